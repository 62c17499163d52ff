//! A scan of files (data directories, sled files, logs) for full card numbers (PANs).
//!
//! # What counts as a PAN here
//!
//! Exactly what the product's guard refuses: the scan reports what
//! [`posfleet_proto::pan::find_pans`] finds, nothing more and nothing less (13 to 19 digits
//! passing the Luhn check, digit groups joined by any single separator or by white space
//! and dashes, card-number groupings joined by single letters; dates, times, Unix times of
//! 2015-2037, IPv4 addresses, UUIDs and IBANs taken out; see that module's docs). Every file
//! is read as **raw bytes**: the valid UTF-8 parts are read as text, and every byte that is
//! not valid UTF-8 ends a run. That covers text (logs, JSON, TOML, PEM) and binary files
//! alike: sled stores a transaction as its protobuf encoding, whose strings are raw bytes in
//! the file and whose numbers are varints (binary, never ASCII digits). Long text is scanned
//! in overlapping pieces of [`PIECE_BYTES`], each finding taken from the piece where it has
//! [`OVERLAP_BYTES`]` / 2` of context on both sides.
//!
//! Findings are reported masked (BIN and last four), never in full.
//!
//! [`ScanReport::exact_hits`] additionally finds given digit strings (the PANs a test posted
//! and the agent refused) anywhere in a run of digits and non-alphanumeric characters, Luhn
//! or not, separators ignored.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use posfleet_proto::pan::{MAX_PAN_DIGITS, MIN_PAN_DIGITS, TextKind, find_pans};

/// Text is scanned in pieces of this many bytes...
pub const PIECE_BYTES: usize = 64 * 1024;
/// ...that overlap by this many.
pub const OVERLAP_BYTES: usize = 512;

/// Files larger than this are refused (the scan reads each file whole).
const MAX_FILE_BYTES: u64 = 2 << 30;

/// One card number as the guard finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    /// Byte offset of the finding's first digit in the file.
    pub offset: usize,
    /// Digits in the finding (the whole run for rule 1).
    pub digits: usize,
    /// First six and last four digits, the rest masked.
    pub masked: String,
    /// Some text around the finding, digits masked, for diagnosis.
    pub context: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} @{}: {} digits {} (context {:?})",
            self.path.display(),
            self.offset,
            self.digits,
            self.masked,
            self.context
        )
    }
}

/// One occurrence of a searched-for number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExactHit {
    pub path: PathBuf,
    pub offset: usize,
    /// Index into the searched list.
    pub which: usize,
}

/// The result of a scan.
#[derive(Debug, Clone, Default)]
pub struct ScanReport {
    pub files: usize,
    pub bytes: u64,
    /// Card data where none may be.
    pub findings: Vec<Finding>,
    /// Occurrences of the searched-for numbers.
    pub exact_hits: Vec<ExactHit>,
}

impl ScanReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty() && self.exact_hits.is_empty()
    }
}

impl fmt::Display for ScanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} files, {} bytes: {} findings, {} exact hits",
            self.files,
            self.bytes,
            self.findings.len(),
            self.exact_hits.len()
        )?;
        for finding in self.findings.iter().take(20) {
            writeln!(f, "  finding: {finding}")?;
        }
        for hit in self.exact_hits.iter().take(20) {
            writeln!(
                f,
                "  searched-for number #{} in {} @{}",
                hit.which,
                hit.path.display(),
                hit.offset
            )?;
        }
        Ok(())
    }
}

/// Scans every regular file under `roots` (recursively; symlinks and sockets skipped).
/// `exact` are digit strings to find anywhere (separators in the files ignored).
pub fn scan_paths(roots: &[PathBuf], exact: &[String]) -> anyhow::Result<ScanReport> {
    let mut report = ScanReport::default();
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(path) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            // Removed meanwhile (a process still running), nothing to scan.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot stat {}", path.display())),
        };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)
                .with_context(|| format!("cannot list {}", path.display()))?
            {
                stack.push(entry?.path());
            }
        } else if meta.is_file() {
            anyhow::ensure!(
                meta.len() <= MAX_FILE_BYTES,
                "{} is too large to scan ({} bytes)",
                path.display(),
                meta.len()
            );
            let bytes =
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
            report.files += 1;
            report.bytes += bytes.len() as u64;
            scan_bytes(&path, &bytes, exact, &mut report);
        }
    }
    Ok(report)
}

/// Scans one file's bytes into `report`.
pub fn scan_bytes(path: &Path, bytes: &[u8], exact: &[String], report: &mut ScanReport) {
    let mut offset = 0;
    for chunk in bytes.utf8_chunks() {
        let text = chunk.valid();
        scan_text(path, bytes, text, offset, report);
        exact_hits(path, text, offset, exact, report);
        offset += text.len() + chunk.invalid().len();
    }
}

/// Scans one valid UTF-8 part (at `base` in the file) in overlapping pieces.
fn scan_text(path: &Path, bytes: &[u8], text: &str, base: usize, report: &mut ScanReport) {
    let mut start = 0;
    loop {
        let end = char_floor(text, (start + PIECE_BYTES).min(text.len()));
        let last = end == text.len();
        let from = if start == 0 {
            0
        } else {
            start + OVERLAP_BYTES / 2
        };
        let to = if last {
            usize::MAX
        } else {
            end - OVERLAP_BYTES / 2
        };
        for range in find_pans(&text[start..end], TextKind::General) {
            let at = start + range.start;
            if !(from..to).contains(&at) {
                continue;
            }
            let digits: String = text[at..start + range.end]
                .chars()
                .filter_map(digit_value)
                .map(|d| char::from(b'0' + d))
                .collect();
            report.findings.push(Finding {
                path: path.to_owned(),
                offset: base + at,
                digits: digits.len(),
                masked: mask(&digits),
                context: context(bytes, base + at, range.len()),
            });
        }
        if last {
            break;
        }
        start = char_floor(text, end - OVERLAP_BYTES);
    }
}

/// The largest char boundary of `text` at or before `at`.
fn char_floor(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Finds the searched-for numbers in runs of digits and non-alphanumeric characters.
fn exact_hits(path: &Path, text: &str, base: usize, exact: &[String], report: &mut ScanReport) {
    if exact.is_empty() {
        return;
    }
    let mut digits = String::new();
    let mut run_start = 0;
    let flush = |digits: &mut String, run_start: usize, report: &mut ScanReport| {
        if digits.len() >= MIN_PAN_DIGITS {
            for (which, number) in exact.iter().enumerate() {
                if !number.is_empty() && digits.contains(number.as_str()) {
                    report.exact_hits.push(ExactHit {
                        path: path.to_owned(),
                        offset: base + run_start,
                        which,
                    });
                }
            }
        }
        digits.clear();
    };
    for (i, c) in text.char_indices() {
        if let Some(d) = digit_value(c) {
            if digits.is_empty() {
                run_start = i;
            }
            digits.push(char::from(b'0' + d));
        } else if c.is_alphanumeric() {
            flush(&mut digits, run_start, report);
        }
    }
    flush(&mut digits, run_start, report);
}

/// `411111******1111`: the first six and last four digits (all masked if shorter than 13).
pub fn mask(digits: &str) -> String {
    if digits.len() < MIN_PAN_DIGITS {
        return "*".repeat(digits.len());
    }
    let (head, rest) = digits.split_at(6);
    let tail = &rest[rest.len() - 4..];
    format!("{head}{}{tail}", "*".repeat(rest.len() - 4))
}

/// Up to 24 bytes either side of a run, printable ASCII only, every digit masked.
fn context(bytes: &[u8], start: usize, len: usize) -> String {
    let from = start.saturating_sub(24);
    let to = (start + len + 24).min(bytes.len());
    bytes[from..to]
        .iter()
        .map(|&b| match b {
            b'0'..=b'9' => '#',
            0x20..=0x7e => char::from(b),
            _ => '.',
        })
        .collect()
}

/// Digits as the guard reads them (ASCII and full-width).
fn digit_value(c: char) -> Option<u8> {
    match c {
        '0'..='9' => Some(c as u8 - b'0'),
        '\u{FF10}'..='\u{FF19}' => u8::try_from(u32::from(c) - 0xFF10).ok(),
        _ => None,
    }
}

/// A Luhn-valid number of `len` digits (13..=19) starting with `prefix`, built from `seed`:
/// for planting in self-checks and posting in tests.
pub fn luhn_number(prefix: &str, len: usize, seed: u64) -> String {
    assert!((MIN_PAN_DIGITS..=MAX_PAN_DIGITS).contains(&len) && prefix.len() < len);
    let mut digits: Vec<u8> = prefix.bytes().map(|b| b - b'0').collect();
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    while digits.len() < len - 1 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        digits.push(((x >> 33) % 10) as u8);
    }
    for check in 0..10 {
        digits.push(check);
        if posfleet_proto::pan::luhn_valid(&digits) {
            return digits.iter().map(|d| char::from(b'0' + d)).collect();
        }
        digits.pop();
    }
    unreachable!("one check digit always fits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use posfleet_proto::pan::contains_pan;

    const NOW_MS: u64 = 1_764_242_400_000;

    fn scan(bytes: &[u8], exact: &[String]) -> ScanReport {
        let mut report = ScanReport::default();
        scan_bytes(Path::new("f"), bytes, exact, &mut report);
        report
    }

    /// A Luhn-valid 13-digit Unix-ms time of today.
    fn luhn_timestamp() -> String {
        (NOW_MS..NOW_MS + 20)
            .map(|t| t.to_string())
            .find(|t| {
                posfleet_proto::pan::luhn_valid(&t.bytes().map(|b| b - b'0').collect::<Vec<_>>())
            })
            .expect("one in ten is Luhn-valid")
    }

    #[test]
    fn finds_a_pan_in_text_and_in_binary_in_every_notation() {
        let pan = luhn_number("411111", 16, 7);
        let grouped = |sep: &str| {
            format!(
                "{}{sep}{}{sep}{}{sep}{}",
                &pan[..4],
                &pan[4..8],
                &pan[8..12],
                &pan[12..]
            )
        };
        let wide: String = pan
            .chars()
            .map(|c| char::from_u32(u32::from(c) - u32::from('0') + 0xFF10).expect("digit"))
            .collect();
        let lettered = format!(
            "{}a{}b{}c{}",
            &pan[..4],
            &pan[4..8],
            &pan[8..12],
            &pan[12..]
        );
        for text in [
            format!("{{\"card\":\"{pan}\"}}"),
            format!("card={} done", grouped(" ")),
            grouped("-"),
            grouped("."),
            grouped(":"),
            format!("x={};", grouped("_")),
            lettered,
            wide,
        ] {
            let report = scan(text.as_bytes(), &[]);
            assert_eq!(report.findings.len(), 1, "{text}: {report}");
            assert_eq!(report.findings[0].masked, mask(&pan));
        }
        // In a binary file, between bytes that are not UTF-8, with the exact offset.
        let mut binary = vec![0xff, 0x00, 0x9c, 0x12];
        binary.extend_from_slice(pan.as_bytes());
        binary.extend_from_slice(&[0x80, 0xfe, 0x01]);
        let report = scan(&binary, std::slice::from_ref(&pan));
        assert_eq!(report.findings.len(), 1, "{report}");
        assert_eq!(report.findings[0].offset, 4);
        assert_eq!(report.exact_hits.len(), 1);
        assert!(
            !report.to_string().contains(&pan),
            "reports never show a PAN"
        );
    }

    /// The scan reports exactly what the guard refuses: Unix times of today (the guard's
    /// shapes) are not findings, the same digits glued to more digits or an old time are.
    #[test]
    fn findings_are_what_the_guard_refuses() {
        let ts = luhn_timestamp();
        let report = scan(format!("{{\"received_ms\":{ts}}}").as_bytes(), &[]);
        assert!(report.findings.is_empty(), "{report}");
        for text in [format!("{ts}7"), format!("x{ts}0y")] {
            let report = scan(text.as_bytes(), &[]);
            assert_eq!(report.findings.len(), 1, "{text}: {report}");
            assert!(contains_pan(&text));
        }
        let old = (1_000_000_000_000u64..)
            .map(|t| t.to_string())
            .find(|t| contains_pan(t))
            .expect("a Luhn-valid old time");
        assert_eq!(scan(old.as_bytes(), &[]).findings.len(), 1);
        let us = (NOW_MS * 1000..NOW_MS * 1000 + 20)
            .map(|t| t.to_string())
            .find(|t| {
                posfleet_proto::pan::luhn_valid(&t.bytes().map(|b| b - b'0').collect::<Vec<_>>())
            })
            .expect("µs");
        assert!(scan(us.as_bytes(), &[]).findings.is_empty());
    }

    #[test]
    fn short_masked_and_shaped_numbers_are_not_findings() {
        let report = scan(
            b"411111******1111 tok_ab12cd34 2026-11-27T03:16:18.123456Z 123456789012 \
              2026-12-07 07:33:31.123456 127.0.0.1:43517 DE89 3704 0044 0532 0130 00",
            &[],
        );
        assert!(report.findings.is_empty(), "{report}");
    }

    /// A text longer than a piece: every finding once, at its offset, wherever the cuts are.
    #[test]
    fn long_text_is_scanned_in_pieces_without_losing_or_doubling_findings() {
        let pan = luhn_number("4111", 16, 5);
        let mut text = String::new();
        let mut offsets = Vec::new();
        while text.len() < 3 * PIECE_BYTES {
            text.push_str(&"log line ünïcödé 07:33:31 x".repeat(7));
            offsets.push(text.len());
            text.push_str(&pan);
            text.push('\n');
        }
        let report = scan(text.as_bytes(), &[]);
        let found: Vec<usize> = report.findings.iter().map(|f| f.offset).collect();
        assert_eq!(found, offsets);
    }

    #[test]
    fn exact_numbers_are_found_whatever_the_separators() {
        let pan = luhn_number("5555", 16, 3);
        let text = format!("a {}-{} b", &pan[..8], &pan[8..]);
        let report = scan(text.as_bytes(), &[pan.clone(), "999".into()]);
        assert_eq!(report.exact_hits.len(), 1);
        assert_eq!(report.exact_hits[0].which, 0);
    }

    #[test]
    fn planted_files_are_found_in_directories() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("a/b")).expect("mkdir");
        let pan = luhn_number("378282", 15, 11);
        std::fs::write(
            dir.path().join("a/b/db"),
            [b"\x00\x01".as_slice(), pan.as_bytes()].concat(),
        )
        .expect("write");
        std::fs::write(
            dir.path().join("a/log"),
            format!("t={}\n", luhn_timestamp()),
        )
        .expect("write");
        let report = scan_paths(&[dir.path().to_owned()], &[]).expect("scan");
        assert_eq!(report.files, 2);
        assert_eq!(report.findings.len(), 1, "{report}");
        assert!(report.findings[0].path.ends_with("a/b/db"));
    }

    #[test]
    fn luhn_numbers_are_valid_and_masks_keep_bin_and_last_four() {
        for len in MIN_PAN_DIGITS..=MAX_PAN_DIGITS {
            let n = luhn_number("4", len, len as u64);
            assert_eq!(n.len(), len);
            assert!(contains_pan(&n), "{n}");
        }
        assert_eq!(mask("4111111111111111"), "411111******1111");
    }
}
