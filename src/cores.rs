//! Which cores a reactor may be pinned to. A core *exists* when the machine has it online
//! (`/sys/devices/system/cpu/online`); whether this process may run there is another question,
//! answered by its affinity mask (`taskset`, a cpuset). `taskset -c 1 nvmirror --cores 1` is
//! valid: core 1 exists and is in the mask. A core that exists outside the mask is accepted with a
//! warning at start, since the reactor's pinning may then be refused (it runs unpinned).

use std::fmt::Write as _;

const ONLINE_PATH: &str = "/sys/devices/system/cpu/online";

/// The machine's online cores and the ones this process's affinity mask allows, both ascending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSet {
    pub online: Vec<usize>,
    pub allowed: Vec<usize>,
}

impl CpuSet {
    /// What this process sees now.
    pub fn of_this_process() -> CpuSet {
        let allowed: Vec<usize> = core_affinity::get_core_ids()
            .map(|ids| {
                let mut ids: Vec<usize> = ids.into_iter().map(|id| id.id).collect();
                ids.sort_unstable();
                ids
            })
            .unwrap_or_default();
        let online = std::fs::read_to_string(ONLINE_PATH)
            .ok()
            .and_then(|text| parse_cpu_list(&text))
            // No sysfs: the mask is the best we know, and at least core 0 exists.
            .unwrap_or_else(|| {
                if allowed.is_empty() {
                    vec![0]
                } else {
                    allowed.clone()
                }
            });
        CpuSet { online, allowed }
    }

    /// Checks `cores`: an error (the reason) for a core that is not online; otherwise the cores
    /// that lie outside the affinity mask (pinning to them may fail), for the caller to warn of.
    pub fn check(&self, cores: &[usize]) -> Result<Vec<usize>, String> {
        if let Some(core) = cores.iter().find(|core| !self.online.contains(core)) {
            return Err(format!(
                "core {core} does not exist (online cores: {})",
                format_cpu_list(&self.online)
            ));
        }
        // An unknown mask (empty) is no reason to warn.
        Ok(cores
            .iter()
            .copied()
            .filter(|core| !self.allowed.is_empty() && !self.allowed.contains(core))
            .collect())
    }

    /// [`CpuSet::check`], logging a warning naming `key` for each core outside the affinity mask.
    pub fn check_and_warn(&self, key: &str, cores: &[usize]) -> Result<(), String> {
        for core in self.check(cores)? {
            log::warn!("{}", self.outside_mask_warning(key, core));
        }
        Ok(())
    }

    fn outside_mask_warning(&self, key: &str, core: usize) -> String {
        format!(
            "{key}: core {core} is online but outside this process's CPU affinity mask ({}, as taskset \
             or a cpuset set it): pinning a reactor to it may be refused, and the reactor then runs unpinned",
            format_cpu_list(&self.allowed)
        )
    }

    /// The first online core not in `used`, if any (where a host's load generator should run).
    pub fn first_unused(&self, used: &[usize]) -> Option<usize> {
        self.online
            .iter()
            .copied()
            .find(|core| !used.contains(core))
    }
}

/// SPDK's `-c` value that runs an SPDK tool on `core` alone: a hex mask (`0x2` for core 1), or
/// SPDK's list form (`[70]`) past the 64 bits a mask literal is read into.
pub fn spdk_core_mask(core: usize) -> String {
    if core < 64 {
        format!("0x{:x}", 1u64 << core)
    } else {
        format!("[{core}]")
    }
}

/// Parses a kernel CPU list such as `0-3,6,8-9` (ascending, no duplicates); `None` if malformed.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cores = Vec::new();
    for part in text.trim().split(',').filter(|part| !part.is_empty()) {
        let (first, last): (usize, usize) = match part.split_once('-') {
            Some((first, last)) => (first.parse().ok()?, last.parse().ok()?),
            None => {
                let core = part.parse().ok()?;
                (core, core)
            }
        };
        if first > last {
            return None;
        }
        cores.extend(first..=last);
    }
    cores.sort_unstable();
    cores.dedup();
    (!cores.is_empty()).then_some(cores)
}

/// The inverse of [`parse_cpu_list`]: ascending cores as `0-3,6`.
pub fn format_cpu_list(cores: &[usize]) -> String {
    let mut text = String::new();
    let mut index = 0;
    while index < cores.len() {
        let first = cores[index];
        let mut last = first;
        while index + 1 < cores.len() && cores[index + 1] == last + 1 {
            index += 1;
            last = cores[index];
        }
        if !text.is_empty() {
            text.push(',');
        }
        let _ = if first == last {
            write!(text, "{first}")
        } else {
            write!(text, "{first}-{last}")
        };
        index += 1;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2-core machine under `taskset -c 1`.
    fn masked_to_core_1() -> CpuSet {
        CpuSet {
            online: vec![0, 1],
            allowed: vec![1],
        }
    }

    #[test]
    fn cpu_lists_parse_and_format() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-4,7"), Some(vec![0, 2, 3, 4, 7]));
        assert_eq!(parse_cpu_list("3"), Some(vec![3]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("4-2"), None);
        assert_eq!(parse_cpu_list("a-b"), None);
        assert_eq!(format_cpu_list(&[0, 2, 3, 4, 7]), "0,2-4,7");
        assert_eq!(format_cpu_list(&[1]), "1");
        assert_eq!(format_cpu_list(&[0, 1]), "0-1");
    }

    #[test]
    fn a_core_in_the_mask_is_accepted_though_the_mask_is_smaller_than_the_machine() {
        assert_eq!(masked_to_core_1().check(&[1]), Ok(vec![]));
    }

    #[test]
    fn an_online_core_outside_the_mask_is_accepted_and_reported() {
        let cpus = masked_to_core_1();
        assert_eq!(cpus.check(&[0, 1]), Ok(vec![0]));
        let warning = cpus.outside_mask_warning("--cores", 0);
        assert!(
            warning.contains("core 0") && warning.contains("affinity mask (1"),
            "{warning}"
        );
        assert!(!warning.contains("does not exist"), "{warning}");
    }

    #[test]
    fn a_core_that_is_not_online_does_not_exist() {
        let error = masked_to_core_1().check(&[1, 2]).unwrap_err();
        assert_eq!(error, "core 2 does not exist (online cores: 0-1)");
    }

    #[test]
    fn spdk_core_masks_select_one_core() {
        assert_eq!(spdk_core_mask(0), "0x1");
        assert_eq!(spdk_core_mask(1), "0x2");
        assert_eq!(spdk_core_mask(5), "0x20");
        assert_eq!(spdk_core_mask(63), "0x8000000000000000");
        assert_eq!(spdk_core_mask(64), "[64]");
    }

    #[test]
    fn the_first_unused_core_is_found() {
        let cpus = masked_to_core_1();
        assert_eq!(cpus.first_unused(&[0]), Some(1));
        assert_eq!(cpus.first_unused(&[1]), Some(0));
        assert_eq!(cpus.first_unused(&[0, 1]), None);
    }

    #[test]
    fn this_process_sees_its_mask_within_the_online_cores() {
        let cpus = CpuSet::of_this_process();
        assert!(!cpus.online.is_empty());
        assert!(cpus.allowed.iter().all(|core| cpus.online.contains(core)));
    }
}
