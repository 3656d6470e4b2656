//! What the process may use of the machine's memory, read from Linux's files: the cgroup memory
//! limit (v2 `memory.max`, v1 `memory.limit_in_bytes`: a pod's memory limit), physical memory
//! (`/proc/meminfo`), and the address-space limit (`/proc/self/limits`, `ulimit -v`). Each is
//! set against what it counts of this process now: resident memory for the first two, the
//! mapped address space for the last.

use std::path::Path;

/// Part of what the process may use that is left to the allocator's slack and to the server
/// itself (request bodies, responses, threads): a tenth.
const SLACK_DIVISOR: u64 = 10;

/// Under an address-space limit, what is mapped counts, not what is used: glibc arenas map
/// 64 MiB at once (the binary caps them at two) and freed heap memory stays mapped. There a
/// quarter is left aside, and the two arenas.
const MAPPED_SLACK_DIVISOR: u64 = 4;
const ARENAS_MAPPED: u64 = 2 * (64 << 20);

/// Values at or above this mean "no limit" (cgroup v1 reports 2^63 rounded to a page).
const UNLIMITED: u64 = 1 << 62;

/// The memory limits that apply to this process, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SystemMemory {
    pub cgroup_limit: Option<u64>,
    pub physical: Option<u64>,
    pub address_space_limit: Option<u64>,
    /// This process's resident and mapped (virtual) bytes now.
    pub resident: u64,
    pub mapped: u64,
}

impl SystemMemory {
    /// Reads this process's limits and usage; what cannot be read is left out.
    pub fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self {
            cgroup_limit: cgroup_limit(),
            physical: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| kib_field(&m, "MemTotal:")),
            address_space_limit: std::fs::read_to_string("/proc/self/limits")
                .ok()
                .and_then(|l| address_space_limit(&l)),
            resident: kib_field(&status, "VmRSS:").unwrap_or(0),
            mapped: kib_field(&status, "VmSize:").unwrap_or(0),
        }
    }

    /// Bytes the process may still take: the tightest limit less what it counts of this
    /// process now, less the slack. `None` when no limit is known.
    pub fn capacity(&self) -> Option<u64> {
        let resident = |limit: u64| {
            let left = limit.saturating_sub(self.resident);
            left - left / SLACK_DIVISOR
        };
        let mapped = |limit: u64| {
            let left = limit.saturating_sub(self.mapped);
            (left - left / MAPPED_SLACK_DIVISOR).saturating_sub(ARENAS_MAPPED)
        };
        [
            self.cgroup_limit.map(resident),
            self.physical.map(resident),
            self.address_space_limit.map(mapped),
        ]
        .into_iter()
        .flatten()
        .min()
    }
}

/// A `Name:   123 kB` line of `/proc/self/status` or `/proc/meminfo`, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// The soft "Max address space" of `/proc/self/limits`.
fn address_space_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))?;
    let soft = line["Max address space".len()..]
        .split_whitespace()
        .next()?;
    soft.parse().ok().filter(|&b| b < UNLIMITED)
}

/// This process's cgroup memory limit: v2 (`0::/path`) or v1 (`N:memory:/path`). Inside a
/// container the cgroup is mounted at the root of its hierarchy, so the root's file is read
/// when the path's is missing.
fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = Path::new("/sys/fs/cgroup");
    let candidates = cgroup_files(&cgroups);
    candidates
        .into_iter()
        .find_map(|(dir, file)| {
            let under = root.join(&dir);
            let at = |d: &Path| std::fs::read_to_string(d.join(file)).ok();
            at(&under).or_else(|| at(&root.join(dir.split('/').next().unwrap_or(""))))
        })
        .and_then(|v| parse_limit(&v))
}

/// The files that may hold this process's memory limit, from `/proc/self/cgroup`, as
/// (directory under `/sys/fs/cgroup`, file name).
fn cgroup_files(cgroups: &str) -> Vec<(String, &'static str)> {
    let mut files = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            files.push((path.to_string(), "memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = if path.is_empty() {
                "memory".to_string()
            } else {
                format!("memory/{path}")
            };
            files.push((dir, "memory.limit_in_bytes"));
        }
    }
    files
}

/// A limit file's value: bytes, or `max` / a huge number for none.
fn parse_limit(value: &str) -> Option<u64> {
    value.trim().parse::<u64>().ok().filter(|&b| b < UNLIMITED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_files_are_read_as_linux_writes_them() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max stack size            8388608              unlimited            bytes\n\
                      Max address space         21474836480          unlimited            bytes\n";
        assert_eq!(address_space_limit(limits), Some(21474836480));
        let none = "Max address space         unlimited            unlimited            bytes\n";
        assert_eq!(address_space_limit(none), None);
        let status = "Name:\tsdserve\nVmSize:\t  288264 kB\nVmRSS:\t   43452 kB\n";
        assert_eq!(kib_field(status, "VmRSS:"), Some(43452 * 1024));
        assert_eq!(kib_field(status, "VmSize:"), Some(288264 * 1024));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("8589934592\n"), Some(8 << 30));
    }

    #[test]
    fn cgroup_paths_of_both_versions() {
        let v2 = "0::/kubepods/pod1/c1\n";
        assert_eq!(
            cgroup_files(v2),
            vec![("kubepods/pod1/c1".to_string(), "memory.max")]
        );
        let v1 = "9:name=systemd:/\n4:memory:/process_api/7a\n1:cpu:/\n0::/\n";
        assert_eq!(
            cgroup_files(v1),
            vec![
                ("memory/process_api/7a".to_string(), "memory.limit_in_bytes"),
                (String::new(), "memory.max"),
            ]
        );
    }

    #[test]
    fn the_tightest_limit_counts_with_its_own_usage() {
        let gib = 1u64 << 30;
        let m = SystemMemory {
            cgroup_limit: Some(8 * gib),
            physical: Some(64 * gib),
            address_space_limit: Some(20 * gib),
            resident: gib,
            mapped: 12 * gib,
        };
        // The address space has 8 GiB left: less a quarter and two arenas, 5.875 GiB; the
        // cgroup has 7 GiB left, less a tenth: 6.3 GiB.
        assert_eq!(m.capacity(), Some(6 * gib - gib / 8));
        let cgroup = SystemMemory {
            cgroup_limit: Some(4 * gib),
            ..m
        };
        assert_eq!(cgroup.capacity(), Some(3 * gib - 3 * gib / 10));
        assert_eq!(SystemMemory::default().capacity(), None);
    }
}
