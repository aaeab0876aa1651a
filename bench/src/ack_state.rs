//! Crash checks: what a verify run had acknowledged when it ended (`--ack-state FILE`), and the
//! check of an image against it (`nvmirror-perf check-image`).
//!
//! A target killed at any moment may leave a block holding its latest acknowledged write or a
//! later write that was in flight (or failed) when it died, never an older one, and never a mix
//! of two. The state file is text, a header line then one line per block written in the run:
//!
//! ```text
//! nvmirror-perf ack-state 1 run_id=0x… io_size=4096 block_count=4096
//! <block> <acked sequence, 0 = none> <latest issued sequence>
//! ```
//!
//! Block `b` covers bytes `b * io_size ..` of the namespace image (LBA `b * io_size / 512`).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::verify::{self, SECTOR_BYTES};

const HEADER: &str = "nvmirror-perf ack-state 1";

/// The state of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckState {
    pub run_id: u64,
    pub io_size_bytes: u32,
    pub block_count: u64,
    /// (block, acked, attempted), blocks ascending.
    pub blocks: Vec<(u64, u64, u64)>,
}

impl AckState {
    pub fn to_text(&self) -> String {
        let mut text = format!(
            "{HEADER} run_id={:#x} io_size={} block_count={}\n",
            self.run_id, self.io_size_bytes, self.block_count
        );
        for (block, acked, attempted) in &self.blocks {
            writeln!(text, "{block} {acked} {attempted}").expect("writing to a String");
        }
        text
    }

    /// Written to a temporary name and renamed, so a reader never sees half a file.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let temporary = path.with_extension("partial");
        std::fs::write(&temporary, self.to_text())
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|e| format!("--ack-state {}: {e}", path.display()))
    }

    pub fn load(path: &Path) -> Result<AckState, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut lines = BufReader::new(file).lines();
        let bad = |what: &str| format!("{}: {what}", path.display());
        let header = lines
            .next()
            .ok_or_else(|| bad("empty"))?
            .map_err(|e| bad(&e.to_string()))?;
        let fields = header
            .strip_prefix(HEADER)
            .ok_or_else(|| bad("not an nvmirror-perf ack-state file (version 1)"))?;
        let field = |name: &str| {
            fields
                .split_whitespace()
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .ok_or_else(|| bad(&format!("header lacks {name}")))
        };
        let run_id = u64::from_str_radix(field("run_id")?.trim_start_matches("0x"), 16)
            .map_err(|_| bad("bad run_id"))?;
        let io_size_bytes: u32 = field("io_size")?.parse().map_err(|_| bad("bad io_size"))?;
        let block_count: u64 = field("block_count")?
            .parse()
            .map_err(|_| bad("bad block_count"))?;
        if io_size_bytes == 0 || !(io_size_bytes as usize).is_multiple_of(SECTOR_BYTES) {
            return Err(bad("io_size is not a multiple of 512"));
        }
        let mut blocks = Vec::new();
        for (number, line) in lines.enumerate() {
            let line = line.map_err(|e| bad(&e.to_string()))?;
            let values: Vec<u64> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| bad(&format!("line {}: not three numbers", number + 2)))?;
            let [block, acked, attempted] = values[..] else {
                return Err(bad(&format!("line {}: not three numbers", number + 2)));
            };
            if block >= block_count || acked > attempted || attempted == 0 {
                return Err(bad(&format!("line {}: inconsistent", number + 2)));
            }
            blocks.push((block, acked, attempted));
        }
        Ok(AckState {
            run_id,
            io_size_bytes,
            block_count,
            blocks,
        })
    }
}

/// What the check of one image found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImageCheck {
    /// Blocks written in the run.
    pub blocks_checked: u64,
    /// Blocks with an acknowledged write (each must be there or be overwritten by a later one).
    pub acked_writes_checked: u64,
    /// An acknowledged write is gone: the block holds no write of this run.
    pub lost: u64,
    /// Sectors of one block from different writes, or not a sector the tool wrote.
    pub torn: u64,
    /// The block holds a write of this run older than its acknowledged one.
    pub stale: u64,
}

impl ImageCheck {
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.torn == 0 && self.stale == 0
    }

    pub fn json(&self) -> String {
        format!(
            "{{\"blocks_checked\":{},\"acked_writes_checked\":{},\"lost\":{},\"torn\":{},\"stale\":{}}}",
            self.blocks_checked, self.acked_writes_checked, self.lost, self.torn, self.stale
        )
    }
}

/// What one block of an image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Every sector is zero (never written).
    Zeroes,
    /// Every sector is a stamp of one write: (run, sequence).
    Write(u64, u64),
    /// Anything else.
    Torn,
}

fn classify(block: &[u8], first_lba: u64) -> Content {
    if block.iter().all(|&b| b == 0) {
        return Content::Zeroes;
    }
    let mut identity = None;
    for (index, sector) in block.chunks_exact(SECTOR_BYTES).enumerate() {
        match verify::read_stamp(sector) {
            Some(stamp) if stamp.lba == first_lba + index as u64 => {
                let this = (stamp.run_id, stamp.sequence);
                if *identity.get_or_insert(this) != this {
                    return Content::Torn;
                }
            }
            _ => return Content::Torn,
        }
    }
    let (run, sequence) = identity.expect("a block has sectors");
    Content::Write(run, sequence)
}

/// Checks every block `state` lists against `image` (the namespace's bytes from offset 0),
/// printing the first few problems.
pub fn check_image(state: &AckState, image: &Path) -> Result<ImageCheck, String> {
    let mut file = std::fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    let io_size = state.io_size_bytes as usize;
    let mut buffer = vec![0u8; io_size];
    let mut check = ImageCheck::default();
    let mut reported = 0;
    for &(block, acked, attempted) in &state.blocks {
        file.seek(SeekFrom::Start(block * io_size as u64))
            .and_then(|_| file.read_exact(&mut buffer))
            .map_err(|e| format!("{} block {block}: {e}", image.display()))?;
        check.blocks_checked += 1;
        check.acked_writes_checked += u64::from(acked != 0);
        let first_lba = block * (io_size / SECTOR_BYTES) as u64;
        let problem = match classify(&buffer, first_lba) {
            Content::Torn => {
                check.torn += 1;
                Some("torn (sectors of different writes, or not written by this tool)")
            }
            Content::Write(run, sequence) if run == state.run_id => {
                if sequence < acked {
                    check.stale += 1;
                    Some("stale (older than its acknowledged write)")
                } else if sequence > attempted {
                    check.torn += 1;
                    Some("a sequence this run never wrote there")
                } else {
                    None
                }
            }
            // Another run's data or zeroes: fine only if nothing was acknowledged.
            Content::Write(..) | Content::Zeroes if acked != 0 => {
                check.lost += 1;
                Some("lost (holds no write of this run)")
            }
            Content::Write(..) | Content::Zeroes => None,
        };
        if let Some(problem) = problem {
            if reported < 10 {
                reported += 1;
                eprintln!(
                    "check-image: {} block {block} (LBA {first_lba}): {problem}; acked seq {acked}, latest issued {attempted}",
                    image.display()
                );
            }
        }
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::stamp_block;

    const RUN: u64 = 0xfeed;

    fn image_with(blocks: &[Option<(u64, u64)>]) -> Vec<u8> {
        let mut image = vec![0u8; blocks.len() * 4096];
        for (index, content) in blocks.iter().enumerate() {
            if let Some((run, sequence)) = content {
                stamp_block(
                    &mut image[index * 4096..(index + 1) * 4096],
                    index as u64 * 8,
                    *run,
                    *sequence,
                );
            }
        }
        image
    }

    #[test]
    fn the_state_file_round_trips_and_rejects_nonsense() {
        let dir = std::env::temp_dir().join(format!("ack-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let state = AckState {
            run_id: RUN,
            io_size_bytes: 4096,
            block_count: 8,
            blocks: vec![(0, 3, 3), (5, 0, 9)],
        };
        state.save(&path).unwrap();
        assert_eq!(AckState::load(&path).unwrap(), state);
        std::fs::write(
            &path,
            format!("{HEADER} run_id=0x1 io_size=4096 block_count=8\n9 1 1\n"),
        )
        .unwrap();
        assert!(AckState::load(&path).unwrap_err().contains("inconsistent"));
        std::fs::write(&path, "something else\n").unwrap();
        assert!(AckState::load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("check-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("image");
        let blocks = [
            Some((RUN, 5)), // 0: acked 5: ok
            Some((RUN, 7)), // 1: acked 5, 7 in flight: ok
            Some((RUN, 4)), // 2: acked 5: stale
            None,           // 3: acked 5: lost
            Some((1, 5)),   // 4: another run, acked 5: lost
            None,           // 5: nothing acked, 6 in flight: ok
            Some((RUN, 9)), // 6: torn below
        ];
        let mut image = image_with(&blocks);
        // Block 6: its second sector from another write.
        let mut other = vec![0u8; 4096];
        stamp_block(&mut other, 48, RUN, 8);
        image[6 * 4096 + 512..6 * 4096 + 1024].copy_from_slice(&other[512..1024]);
        std::fs::write(&path, &image).unwrap();
        let state = AckState {
            run_id: RUN,
            io_size_bytes: 4096,
            block_count: 7,
            blocks: vec![
                (0, 5, 5),
                (1, 5, 7),
                (2, 5, 5),
                (3, 5, 5),
                (4, 5, 5),
                (5, 0, 6),
                (6, 9, 9),
            ],
        };
        let check = check_image(&state, &path).unwrap();
        assert_eq!(
            check,
            ImageCheck {
                blocks_checked: 7,
                acked_writes_checked: 6,
                lost: 2,
                torn: 1,
                stale: 1,
            }
        );
        assert!(!check.is_clean());
        let clean = AckState {
            blocks: vec![(0, 5, 5), (1, 5, 7), (5, 0, 6)],
            ..state
        };
        assert!(check_image(&clean, &path).unwrap().is_clean());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
