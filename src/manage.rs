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
            let policy = options
                .positional()
                .ok_or("nvmirror set-policy suspend|fail [--socket PATH | --config FILE]")?;
            (
                "nvmirror_set_policy".to_string(),
                json!({ "policy": policy }),
            )
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
                "  destination is {}{} (peer_loss_policy {})",
                peer["state"].as_str().unwrap_or("?"),
                peer["reason"]
                    .as_str()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default(),
                peer["policy"].as_str().unwrap_or("?")
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
