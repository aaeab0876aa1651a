//! Asynchronous events (NVMe Base 2.0 section 5.2): what a controller tells its host without being
//! asked. An event the host enabled with Asynchronous Event Configuration (feature 0Bh) is queued
//! until an Asynchronous Event Request is outstanding, which then completes with the event in dword 0.
//! From the moment it is raised the event is masked until the host reads its log page with RAE
//! cleared (Get Log Page dword 10 bit 15), so each kind is queued at most once; masking is per event,
//! as in Linux nvmet. The Changed Namespace List log page (section 5.16.1.5) collects the NSIDs
//! behind the Namespace Attribute Changed notice, whether or not the notice is enabled.
//!
//! This is one controller's state, behind its admin-path lock ([`crate::controller::Controller`]);
//! the admin queue holds the requests and completes them (`Connection::poll_async_events` in
//! [`crate::admin`]).

use std::collections::VecDeque;

use crate::spec::{
    CHANGED_NAMESPACES_BYTES, CONFIG_NAMESPACE_ATTRIBUTE_NOTICES,
    EVENT_INFO_NAMESPACE_ATTRIBUTE_CHANGED, EVENT_TYPE_NOTICE, LID_CHANGED_NAMESPACES,
};

/// Entries of the Changed Namespace List log page.
pub const CHANGED_NAMESPACES_MAX: usize = 1024;
/// The list's first entry once more namespaces changed than it holds.
pub const CHANGED_NAMESPACES_OVERFLOW: u32 = 0xffff_ffff;
const _: () = assert!(CHANGED_NAMESPACES_MAX * 4 == CHANGED_NAMESPACES_BYTES);

/// An event this target raises. Each variant is one (type, information, log page) triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEvent {
    /// Notice, information 00h, log page 04h: a namespace's attributes (its size) changed.
    NamespaceAttributeChanged,
}

impl AsyncEvent {
    pub const ALL: [AsyncEvent; 1] = [AsyncEvent::NamespaceAttributeChanged];

    pub fn event_type(self) -> u8 {
        match self {
            AsyncEvent::NamespaceAttributeChanged => EVENT_TYPE_NOTICE,
        }
    }

    pub fn information(self) -> u8 {
        match self {
            AsyncEvent::NamespaceAttributeChanged => EVENT_INFO_NAMESPACE_ATTRIBUTE_CHANGED,
        }
    }

    /// The log page whose read (RAE cleared) clears the event.
    pub fn log_page(self) -> u8 {
        match self {
            AsyncEvent::NamespaceAttributeChanged => LID_CHANGED_NAMESPACES,
        }
    }

    /// The Asynchronous Event Configuration bit that enables the event.
    pub fn config_bit(self) -> u32 {
        match self {
            AsyncEvent::NamespaceAttributeChanged => CONFIG_NAMESPACE_ATTRIBUTE_NOTICES,
        }
    }

    /// Completion dword 0 of the Asynchronous Event Request that reports it (Base 2.0 section 5.2.1):
    /// type in bits 2:0, information in bits 15:8, log page identifier in bits 23:16.
    pub fn completion_dword0(self) -> u32 {
        u32::from(self.event_type())
            | (u32::from(self.information()) << 8)
            | (u32::from(self.log_page()) << 16)
    }

    fn mask_bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A controller's events: queued ones, masked ones and the Changed Namespace List.
pub struct AsyncEvents {
    pending: VecDeque<AsyncEvent>,
    masked: u32,
    /// Ascending, no duplicates; empty after an overflow.
    changed_namespaces: Vec<u32>,
    changed_namespaces_overflow: bool,
}

impl AsyncEvents {
    pub fn new() -> AsyncEvents {
        AsyncEvents {
            pending: VecDeque::with_capacity(AsyncEvent::ALL.len()),
            masked: 0,
            changed_namespaces: Vec::with_capacity(CHANGED_NAMESPACES_MAX),
            changed_namespaces_overflow: false,
        }
    }

    /// Namespace `nsid` changed: it joins the Changed Namespace List, and the notice is raised when
    /// `config` (the Asynchronous Event Configuration) enables it. Returns whether an event was queued.
    pub fn namespace_changed(&mut self, nsid: u32, config: u32) -> bool {
        assert!(
            nsid != 0 && nsid != CHANGED_NAMESPACES_OVERFLOW,
            "a valid NSID"
        );
        if !self.changed_namespaces_overflow {
            if let Err(position) = self.changed_namespaces.binary_search(&nsid) {
                if self.changed_namespaces.len() == CHANGED_NAMESPACES_MAX {
                    self.changed_namespaces_overflow = true;
                    self.changed_namespaces.clear();
                } else {
                    self.changed_namespaces.insert(position, nsid);
                }
            }
        }
        self.raise(AsyncEvent::NamespaceAttributeChanged, config)
    }

    /// Queues `event` unless `config` disables it or it is masked (raised and not yet cleared).
    pub fn raise(&mut self, event: AsyncEvent, config: u32) -> bool {
        if config & event.config_bit() == 0 || self.masked & event.mask_bit() != 0 {
            return false;
        }
        self.masked |= event.mask_bit();
        assert!(
            self.pending.len() < AsyncEvent::ALL.len(),
            "a queued event is masked, so each kind is queued once"
        );
        self.pending.push_back(event);
        true
    }

    /// The oldest queued event, for an outstanding Asynchronous Event Request.
    pub fn next_event(&mut self) -> Option<AsyncEvent> {
        self.pending.pop_front()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The Changed Namespace List log page: NSIDs in ascending order, zero filled, or FFFFFFFFh
    /// alone after more than [`CHANGED_NAMESPACES_MAX`] changed.
    pub fn write_changed_namespaces(&self, page: &mut [u8; CHANGED_NAMESPACES_BYTES]) {
        page.fill(0);
        if self.changed_namespaces_overflow {
            page[..4].copy_from_slice(&CHANGED_NAMESPACES_OVERFLOW.to_le_bytes());
            return;
        }
        for (entry, nsid) in page.chunks_exact_mut(4).zip(&self.changed_namespaces) {
            entry.copy_from_slice(&nsid.to_le_bytes());
        }
    }

    /// The host read log page `lid`. Unless it asked to retain the event (RAE set), the events
    /// reported through that page are cleared: unmasked, dropped if still queued, and the Changed
    /// Namespace List emptied.
    pub fn log_page_read(&mut self, lid: u8, retain: bool) {
        if retain {
            return;
        }
        for event in AsyncEvent::ALL {
            if event.log_page() == lid {
                self.masked &= !event.mask_bit();
            }
        }
        self.pending.retain(|event| event.log_page() != lid);
        if lid == LID_CHANGED_NAMESPACES {
            self.changed_namespaces.clear();
            self.changed_namespaces_overflow = false;
        }
    }

    /// Controller reset: the outstanding requests are aborted, and with them goes every event
    /// state; the host identifies everything again after it re-enables the controller.
    pub fn reset(&mut self) {
        self.pending.clear();
        self.masked = 0;
        self.changed_namespaces.clear();
        self.changed_namespaces_overflow = false;
    }
}

impl Default for AsyncEvents {
    fn default() -> Self {
        AsyncEvents::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENABLED: u32 = CONFIG_NAMESPACE_ATTRIBUTE_NOTICES;

    fn page(events: &AsyncEvents) -> Vec<u32> {
        let mut page = [0u8; CHANGED_NAMESPACES_BYTES];
        events.write_changed_namespaces(&mut page);
        page.chunks_exact(4)
            .map(|entry| u32::from_le_bytes(entry.try_into().unwrap()))
            .take_while(|&nsid| nsid != 0)
            .collect()
    }

    #[test]
    fn namespace_attribute_changed_dword0() {
        assert_eq!(
            AsyncEvent::NamespaceAttributeChanged.completion_dword0(),
            0x0004_0002
        );
    }

    #[test]
    fn raised_once_masked_until_its_log_page_is_read() {
        let mut events = AsyncEvents::new();
        assert!(events.namespace_changed(3, ENABLED));
        assert!(!events.namespace_changed(1, ENABLED), "masked");
        assert!(!events.namespace_changed(3, ENABLED), "masked");
        assert_eq!(
            events.next_event(),
            Some(AsyncEvent::NamespaceAttributeChanged)
        );
        assert_eq!(events.next_event(), None);
        assert_eq!(page(&events), [1, 3]);
        events.log_page_read(LID_CHANGED_NAMESPACES, true);
        assert_eq!(page(&events), [1, 3], "RAE set keeps the list");
        assert!(
            !events.namespace_changed(2, ENABLED),
            "RAE set keeps the mask"
        );
        events.log_page_read(0x02, false);
        assert!(!events.namespace_changed(2, ENABLED), "another page");
        events.log_page_read(LID_CHANGED_NAMESPACES, false);
        assert_eq!(page(&events), [] as [u32; 0]);
        assert!(events.namespace_changed(2, ENABLED));
        assert!(events.has_pending());
    }

    #[test]
    fn disabled_notices_are_listed_but_not_raised() {
        let mut events = AsyncEvents::new();
        assert!(!events.namespace_changed(7, 0));
        assert!(!events.namespace_changed(7, 0xff | (1 << 9)));
        assert!(!events.has_pending());
        assert_eq!(page(&events), [7]);
        assert!(
            events.namespace_changed(8, ENABLED),
            "not masked by a disabled notice"
        );
    }

    #[test]
    fn reading_the_log_page_drops_a_queued_event() {
        let mut events = AsyncEvents::new();
        assert!(events.namespace_changed(1, ENABLED));
        events.log_page_read(LID_CHANGED_NAMESPACES, false);
        assert_eq!(events.next_event(), None);
        assert!(events.namespace_changed(1, ENABLED));
    }

    #[test]
    fn list_overflow_reports_ffffffff_until_read() {
        let mut events = AsyncEvents::new();
        for nsid in (1..=CHANGED_NAMESPACES_MAX as u32).rev() {
            events.namespace_changed(nsid, 0);
        }
        let listed = page(&events);
        assert_eq!(listed.len(), CHANGED_NAMESPACES_MAX);
        assert!(listed.windows(2).all(|pair| pair[0] < pair[1]));
        events.namespace_changed(1, 0);
        assert_eq!(page(&events).len(), CHANGED_NAMESPACES_MAX, "no duplicate");
        events.namespace_changed(5000, 0);
        assert_eq!(page(&events), [CHANGED_NAMESPACES_OVERFLOW]);
        events.namespace_changed(5001, 0);
        assert_eq!(page(&events), [CHANGED_NAMESPACES_OVERFLOW]);
        events.log_page_read(LID_CHANGED_NAMESPACES, false);
        events.namespace_changed(9, 0);
        assert_eq!(page(&events), [9]);
    }

    #[test]
    fn reset_clears_queue_masks_and_list() {
        let mut events = AsyncEvents::new();
        assert!(events.namespace_changed(1, ENABLED));
        events.reset();
        assert!(!events.has_pending());
        assert_eq!(page(&events), [] as [u32; 0]);
        assert!(
            events.namespace_changed(1, ENABLED),
            "unmasked by the reset"
        );
    }
}
