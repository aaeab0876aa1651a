//! The send side of a link, owned by the Source or the Destination: encoded headers and small
//! messages live in an engine-owned byte buffer allocated at start (used as a ring), entry data
//! is referenced in ring memory, not copied. The runtime gathers up to `max` slices with
//! [`OutQueue::tx_iovecs`], writes them with one `writev`, and reports what went with
//! [`OutQueue::tx_advance`]; partial writes are normal.

use std::collections::VecDeque;
use std::io::IoSlice;

/// One contiguous piece of the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Bytes in the queue's own buffer.
    Inline { start: u32, len: u32 },
    /// Bytes in ring memory (entry data).
    Ring { offset: u64, len: u32 },
}

impl Segment {
    fn len(&self) -> usize {
        match *self {
            Self::Inline { len, .. } | Self::Ring { len, .. } => len as usize,
        }
    }
}

/// No room for the message right now: send what is queued first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueFull;

/// Inline buffer position saved before an allocation, to undo it.
#[derive(Debug, Clone, Copy)]
pub struct InlineMark {
    tail: usize,
    wrapped: bool,
    end_mark: usize,
}

/// The send queue: segments in stream order over an inline byte ring and ring memory.
#[derive(Debug)]
pub struct OutQueue {
    inline: Vec<u8>,
    /// Start of the oldest live inline byte.
    head: usize,
    /// Next free inline byte.
    tail: usize,
    /// Live inline bytes are `[head, end_mark) ∪ [0, tail)`.
    wrapped: bool,
    end_mark: usize,
    segments: VecDeque<Segment>,
    segments_max: usize,
    /// Bytes of the front segment already written.
    front_sent: usize,
    pending_bytes: u64,
}

impl OutQueue {
    /// A queue with `inline_bytes` of buffer and room for `segments_max` segments.
    pub fn new(inline_bytes: usize, segments_max: usize) -> Self {
        Self {
            inline: vec![0; inline_bytes],
            head: 0,
            tail: 0,
            wrapped: false,
            end_mark: 0,
            segments: VecDeque::with_capacity(segments_max),
            segments_max,
            front_sent: 0,
            pending_bytes: 0,
        }
    }

    /// True if a message of `inline_len` inline bytes and `segments` segments fits now.
    pub fn can_push(&self, inline_len: usize, segments: usize) -> bool {
        self.segments.len() + segments <= self.segments_max && self.find_room(inline_len).is_some()
    }

    fn find_room(&self, len: usize) -> Option<(usize, bool)> {
        if self.wrapped {
            (self.tail + len < self.head).then_some((self.tail, false))
        } else if self.tail + len <= self.inline.len() {
            Some((self.tail, false))
        } else {
            (len < self.head).then_some((0, true))
        }
    }

    /// Allocates `len` inline bytes (not yet in the stream); returns the start and an undo mark.
    pub fn alloc_inline(&mut self, len: usize) -> Result<(usize, InlineMark), QueueFull> {
        assert!(len > 0);
        if self.segments.len() == self.segments_max {
            return Err(QueueFull);
        }
        let (start, wraps) = self.find_room(len).ok_or(QueueFull)?;
        let mark = InlineMark {
            tail: self.tail,
            wrapped: self.wrapped,
            end_mark: self.end_mark,
        };
        if wraps {
            self.wrapped = true;
            self.end_mark = self.tail;
        }
        self.tail = start + len;
        Ok((start, mark))
    }

    /// Undoes the last [`OutQueue::alloc_inline`] (the message could not be built).
    pub fn undo_alloc(&mut self, mark: InlineMark) {
        self.tail = mark.tail;
        self.wrapped = mark.wrapped;
        self.end_mark = mark.end_mark;
    }

    /// The bytes of an allocation, to encode into.
    pub fn inline_mut(&mut self, start: usize, len: usize) -> &mut [u8] {
        &mut self.inline[start..start + len]
    }

    /// Appends a segment to the stream.
    pub fn push(&mut self, segment: Segment) {
        assert!(
            self.segments.len() < self.segments_max,
            "checked with can_push"
        );
        assert!(segment.len() > 0);
        if let (
            Some(Segment::Ring { offset, len }),
            Segment::Ring {
                offset: next,
                len: more,
            },
        ) = (self.segments.back_mut(), segment)
        {
            if *offset + u64::from(*len) == next
                && (u64::from(*len) + u64::from(more)) <= u64::from(u32::MAX)
            {
                *len += more;
                self.pending_bytes += u64::from(more);
                return;
            }
        }
        self.pending_bytes += segment.len() as u64;
        self.segments.push_back(segment);
    }

    /// Encodes a wholly inline message with `encode` (which fills exactly `len` bytes).
    pub fn push_inline(
        &mut self,
        len: usize,
        encode: impl FnOnce(&mut [u8]),
    ) -> Result<(), QueueFull> {
        let (start, _) = self.alloc_inline(len)?;
        encode(self.inline_mut(start, len));
        self.push(Segment::Inline {
            start: start as u32,
            len: len as u32,
        });
        Ok(())
    }

    /// Fills `out` with up to `max` slices from the head of the stream; returns their bytes.
    pub fn tx_iovecs<'a>(
        &'a self,
        ring: &'a [u8],
        out: &mut impl Extend<IoSlice<'a>>,
        max: usize,
    ) -> usize {
        let mut bytes = 0;
        for (i, segment) in self.segments.iter().take(max).enumerate() {
            let skip = if i == 0 { self.front_sent } else { 0 };
            let slice = match *segment {
                Segment::Inline { start, len } => {
                    &self.inline[start as usize..(start + len) as usize]
                }
                Segment::Ring { offset, len } => {
                    &ring[offset as usize..offset as usize + len as usize]
                }
            };
            out.extend(std::iter::once(IoSlice::new(&slice[skip..])));
            bytes += slice.len() - skip;
        }
        bytes
    }

    /// Consumes `written` bytes from the head of the stream.
    pub fn tx_advance(&mut self, mut written: usize) {
        assert!(
            written as u64 <= self.pending_bytes,
            "advanced past the queued bytes"
        );
        self.pending_bytes -= written as u64;
        while written > 0 {
            let front = *self
                .segments
                .front()
                .expect("pending bytes are in segments");
            let remaining = front.len() - self.front_sent;
            if written < remaining {
                self.front_sent += written;
                return;
            }
            written -= remaining;
            self.front_sent = 0;
            self.segments.pop_front();
            if let Segment::Inline { start, len } = front {
                self.release_inline(start as usize + len as usize);
            }
        }
    }

    fn release_inline(&mut self, end: usize) {
        self.head = end;
        if self.wrapped && self.head == self.end_mark {
            self.wrapped = false;
            self.head = 0;
        }
        if !self.wrapped && self.head == self.tail {
            self.head = 0;
            self.tail = 0;
        }
    }

    /// Bytes queued and not yet written.
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// Segments queued.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Drops everything queued (the link went down).
    pub fn clear(&mut self) {
        self.segments.clear();
        self.front_sent = 0;
        self.pending_bytes = 0;
        self.head = 0;
        self.tail = 0;
        self.wrapped = false;
        self.end_mark = 0;
    }

    /// Everything queued as one byte vector, then cleared (tests and tools; not the data path).
    pub fn drain_to_vec(&mut self, ring: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.pending_bytes as usize);
        let mut slices = Vec::new();
        self.tx_iovecs(ring, &mut slices, usize::MAX);
        for slice in &slices {
            bytes.extend_from_slice(slice);
        }
        let written = bytes.len();
        self.tx_advance(written);
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gather(queue: &OutQueue, ring: &[u8], max: usize) -> Vec<u8> {
        let mut slices = Vec::new();
        let described = queue.tx_iovecs(ring, &mut slices, max);
        let bytes: Vec<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(bytes.len(), described);
        bytes
    }

    #[test]
    fn mixes_inline_and_ring_bytes_with_partial_writes() {
        let ring: Vec<u8> = (0..=255).collect();
        let mut queue = OutQueue::new(64, 8);
        queue
            .push_inline(4, |b| b.copy_from_slice(b"head"))
            .unwrap();
        queue.push(Segment::Ring { offset: 10, len: 3 });
        queue.push(Segment::Ring { offset: 13, len: 2 });
        assert_eq!(queue.segment_count(), 2, "adjacent ring bytes merge");
        queue.push_inline(2, |b| b.copy_from_slice(b"!!")).unwrap();
        assert_eq!(queue.pending_bytes(), 11);
        assert_eq!(gather(&queue, &ring, 64), b"head\x0a\x0b\x0c\x0d\x0e!!");
        assert_eq!(gather(&queue, &ring, 1), b"head");
        queue.tx_advance(6);
        assert_eq!(gather(&queue, &ring, 64), b"\x0c\x0d\x0e!!");
        queue.tx_advance(5);
        assert_eq!(queue.pending_bytes(), 0);
        assert_eq!(queue.segment_count(), 0);
    }

    #[test]
    fn inline_buffer_wraps_and_refuses_when_full() {
        let mut queue = OutQueue::new(32, 16);
        queue.push_inline(12, |b| b.fill(1)).unwrap();
        queue.push_inline(12, |b| b.fill(2)).unwrap();
        assert!(!queue.can_push(12, 1));
        assert_eq!(queue.push_inline(12, |b| b.fill(3)), Err(QueueFull));
        queue.tx_advance(12);
        queue.push_inline(10, |b| b.fill(3)).unwrap();
        assert!(queue.wrapped);
        assert_eq!(
            queue.push_inline(4, |b| b.fill(4)),
            Err(QueueFull),
            "would reach the head"
        );
        let mut expected = vec![2u8; 12];
        expected.extend_from_slice(&[3; 10]);
        assert_eq!(gather(&queue, &[], 16), expected);
        queue.tx_advance(12);
        assert!(!queue.wrapped);
        queue.tx_advance(10);
        assert_eq!((queue.head, queue.tail), (0, 0));
        queue.push_inline(32, |b| b.fill(5)).unwrap();
    }

    #[test]
    fn undo_and_clear() {
        let mut queue = OutQueue::new(32, 4);
        let (start, mark) = queue.alloc_inline(20).unwrap();
        assert_eq!(start, 0);
        queue.undo_alloc(mark);
        assert!(queue.can_push(32, 4));
        queue.push_inline(10, |b| b.fill(1)).unwrap();
        queue.push(Segment::Ring {
            offset: 0,
            len: 100,
        });
        queue.clear();
        assert_eq!(queue.pending_bytes(), 0);
        assert!(queue.can_push(32, 4));
    }
}
