//! Where a process's resident memory is, from `/proc/PID/smaps` and `/proc/PID/task`: the
//! breakdown `fleet-bench agent-memory` prints.
//!
//! Every mapping is put in one class by what the kernel shows of it:
//!
//! - **binary**: file-backed mappings of the program itself (code, read-only data, relocations);
//! - **libraries**: other file-backed mappings (libc, libm, the loader, locale files);
//! - **main heap**: `[heap]`, the `brk` area of glibc's main malloc arena;
//! - **malloc arenas**: anonymous read-write mappings aligned to 64 MiB and followed by an
//!   inaccessible reservation: glibc's per-thread arenas (`HEAP_MAX_SIZE` on 64-bit);
//! - **thread stacks**: anonymous read-write mappings right above a one-page inaccessible
//!   guard (how pthreads lays out a stack), plus `[stack]`, the main thread's;
//! - **other anonymous**: the rest of the anonymous memory (malloc's large blocks, which it
//!   maps one by one, and anything mapped directly);
//! - **kernel**: `[vdso]`, `[vvar]` and the like.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::Context;

/// Bytes of one class of mappings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassFigures {
    /// Mappings in the class.
    pub mappings: usize,
    /// Resident bytes (`Rss`).
    pub rss: u64,
    /// Resident bytes not shared with another process (`Private_Clean` + `Private_Dirty`).
    pub private: u64,
}

/// The classes of the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Binary,
    Libraries,
    MainHeap,
    MallocArenas,
    ThreadStacks,
    OtherAnonymous,
    Kernel,
}

impl Class {
    pub const ALL: [Self; 7] = [
        Self::Binary,
        Self::Libraries,
        Self::MainHeap,
        Self::MallocArenas,
        Self::ThreadStacks,
        Self::OtherAnonymous,
        Self::Kernel,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::Libraries => "libraries",
            Self::MainHeap => "main heap",
            Self::MallocArenas => "malloc arenas",
            Self::ThreadStacks => "thread stacks",
            Self::OtherAnonymous => "other anonymous",
            Self::Kernel => "kernel",
        }
    }
}

/// One process's memory by class, and its threads by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryMap {
    pub classes: BTreeMap<Class, ClassFigures>,
    /// Thread name (`comm`) → how many threads carry it.
    pub threads: BTreeMap<String, usize>,
}

impl MemoryMap {
    /// Reads `/proc/PID/smaps`, `/proc/PID/exe` and `/proc/PID/task/*/comm`.
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        let smaps_path = format!("/proc/{pid}/smaps");
        let smaps = std::fs::read_to_string(&smaps_path)
            .with_context(|| format!("cannot read {smaps_path}"))?;
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("cannot read /proc/{pid}/exe"))?;
        let mut map = Self::from_smaps(&smaps, &exe.to_string_lossy());
        let tasks = format!("/proc/{pid}/task");
        for entry in std::fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            let comm = entry
                .ok()
                .and_then(|e| std::fs::read_to_string(e.path().join("comm")).ok());
            // A thread that ended between the listing and the read is not counted.
            if let Some(comm) = comm {
                *map.threads.entry(comm.trim().to_owned()).or_default() += 1;
            }
        }
        Ok(map)
    }

    /// The classes of `smaps` (the text of `/proc/PID/smaps`) for a program at `exe`.
    pub fn from_smaps(smaps: &str, exe: &str) -> Self {
        let mappings = parse(smaps);
        let mut classes: BTreeMap<Class, ClassFigures> = BTreeMap::new();
        for (i, m) in mappings.iter().enumerate() {
            let class = classify(&mappings, i, exe);
            let figures = classes.entry(class).or_default();
            figures.mappings += 1;
            figures.rss += m.rss;
            figures.private += m.private;
        }
        Self {
            classes,
            threads: BTreeMap::new(),
        }
    }

    /// Resident bytes of one class.
    pub fn rss(&self, class: Class) -> u64 {
        self.classes.get(&class).map_or(0, |c| c.rss)
    }

    /// Resident bytes over every class (what `VmRSS` shows, up to the moment of each read).
    pub fn total_rss(&self) -> u64 {
        self.classes.values().map(|c| c.rss).sum()
    }

    /// Threads over every name.
    pub fn thread_count(&self) -> usize {
        self.threads.values().sum()
    }
}

impl fmt::Display for MemoryMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kib = |b: u64| b as f64 / 1024.0;
        for class in Class::ALL {
            let c = self.classes.get(&class).copied().unwrap_or_default();
            writeln!(
                f,
                "    {:<16} {:>8.0} KiB resident ({:>8.0} KiB private) in {} mappings",
                class.name(),
                kib(c.rss),
                kib(c.private),
                c.mappings
            )?;
        }
        writeln!(f, "    {:<16} {:>8.0} KiB", "total", kib(self.total_rss()))?;
        let threads: Vec<String> = self
            .threads
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect();
        write!(
            f,
            "    threads ({}): {}",
            self.thread_count(),
            threads.join(", ")
        )
    }
}

/// One mapping of smaps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    /// Empty for an anonymous mapping.
    path: String,
    rss: u64,
    private: u64,
}

/// 64 MiB: glibc's `HEAP_MAX_SIZE` on 64-bit, the size and alignment of a non-main arena.
const ARENA_ALIGN: u64 = 64 << 20;
const PAGE: u64 = 4096;

fn parse(smaps: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else {
            continue;
        };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let perms = words.next().unwrap_or_default().to_owned();
            // offset, device, inode, then the path (which may hold spaces).
            let path = words.skip(3).collect::<Vec<_>>().join(" ");
            out.push(Mapping {
                start,
                end,
                perms,
                path,
                rss: 0,
                private: 0,
            });
            continue;
        }
        let Some(current) = out.last_mut() else {
            continue;
        };
        let kib = || -> u64 {
            line.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => current.rss = kib() * 1024,
            "Private_Clean:" | "Private_Dirty:" => current.private += kib() * 1024,
            _ => {}
        }
    }
    out
}

fn classify(mappings: &[Mapping], i: usize, exe: &str) -> Class {
    let m = &mappings[i];
    if m.path == exe {
        return Class::Binary;
    }
    if m.path.starts_with('/') {
        return Class::Libraries;
    }
    match m.path.as_str() {
        "[heap]" => return Class::MainHeap,
        "[stack]" => return Class::ThreadStacks,
        "" => {}
        _ => return Class::Kernel,
    }
    let inaccessible = |m: &Mapping| m.perms.starts_with("---") && m.path.is_empty();
    let guard_below = i.checked_sub(1).map(|j| &mappings[j]).is_some_and(|below| {
        inaccessible(below) && below.end == m.start && below.end - below.start <= PAGE
    });
    if guard_below {
        return Class::ThreadStacks;
    }
    let reservation_above = mappings
        .get(i + 1)
        .is_some_and(|above| inaccessible(above) && above.start == m.end);
    if m.start % ARENA_ALIGN == 0 && reservation_above {
        return Class::MallocArenas;
    }
    Class::OtherAnonymous
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(range: &str, perms: &str, path: &str, rss_kib: u64, private_kib: u64) -> String {
        format!(
            "{range} {perms} 00000000 00:00 0 {path}\nSize: 4 kB\nRss: {rss_kib} kB\nShared_Clean: 0 kB\nPrivate_Clean: 0 kB\nPrivate_Dirty: {private_kib} kB\nVmFlags: rd wr mr mw me ac\n"
        )
    }

    #[test]
    fn classes_by_path_guard_and_arena_layout() {
        let smaps = [
            mapping(
                "555555554000-555555600000",
                "r-xp",
                "/usr/bin/agent",
                900,
                0,
            ),
            mapping("555555600000-555555610000", "rw-p", "[heap]", 48, 48),
            // A thread stack: a one-page guard, then the stack.
            mapping("7f0000000000-7f0000001000", "---p", "", 0, 0),
            mapping("7f0000001000-7f0000801000", "rw-p", "", 16, 16),
            // A malloc arena: 64 MiB aligned, its reservation right above.
            mapping("7f0004000000-7f0004100000", "rw-p", "", 132, 132),
            mapping("7f0004100000-7f0008000000", "---p", "", 0, 0),
            // A large block malloc mapped on its own.
            mapping("7f0010000000-7f0010100000", "rw-p", "", 1024, 1024),
            mapping(
                "7f0020000000-7f0020100000",
                "r-xp",
                "/usr/lib/libc.so.6",
                600,
                8,
            ),
            mapping("7ffff7fc1000-7ffff7fc5000", "r--p", "[vvar]", 0, 0),
            mapping("7ffffffde000-7ffffffff000", "rw-p", "[stack]", 20, 20),
        ]
        .concat();
        let map = MemoryMap::from_smaps(&smaps, "/usr/bin/agent");
        let kib = |class| map.rss(class) / 1024;
        assert_eq!(kib(Class::Binary), 900);
        assert_eq!(kib(Class::MainHeap), 48);
        assert_eq!(kib(Class::ThreadStacks), 36);
        assert_eq!(kib(Class::MallocArenas), 132);
        assert_eq!(kib(Class::OtherAnonymous), 1024);
        assert_eq!(kib(Class::Libraries), 600);
        assert_eq!(map.classes[&Class::Libraries].private, 8 * 1024);
        assert_eq!(map.classes[&Class::Kernel].mappings, 1);
        // The two inaccessible mappings are anonymous but neither stack nor arena.
        assert_eq!(map.classes[&Class::OtherAnonymous].mappings, 3);
        assert_eq!(map.total_rss() / 1024, 900 + 48 + 36 + 132 + 1024 + 600);
    }

    #[test]
    fn a_live_process_adds_up_to_its_vmrss() {
        let map = MemoryMap::of(std::process::id()).expect("own smaps");
        assert!(map.rss(Class::Binary) > 0, "{map}");
        assert!(map.thread_count() >= 1, "{map}");
        let rss = crate::host::rss_bytes(std::process::id()).expect("own VmRSS");
        // Both are reads of a running process, moments apart: close, not equal.
        let diff = rss.abs_diff(map.total_rss());
        assert!(diff < rss / 4, "smaps {} vs VmRSS {rss}", map.total_rss());
    }
}
