//! SPDK's parsed JSON (`spdk_json_val` arrays) as `serde_json` values, so RPC handlers are plain
//! Rust over serde.

use serde_json::{Map, Number, Value};

use crate::sys;

use sys::spdk_json_val_type as kind;

fn text(val: &sys::spdk_json_val) -> &[u8] {
    if val.len == 0 {
        return &[];
    }
    // SAFETY: for strings, names and numbers SPDK's parser points `start` at `len` bytes of
    // the (decoded) request buffer, alive while the handler runs.
    unsafe { std::slice::from_raw_parts(val.start as *const u8, val.len as usize) }
}

/// Converts the value starting at `vals[0]`; returns it and how many entries it spans.
fn convert(vals: &[sys::spdk_json_val]) -> Result<(Value, usize), String> {
    let val = vals.first().ok_or("truncated JSON value")?;
    match val.type_ {
        kind::SPDK_JSON_VAL_NULL => Ok((Value::Null, 1)),
        kind::SPDK_JSON_VAL_TRUE => Ok((Value::Bool(true), 1)),
        kind::SPDK_JSON_VAL_FALSE => Ok((Value::Bool(false), 1)),
        kind::SPDK_JSON_VAL_STRING => Ok((
            Value::String(String::from_utf8_lossy(text(val)).into_owned()),
            1,
        )),
        kind::SPDK_JSON_VAL_NUMBER => {
            let digits = std::str::from_utf8(text(val)).map_err(|e| e.to_string())?;
            let number: Number = serde_json::from_str(digits)
                .map_err(|e| format!("bad JSON number '{digits}': {e}"))?;
            Ok((Value::Number(number), 1))
        }
        kind::SPDK_JSON_VAL_ARRAY_BEGIN | kind::SPDK_JSON_VAL_OBJECT_BEGIN => {
            // `len` counts the entries between the begin and its end.
            let inner = val.len as usize;
            let body = vals.get(1..1 + inner).ok_or("truncated JSON container")?;
            let mut at = 0;
            if val.type_ == kind::SPDK_JSON_VAL_ARRAY_BEGIN {
                let mut items = Vec::new();
                while at < inner {
                    let (item, used) = convert(&body[at..])?;
                    items.push(item);
                    at += used;
                }
                Ok((Value::Array(items), inner + 2))
            } else {
                let mut map = Map::new();
                while at < inner {
                    let name = &body[at];
                    if name.type_ != kind::SPDK_JSON_VAL_NAME {
                        return Err("JSON object member without a name".into());
                    }
                    let key = String::from_utf8_lossy(text(name)).into_owned();
                    let (item, used) = convert(&body[at + 1..])?;
                    map.insert(key, item);
                    at += 1 + used;
                }
                Ok((Value::Object(map), inner + 2))
            }
        }
        other => Err(format!("unexpected JSON entry of type {other}")),
    }
}

/// The params of a request (`None`: the request had none).
///
/// # Safety
/// `params` is null or points at a parsed value as SPDK hands it to an RPC handler (its entries
/// contiguous, alive for the call).
pub unsafe fn params_value(params: *const sys::spdk_json_val) -> Result<Option<Value>, String> {
    if params.is_null() {
        return Ok(None);
    }
    // SAFETY: per the contract, params[0] is valid; a container spans len + 2 entries.
    let first = unsafe { &*params };
    let count = match first.type_ {
        kind::SPDK_JSON_VAL_ARRAY_BEGIN | kind::SPDK_JSON_VAL_OBJECT_BEGIN => {
            first.len as usize + 2
        }
        _ => 1,
    };
    // SAFETY: `count` entries are contiguous from `params` (the contract above).
    let vals = unsafe { std::slice::from_raw_parts(params, count) };
    convert(vals).map(|(value, _)| Some(value))
}
