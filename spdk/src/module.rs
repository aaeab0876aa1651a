//! The `nvmirror` bdev module's events, as SPDK reports them: `save_config` asks each module
//! for the calls that recreate what it holds, and every bdev SPDK registers passes through the
//! modules' examination. The runtime sets [`ModuleHooks`] once, before the app starts; the C
//! shim calls back here and reports the examination done itself.

use std::ffi::CStr;
use std::sync::OnceLock;

use crate::sys;

/// What the runtime does at the module's events (on the SPDK thread that raises them).
#[derive(Clone, Copy)]
pub struct ModuleHooks {
    /// The JSON-RPC calls that recreate the module's volumes (SPDK's `save_config`, in the
    /// bdev subsystem's list), each one method object as JSON text.
    pub config: fn() -> Vec<String>,
    /// A bdev named so was registered (any module's, ours included).
    pub bdev_registered: fn(&str),
    /// A bdev nvmirror opened is being removed (hot-removed, or deleted by its module): SPDK
    /// finishes the removal once every descriptor of it is closed.
    pub bdev_removed: fn(&str),
}

static HOOKS: OnceLock<ModuleHooks> = OnceLock::new();

/// Sets the hooks (once; a second call is refused).
pub fn set_hooks(hooks: ModuleHooks) -> Result<(), String> {
    HOOKS
        .set(hooks)
        .map_err(|_| "the nvmirror module's hooks are set already".to_string())?;
    let callbacks = sys::nvmirror_module_callbacks {
        module_init: None,
        module_fini: None,
        config_json: Some(config_json),
        examine_config: Some(examine_config),
    };
    // SAFETY: the shim copies the struct; the functions are 'static.
    unsafe { sys::nvmirror_set_module_callbacks(&callbacks) };
    Ok(())
}

/// Reports the removal of a bdev nvmirror opened (from its descriptor's event callback).
pub(crate) fn base_bdev_removed(name: &str) {
    if let Some(hooks) = HOOKS.get() {
        (hooks.bdev_removed)(name);
    }
}

/// Whether SPDK has a bdev of this name (registered, perhaps still being examined).
pub fn bdev_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated name alive for the call; the bdev is only compared with null.
    !unsafe { sys::spdk_bdev_get_by_name(name.as_ptr()) }.is_null()
}

unsafe extern "C" fn config_json(w: *mut sys::spdk_json_write_ctx) -> i32 {
    let Some(hooks) = HOOKS.get() else {
        return 0;
    };
    for call in (hooks.config)() {
        // SAFETY: w is the writer SPDK passed, inside the bdev subsystem's config array; a
        // raw value is one whole JSON object (serialized by serde_json).
        unsafe { sys::spdk_json_write_val_raw(w, call.as_ptr().cast(), call.len()) };
    }
    0
}

unsafe extern "C" fn examine_config(bdev: *mut sys::spdk_bdev) {
    let Some(hooks) = HOOKS.get() else {
        return;
    };
    // SAFETY: a bdev being registered; its name is a NUL-terminated string it owns.
    let name = unsafe { CStr::from_ptr(sys::spdk_bdev_get_name(bdev)) }.to_string_lossy();
    (hooks.bdev_registered)(&name);
}
