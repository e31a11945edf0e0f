//! `/proc/PID/maps`: the mappings of a process.

use super::{io_err, DirtyError, Result};

/// One line of `/proc/PID/maps`: one mapping (VMA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// Shared (`s`) rather than private copy-on-write (`p`).
    pub shared: bool,
    /// Offset in the mapped file.
    pub offset: u64,
    /// Device of the mapped file, `major:minor` in hex.
    pub dev: String,
    /// Inode of the mapped file, 0 for anonymous memory.
    pub inode: u64,
    /// The path of the mapped file, a pseudo-name such as `[heap]`,
    /// `[stack]` or `[anon:name]`, or empty.
    pub path: String,
}

/// Kernel-provided mappings that are never tracked.
const SPECIAL: &[&str] = &[
    "[vsyscall]",
    "[vvar]",
    "[vvar_vclock]",
    "[vdso]",
    "[uprobes]",
];

impl MapEntry {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the mapping is empty (never true for a real mapping).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    /// Private (copy-on-write) mapping.
    pub fn is_private(&self) -> bool {
        !self.shared
    }

    /// Anonymous memory: no backing file (this includes `[heap]`, `[stack]`
    /// and named anonymous mappings).
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0 && (self.path.is_empty() || self.path.starts_with('['))
    }

    /// One of the kernel's special mappings (`[vdso]`, `[vvar]`,
    /// `[vsyscall]`, ...), never tracked.
    pub fn is_special(&self) -> bool {
        SPECIAL.contains(&self.path.as_str())
    }

    /// Whether dirty tracking follows this mapping: private and writable,
    /// anonymous or file-backed, and not a special mapping.
    pub fn is_trackable(&self) -> bool {
        self.is_private() && self.write && !self.is_special()
    }
}

/// The mappings of a process, as listed by `/proc/PID/maps`, sorted by
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProcessMaps {
    entries: Vec<MapEntry>,
}

impl ProcessMaps {
    /// Reads `/proc/PID/maps`.
    pub fn read(pid: i32) -> Result<Self> {
        let path = format!("/proc/{pid}/maps");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DirtyError::ProcessGone { pid }
            } else {
                io_err(format!("read {path}"))(e)
            }
        })?;
        Self::parse(&text).map_err(|e| match e {
            DirtyError::Parse { reason, .. } => DirtyError::Parse { what: path, reason },
            other => other,
        })
    }

    /// Parses the text of a maps file.
    pub fn parse(text: &str) -> Result<Self> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let entry = parse_line(line).ok_or_else(|| DirtyError::Parse {
                what: "maps".to_string(),
                reason: format!("line {}: {line:?}", n + 1),
            })?;
            entries.push(entry);
        }
        entries.sort_by_key(|e| e.start);
        Ok(ProcessMaps { entries })
    }

    /// All mappings, sorted by address.
    pub fn entries(&self) -> &[MapEntry] {
        &self.entries
    }

    /// The mappings dirty tracking follows ([`MapEntry::is_trackable`]).
    pub fn trackable(&self) -> impl Iterator<Item = &MapEntry> + '_ {
        self.entries.iter().filter(|e| e.is_trackable())
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&MapEntry> {
        let i = self.entries.partition_point(|e| e.end <= addr);
        self.entries.get(i).filter(|e| e.start <= addr)
    }

    /// The first mapping with this path, e.g. `[vdso]`.
    pub fn by_path(&self, path: &str) -> Option<&MapEntry> {
        self.entries.iter().find(|e| e.path == path)
    }
}

/// Splits off the next whitespace-separated field.
fn field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    let end = s.find(' ').unwrap_or(s.len());
    Some((&s[..end], &s[end..]))
}

fn parse_line(line: &str) -> Option<MapEntry> {
    let (range, rest) = field(line)?;
    let (perms, rest) = field(rest)?;
    let (offset, rest) = field(rest)?;
    let (dev, rest) = field(rest)?;
    let (inode, rest) = field(rest)?;
    // The path is the rest of the line after the padding; it may contain
    // spaces (and ends in " (deleted)" for unlinked files).
    let path = rest.trim_start_matches(' ').to_string();
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let p = perms.as_bytes();
    if p.len() != 4 || end < start {
        return None;
    }
    Some(MapEntry {
        start,
        end,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: dev.to_string(),
        inode: inode.parse().ok()?,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234                       /usr/bin/cat
55d0c0a02000-55d0c0a07000 r-xp 00002000 fd:01 1234                       /usr/bin/cat
55d0c0a0a000-55d0c0a0b000 rw-p 00009000 fd:01 1234                       /usr/bin/cat
55d0c1e6e000-55d0c1e8f000 rw-p 00000000 00:00 0                          [heap]
7f1a2b400000-7f1a2b600000 rw-s 00000000 00:01 99                         /dev/shm/with space (deleted)
7f1a2b600000-7f1a2b700000 rw-p 00000000 00:00 0 
7f1a2b700000-7f1a2b701000 ---p 00000000 00:00 0 
7f1a2b701000-7f1a2b702000 rw-p 00000000 00:00 0                          [anon:named]
7ffd3b1a0000-7ffd3b1c1000 rw-p 00000000 00:00 0                          [stack]
7ffd3b1f0000-7ffd3b1f4000 r--p 00000000 00:00 0                          [vvar]
7ffd3b1f4000-7ffd3b1f6000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_maps() {
        let m = ProcessMaps::parse(SAMPLE).expect("parse");
        assert_eq!(m.entries().len(), 12);
        let e = &m.entries()[4];
        assert_eq!(e.path, "/dev/shm/with space (deleted)");
        assert!(e.shared && e.read && e.write && !e.exec);
        assert_eq!(e.inode, 99);
        let cat_data = &m.entries()[2];
        assert_eq!(cat_data.offset, 0x9000);
        assert_eq!(cat_data.dev, "fd:01");
        assert!(!cat_data.is_anonymous());
        let tracked: Vec<&str> = m.trackable().map(|e| e.path.as_str()).collect();
        assert_eq!(
            tracked,
            vec!["/usr/bin/cat", "[heap]", "", "[anon:named]", "[stack]"]
        );
        assert!(m.entries()[5].is_anonymous());
        assert!(m
            .by_path("[vdso]")
            .is_some_and(|e| e.exec && e.is_special()));
        assert_eq!(
            m.find(0x7ffd3b1a0000).map(|e| e.path.as_str()),
            Some("[stack]")
        );
        assert_eq!(m.find(0x7ffd3b1c1000), None);
        assert_eq!(m.entries()[3].len(), 0x21000);
    }

    #[test]
    fn rejects_garbage() {
        assert!(ProcessMaps::parse("hello world\n").is_err());
        assert!(ProcessMaps::parse("1000-2000 rw-p 0 00:00\n").is_err());
        assert!(ProcessMaps::parse("").expect("empty").entries().is_empty());
    }

    #[test]
    fn reads_own_maps() {
        let m = ProcessMaps::read(std::process::id() as i32).expect("own maps");
        assert!(m.by_path("[stack]").is_some());
        assert!(m.trackable().count() > 0);
        assert!(matches!(
            ProcessMaps::read(i32::MAX),
            Err(DirtyError::ProcessGone { .. })
        ));
    }
}
