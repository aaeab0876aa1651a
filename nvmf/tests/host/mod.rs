//! A tiny NVMe/TCP host written from the spec on top of `nvmirror_nvmf::pdu`, and a target running a
//! DeviceBackend over memory in a background thread (127.0.0.1, ephemeral port, bounded in time).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use nvmirror_engine::device::MemoryDevice;
use nvmirror_nvmf::backend::{Backend, BackendError, IoToken, NamespaceInfo};
use nvmirror_nvmf::pdu::*;
use nvmirror_nvmf::{DeviceBackend, PollGroup, SubsystemConfig, Target, TargetConfig};

pub const NQN: &str = "nqn.2024-01.io.nvmirror:test";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:host-a";
pub const DEVICE_BYTES: usize = 4 * 1024 * 1024;

/// Wraps a DeviceBackend and answers Busy to the first `busy_reservations` write reservations.
pub struct BusyBackend {
    pub inner: DeviceBackend<MemoryDevice>,
    pub busy_reservations: usize,
}

impl Backend for BusyBackend {
    type WriteSlot = <DeviceBackend<MemoryDevice> as Backend>::WriteSlot;
    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.inner.namespace(nsid)
    }
    fn reserve_write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Self::WriteSlot, BackendError> {
        if self.busy_reservations > 0 {
            self.busy_reservations -= 1;
            return Err(BackendError::Busy);
        }
        self.inner.reserve_write(now_us, nsid, lba, length_bytes)
    }
    fn write_buffer(&mut self, slot: &Self::WriteSlot) -> &mut [u8] {
        self.inner.write_buffer(slot)
    }
    fn commit_write(&mut self, now_us: u64, slot: Self::WriteSlot) -> IoToken {
        self.inner.commit_write(now_us, slot)
    }
    fn abort_write(&mut self, now_us: u64, slot: Self::WriteSlot) -> IoToken {
        self.inner.abort_write(now_us, slot)
    }
    fn write_zeroes(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        self.inner.write_zeroes(now_us, nsid, lba, length_bytes)
    }
    fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(nsid, lba, buf)
    }
    fn flush(&mut self, now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        self.inner.flush(now_us, nsid)
    }
    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)> {
        self.inner.poll_completion()
    }
}

/// Wraps a DeviceBackend whose write_zeroes takes effect only when its token completes, a few polls
/// later (as on the replicated volume, completion is asynchronous), and answers Busy to every other
/// write_zeroes call. Records each accepted call as (LBA, blocks).
pub struct DeferredZeroesBackend {
    pub inner: DeviceBackend<MemoryDevice>,
    pub zeroes_calls: Arc<Mutex<Vec<(u64, u64)>>>,
    deferred: VecDeque<DeferredZeroes>,
    busy_next: bool,
    next_token: u64,
}

struct DeferredZeroes {
    token: IoToken,
    nsid: u32,
    lba: u64,
    length_bytes: u64,
    polls_left: u32,
}

/// Polls a deferred write_zeroes waits before it completes.
pub const DEFERRED_ZEROES_POLLS: u32 = 5;

impl DeferredZeroesBackend {
    pub fn new(device: MemoryDevice) -> DeferredZeroesBackend {
        DeferredZeroesBackend {
            inner: DeviceBackend::new(vec![device]),
            zeroes_calls: Arc::new(Mutex::new(Vec::new())),
            deferred: VecDeque::new(),
            busy_next: true,
            next_token: 1 << 48,
        }
    }
}

impl Backend for DeferredZeroesBackend {
    type WriteSlot = <DeviceBackend<MemoryDevice> as Backend>::WriteSlot;
    fn namespace(&self, nsid: u32) -> Option<NamespaceInfo> {
        self.inner.namespace(nsid)
    }
    fn reserve_write(
        &mut self,
        now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u32,
    ) -> Result<Self::WriteSlot, BackendError> {
        self.inner.reserve_write(now_us, nsid, lba, length_bytes)
    }
    fn write_buffer(&mut self, slot: &Self::WriteSlot) -> &mut [u8] {
        self.inner.write_buffer(slot)
    }
    fn commit_write(&mut self, now_us: u64, slot: Self::WriteSlot) -> IoToken {
        self.inner.commit_write(now_us, slot)
    }
    fn abort_write(&mut self, now_us: u64, slot: Self::WriteSlot) -> IoToken {
        self.inner.abort_write(now_us, slot)
    }
    fn write_zeroes(
        &mut self,
        _now_us: u64,
        nsid: u32,
        lba: u64,
        length_bytes: u64,
    ) -> Result<IoToken, BackendError> {
        let size_bytes = self
            .inner
            .namespace(nsid)
            .ok_or(BackendError::InvalidNamespace)?
            .size_bytes;
        assert!(
            lba * 512 + length_bytes <= size_bytes,
            "the target checks ranges first"
        );
        assert!(
            length_bytes <= 65536 * 512,
            "at most one Write Zeroes' worth"
        );
        self.busy_next = !self.busy_next;
        if !self.busy_next {
            return Err(BackendError::Busy);
        }
        self.zeroes_calls
            .lock()
            .unwrap()
            .push((lba, length_bytes / 512));
        let token = IoToken(self.next_token);
        self.next_token += 1;
        self.deferred.push_back(DeferredZeroes {
            token,
            nsid,
            lba,
            length_bytes,
            polls_left: DEFERRED_ZEROES_POLLS,
        });
        Ok(token)
    }
    fn read(&mut self, nsid: u32, lba: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.inner.read(nsid, lba, buf)
    }
    fn flush(&mut self, now_us: u64, nsid: u32) -> Result<IoToken, BackendError> {
        self.inner.flush(now_us, nsid)
    }
    fn poll_completion(&mut self) -> Option<(IoToken, Result<(), BackendError>)> {
        if let Some(done) = self.inner.poll_completion() {
            return Some(done);
        }
        let front = self.deferred.front_mut()?;
        if front.polls_left > 0 {
            front.polls_left -= 1;
            return None;
        }
        let done = self.deferred.pop_front().unwrap();
        // Its own completion token is unknown to the target, which skips it.
        let _applied = self
            .inner
            .write_zeroes(0, done.nsid, done.lba, done.length_bytes)
            .expect("checked when accepted");
        Some((done.token, Ok(())))
    }
}

pub fn config(allow_any_host: bool) -> TargetConfig {
    let subsystem = SubsystemConfig {
        nqn: NQN.into(),
        serial: "SERIAL1".into(),
        model: "test model".into(),
        allow_any_host,
        allowed_hosts: vec![HOSTNQN.into()],
        namespaces: vec![1],
    };
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut config = TargetConfig::with_defaults(vec![subsystem], localhost);
    config.listeners = vec![SocketAddr::new(localhost, 0)];
    config.discovery_listeners = Vec::new();
    config
}

pub struct Server {
    pub address: SocketAddr,
    pub target: Arc<Target>,
    /// Held by the target thread for each poll pass: a test holding it makes PDUs sent meanwhile
    /// arrive together in the next pass.
    pub pass: Arc<Mutex<()>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(handle) = self.handle.take() {
            handle.join().expect("target thread");
        }
    }
}

pub fn serve<B: Backend + Send + 'static>(config: TargetConfig, mut backend: B) -> Server {
    let target = Target::new(config).expect("valid config");
    let mut listeners = target.bind_listeners().expect("bind");
    let address = listeners[0].local_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_thread = Arc::clone(&stop);
    let target_shared = Arc::clone(&target);
    let pass = Arc::new(Mutex::new(()));
    let pass_thread = Arc::clone(&pass);
    let handle = std::thread::spawn(move || {
        let mut group = PollGroup::new(target);
        let start = Instant::now();
        while !stop_thread.load(Ordering::Acquire) && start.elapsed() < Duration::from_secs(50) {
            let pass = pass_thread.lock().expect("pass lock");
            let now_us = start.elapsed().as_micros() as u64;
            while let Some(stream) = listeners[0].poll_accept() {
                group.add_connection(stream, now_us);
            }
            let work = group.poll(now_us, &mut backend);
            drop(pass);
            if work == 0 {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    });
    Server {
        address,
        target: target_shared,
        pass,
        stop,
        handle: Some(handle),
    }
}

pub fn serve_memory(config: TargetConfig) -> Server {
    serve(
        config,
        DeviceBackend::new(vec![MemoryDevice::new(DEVICE_BYTES)]),
    )
}

pub struct Host {
    pub stream: TcpStream,
    pub framing: Framing,
    next_cid: u16,
    pub cntlid: u16,
}

pub struct Received {
    pub pdu: Pdu,
    pub data: Vec<u8>,
}

impl Host {
    pub fn open(address: SocketAddr, header_digest: bool, data_digest: bool) -> Host {
        let stream = TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let mut host = Host {
            stream,
            framing: Framing::PLAIN,
            next_cid: 1,
            cntlid: 0,
        };
        let mut buf = [0u8; 128];
        ICReq {
            pfv: 0,
            hpda: 0,
            header_digest,
            data_digest,
            maxr2t: 0,
        }
        .encode_into(&mut buf);
        host.stream.write_all(&buf).unwrap();
        let Received {
            pdu: Pdu::ICResp(icresp),
            ..
        } = host.receive().expect("ICResp")
        else {
            panic!("expected ICResp")
        };
        assert_eq!(
            (icresp.header_digest, icresp.data_digest),
            (header_digest, data_digest)
        );
        assert!(icresp.maxh2cdata >= 4096);
        host.framing = Framing {
            header_digest,
            data_digest,
            pda: 0,
        };
        host
    }

    /// A connection that has not sent its ICReq.
    pub fn raw(address: SocketAddr) -> Host {
        let stream = TcpStream::connect(address).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Host {
            stream,
            framing: Framing::PLAIN,
            next_cid: 1,
            cntlid: 0,
        }
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1);
        self.next_cid
    }

    /// Reads one PDU; None when the target closed the connection.
    pub fn receive(&mut self) -> Option<Received> {
        let mut common = [0u8; COMMON_HEADER_BYTES];
        if self.stream.read_exact(&mut common).is_err() {
            return None;
        }
        let header = CommonHeader::parse(&common);
        let mut whole = vec![0u8; header.plen as usize];
        whole[..8].copy_from_slice(&common);
        self.stream.read_exact(&mut whole[8..]).expect("PDU body");
        let (pdu, location) =
            decode(&whole, Direction::ControllerToHost, &self.framing).expect("valid PDU");
        let start = location.offset as usize;
        let data = whole[start..start + location.length as usize].to_vec();
        if location.digest {
            let digest = u32::from_le_bytes(whole[start + data.len()..][..4].try_into().unwrap());
            assert_eq!(digest, crc32c(&data), "C2H data digest");
        }
        Some(Received { pdu, data })
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    pub fn send_capsule(&mut self, command: &Command, data: &[u8]) {
        let mut buf = vec![0u8; HEADER_BYTES_MAX + data.len() + 4];
        let prefix = encode_capsule_cmd(&mut buf, command, &self.framing, data.len());
        let mut length = prefix;
        if !data.is_empty() {
            buf[prefix..prefix + data.len()].copy_from_slice(data);
            length += data.len();
            if self.framing.data_digest {
                buf[length..length + 4].copy_from_slice(&crc32c(data).to_le_bytes());
                length += 4;
            }
        }
        self.send_raw(&buf[..length]);
    }

    pub fn send_h2c(&mut self, header: DataHeader, data: &[u8]) {
        let mut buf = vec![0u8; HEADER_BYTES_MAX + data.len() + 4];
        let prefix = header.encode_into(&mut buf, PduType::H2CData, &self.framing);
        buf[prefix..prefix + data.len()].copy_from_slice(data);
        let mut length = prefix + data.len();
        if self.framing.data_digest {
            buf[length..length + 4].copy_from_slice(&crc32c(data).to_le_bytes());
            length += 4;
        }
        self.send_raw(&buf[..length]);
    }

    /// Sends a command and waits for its completion, collecting C2H data and answering R2Ts with `data`.
    pub fn execute(
        &mut self,
        command: &Command,
        in_capsule: &[u8],
        r2t_data: &[u8],
    ) -> (Completion, Vec<u8>) {
        self.send_capsule(command, in_capsule);
        let mut received = Vec::new();
        loop {
            let Received { pdu, data } = self.receive().expect("target closed the connection");
            match pdu {
                Pdu::CapsuleResp(completion) => {
                    assert_eq!(completion.cid, command.cid());
                    return (completion, received);
                }
                Pdu::C2HData(header) => {
                    assert_eq!(header.datao as usize, received.len());
                    received.extend_from_slice(&data);
                    if header.success {
                        return (Completion::new(command.cid(), Status::SUCCESS), received);
                    }
                }
                Pdu::R2T(r2t) => {
                    let chunk = &r2t_data[r2t.r2to as usize..(r2t.r2to + r2t.r2tl) as usize];
                    let header = DataHeader {
                        cccid: r2t.cccid,
                        ttag: r2t.ttag,
                        datao: r2t.r2to,
                        datal: r2t.r2tl,
                        last: true,
                        success: false,
                    };
                    self.send_h2c(header, chunk);
                }
                other => panic!("unexpected PDU {other:?}"),
            }
        }
    }

    pub fn connect(
        &mut self,
        qid: u16,
        subnqn: &str,
        hostnqn: &str,
        cntlid: u16,
        kato_ms: u32,
    ) -> Completion {
        let cid = self.cid();
        let command = Command::connect(cid, qid, 31, 0, kato_ms);
        let data = ConnectData {
            hostid: [1; 16],
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        };
        let mut bytes = vec![0u8; CONNECT_DATA_BYTES];
        data.encode_into(&mut bytes);
        let (completion, _) = self.execute(&command, &bytes, &[]);
        completion
    }

    pub fn property_set(&mut self, offset: u32, value: u64) -> Completion {
        let cid = self.cid();
        self.execute(&Command::property_set(cid, offset, false, value), &[], &[])
            .0
    }

    pub fn property_get(&mut self, offset: u32, eight_bytes: bool) -> Completion {
        let cid = self.cid();
        self.execute(&Command::property_get(cid, offset, eight_bytes), &[], &[])
            .0
    }

    /// ICReq + admin Connect + CC.EN = 1, waits for CSTS.RDY.
    pub fn admin(address: SocketAddr, digests: bool) -> Host {
        let mut host = Host::open(address, digests, digests);
        let completion = host.connect(0, NQN, HOSTNQN, 0xffff, 0);
        assert!(completion.status.is_success(), "{completion:?}");
        host.cntlid = completion.dw0 as u16;
        assert!(host
            .property_set(0x14, 1 | (6 << 16) | (4 << 20))
            .status
            .is_success());
        assert_eq!(host.property_get(0x1c, false).dw0 & 1, 1);
        host
    }

    pub fn io(address: SocketAddr, cntlid: u16, qid: u16, digests: bool) -> Host {
        let mut host = Host::open(address, digests, digests);
        let completion = host.connect(qid, NQN, HOSTNQN, cntlid, 0);
        assert!(completion.status.is_success(), "{completion:?}");
        host.cntlid = cntlid;
        host
    }

    pub fn admin_command(
        &mut self,
        opcode: u8,
        nsid: u32,
        cdw10: u32,
        cdw11: u32,
        data_bytes: u32,
    ) -> (Completion, Vec<u8>) {
        let mut command = Command::zeroed();
        let cid = self.cid();
        command
            .set_opcode(opcode)
            .set_cid(cid)
            .set_nsid(nsid)
            .set_cdw(10, cdw10)
            .set_cdw(11, cdw11);
        command.set_sgl(SglDescriptor::Transport { length: data_bytes });
        self.execute(&command, &[], &[])
    }

    pub fn write(&mut self, lba: u64, data: &[u8], in_capsule: bool) -> Completion {
        let cid = self.cid();
        let blocks = (data.len() / 512) as u32;
        let sgl = if in_capsule {
            SglDescriptor::InCapsule {
                offset: 0,
                length: data.len() as u32,
            }
        } else {
            SglDescriptor::Transport {
                length: data.len() as u32,
            }
        };
        let command = Command::read_write(io_opcode::WRITE, cid, 1, lba, blocks, sgl);
        if in_capsule {
            self.execute(&command, data, &[]).0
        } else {
            self.execute(&command, &[], data).0
        }
    }

    pub fn read(&mut self, lba: u64, blocks: u32) -> (Completion, Vec<u8>) {
        let cid = self.cid();
        let sgl = SglDescriptor::Transport {
            length: blocks * 512,
        };
        let command = Command::read_write(io_opcode::READ, cid, 1, lba, blocks, sgl);
        self.execute(&command, &[], &[])
    }

    /// Sends an Asynchronous Event Request without waiting; returns its CID.
    pub fn send_async_event_request(&mut self) -> u16 {
        let cid = self.cid();
        let mut command = Command::zeroed();
        command
            .set_opcode(admin_opcode::ASYNC_EVENT_REQUEST)
            .set_cid(cid);
        self.send_capsule(&command, &[]);
        cid
    }

    /// Receives the next PDU and expects a CapsuleResp.
    pub fn receive_completion(&mut self) -> Completion {
        match self.receive() {
            Some(Received {
                pdu: Pdu::CapsuleResp(completion),
                ..
            }) => completion,
            Some(Received { pdu, .. }) => panic!("expected a CapsuleResp, got {pdu:?}"),
            None => panic!("expected a CapsuleResp, the connection closed"),
        }
    }

    /// Get Log Page of `lid`, `bytes` long, with RAE (dword 10 bit 15) as given.
    pub fn get_log_page(&mut self, lid: u8, bytes: u32, retain: bool) -> (Completion, Vec<u8>) {
        let cdw10 = u32::from(lid) | ((bytes / 4 - 1) << 16) | (u32::from(retain) << 15);
        self.admin_command(admin_opcode::GET_LOG_PAGE, 0xffff_ffff, cdw10, 0, bytes)
    }

    /// Writes a pattern and reads it back: the healthy connection's proof of life.
    pub fn verified_io(&mut self, lba: u64, seed: u8) {
        let data: Vec<u8> = (0..8192)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        assert!(self.write(lba, &data, false).status.is_success());
        let (completion, read) = self.read(lba, 16);
        assert!(completion.status.is_success());
        assert_eq!(read, data);
    }

    /// Expects a C2HTermReq with `fes` and then the connection closed.
    pub fn expect_term_req(&mut self, fes: Fes) -> u32 {
        let Some(Received {
            pdu: Pdu::C2HTermReq(term),
            ..
        }) = self.receive()
        else {
            panic!("expected C2HTermReq")
        };
        assert_eq!(term.fes, fes as u16);
        let mut byte = [0u8; 1];
        assert_eq!(
            self.stream.read(&mut byte).unwrap_or(0),
            0,
            "connection closed after the TermReq"
        );
        term.fei
    }
}
