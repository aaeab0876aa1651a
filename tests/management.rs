//! The management interface on running processes: `nvmirror status | stats | cp | rpc` over the
//! JSON-RPC socket each process opens, and the same socket spoken to as SPDK's rpc.py does
//! (one JSON object per request, no newline needed).

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::process::{Command, Output};

use common::*;

fn nvmirror(args: &[&str]) -> Output {
    run_to_end({
        let mut command = Command::new(BIN);
        command.args(args);
        command
    })
}

fn json_of(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

#[test]
fn status_stats_and_a_waited_cp_on_a_running_pair() {
    let scratch = Scratch::new("manage");
    let target_port = free_port();
    let nqn = "nqn.2026-11.io.nvmirror:manage";
    let (destination, source) = write_pair(&scratch, ("manage", "manage"), 600_000);
    let mut text = std::fs::read_to_string(&source).unwrap();
    text.push_str(&target_section(target_port, nqn, "1, 2"));
    std::fs::write(&source, text).unwrap();
    let _destination = start_destination(&destination);
    let (_source, _lines) = start_source(&source, &[], "info", &scratch.path("source.log"));
    let source_arg = source.to_str().unwrap();
    let destination_arg = destination.to_str().unwrap();

    let status = json_of(&nvmirror(&["status", "--config", source_arg, "--json"]));
    assert_eq!(status["volume"], "manage");
    assert_eq!(status["nodes"][0]["role"], "source");
    let destination_status = json_of(&nvmirror(&[
        "status",
        "--config",
        destination_arg,
        "--json",
    ]));
    assert_eq!(destination_status["nodes"][0]["role"], "destination");

    let mut perf = perf_at(target_port, nqn);
    perf.args(["--pattern", "randwrite", "--time-s", "1", "--warmup-s", "0"]);
    perf.args(["--queue-depth", "8", "--io-size", "4096"]);
    let output = run_to_end(perf);
    assert!(output.status.success(), "{output:?}");

    // With a CP interval of 10 minutes, only the requested CP can put the writes on the mirror.
    let cp = json_of(&nvmirror(&["cp", "--wait", "--config", source_arg]));
    assert_eq!(cp["requested"], true);
    assert!(cp["cp_number"].as_u64().unwrap() >= 1, "{cp}");
    // Namespace 2 was not written: write it too, so the image check covers both.
    let mut perf = perf_at(target_port, nqn);
    perf.args([
        "--nsid",
        "2",
        "--pattern",
        "write",
        "--time-s",
        "1",
        "--warmup-s",
        "0",
    ]);
    perf.args(["--queue-depth", "8", "--io-size", "4096"]);
    assert!(run_to_end(perf).status.success());
    json_of(&nvmirror(&["cp", "--wait", "--config", source_arg]));
    assert_images_equal(&scratch);

    let stats = json_of(&nvmirror(&["stats", "--config", source_arg, "--json"]));
    let counters = &stats["counters"]["source"];
    assert!(
        counters["host_write_count"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert!(counters["cp_count"].as_u64().unwrap() >= 2, "{stats}");
    let status = json_of(&nvmirror(&["status", "--config", source_arg, "--json"]));
    let node = &status["nodes"][0];
    assert_eq!(node["link_connected"], true, "{status}");
    assert!(node["cp_completed"].as_u64().unwrap() >= 2, "{status}");

    assert_eq!(node["peer"]["state"], "connected", "{status}");
    assert_eq!(node["peer"]["policy"], "suspend", "{status}");
    // The policy changes at run time and status shows it.
    let set = json_of(&nvmirror(&["set-policy", "fail", "--config", source_arg]));
    assert_eq!(set["policy"], "fail");
    let status = json_of(&nvmirror(&["status", "--config", source_arg, "--json"]));
    assert_eq!(status["nodes"][0]["peer"]["policy"], "fail", "{status}");
    let stats = json_of(&nvmirror(&["stats", "--config", source_arg, "--json"]));
    assert_eq!(
        stats["counters"]["source"]["policy_change_count"], 1,
        "{stats}"
    );
    let bad = nvmirror(&["set-policy", "sometimes", "--config", source_arg]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("one of suspend, fail, degrade"));

    // Errors name what is wrong and fail the command.
    let unknown = nvmirror(&["rpc", "nvmirror_nope", "--config", source_arg]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("-32601"));
    let typo = nvmirror(&[
        "rpc",
        "nvmirror_cp",
        r#"{"wiat": true}"#,
        "--config",
        source_arg,
    ]);
    assert!(String::from_utf8_lossy(&typo.stderr).contains("unknown parameter 'wiat'"));
    let no_cp = nvmirror(&["cp", "--config", destination_arg]);
    assert!(String::from_utf8_lossy(&no_cp.stderr).contains("runs no source"));

    // As rpc.py speaks: two objects back to back on one connection, no newline.
    let socket = scratch.path("source.sock");
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .write_all(
            br#"{"jsonrpc":"2.0","method":"rpc_get_methods","id":1}{"jsonrpc":"2.0","method":"nvmirror_get_status","id":2}"#,
        )
        .unwrap();
    let replies: Vec<serde_json::Value> = serde_json::Deserializer::from_reader(&stream)
        .into_iter()
        .take(2)
        .map(Result::unwrap)
        .collect();
    let methods = replies[0]["result"].as_array().unwrap();
    for method in [
        "nvmirror_get_status",
        "nvmirror_get_stats",
        "nvmirror_cp",
        "nvmirror_set_policy",
    ] {
        assert!(methods.iter().any(|m| m == method), "{methods:?}");
    }
    assert_eq!(replies[1]["id"], 2);
    assert_eq!(replies[1]["result"]["volume"], "manage");
}
