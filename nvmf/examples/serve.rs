//! Serves a 64 MiB in-memory namespace over NVMe/TCP on 127.0.0.1 with one polled poll group, for
//! validation with real hosts (SPDK's spdk_nvme_identify / spdk_nvme_perf / spdk_nvme_discover).
//! Usage: `serve [PORT] [DISCOVERY_PORT]` (defaults 4420 and 8009). The subsystem NQN is printed.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use nvmirror_engine::device::MemoryDevice;
use nvmirror_nvmf::{DeviceBackend, PollGroup, SubsystemConfig, Target, TargetConfig};

const DEVICE_BYTES: usize = 64 * 1024 * 1024;
const NQN: &str = "nqn.2024-01.io.nvmirror:serve";

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut arguments = std::env::args()
        .skip(1)
        .map(|value| value.parse::<u16>().expect("port number"));
    let port = arguments.next().unwrap_or(4420);
    let discovery_port = arguments.next().unwrap_or(8009);
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let subsystem = SubsystemConfig {
        nqn: NQN.into(),
        serial: "NVMIRROR0001".into(),
        model: "nvmirror memory namespace".into(),
        allow_any_host: true,
        allowed_hosts: Vec::new(),
        namespaces: vec![1],
    };
    let mut config = TargetConfig::with_defaults(vec![subsystem], localhost);
    config.listeners = vec![SocketAddr::new(localhost, port)];
    config.discovery_listeners = vec![SocketAddr::new(localhost, discovery_port)];
    let target = Target::new(config).expect("valid configuration");
    let mut listeners = target.bind_listeners().expect("bind listeners");
    for listener in &listeners {
        println!("listening on {} subnqn {NQN}", listener.local_addr());
    }
    let mut backend = DeviceBackend::new(vec![MemoryDevice::new(DEVICE_BYTES)]);
    let mut group = PollGroup::new(target);
    let start = Instant::now();
    loop {
        let now_us = start.elapsed().as_micros() as u64;
        for listener in &mut listeners {
            while let Some(stream) = listener.poll_accept() {
                group.add_connection(stream, now_us);
            }
        }
        let work = group.poll(now_us, &mut backend);
        if work == 0 && group.connection_count() == 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}
