//! Generations: which side of a pair holds the newest data (ARCHITECTURE "node metadata";
//! invariant 6). DRBD's generation identifiers are the model, written our own way.
//!
//! Each node keeps, per volume and independent of its role, a `current` generation (a random
//! non-zero 64-bit id; 0 means "holds no data yet"), the last [`HISTORY_LEN`] generations before
//! it (newest first), and the generation its dirty bitmap counts changes since (`bitmap_base`).
//! A node takes a new generation whenever its data starts to differ from what its peer could
//! know: a promotion, or a source writing without its peer (the degrade policy). The old current
//! moves into the history. Two sides then compare ([`decide`]): equal currents are in sync; a
//! current found in the other side's history is behind; two currents that both moved on since a
//! generation they share are a split brain. No counter and no outside store decide: random ids
//! never collide by accident, and a side that moved on can never be mistaken for one that did not.
//!
//! [`settle`] turns the decision into the handshake's verdict. Source and destination both
//! call it with the same arguments (the source's generations from the Hello, the destination's
//! from the HelloAck), so both sides accept or refuse alike and log the same text.

use std::fmt;

use crate::checksum::{le_u32, le_u64};

/// Earlier generations a node remembers (newest first).
pub const HISTORY_LEN: usize = 4;
/// Bytes of [`Generations`] on the wire and on disk: node_id, current, history, bitmap_base,
/// flags u32, zero u32.
pub const GENERATIONS_BYTES: usize = 8 + 8 + 8 * HISTORY_LEN + 8 + 4 + 4;
const _: () = assert!(GENERATIONS_BYTES == 64);

/// The `assume_identical` config key was applied once to this node's metadata: it is not applied
/// again, so a config that keeps it never blesses a later pair of devices that differ.
pub const FLAG_ASSUME_IDENTICAL_CONSUMED: u32 = 1 << 0;
/// On the wire only (Hello, HelloAck): this side's config asks for `assume_identical` and its
/// metadata has not consumed it.
pub const FLAG_ASSUME_IDENTICAL: u32 = 1 << 1;
/// This node is the target of a resync that has not finished: its mirror mixes blocks of two
/// points in time (a consistent image only once the resync is done), so it is not promoted
/// unless the operator forces it. Set durably before the first resync block is written.
pub const FLAG_RESYNC_TARGET: u32 = 1 << 2;
/// This node last ran as the volume's source: started as a destination, it attaches (its former
/// source ring's entries are marked for the resync, then the ring is retired).
pub const FLAG_RAN_AS_SOURCE: u32 = 1 << 3;
/// Every flag a decoder accepts.
pub const FLAGS_KNOWN: u32 = FLAG_ASSUME_IDENTICAL_CONSUMED
    | FLAG_ASSUME_IDENTICAL
    | FLAG_RESYNC_TARGET
    | FLAG_RAN_AS_SOURCE;

/// A node's generation identity (what the handshake compares).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    /// Random, chosen when the node's metadata was formatted; never 0.
    pub node_id: u64,
    /// 0: this node holds no data of the volume yet.
    pub current: u64,
    /// Earlier generations, newest first; unused slots are 0 and come last.
    pub history: [u64; HISTORY_LEN],
    /// The generation the dirty bitmap counts changes since; 0: the bitmap counts nothing.
    pub bitmap_base: u64,
    pub flags: u32,
}

/// A generation as logs print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex(pub u64);

impl fmt::Display for Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Generations {
    /// A freshly formatted node: an identity, no data.
    pub fn fresh(node_id: u64) -> Self {
        assert_ne!(node_id, 0, "node ids are non-zero");
        Generations {
            node_id,
            ..Generations::default()
        }
    }

    pub fn in_history(&self, generation: u64) -> bool {
        generation != 0 && self.history.contains(&generation)
    }

    /// Takes `generation` as the new current; the old one moves into the history and, when the
    /// bitmap counted nothing yet, becomes its base (the bitmap counts changes since it).
    pub fn new_generation(&mut self, generation: u64) {
        assert_ne!(generation, 0, "a generation is non-zero");
        assert_ne!(generation, self.current, "a new generation differs");
        assert!(!self.in_history(generation), "a new generation is new");
        if self.current != 0 {
            self.history.copy_within(0..HISTORY_LEN - 1, 1);
            self.history[0] = self.current;
            if self.bitmap_base == 0 {
                self.bitmap_base = self.current;
            }
        }
        self.current = generation;
        self.check();
    }

    /// Takes the peer's current (after a sync, or when both sides are declared identical).
    pub fn adopt(&mut self, generation: u64) {
        assert_ne!(generation, 0);
        if generation == self.current {
            return;
        }
        // An adopted generation this side held before leaves the history (it is current again).
        if let Some(at) = self.history.iter().position(|&g| g == generation) {
            self.history.copy_within(at + 1.., at);
            self.history[HISTORY_LEN - 1] = 0;
        }
        if self.current != 0 {
            self.history.copy_within(0..HISTORY_LEN - 1, 1);
            self.history[0] = self.current;
        }
        self.current = generation;
        self.check();
    }

    /// The invariants every decoded or changed value keeps.
    pub fn check(&self) {
        assert!(self.validate().is_ok(), "{:?}", self.validate());
    }

    /// Why these generations cannot be a node's (a decoder rejects them).
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.node_id == 0 {
            return Err("zero node id");
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err("unknown flags");
        }
        if self.current == 0 && (self.history[0] != 0 || self.bitmap_base != 0) {
            return Err("history or bitmap base without a current generation");
        }
        let used = self.history.iter().take_while(|&&g| g != 0).count();
        if self.history[used..].iter().any(|&g| g != 0) {
            return Err("a gap in the history");
        }
        let history = &self.history[..used];
        if history.contains(&self.current) {
            return Err("current generation in its own history");
        }
        if history
            .iter()
            .enumerate()
            .any(|(i, g)| history[i + 1..].contains(g))
        {
            return Err("a generation twice in the history");
        }
        Ok(())
    }

    /// Writes the 64-byte form (see [`GENERATIONS_BYTES`]).
    pub fn encode(&self, out: &mut [u8]) {
        assert_eq!(out.len(), GENERATIONS_BYTES);
        out[0..8].copy_from_slice(&self.node_id.to_le_bytes());
        out[8..16].copy_from_slice(&self.current.to_le_bytes());
        for (i, generation) in self.history.iter().enumerate() {
            out[16 + 8 * i..24 + 8 * i].copy_from_slice(&generation.to_le_bytes());
        }
        let at = 16 + 8 * HISTORY_LEN;
        out[at..at + 8].copy_from_slice(&self.bitmap_base.to_le_bytes());
        out[at + 8..at + 12].copy_from_slice(&self.flags.to_le_bytes());
        out[at + 12..at + 16].fill(0);
    }

    /// Reads the 64-byte form, rejecting what [`Generations::validate`] rejects.
    pub fn decode(bytes: &[u8]) -> Result<Self, &'static str> {
        assert_eq!(bytes.len(), GENERATIONS_BYTES);
        let at = 16 + 8 * HISTORY_LEN;
        let mut generations = Generations {
            node_id: le_u64(bytes, 0),
            current: le_u64(bytes, 8),
            history: [0; HISTORY_LEN],
            bitmap_base: le_u64(bytes, at),
            flags: le_u32(bytes, at + 8),
        };
        for (i, generation) in generations.history.iter_mut().enumerate() {
            *generation = le_u64(bytes, 16 + 8 * i);
        }
        if le_u32(bytes, at + 12) != 0 {
            return Err("nonzero padding");
        }
        generations.validate()?;
        Ok(generations)
    }

    /// The most recent generation both sides held, if either history shows one.
    fn common_ancestor(&self, other: &Generations) -> Option<u64> {
        self.history
            .iter()
            .copied()
            .find(|&g| g != 0 && (other.in_history(g) || other.current == g))
            .or_else(|| other.in_history(self.current).then_some(self.current))
    }
}

/// What two sides' generations say of each other (from "our" side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Equal currents: the same data (as far as generations tell).
    InSync,
    /// The peer's current is in our history: it is behind and resyncs from us; from our bitmap
    /// when it counts changes since exactly that generation, in full otherwise.
    PeerBehind { bitmap_usable: bool },
    /// Our current is in the peer's history: we are behind.
    WeAreBehind { bitmap_usable: bool },
    /// Both moved on since `ancestor`: neither side's changes may overwrite the other's.
    SplitBrain {
        ours: u64,
        theirs: u64,
        ancestor: u64,
    },
    /// Both hold data and no generation links them: a full sync (or `assume_identical`).
    NoSharedHistory { ours: u64, theirs: u64 },
    /// Neither side holds data yet.
    BothFresh,
    /// The peer holds no data; we do.
    PeerFresh,
    /// We hold no data; the peer does.
    WeAreFresh,
    /// Both sides carry one node id: one metadata file serves both (a configuration error).
    SameNode,
}

/// Compares our generations with the peer's. Pure and symmetric: `decide(b, a)` is the mirror
/// image of `decide(a, b)`.
pub fn decide(ours: &Generations, theirs: &Generations) -> Decision {
    if ours.node_id == theirs.node_id {
        return Decision::SameNode;
    }
    match (ours.current, theirs.current) {
        (0, 0) => return Decision::BothFresh,
        (a, b) if a == b => return Decision::InSync,
        (0, _) => return Decision::WeAreFresh,
        (_, 0) => return Decision::PeerFresh,
        _ => {}
    }
    if ours.in_history(theirs.current) {
        return Decision::PeerBehind {
            bitmap_usable: ours.bitmap_base == theirs.current,
        };
    }
    if theirs.in_history(ours.current) {
        return Decision::WeAreBehind {
            bitmap_usable: theirs.bitmap_base == ours.current,
        };
    }
    match ours.common_ancestor(theirs) {
        Some(ancestor) => Decision::SplitBrain {
            ours: ours.current,
            theirs: theirs.current,
            ancestor,
        },
        None => Decision::NoSharedHistory {
            ours: ours.current,
            theirs: theirs.current,
        },
    }
}

/// How a handshake that goes ahead leaves the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// The generation both sides hold afterwards (the destination once its resync is done).
    pub generation: u64,
    pub source_adopts: bool,
    pub destination_adopts: bool,
    /// `assume_identical` decided it: both sides record it as consumed.
    pub assumed_identical: bool,
    /// The destination is behind: the source resyncs it first (`None`: in sync).
    pub resync: Option<ResyncKind>,
}

/// What a resync sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncKind {
    /// The extents the source's bitmap marked since the destination's generation.
    Bitmap,
    /// Every extent (no usable bitmap, or a destination without data: the initial sync).
    Full,
}

/// Why a handshake is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source's current is in the destination's history (a stale former source).
    StaleSource,
    SplitBrain,
    /// No shared history (or a side without data): a full sync is needed first.
    FullSyncRequired,
    /// The destination is behind the source: it needs a resync, which this version lacks.
    ResyncRequired,
    SameNode,
}

/// The handshake's verdict on `source` and `destination` generations. `assume_identical` is
/// true when both sides ask for it (config key, not yet consumed); `proposed` is the source's
/// fresh generation for a pair where neither side holds data.
pub fn settle(
    source: &Generations,
    destination: &Generations,
    assume_identical: bool,
    proposed: u64,
) -> Result<Settlement, (Refusal, String)> {
    let (s, d) = (Hex(source.current), Hex(destination.current));
    let accept = |generation, source_adopts, destination_adopts| {
        Ok(Settlement {
            generation,
            source_adopts,
            destination_adopts,
            assumed_identical: source_adopts || destination_adopts,
            resync: None,
        })
    };
    let resync = |generation, source_adopts, kind| {
        Ok(Settlement {
            generation,
            source_adopts,
            destination_adopts: false,
            assumed_identical: false,
            resync: Some(kind),
        })
    };
    let full_sync = |what: String| {
        Err((
            Refusal::FullSyncRequired,
            format!(
                "{what}: a full sync would overwrite the destination's data; set \
                 assume_identical = true on both sides only if both devices are known identical"
            ),
        ))
    };
    match decide(source, destination) {
        Decision::InSync => accept(source.current, false, false),
        // A first handshake that settled on the source's proposal, of which only the destination
        // made its half durable before a crash: the source completes it. The proposal is the
        // source's own random id, so only this pair's accepted settlement can have put it there.
        Decision::WeAreFresh if destination.current == proposed => Ok(Settlement {
            generation: proposed,
            source_adopts: true,
            destination_adopts: false,
            assumed_identical: true,
            resync: None,
        }),
        Decision::BothFresh if assume_identical => {
            assert_ne!(proposed, 0, "the source proposes a non-zero generation");
            accept(proposed, true, true)
        }
        Decision::PeerFresh if assume_identical => accept(source.current, false, true),
        Decision::WeAreFresh if assume_identical => accept(destination.current, true, false),
        Decision::NoSharedHistory { .. } if assume_identical => accept(source.current, false, true),
        // The initial sync: the destination holds nothing, so the source copies everything.
        Decision::BothFresh => {
            assert_ne!(proposed, 0, "the source proposes a non-zero generation");
            resync(proposed, true, ResyncKind::Full)
        }
        Decision::PeerFresh => resync(source.current, false, ResyncKind::Full),
        Decision::WeAreFresh => full_sync(format!(
            "the source holds no data of this volume; the destination is at generation {d}"
        )),
        Decision::NoSharedHistory { .. } => full_sync(format!(
            "source generation {s} and destination generation {d} share no history"
        )),
        Decision::PeerBehind { bitmap_usable } => resync(
            source.current,
            false,
            if bitmap_usable {
                ResyncKind::Bitmap
            } else {
                ResyncKind::Full
            },
        ),
        Decision::WeAreBehind { .. } => Err((
            Refusal::StaleSource,
            format!(
                "stale source: source generation {s} is older than destination generation {d} \
                 (the destination was promoted or took writes since); this source must not serve"
            ),
        )),
        Decision::SplitBrain { ancestor, .. } => Err((
            Refusal::SplitBrain,
            format!(
                "split brain: source generation {s} and destination generation {d} both moved on \
                 since generation {}; refused until an operator discards one side's changes",
                Hex(ancestor)
            ),
        )),
        Decision::SameNode => Err((
            Refusal::SameNode,
            format!(
                "source and destination have the same node id {}: they share one metadata file",
                Hex(source.node_id)
            ),
        )),
    }
}

#[cfg(test)]
mod tests;
