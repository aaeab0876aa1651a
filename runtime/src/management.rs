//! The management interface: JSON-RPC 2.0 over a Unix stream socket, as SPDK's RPC server speaks it
//! (`lib/rpc`, `lib/jsonrpc`): one JSON object per request, no framing beyond JSON itself (a
//! newline between objects is allowed, not needed), a reply per request that carries an `id`, SPDK's
//! error codes. So `rpc.py -s SOCKET METHOD` and our own client (`nvmirror status` and friends) both
//! work, and the SPDK runtime can register the same methods with SPDK's server later.
//!
//! The server runs on a thread of its own, never on a reactor: a method reaches a node through its
//! [`NodeControl`] (mailbox commands and published state), the same way signals do.

use std::io::{self, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::node::{Command, NodeControl, PeerStatus};
use nvmirror_engine::counters::Counters;
use nvmirror_engine::generation::{Generations, Hex, ResyncKind, FLAG_RESYNC_TARGET};
use nvmirror_engine::liveness::{PeerLossPolicy, PeerState};

/// JSON-RPC 2.0 error codes (the spec's, which SPDK uses too).
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
pub const METHOD_NOT_FOUND: i64 = -32601;
pub const INVALID_PARAMS: i64 = -32602;
pub const INTERNAL_ERROR: i64 = -32603;

/// Connections served at once; one more is refused with a message (a management client that
/// leaks connections must not exhaust threads).
pub const CONNECTIONS_MAX: usize = 8;
/// An idle connection is closed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request larger than this is refused (no method takes more than a few hundred bytes).
pub const REQUEST_BYTES_MAX: u64 = 1 << 20;
/// How long `nvmirror_get_stats` waits for a node to publish fresh counters.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `nvmirror_cp` with `"wait": true` waits for the CP at most unless told otherwise.
pub const CP_WAIT_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// Why the last online promotion of this process was refused (shown by `nvmirror_get_status`).
pub static LAST_PROMOTE_ERROR: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A method's failure: a JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(INVALID_PARAMS, message)
    }
}

/// What a server dispatches to: every method by name.
pub trait Methods: Send + Sync + 'static {
    /// The method names, for `rpc_get_methods`.
    fn names(&self) -> Vec<&'static str>;
    fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError>;
}

/// Handles one decoded request; `None` for a notification (no `id`: JSON-RPC sends no reply).
pub fn handle_request(methods: &dyn Methods, request: &Value) -> Option<Value> {
    let id = request.get("id").cloned();
    let reply = |outcome: Result<Value, RpcError>| {
        let id = id.clone().unwrap_or(Value::Null);
        match outcome {
            Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
            Err(e) => json!({"jsonrpc": "2.0", "id": id,
                             "error": {"code": e.code, "message": e.message}}),
        }
    };
    let Some(object) = request.as_object() else {
        return Some(reply(Err(RpcError::new(
            INVALID_REQUEST,
            "a request is a JSON object",
        ))));
    };
    if object.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(reply(Err(RpcError::new(
            INVALID_REQUEST,
            "\"jsonrpc\": \"2.0\" is required",
        ))));
    }
    let Some(method) = object.get("method").and_then(Value::as_str) else {
        return Some(reply(Err(RpcError::new(
            INVALID_REQUEST,
            "\"method\" must be a string",
        ))));
    };
    let params = object.get("params").cloned().unwrap_or(Value::Null);
    if !(params.is_null() || params.is_object()) {
        return Some(reply(Err(RpcError::invalid_params(
            "params must be an object (named parameters, as SPDK's methods take)",
        ))));
    }
    let outcome = if method == "rpc_get_methods" {
        let mut names = methods.names();
        names.push("rpc_get_methods");
        names.sort_unstable();
        Ok(json!(names))
    } else {
        methods.call(method, &params)
    };
    id.is_some().then(|| reply(outcome))
}

/// A running server: the socket file is removed when it stops.
pub struct RpcServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RpcServer {
    /// Listens on `path`. A socket file nobody answers on (left by a killed process) is replaced;
    /// one a live server answers on is an error, as in SPDK ("RPC socket path in use").
    pub fn start(path: &Path, methods: Arc<dyn Methods>) -> io::Result<RpcServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "management socket {} is in use by a running nvmirror; give this one another (config key 'rpc_socket' or --rpc-socket)",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("management socket {}: {e}", path.display()),
            )
        })?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("management".into())
                .spawn(move || accept_loop(listener, methods, &stop))?
        };
        log::info!("management: JSON-RPC 2.0 on {}", path.display());
        Ok(RpcServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Accept polling period: the stop flag is seen this soon.
const ACCEPT_POLL: Duration = Duration::from_millis(20);

fn accept_loop(listener: UnixListener, methods: Arc<dyn Methods>, stop: &AtomicBool) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                if active.load(Ordering::Acquire) >= CONNECTIONS_MAX {
                    let busy = json!({"jsonrpc": "2.0", "id": null, "error": {
                        "code": INTERNAL_ERROR,
                        "message": format!("{CONNECTIONS_MAX} management connections are open already")}});
                    let _ = writeln!(stream, "{busy}");
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let methods = methods.clone();
                let active = active.clone();
                let spawned = std::thread::Builder::new()
                    .name("management-connection".into())
                    .spawn(move || {
                        if let Err(e) = serve_connection(stream, methods.as_ref()) {
                            log::debug!("management: connection ended: {e}");
                        }
                        active.fetch_sub(1, Ordering::AcqRel);
                    });
                if let Err(e) = spawned {
                    log::warn!("management: cannot serve a connection: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                log::warn!("management: accept failed: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Reads JSON values off the stream one after the other and answers each.
fn serve_connection(stream: UnixStream, methods: &dyn Methods) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    let reader = BufReader::new(io::Read::take(stream, REQUEST_BYTES_MAX));
    for value in serde_json::Deserializer::from_reader(reader).into_iter::<Value>() {
        let request = match value {
            Ok(request) => request,
            Err(e) if e.is_eof() => return Ok(()),
            Err(e) if e.is_io() => return Err(io::Error::other(e)),
            Err(e) => {
                // Bytes that are not JSON leave no way to find the next request: answer, close.
                let error = json!({"jsonrpc": "2.0", "id": null,
                                   "error": {"code": PARSE_ERROR, "message": e.to_string()}});
                writeln!(writer, "{error}")?;
                return Ok(());
            }
        };
        if let Some(reply) = handle_request(methods, &request) {
            writeln!(writer, "{reply}")?;
        }
    }
    Ok(())
}

/// Sends one request to a server and returns its `result` (or its error as a message).
pub fn call(path: &Path, method: &str, params: Value) -> Result<Value, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the management socket {}: {e} (is nvmirror running? its log names the socket)",
            path.display()
        )
    })?;
    stream
        .set_read_timeout(Some(Duration::from_millis(CP_WAIT_TIMEOUT_MS_DEFAULT) * 2))
        .map_err(|e| e.to_string())?;
    let request = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    writeln!(stream, "{request}").map_err(|e| format!("sending the request: {e}"))?;
    let reply: Value = serde_json::Deserializer::from_reader(BufReader::new(&stream))
        .into_iter::<Value>()
        .next()
        .ok_or("the server closed the connection without a reply")?
        .map_err(|e| format!("reading the reply: {e}"))?;
    if let Some(error) = reply.get("error") {
        return Err(format!(
            "{method} failed: {} (code {})",
            error.get("message").and_then(Value::as_str).unwrap_or("?"),
            error.get("code").and_then(Value::as_i64).unwrap_or(0)
        ));
    }
    reply
        .get("result")
        .cloned()
        .ok_or_else(|| format!("a reply without result or error: {reply}"))
}

/// One node of this process as the methods see it.
pub struct ManagedNode {
    /// "source" or "destination".
    pub role: &'static str,
    /// Where the node publishes its state.
    pub control: Arc<NodeControl>,
    /// Whose mailbox the node's reactor drains: its own, or for a source and destination
    /// sharing one reactor, the pair's (which hands each command to both).
    pub commands: Arc<NodeControl>,
}

/// The methods of a process running one volume's nodes.
pub struct NodeMethods {
    pub volume: String,
    pub nodes: Vec<ManagedNode>,
}

impl NodeMethods {
    fn source(&self) -> Result<&ManagedNode, RpcError> {
        self.nodes
            .iter()
            .find(|node| node.role == "source")
            .ok_or_else(|| RpcError::new(INTERNAL_ERROR, "this process runs no source"))
    }

    fn status(&self) -> Result<Value, RpcError> {
        let mut nodes = Vec::new();
        for node in &self.nodes {
            let counters = fresh_counters(node)?;
            nodes.push(node_status_json(node.role, &node.control, &counters));
        }
        let promote_error = LAST_PROMOTE_ERROR.lock().unwrap().clone();
        Ok(json!({"volume": self.volume, "nodes": nodes, "promote_error": promote_error}))
    }

    fn stats(&self) -> Result<Value, RpcError> {
        let mut out = Map::new();
        for node in &self.nodes {
            let counters = fresh_counters(node)?;
            let fields: Value = serde_json::from_str(&counters.to_json())
                .map_err(|e| RpcError::new(INTERNAL_ERROR, e.to_string()))?;
            out.insert(node.role.to_string(), fields);
        }
        Ok(json!({"volume": self.volume, "counters": out}))
    }

    fn cp(&self, params: &Value) -> Result<Value, RpcError> {
        only_params(params, &["wait", "timeout_ms"])?;
        let wait = optional_bool(params, "wait")?.unwrap_or(false);
        let timeout_ms = optional_u64(params, "timeout_ms")?.unwrap_or(CP_WAIT_TIMEOUT_MS_DEFAULT);
        let source = self.source()?;
        let control = &source.control;
        let seen = control.cp_requests_seen.load(Ordering::Acquire);
        source
            .commands
            .send(Command::RequestCp)
            .map_err(|e| RpcError::new(INTERNAL_ERROR, e))?;
        if !wait {
            return Ok(json!({"requested": true}));
        }
        // Done once a CP made every write completed before the request durable on both sides:
        // the node notes which CP that is when it takes the request.
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        loop {
            let needed = (control.cp_requests_seen.load(Ordering::Acquire) > seen)
                .then(|| control.cp_requested_number.load(Ordering::Acquire));
            let durable = control.cp_durable_number.load(Ordering::Acquire);
            if needed.is_some_and(|needed| durable >= needed) {
                return Ok(json!({"requested": true, "cp_number": durable}));
            }
            if Instant::now() >= deadline {
                return Err(RpcError::new(
                    INTERNAL_ERROR,
                    format!(
                        "no CP completed within {timeout_ms} ms (is the destination reachable?); the writes stay in the NVRAM ring"
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl NodeMethods {
    fn set_policy(&self, params: &Value) -> Result<Value, RpcError> {
        only_params(params, &["policy"])?;
        let name = params_object(params)?
            .and_then(|map| map.get("policy"))
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params("'policy' (a string) is required"))?;
        let policy = match name {
            "suspend" => PeerLossPolicy::Suspend,
            "fail" => PeerLossPolicy::Fail,
            "degrade" => PeerLossPolicy::Degrade,
            other => {
                return Err(RpcError::invalid_params(format!(
                    "policy '{other}': one of suspend, fail, degrade"
                )))
            }
        };
        let source = self.source()?;
        source
            .commands
            .send(Command::SetPeerLossPolicy(policy))
            .map_err(|e| RpcError::new(INTERNAL_ERROR, e))?;
        fresh_counters(source)?;
        Ok(json!({"policy": policy.name()}))
    }
}

impl Methods for NodeMethods {
    fn names(&self) -> Vec<&'static str> {
        vec![
            "nvmirror_get_status",
            "nvmirror_get_stats",
            "nvmirror_cp",
            "nvmirror_set_policy",
            "nvmirror_promote",
            "nvmirror_attach",
        ]
    }

    fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
        match method {
            "nvmirror_get_status" => {
                no_params(params)?;
                self.status()
            }
            "nvmirror_get_stats" => {
                no_params(params)?;
                self.stats()
            }
            "nvmirror_cp" => self.cp(params),
            "nvmirror_set_policy" => self.set_policy(params),
            "nvmirror_attach" => {
                only_params(params, &["peer"])?;
                let peer: std::net::SocketAddr = params_object(params)?
                    .and_then(|map| map.get("peer"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| RpcError::invalid_params("'peer' (\"ADDR:PORT\") is required"))?
                    .parse()
                    .map_err(|_| {
                        RpcError::invalid_params("'peer' is not an address like 127.0.0.1:4800")
                    })?;
                let source = self.source()?;
                source
                    .commands
                    .send(Command::Attach(peer))
                    .map_err(|e| RpcError::new(INTERNAL_ERROR, e))?;
                Ok(json!({"peer": peer.to_string()}))
            }
            "nvmirror_promote" => {
                no_params(params)?;
                let destination = self
                    .nodes
                    .iter()
                    .find(|node| node.role == "destination")
                    .ok_or_else(|| {
                        RpcError::new(INTERNAL_ERROR, "this process runs no destination")
                    })?;
                if self.nodes.len() > 1 {
                    return Err(RpcError::new(
                        INTERNAL_ERROR,
                        "the embedded pair's destination is not promoted (its source is here)",
                    ));
                }
                destination
                    .control
                    .promote_requested
                    .store(true, Ordering::Release);
                Ok(json!({"promoting": true}))
            }
            other => Err(RpcError::new(
                METHOD_NOT_FOUND,
                format!("no method '{other}' (rpc_get_methods lists them)"),
            )),
        }
    }
}

/// One node's status as `nvmirror_get_status` shows it (both runtimes), from its published
/// state and fresh counters.
pub fn node_status_json(role: &str, control: &NodeControl, counters: &Counters) -> Value {
    let link = *control.link.lock().unwrap();
    let peer_status = *control.peer.lock().unwrap();
    let peer = peer_status.map(|peer| {
        let (state, since_us, reason) = match peer.state {
            PeerState::Connected { since_us } => ("connected", since_us, None),
            PeerState::Disconnected { since_us } => ("disconnected", since_us, None),
            PeerState::Lost { since_us, reason } => ("lost", since_us, Some(reason.to_string())),
        };
        json!({"state": state, "since_us": since_us, "reason": reason,
               "policy": peer.policy.name()})
    });
    let generations = control.generations.lock().unwrap().map(generations_json);
    let mut fields = json!({
        "role": role,
        "peer": peer,
        "link_connected": link.connected,
        "link_connects": link.connects,
        "link_disconnects": link.disconnects,
        "cp_completed": control.cp_completed.load(Ordering::Acquire),
        "ring_used_bytes": counters.ring_used_bytes,
        "ring_size_bytes": counters.ring_size_bytes,
        "device_error_count": counters.device_error_count,
        "cp_failure_count": counters.cp_failure_count,
        "refused": control.rejected.lock().unwrap().clone(),
        "generations": generations,
    });
    if let Some(peer) = peer_status {
        fields["degraded"] = json!(peer.degraded);
        fields["resync"] = resync_json(&peer, counters);
    }
    fields
}

/// A node's generations as status shows them: hex ids (as the log prints them), 0 for none.
fn generations_json(generations: Generations) -> Value {
    json!({
        "current": Hex(generations.current).to_string(),
        "bitmap_base": Hex(generations.bitmap_base).to_string(),
        "history": generations.history.iter().filter(|&&g| g != 0)
            .map(|&g| Hex(g).to_string()).collect::<Vec<_>>(),
        // A destination in the middle of a resync holds no point-in-time image.
        "resync_target": generations.flags & FLAG_RESYNC_TARGET != 0,
    })
}

/// A source's resync: the one running (progress, rate, ETA), else the last one's figures.
fn resync_json(peer: &PeerStatus, counters: &Counters) -> Value {
    let mut resync = json!({
        "active": peer.resync.is_some(),
        "count": counters.resync_count,
        "bytes_done": counters.resync_bytes_done,
        "bytes_total": counters.resync_bytes_total,
        "reference_blocks": counters.resync_reference_blocks,
        "data_blocks": counters.resync_data_blocks,
        "wire_bytes": counters.resync_wire_bytes,
    });
    if let Some(status) = peer.resync {
        let (percent, mib_s, eta_s) = status.rates(peer.now_us);
        resync["kind"] = json!(match status.kind {
            ResyncKind::Bitmap => "bitmap",
            ResyncKind::Full => "full",
        });
        resync["percent"] = json!((percent * 10.0).round() / 10.0);
        resync["bytes_done"] = json!(status.bytes_done);
        resync["bytes_total"] = json!(status.bytes_total);
        resync["mib_s"] = json!((mib_s * 10.0).round() / 10.0);
        resync["eta_s"] = json!(eta_s.map(|s| s.ceil()));
        resync["references_done"] = json!(status.references_done);
    }
    resync
}

/// Asks a node to publish its counters and waits until it did.
fn fresh_counters(node: &ManagedNode) -> Result<Counters, RpcError> {
    let control = &node.control;
    let before = control.published.load(Ordering::Acquire);
    node.commands
        .send(Command::PublishCounters)
        .map_err(|e| RpcError::new(INTERNAL_ERROR, e))?;
    let deadline = Instant::now() + PUBLISH_TIMEOUT;
    while control.published.load(Ordering::Acquire) == before {
        if Instant::now() >= deadline {
            return Err(RpcError::new(
                INTERNAL_ERROR,
                format!(
                    "the node did not publish its counters within {} ms (reactor stuck?)",
                    PUBLISH_TIMEOUT.as_millis()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(control
        .counters
        .lock()
        .unwrap()
        .expect("published counters are set before the count moves"))
}

fn params_object(params: &Value) -> Result<Option<&Map<String, Value>>, RpcError> {
    match params {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(map)),
        _ => Err(RpcError::invalid_params("params must be an object")),
    }
}

fn no_params(params: &Value) -> Result<(), RpcError> {
    only_params(params, &[])
}

/// Refuses a parameter the method does not take (a typo must not pass silently).
fn only_params(params: &Value, known: &[&str]) -> Result<(), RpcError> {
    let unknown = params_object(params)?
        .and_then(|map| map.keys().find(|key| !known.contains(&key.as_str())));
    match unknown {
        Some(key) if known.is_empty() => Err(RpcError::invalid_params(format!(
            "this method takes no parameter '{key}'"
        ))),
        Some(key) => Err(RpcError::invalid_params(format!(
            "unknown parameter '{key}' (this method takes {})",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

fn optional_bool(params: &Value, key: &str) -> Result<Option<bool>, RpcError> {
    match params_object(params)?.and_then(|map| map.get(key)) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(RpcError::invalid_params(format!(
            "'{key}' must be true or false, not {other}"
        ))),
    }
}

fn optional_u64(params: &Value, key: &str) -> Result<Option<u64>, RpcError> {
    match params_object(params)?.and_then(|map| map.get(key)) {
        None => Ok(None),
        Some(value) => value.as_u64().map(Some).ok_or_else(|| {
            RpcError::invalid_params(format!(
                "'{key}' must be a non-negative integer, not {value}"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Methods for Echo {
        fn names(&self) -> Vec<&'static str> {
            vec!["echo"]
        }
        fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(params.clone()),
                _ => Err(RpcError::new(METHOD_NOT_FOUND, "no such method")),
            }
        }
    }

    fn error_code(reply: &Value) -> i64 {
        reply["error"]["code"].as_i64().unwrap()
    }

    #[test]
    fn requests_are_answered_with_their_id_and_errors_with_the_spec_codes() {
        let ok = handle_request(
            &Echo,
            &json!({"jsonrpc": "2.0", "id": 7, "method": "echo", "params": {"a": 1}}),
        )
        .unwrap();
        assert_eq!(ok, json!({"jsonrpc": "2.0", "id": 7, "result": {"a": 1}}));
        let missing = handle_request(
            &Echo,
            &json!({"jsonrpc": "2.0", "id": "x", "method": "nope"}),
        )
        .unwrap();
        assert_eq!(error_code(&missing), METHOD_NOT_FOUND);
        assert_eq!(missing["id"], json!("x"));
        let old = handle_request(&Echo, &json!({"id": 1, "method": "echo"})).unwrap();
        assert_eq!(error_code(&old), INVALID_REQUEST);
        let positional = handle_request(
            &Echo,
            &json!({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": [1]}),
        )
        .unwrap();
        assert_eq!(error_code(&positional), INVALID_PARAMS);
        let not_object = handle_request(&Echo, &json!([1, 2])).unwrap();
        assert_eq!(error_code(&not_object), INVALID_REQUEST);
        // A notification (no id) is executed and not answered.
        assert!(handle_request(&Echo, &json!({"jsonrpc": "2.0", "method": "echo"})).is_none());
        let methods = handle_request(
            &Echo,
            &json!({"jsonrpc": "2.0", "id": 2, "method": "rpc_get_methods"}),
        )
        .unwrap();
        assert_eq!(methods["result"], json!(["echo", "rpc_get_methods"]));
    }

    #[test]
    fn a_socket_serves_back_to_back_objects_and_refuses_a_second_server() {
        let dir = std::env::temp_dir().join(format!("nvmirror-rpc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rpc.sock");
        let server = RpcServer::start(&path, Arc::new(Echo)).unwrap();
        assert_eq!(
            call(&path, "echo", json!({"x": [1, 2]})).unwrap(),
            json!({"x": [1, 2]})
        );
        // Two requests in one write without a separator, as a streaming client may send them.
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .write_all(br#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"n":1}}{"jsonrpc":"2.0","id":2,"method":"echo","params":{"n":2}}"#)
            .unwrap();
        let replies: Vec<Value> = serde_json::Deserializer::from_reader(&stream)
            .into_iter::<Value>()
            .take(2)
            .map(Result::unwrap)
            .collect();
        assert_eq!(replies[0]["result"], json!({"n": 1}));
        assert_eq!(replies[1]["result"], json!({"n": 2}));
        let error = call(&path, "nope", Value::Null).unwrap_err();
        assert!(error.contains("-32601"), "{error}");
        let second = RpcServer::start(&path, Arc::new(Echo)).err().unwrap();
        assert_eq!(second.kind(), io::ErrorKind::AddrInUse);
        drop(server);
        assert!(!path.exists(), "the socket file goes with the server");
        // A socket file left behind by a killed process is replaced.
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let again = RpcServer::start(&path, Arc::new(Echo)).unwrap();
        assert_eq!(call(&path, "echo", json!(null)).unwrap(), json!(null));
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
