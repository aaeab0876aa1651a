//! JSON-RPC methods in SPDK's RPC server, written in Rust: a handler takes the params as a
//! `serde_json::Value` and answers through a [`Responder`], at once or later (a method that
//! waits for a CP answers from a poller).

use std::ffi::CString;
use std::sync::Mutex;

use serde_json::Value;

use crate::json::params_value;
use crate::sys;

/// JSON-RPC error codes (SPDK's).
pub const INVALID_PARAMS: i32 = -32602;
pub const INTERNAL_ERROR: i32 = -32603;
pub const INVALID_STATE: i32 = -1;

/// Answers one request, once. Must be used on the thread the request came on (the app thread).
pub struct Responder {
    request: *mut sys::spdk_jsonrpc_request,
}

impl Responder {
    pub fn ok(self, result: Value) {
        let text = result.to_string();
        // SAFETY: the request is live until answered; answered once (self is consumed). The
        // write context is ended before anything else touches the request.
        unsafe {
            let w = sys::spdk_jsonrpc_begin_result(self.request);
            if w.is_null() {
                return; // a notification: no answer wanted
            }
            sys::spdk_json_write_val_raw(w, text.as_ptr().cast(), text.len());
            sys::spdk_jsonrpc_end_result(self.request, w);
        }
    }

    pub fn error(self, code: i32, message: &str) {
        let message = CString::new(message.replace('\0', " ")).expect("no NUL left");
        // SAFETY: as in `ok`; the message is copied by SPDK before the call returns.
        unsafe { sys::spdk_jsonrpc_send_error_response(self.request, code, message.as_ptr()) };
    }

    /// `Ok` as the result, `Err((code, message))` as the error.
    pub fn answer(self, result: Result<Value, (i32, String)>) {
        match result {
            Ok(value) => self.ok(value),
            Err((code, message)) => self.error(code, &message),
        }
    }
}

/// A method handler: the params (`None`: none given) and the request's responder.
pub type Handler = fn(Option<Value>, Responder);

const METHODS_MAX: usize = 16;

static HANDLERS: Mutex<Vec<Handler>> = Mutex::new(Vec::new());

unsafe extern "C" fn dispatch<const N: usize>(
    request: *mut sys::spdk_jsonrpc_request,
    params: *const sys::spdk_json_val,
) {
    let responder = Responder { request };
    let Some(handler) = HANDLERS.lock().unwrap().get(N).copied() else {
        responder.error(INTERNAL_ERROR, "no handler");
        return;
    };
    // SAFETY: SPDK passes this handler its request's parsed params (or null).
    match unsafe { params_value(params) } {
        Ok(params) => handler(params, responder),
        Err(reason) => responder.error(INVALID_PARAMS, &reason),
    }
}

macro_rules! trampolines {
    ($($n:literal)*) => { [$(dispatch::<$n> as unsafe extern "C" fn(_, _)),*] };
}

/// Registers `method` for the states in `state_mask` (`STARTUP`: usable from a JSON config;
/// `RUNTIME`: after start). Call before the app starts.
pub fn register(method: &str, state_mask: u32, handler: Handler) {
    const TRAMPOLINES: [unsafe extern "C" fn(
        *mut sys::spdk_jsonrpc_request,
        *const sys::spdk_json_val,
    ); METHODS_MAX] = trampolines!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
    let index = {
        let mut handlers = HANDLERS.lock().unwrap();
        handlers.push(handler);
        handlers.len() - 1
    };
    assert!(index < METHODS_MAX, "more than {METHODS_MAX} RPC methods");
    // SPDK keeps the method name's pointer: the name lives for the program.
    let name: &'static CString = Box::leak(Box::new(CString::new(method).expect("no NUL")));
    // SAFETY: the name is static; the trampoline is a valid handler for the program's life.
    unsafe { sys::spdk_rpc_register_method(name.as_ptr(), Some(TRAMPOLINES[index]), state_mask) };
}

pub const STARTUP: u32 = 0x1;
pub const RUNTIME: u32 = 0x2;
