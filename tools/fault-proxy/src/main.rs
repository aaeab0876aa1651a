//! `nvmirror-fault-proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT [--at 2s stall]
//! [--at 5s heal] [--after-bytes 1048576 drop] ...`: the loopback fault proxy of
//! [`nvmirror_fault_proxy`] as a process. It prints one line with the address it listens on
//! (useful with port 0), then runs the script and forwards until it is killed.

use std::net::SocketAddr;

use nvmirror_fault_proxy::{parse_script, FaultProxy};

const USAGE: &str =
    "usage: nvmirror-fault-proxy --listen 127.0.0.1:PORT --upstream 127.0.0.1:PORT \
[--at DURATION ACTION | --after-bytes N ACTION]...\n\
ACTION: stall | heal | drop | corrupt | delay=DURATION; DURATION: 2s, 250ms, 100us";

fn address(flag: &str, value: Option<&String>) -> Result<SocketAddr, String> {
    let value = value.ok_or_else(|| format!("{flag} needs an address\n{USAGE}"))?;
    value
        .parse()
        .map_err(|e| format!("{flag} {value}: {e} (want 127.0.0.1:PORT)"))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut listen, mut upstream, mut script_args) = (None, None, Vec::new());
    let mut at = 0;
    while at < args.len() {
        match args[at].as_str() {
            "--listen" => {
                listen = Some(address("--listen", args.get(at + 1))?);
                at += 2;
            }
            "--upstream" => {
                upstream = Some(address("--upstream", args.get(at + 1))?);
                at += 2;
            }
            "--help" | "-h" => return Err(USAGE.into()),
            _ => {
                script_args.extend(args[at..args.len().min(at + 3)].iter().cloned());
                at += 3;
            }
        }
    }
    let script = parse_script(&script_args).map_err(|e| format!("{e}\n{USAGE}"))?;
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    let upstream = upstream.ok_or_else(|| format!("--upstream is required\n{USAGE}"))?;
    let proxy = FaultProxy::start(listen, upstream, script).map_err(|e| e.to_string())?;
    println!(
        "fault-proxy: listening on {}, forwarding to {upstream}",
        proxy.local_addr()
    );
    proxy.wait();
    Ok(())
}

fn main() {
    if let Err(error) = run() {
        eprintln!("nvmirror-fault-proxy: {error}");
        std::process::exit(2);
    }
}
