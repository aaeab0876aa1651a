//! DMA-safe memory: buffers from SPDK's hugepage heap, and registration of memory the runtime
//! maps itself (the NVRAM ring) so devices read it in place.

use crate::sys;

/// A zeroed buffer from SPDK's DMA heap (`spdk_dma_zmalloc`), 4 KiB aligned.
pub struct DmaBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; SPDK's heap may be freed from any
// thread.
unsafe impl Send for DmaBuf {}

impl DmaBuf {
    pub fn new(len: usize) -> Result<DmaBuf, String> {
        // SAFETY: a plain allocation; null is checked.
        let ptr = unsafe { sys::spdk_dma_zmalloc(len.max(1), 4096, std::ptr::null_mut()) };
        if ptr.is_null() {
            return Err(format!(
                "no DMA memory for {len} bytes (SPDK's hugepage heap is full: start with a larger -s)"
            ));
        }
        Ok(DmaBuf {
            ptr: ptr.cast(),
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr holds len initialized (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by spdk_dma_zmalloc, freed once.
        unsafe { sys::spdk_dma_free(self.ptr.cast()) };
    }
}

/// The ranges [`Registered`] holds, so a device can tell whether a write's data may be handed
/// to the bdev in place.
static REGISTERED: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// `data` lies inside memory registered with SPDK (hugepage memory devices may DMA from).
pub fn is_registered(data: &[u8]) -> bool {
    let start = data.as_ptr() as usize;
    REGISTERED
        .lock()
        .unwrap()
        .iter()
        .any(|&(addr, len)| start >= addr && start + data.len() <= addr + len)
}

/// Memory registered with SPDK's memory map (`spdk_mem_register`) until dropped, so devices
/// can DMA from it. Only hugepage-backed, 2 MiB-aligned memory can be registered.
pub struct Registered {
    addr: usize,
    len: usize,
}

pub const REGISTRATION_ALIGN: usize = 2 << 20;

impl Registered {
    /// Registers `memory`, which must stay mapped until the registration is dropped.
    pub fn new(memory: &[u8]) -> Result<Registered, String> {
        let (addr, len) = (memory.as_ptr() as usize, memory.len());
        if addr % REGISTRATION_ALIGN != 0 || len % REGISTRATION_ALIGN != 0 || len == 0 {
            return Err(format!(
                "{len} bytes at {addr:#x} are not 2 MiB aligned (hugepage-backed memory is)"
            ));
        }
        // SAFETY: registration only records the range (the caller keeps it mapped).
        let rc = unsafe { sys::spdk_mem_register(addr as *mut _, len) };
        if rc != 0 {
            return Err(format!("spdk_mem_register failed: {rc}"));
        }
        REGISTERED.lock().unwrap().push((addr, len));
        Ok(Registered { addr, len })
    }

    /// The registered range holds `data` entirely.
    pub fn contains(&self, data: &[u8]) -> bool {
        let start = data.as_ptr() as usize;
        start >= self.addr && start + data.len() <= self.addr + self.len
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        REGISTERED
            .lock()
            .unwrap()
            .retain(|&range| range != (self.addr, self.len));
        // SAFETY: the range was registered by `new` and is unregistered once.
        let rc = unsafe { sys::spdk_mem_unregister(self.addr as *mut _, self.len) };
        if rc != 0 {
            log::warn!("spdk_mem_unregister failed: {rc}");
        }
    }
}
