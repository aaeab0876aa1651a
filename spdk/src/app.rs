//! The SPDK application: `spdk_app_start` with SPDK's own command-line options, so an operator
//! runs nvmirror's SPDK runtime as they run `nvmf_tgt` (`-m` core mask, `-s` hugepage memory in
//! MiB, `-c` JSON config, `-r` RPC socket, `--huge-dir`, `-L` log flags, ...).

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};

use crate::sys;

type StartFn = Box<dyn FnOnce()>;
/// Called with what ends the app once the runtime is ready for SPDK's subsystems to finish.
type ShutdownFn = Box<dyn FnOnce(Box<dyn FnOnce()>)>;

thread_local! {
    /// Run on the app thread when a signal (or [`stop`]) asks the app to end, before SPDK's
    /// subsystems finish: the runtime stops its nodes while their bdevs still exist.
    static SHUTDOWN: RefCell<Option<ShutdownFn>> = const { RefCell::new(None) };
}

unsafe extern "C" fn app_started(ctx: *mut c_void) {
    // SAFETY: ctx is the Box<StartFn> leaked by `run`, passed to this callback exactly once.
    let start = unsafe { Box::from_raw(ctx as *mut StartFn) };
    start();
}

unsafe extern "C" fn app_shutdown() {
    stop(0);
}

/// Ends the app (on the app thread): the shutdown hook first (it may take its time, e.g. a last
/// CP), then SPDK's subsystems.
pub fn stop(rc: i32) {
    let end: Box<dyn FnOnce()> = Box::new(move || {
        // SAFETY: spdk_app_stop may be called from any SPDK thread while the app runs; a
        // second call is ignored by SPDK.
        unsafe { sys::spdk_app_stop(rc) }
    });
    match SHUTDOWN.with(|hook| hook.borrow_mut().take()) {
        Some(hook) => hook(end),
        None => end(),
    }
}

/// Sets what runs on the app thread when the app is asked to end; it calls the function it is
/// given once the runtime has wound down.
pub fn on_shutdown(hook: impl FnOnce(Box<dyn FnOnce()>) + 'static) {
    SHUTDOWN.with(|slot| *slot.borrow_mut() = Some(Box::new(hook)));
}

/// What [`run`] ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The app ran and stopped with this code (0: clean).
    Stopped(i32),
    /// `--help` was asked for: SPDK printed its usage.
    Help,
}

/// Parses SPDK's options from `args` (`args[0]` is the program name), starts the SPDK app and
/// calls `start` on its first thread once its subsystems (and the JSON config) are up. Returns
/// when the app stopped.
pub fn run(name: &str, args: &[String], start: impl FnOnce() + 'static) -> Result<Outcome, String> {
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    let cargs: Vec<CString> = args
        .iter()
        .map(|arg| CString::new(arg.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("argument with a NUL byte: {e}"))?;
    let mut argv: Vec<*mut c_char> = cargs
        .iter()
        .map(|arg| arg.as_ptr() as *mut c_char)
        .collect();
    argv.push(std::ptr::null_mut());
    let mut opts = sys::spdk_app_opts::default();
    // SAFETY: opts is a plain C struct of the size passed; spdk_app_opts_init fills it.
    unsafe { sys::spdk_app_opts_init(&mut opts, std::mem::size_of::<sys::spdk_app_opts>()) };
    opts.name = cname.as_ptr();
    opts.shutdown_cb = Some(app_shutdown);
    let empty = CString::default();
    // SAFETY: argv holds args.len() valid C strings and a NULL, alive (cargs) across the call;
    // getopt may permute argv's pointers, which it owns for the call. No app-specific options.
    let parsed = unsafe {
        sys::spdk_app_parse_args(
            argv.len() as i32 - 1,
            argv.as_mut_ptr(),
            &mut opts,
            empty.as_ptr(),
            std::ptr::null(),
            Some(no_app_option),
            Some(no_app_usage),
        )
    };
    match parsed {
        sys::spdk_app_parse_args_rvals::SPDK_APP_PARSE_ARGS_SUCCESS => {}
        sys::spdk_app_parse_args_rvals::SPDK_APP_PARSE_ARGS_HELP => return Ok(Outcome::Help),
        _ => return Err("invalid SPDK application options (see --help)".into()),
    }
    let start: Box<StartFn> = Box::new(Box::new(start));
    let ctx = Box::into_raw(start) as *mut c_void;
    // SAFETY: opts was initialized and parsed above; its strings (cname, argv's) outlive the
    // call, which returns only once the app stopped. app_started frees ctx.
    let rc = unsafe { sys::spdk_app_start(&mut opts, Some(app_started), ctx) };
    // SAFETY: called once, after spdk_app_start returned.
    unsafe { sys::spdk_app_fini() };
    Ok(Outcome::Stopped(rc))
}

unsafe extern "C" fn no_app_option(_ch: i32, _arg: *mut c_char) -> i32 {
    -libc::EINVAL
}

unsafe extern "C" fn no_app_usage() {}
