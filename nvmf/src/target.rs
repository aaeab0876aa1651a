//! The target: immutable-after-start configuration, the controller-ID allocator and the registry that
//! lets an I/O queue's Connect (which names its CNTLID and may land on any poll group) find its
//! controller; plus the listening sockets, and [`Target::namespace_changed`] for the runtime to report a
//! namespace whose size changed. Admin path only: the I/O path never takes the registry lock.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::TargetConfig;
use crate::controller::{Controller, ControllerKind};

/// Highest dynamic controller ID (0xFFF0..=0xFFFF are reserved by the Fabrics spec).
pub const CNTLID_MAX: u16 = 0xffef;

pub struct Target {
    pub config: TargetConfig,
    next_cntlid: AtomicU16,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
}

impl Target {
    pub fn new(config: TargetConfig) -> Result<Arc<Target>, String> {
        config.validate()?;
        Ok(Arc::new(Target {
            config,
            next_cntlid: AtomicU16::new(1),
            controllers: Mutex::new(HashMap::new()),
        }))
    }

    /// Binds every listener and discovery listener (an address in both is bound once).
    pub fn bind_listeners(&self) -> io::Result<Vec<Listener>> {
        let mut addresses: Vec<SocketAddr> = self.config.listeners.clone();
        for address in &self.config.discovery_listeners {
            if !addresses.contains(address) {
                addresses.push(*address);
            }
        }
        addresses
            .iter()
            .map(|&address| Listener::bind(address))
            .collect()
    }

    /// Allocates a controller ID not in use and registers the controller built for it.
    pub fn register_controller(
        &self,
        build: impl FnOnce(u16) -> Controller,
    ) -> Option<Arc<Controller>> {
        let mut controllers = self.controllers.lock().expect("controller registry lock");
        for _ in 0..CNTLID_MAX {
            let cntlid = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            if cntlid == 0 || cntlid > CNTLID_MAX {
                self.next_cntlid.store(1, Ordering::Relaxed);
                continue;
            }
            if controllers.contains_key(&cntlid) {
                continue;
            }
            let controller = Arc::new(build(cntlid));
            controllers.insert(cntlid, Arc::clone(&controller));
            return Some(controller);
        }
        None
    }

    pub fn find_controller(&self, cntlid: u16) -> Option<Arc<Controller>> {
        self.controllers
            .lock()
            .expect("controller registry lock")
            .get(&cntlid)
            .cloned()
    }

    /// The admin queue is gone: the controller stops existing and its I/O queues close.
    pub fn remove_controller(&self, cntlid: u16) {
        let removed = self
            .controllers
            .lock()
            .expect("controller registry lock")
            .remove(&cntlid);
        if let Some(controller) = removed {
            controller.closed.store(true, Ordering::Release);
        }
    }

    /// The NSIDs a controller of `kind` exports: its subsystem's; a discovery controller exports none.
    pub fn namespaces(&self, kind: ControllerKind) -> &[u32] {
        match kind {
            ControllerKind::Nvm { subsystem_index } => {
                &self.config.subsystems[subsystem_index].namespaces
            }
            ControllerKind::Discovery => &[],
        }
    }

    /// Namespace `nsid`'s attributes changed (the backend reports a new size): every controller of a
    /// subsystem that exports it lists it in its Changed Namespace List and raises the Namespace
    /// Attribute Changed notice if its host enabled it (Base 2.0 section 5.2). Any thread may call
    /// this; returns how many controllers were told.
    pub fn namespace_changed(&self, nsid: u32) -> usize {
        let controllers = self.controllers.lock().expect("controller registry lock");
        let mut told = 0;
        for controller in controllers.values() {
            if self.namespaces(controller.kind).contains(&nsid) {
                controller.namespace_changed(nsid);
                told += 1;
            }
        }
        told
    }
}

/// A nonblocking listening socket.
pub struct Listener {
    socket: TcpListener,
    local_addr: SocketAddr,
}

impl Listener {
    fn bind(address: SocketAddr) -> io::Result<Listener> {
        let socket = TcpListener::bind(address)?;
        socket.set_nonblocking(true)?;
        let local_addr = socket.local_addr()?;
        Ok(Listener { socket, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Accepts one pending connection, if any (never blocks).
    pub fn poll_accept(&mut self) -> Option<TcpStream> {
        match self.socket.accept() {
            Ok((stream, peer)) => {
                log::info!("nvmf: accepted {peer} on {}", self.local_addr);
                Some(stream)
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => None,
            Err(error) => {
                log::warn!("nvmf: accept on {} failed: {error}", self.local_addr);
                None
            }
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}
