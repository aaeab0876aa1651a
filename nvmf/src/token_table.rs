//! Which request of which connection a backend completion belongs to: an open-addressing table
//! keyed by the token itself.
//!
//! Backends hand out tokens in sequence (write ids, counters), and completions come back in
//! roughly the same order. Indexed by the token's low bits with linear probing, consecutive
//! tokens sit in consecutive entries, so the commands in flight share a few cache lines; a
//! scattering hash made the table a cache miss per command (4% of a replicated QD 32 profile).
//! Deletion shifts the probe chain back (no tombstones, so no periodic rehash).

use crate::backend::IoToken;
use crate::poll_group::ConnectionKey;

/// A used entry: the token and its value (`None`: empty).
type Entry<V> = Option<(u64, V)>;

/// Tokens to what waits for them (the target: a command's connection and slot; SPDK's bdev
/// front end: a bdev I/O).
#[derive(Debug)]
pub struct TokenTable<V: Copy = (ConnectionKey, u16)> {
    entries: Vec<Entry<V>>,
    len: usize,
}

impl<V: Copy> Default for TokenTable<V> {
    fn default() -> Self {
        TokenTable {
            entries: Vec::new(),
            len: 0,
        }
    }
}

impl<V: Copy> TokenTable<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens it holds without growing (at most half full, so probe chains stay short).
    pub fn capacity(&self) -> usize {
        self.entries.len() / 2
    }

    /// Room for `capacity` tokens; grows (and rehashes) only here or in [`Self::insert_growing`].
    pub fn reserve_total(&mut self, capacity: usize) {
        if capacity <= self.capacity() {
            return;
        }
        let old = std::mem::replace(
            &mut self.entries,
            vec![None; (capacity * 2).next_power_of_two()],
        );
        self.len = 0;
        for (token, value) in old.into_iter().flatten() {
            self.insert(IoToken(token), value);
        }
    }

    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    fn home(&self, token: u64) -> usize {
        // The low bits, folded with the high ones so "high bit | counter" tokens spread too.
        (token ^ (token >> 32)) as usize & self.mask()
    }

    /// The entry holding `token`, if any.
    fn find(&self, token: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let mut at = self.home(token);
        loop {
            match self.entries[at] {
                None => return None,
                Some((held, _)) if held == token => return Some(at),
                Some(_) => at = (at + 1) & self.mask(),
            }
        }
    }

    /// Adds `token`; returns the previous value if it was present (replaced). The table must
    /// have room ([`Self::reserve_total`]): the target sizes it at connection setup.
    pub fn insert(&mut self, token: IoToken, value: V) -> Option<V> {
        assert!(self.len < self.capacity(), "token table sized ahead of use");
        let mut at = self.home(token.0);
        loop {
            let slot = &mut self.entries[at];
            match *slot {
                None => {
                    *slot = Some((token.0, value));
                    self.len += 1;
                    return None;
                }
                Some((held, previous)) if held == token.0 => {
                    *slot = Some((token.0, value));
                    return Some(previous);
                }
                Some(_) => at = (at + 1) & self.mask(),
            }
        }
    }

    /// [`Self::insert`], doubling the table first when it is full (for users that cannot
    /// know their number of tokens in flight ahead).
    pub fn insert_growing(&mut self, token: IoToken, value: V) -> Option<V> {
        if self.len >= self.capacity() {
            self.reserve_total((self.capacity() * 2).max(64));
        }
        self.insert(token, value)
    }

    pub fn remove(&mut self, token: &IoToken) -> Option<V> {
        let mut hole = self.find(token.0)?;
        let (_, removed) = self.entries[hole].take().expect("found");
        self.len -= 1;
        // Backward-shift: move later entries of the chain into the hole when their home
        // position is not between the hole and themselves (cyclically).
        let mask = self.mask();
        let mut at = (hole + 1) & mask;
        while let Some((held, _)) = self.entries[at] {
            let home = self.home(held);
            let distance_home = at.wrapping_sub(home) & mask;
            let distance_hole = at.wrapping_sub(hole) & mask;
            if distance_home >= distance_hole {
                self.entries[hole] = self.entries[at].take();
                hole = at;
            }
            at = (at + 1) & mask;
        }
        Some(removed)
    }

    /// Keeps the tokens `keep` says to keep (a connection closed: drop its tokens).
    pub fn retain(&mut self, mut keep: impl FnMut(&IoToken, &mut V) -> bool) {
        let dropped: Vec<u64> = self
            .entries
            .iter()
            .flatten()
            .filter(|&&(token, mut value)| !keep(&IoToken(token), &mut value))
            .map(|&(token, _)| token)
            .collect();
        for token in dropped {
            self.remove(&IoToken(token));
        }
    }

    /// Empties the table: every token and value it held.
    pub fn drain(&mut self) -> Vec<(IoToken, V)> {
        self.len = 0;
        self.entries
            .iter_mut()
            .filter_map(|entry| entry.take())
            .map(|(token, value)| (IoToken(token), value))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(slot: u32) -> ConnectionKey {
        ConnectionKey {
            slot,
            generation: 1,
        }
    }

    /// Against a std map, with tokens that collide, wrap and come back out of order.
    #[test]
    fn behaves_like_a_map_under_churn() {
        let mut table = TokenTable::default();
        table.reserve_total(64);
        let mut model = std::collections::HashMap::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for step in 0..20_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Sequential tokens, some with the high bit, some far apart (same low bits).
            let token = match state % 3 {
                0 => step,
                1 => (1 << 63) | step,
                _ => step << 20,
            };
            if model.len() < 60 && state % 5 < 3 {
                let value = (key((step % 7) as u32), (step % 100) as u16);
                assert_eq!(
                    table.insert(IoToken(token), value),
                    model.insert(token, value)
                );
            } else if let Some(&victim) = model.keys().next() {
                assert_eq!(table.remove(&IoToken(victim)), model.remove(&victim));
                assert_eq!(table.remove(&IoToken(victim)), None);
            }
            assert_eq!(table.len(), model.len());
        }
        for (token, value) in &model {
            assert_eq!(
                table
                    .find(*token)
                    .and_then(|at| table.entries[at].map(|(_, value)| value)),
                Some(*value)
            );
        }
        table.retain(|_, (owner, _)| owner.slot != 3);
        model.retain(|_, (owner, _)| owner.slot != 3);
        assert_eq!(table.len(), model.len());
        for token in model.keys() {
            assert!(table.find(*token).is_some());
        }
    }

    #[test]
    fn growing_keeps_every_token() {
        let mut table = TokenTable::default();
        table.reserve_total(4);
        for token in 0..4 {
            table.insert(IoToken(token), (key(0), token as u16));
        }
        table.reserve_total(100);
        assert!(table.capacity() >= 100);
        for token in 0..4 {
            assert_eq!(table.remove(&IoToken(token)), Some((key(0), token as u16)));
        }
        assert!(table.is_empty());
    }
}
