//! A scan of files (data directories, sled files, logs) for full card numbers (PANs).
//!
//! # What counts as a PAN here
//!
//! Exactly what the product's guard refuses ([`posfleet_proto::pan::contains_pan`]): 13 to
//! 19 digits passing the Luhn check, separators (white space, dashes) between digits
//! allowed, any 13..=19-digit window of a longer run. Every file is read as **raw bytes**:
//! the valid UTF-8 parts are read as text (ASCII digits, full-width digits, the guard's
//! separators), and every byte that is not valid UTF-8 ends a run. That covers text (logs,
//! JSON, TOML, PEM) and binary files alike: sled stores a transaction as its protobuf
//! encoding, whose strings are raw bytes in the file and whose numbers are varints (binary,
//! never ASCII digits).
//!
//! # What is not a finding
//!
//! Numbers that are not card data but happen to be 13+ digits and Luhn-valid. The one kind
//! that occurs in practice is a **Unix time in milliseconds**: 13 digits today, Luhn-valid for
//! one value in ten, written by the controller's JSON ledgers and by logs. The rule: a run is
//! excused as a timestamp if and only if it is one number with no separators, of exactly 13,
//! 16 or 19 digits, whose value read as Unix milliseconds, microseconds or nanoseconds lies
//! within [`ScanRules::window_ms`], i.e. during the test run give or take an hour. A real card
//! number falls in that window with probability about 10⁻⁶ for 13 digits (7.2·10⁶ values of
//! 9·10¹²; and no scheme issues 13-digit numbers starting with `17`), less for 16 and 19. Any
//! other Luhn-valid run is a finding, and findings are reported masked (BIN and last four),
//! never in full.
//!
//! [`ScanReport::exact_hits`] additionally finds given digit strings (the PANs a test posted
//! and the agent refused) anywhere in a run, Luhn or not, separators ignored.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::Context;
use posfleet_proto::pan::{MAX_PAN_DIGITS, MIN_PAN_DIGITS, contains_pan};

/// Slack around the test run for the timestamp rule.
pub const TIME_SLACK_MS: u64 = 3_600_000;

/// Files larger than this are refused (the scan reads each file whole).
const MAX_FILE_BYTES: u64 = 2 << 30;

/// What the scan excuses (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRules {
    /// Unix-ms window in which a 13/16/19-digit number is taken for a timestamp.
    pub window_ms: RangeInclusive<u64>,
}

impl ScanRules {
    /// The window from `started_ms` to `ended_ms`, widened by [`TIME_SLACK_MS`] each side.
    pub fn for_run(started_ms: u64, ended_ms: u64) -> Self {
        Self {
            window_ms: started_ms.saturating_sub(TIME_SLACK_MS)..=ended_ms + TIME_SLACK_MS,
        }
    }

    /// Why a Luhn-valid run is not card data, if it is not.
    fn excuse(&self, run: &str) -> Option<&'static str> {
        if !run.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value: u128 = run.parse().ok()?;
        let (unit, divisor) = match run.len() {
            13 => ("Unix time in ms", 1),
            16 => ("Unix time in µs", 1_000),
            19 => ("Unix time in ns", 1_000_000),
            _ => return None,
        };
        let ms = u64::try_from(value / divisor).ok()?;
        self.window_ms.contains(&ms).then_some(unit)
    }
}

/// One Luhn-valid run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    /// Byte offset of the run's first character in the file.
    pub offset: usize,
    /// Digits in the run.
    pub digits: usize,
    /// First six and last four digits, the rest masked.
    pub masked: String,
    /// Some text around the run, digits masked, for diagnosis.
    pub context: String,
    /// Why it is not card data (timestamps), or `None`: a finding.
    pub excused: Option<&'static str>,
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
        )?;
        if let Some(why) = self.excused {
            write!(f, " excused: {why}")?;
        }
        Ok(())
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
    /// Luhn-valid runs that are not excused: card data where none may be.
    pub findings: Vec<Finding>,
    /// Luhn-valid runs excused as timestamps (kept to show the rule at work).
    pub excused: Vec<Finding>,
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
            "{} files, {} bytes: {} findings, {} excused runs, {} exact hits",
            self.files,
            self.bytes,
            self.findings.len(),
            self.excused.len(),
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
pub fn scan_paths(
    roots: &[PathBuf],
    rules: &ScanRules,
    exact: &[String],
) -> anyhow::Result<ScanReport> {
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
            scan_bytes(&path, &bytes, rules, exact, &mut report);
        }
    }
    Ok(report)
}

/// Scans one file's bytes into `report`.
pub fn scan_bytes(
    path: &Path,
    bytes: &[u8],
    rules: &ScanRules,
    exact: &[String],
    report: &mut ScanReport,
) {
    let mut run = Run::default();
    let mut offset = 0;
    for chunk in bytes.utf8_chunks() {
        for (i, c) in chunk.valid().char_indices() {
            if is_digit(c) || is_separator(c) {
                if run.text.is_empty() {
                    run.start = offset + i;
                }
                run.text.push(c);
            } else {
                run.finish(path, bytes, rules, exact, report);
            }
        }
        offset += chunk.valid().len();
        if !chunk.invalid().is_empty() {
            run.finish(path, bytes, rules, exact, report);
            offset += chunk.invalid().len();
        }
    }
    run.finish(path, bytes, rules, exact, report);
}

/// Digits and separators seen in a row.
#[derive(Default)]
struct Run {
    start: usize,
    text: String,
}

impl Run {
    fn finish(
        &mut self,
        path: &Path,
        bytes: &[u8],
        rules: &ScanRules,
        exact: &[String],
        report: &mut ScanReport,
    ) {
        if self.text.is_empty() {
            return;
        }
        let text = std::mem::take(&mut self.text);
        let lead = text.len() - text.trim_start_matches(is_separator).len();
        let run = text.trim_matches(is_separator);
        let start = self.start + lead;
        let digits: String = run
            .chars()
            .filter_map(|c| digit_value(c).map(|d| char::from(b'0' + d)))
            .collect();
        if digits.len() < MIN_PAN_DIGITS {
            return;
        }
        for (which, number) in exact.iter().enumerate() {
            if !number.is_empty() && digits.contains(number.as_str()) {
                report.exact_hits.push(ExactHit {
                    path: path.to_owned(),
                    offset: start,
                    which,
                });
            }
        }
        // The product's guard decides what is a PAN; this scan only finds the runs.
        if !contains_pan(run) {
            return;
        }
        let finding = Finding {
            path: path.to_owned(),
            offset: start,
            digits: digits.len(),
            masked: mask(&digits),
            context: context(bytes, start, run.len()),
            excused: rules.excuse(run),
        };
        if finding.excused.is_some() {
            report.excused.push(finding);
        } else {
            report.findings.push(finding);
        }
    }
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

fn is_digit(c: char) -> bool {
    digit_value(c).is_some()
}

/// The guard's separators (`posfleet_proto::pan`): white space and dashes.
fn is_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '-' | '\u{2010}'..='\u{2015}' | '\u{2212}' | '\u{FE58}' | '\u{FE63}' | '\u{FF0D}'
        )
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

    const NOW_MS: u64 = 1_764_242_400_000;

    fn rules() -> ScanRules {
        ScanRules::for_run(NOW_MS, NOW_MS + 60_000)
    }

    fn scan(bytes: &[u8], exact: &[String]) -> ScanReport {
        let mut report = ScanReport::default();
        scan_bytes(Path::new("f"), bytes, &rules(), exact, &mut report);
        report
    }

    /// A Luhn-valid 13-digit Unix-ms time within the window.
    fn luhn_timestamp() -> String {
        (NOW_MS..NOW_MS + 20)
            .map(|t| t.to_string())
            .find(|t| contains_pan(t))
            .expect("one in ten is Luhn-valid")
    }

    #[test]
    fn finds_a_pan_in_text_and_in_binary_in_every_notation() {
        let pan = luhn_number("411111", 16, 7);
        let spaced = format!(
            "{} {} {} {}",
            &pan[..4],
            &pan[4..8],
            &pan[8..12],
            &pan[12..]
        );
        let wide: String = pan
            .chars()
            .map(|c| char::from_u32(u32::from(c) - u32::from('0') + 0xFF10).expect("digit"))
            .collect();
        for text in [
            format!("{{\"card\":\"{pan}\"}}"),
            format!("card={spaced} done"),
            spaced.replace(' ', "-"),
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

    #[test]
    fn timestamps_of_the_run_are_excused_and_nothing_else() {
        let ts = luhn_timestamp();
        let report = scan(format!("{{\"received_ms\":{ts}}}").as_bytes(), &[]);
        assert!(report.findings.is_empty(), "{report}");
        assert_eq!(report.excused.len(), 1);
        // The same digits joined to another digit, or a timestamp far from the run, are not
        // a timestamp of the run.
        for text in [format!("{ts} 7"), format!("x{ts}0y")] {
            let report = scan(text.as_bytes(), &[]);
            assert_eq!(report.findings.len(), 1, "{text}: {report}");
        }
        let old = (1_000_000_000_000u64..)
            .map(|t| t.to_string())
            .find(|t| contains_pan(t))
            .expect("a Luhn-valid old time");
        assert_eq!(scan(old.as_bytes(), &[]).findings.len(), 1);
        // Microseconds and nanoseconds of the run, too.
        let us = (NOW_MS * 1000..NOW_MS * 1000 + 20)
            .map(|t| t.to_string())
            .find(|t| contains_pan(t))
            .expect("µs");
        assert!(scan(us.as_bytes(), &[]).findings.is_empty());
    }

    #[test]
    fn short_masked_and_separated_numbers_are_not_findings() {
        let report = scan(
            b"411111******1111 tok_ab12cd34 2026-11-27T03:16:18.123456Z 123456789012",
            &[],
        );
        assert!(
            report.findings.is_empty() && report.excused.is_empty(),
            "{report}"
        );
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
        let report = scan_paths(&[dir.path().to_owned()], &rules(), &[]).expect("scan");
        assert_eq!(report.files, 2);
        assert_eq!(report.findings.len(), 1, "{report}");
        assert!(report.findings[0].path.ends_with("a/b/db"));
        assert_eq!(report.excused.len(), 1);
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
