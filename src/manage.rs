//! The management commands: the JSON-RPC server a running process opens (runtime/src/management.rs)
//! and its command-line client, `nvmirror status | stats | cp | rpc`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nvmirror_runtime::management::{self, ManagedNode, NodeMethods, RpcServer};
use nvmirror_runtime::node::NodeControl;
use serde_json::{json, Value};

use crate::config::{Config, RPC_SOCKET_EMBEDDED};
use crate::Options;

/// A node of this process: its role, the control it publishes to, the control whose mailbox
/// its reactor drains.
pub type Node<'a> = (&'static str, &'a Arc<NodeControl>, &'a Arc<NodeControl>);

/// Opens the management socket for this process's nodes of `volume`.
pub fn start_server(path: &Path, volume: &str, nodes: &[Node]) -> Result<RpcServer, String> {
    let methods = NodeMethods {
        volume: volume.to_string(),
        nodes: nodes
            .iter()
            .map(|(role, control, commands)| ManagedNode {
                role,
                control: Arc::clone(control),
                commands: Arc::clone(commands),
            })
            .collect(),
    };
    let server = RpcServer::start(path, Arc::new(methods)).map_err(|e| e.to_string())?;
    println!(
        "  management:     nvmirror status --socket {}",
        path.display()
    );
    Ok(server)
}

/// Which socket a client command talks to: `--socket PATH`, or the one `--config FILE` names,
/// or the embedded default's.
fn socket(options: &mut Options) -> Result<PathBuf, String> {
    if let Some(path) = options.value("--socket")? {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = options.value("--config")? {
        let config = Config::load(Path::new(&path)).map_err(|e| e.to_string())?;
        return Ok(config.rpc_socket_path());
    }
    Ok(PathBuf::from(RPC_SOCKET_EMBEDDED))
}

/// `nvmirror status|stats|cp|rpc ...`.
pub fn run_client(command: &str, options: &mut Options) -> Result<(), String> {
    let path = socket(options)?;
    let json_out = options.flag("--json");
    let (method, params) = match command {
        "status" => ("nvmirror_get_status".to_string(), Value::Null),
        "stats" => ("nvmirror_get_stats".to_string(), Value::Null),
        "cp" => {
            let wait = options.flag("--wait");
            let mut params = json!({ "wait": wait });
            if let Some(ms) = options.value("--timeout-ms")? {
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("--timeout-ms: '{ms}' is not a number"))?;
                params["timeout_ms"] = json!(ms);
            }
            ("nvmirror_cp".to_string(), params)
        }
        "set-policy" => {
            let policy = options.positional().ok_or(
                "nvmirror set-policy suspend|fail|degrade [--socket PATH | --config FILE]",
            )?;
            (
                "nvmirror_set_policy".to_string(),
                json!({ "policy": policy }),
            )
        }
        "attach" => {
            let peer = options
                .positional()
                .ok_or("nvmirror attach ADDR:PORT [--socket PATH | --config FILE]")?;
            ("nvmirror_attach".to_string(), json!({ "peer": peer }))
        }
        "rpc" => {
            let method = options
                .positional()
                .ok_or("nvmirror rpc METHOD ['{\"param\": value}']")?;
            let params = match options.positional() {
                Some(text) => {
                    serde_json::from_str(&text).map_err(|e| format!("params are not JSON: {e}"))?
                }
                None => Value::Null,
            };
            (method, params)
        }
        other => unreachable!("not a client command: {other}"),
    };
    options.finish()?;
    let result = management::call(&path, &method, params)?;
    if json_out || command == "rpc" {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("a Value prints")
        );
        return Ok(());
    }
    match command {
        "status" => print_status(&result),
        "stats" => print_stats(&result),
        _ => println!("{result}"),
    }
    Ok(())
}

fn print_status(status: &Value) {
    println!("volume {}", status["volume"].as_str().unwrap_or("?"));
    for node in status["nodes"].as_array().into_iter().flatten() {
        let peer = &node["peer"];
        if peer.is_object() {
            println!(
                "  destination is {}{} (peer_loss_policy {}){}",
                peer["state"].as_str().unwrap_or("?"),
                peer["reason"]
                    .as_str()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default(),
                peer["policy"].as_str().unwrap_or("?"),
                if node["degraded"].as_bool() == Some(true) {
                    "; DEGRADED: writes complete on the source alone, their extents marked"
                } else {
                    ""
                }
            );
        }
        println!(
            "  {:<12} link {:<12} cp_completed {}  ring {} / {} bytes  device errors {}  cp failures {}{}",
            node["role"].as_str().unwrap_or("?"),
            if node["link_connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "disconnected"
            },
            node["cp_completed"],
            node["ring_used_bytes"],
            node["ring_size_bytes"],
            node["device_error_count"],
            node["cp_failure_count"],
            match node["refused"].as_str() {
                Some(reason) => format!("  REFUSED: {reason}"),
                None => String::new(),
            }
        );
        let line = [
            generations_text(&node["generations"]),
            resync_text(&node["resync"]),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("; ");
        if !line.is_empty() {
            println!("  {:<12} {line}", "");
        }
    }
}

/// "generation G (bitmap counts changes since B)", and a destination being resynced says so.
fn generations_text(generations: &Value) -> Option<String> {
    let current = generations["current"].as_str()?;
    let mut text = format!("generation {current}");
    match generations["bitmap_base"].as_str() {
        Some(base) if base.bytes().any(|b| b != b'0') => {
            text += &format!(" (bitmap counts changes since {base})")
        }
        _ => {}
    }
    if generations["resync_target"].as_bool() == Some(true) {
        text += ", RESYNC TARGET: this mirror is no point-in-time image until the resync ends";
    }
    Some(text)
}

/// The running resync (percent, MiB, rate, ETA), or what the last one did.
fn resync_text(resync: &Value) -> Option<String> {
    let mib = |key: &str| resync[key].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    let blocks = format!(
        "{} blocks as references, {} as data",
        resync["reference_blocks"], resync["data_blocks"]
    );
    if resync["active"].as_bool()? {
        return Some(format!(
            "resync ({}) {}% ({:.1} of {:.1} MiB), {} MiB/s, ETA {}, {blocks}",
            resync["kind"].as_str().unwrap_or("?"),
            resync["percent"],
            mib("bytes_done"),
            mib("bytes_total"),
            resync["mib_s"],
            match resync["eta_s"].as_f64() {
                Some(s) => format!("{s} s"),
                None => "unknown".to_string(),
            },
        ));
    }
    match resync["count"].as_u64()? {
        0 => Some("no resync yet".to_string()),
        count => Some(format!(
            "{count} resync(s) done, the last {:.1} MiB: {blocks}",
            mib("bytes_done")
        )),
    }
}

fn print_stats(stats: &Value) {
    for (role, counters) in stats["counters"].as_object().into_iter().flatten() {
        println!("--- {role} counters ---");
        for (name, value) in counters.as_object().into_iter().flatten() {
            println!("{name} {value}");
        }
    }
}
