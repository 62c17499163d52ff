//! The maintenance window (`maintenance.window` of the applied configuration,
//! `HH:MM-HH:MM` in the terminal's local time, possibly across midnight) and the terminal's
//! UTC offset, read from its TZif time zone file (`/etc/localtime`) with jiff: the file's
//! transitions, then the daylight saving rule in its footer, so both the "fat" files some
//! distributions ship (transitions up to 2037) and "slim" ones (few or no transitions, the
//! rule in the footer) give the right offset. Without a readable file the offset is 0 (UTC),
//! as in most containers.

use std::path::Path;

/// Config key of the window.
pub(crate) const WINDOW_KEY: &str = "maintenance.window";
const DAY_MINUTES: u32 = 24 * 60;

/// A daily window, in minutes after local midnight; `start != end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    start: u32,
    end: u32,
}

impl Window {
    /// `HH:MM-HH:MM` (24 h times, start ≠ end).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (a, b) = text.trim().split_once('-')?;
        let (start, end) = (minutes(a)?, minutes(b)?);
        (start != end).then_some(Self { start, end })
    }

    /// Whether `minute` (after local midnight) is inside; the end is exclusive. A window
    /// whose end is before its start runs across midnight.
    pub(crate) fn contains(self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }
}

fn minutes(hhmm: &str) -> Option<u32> {
    let (h, m) = hhmm.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Minutes after local midnight at Unix time `unix_s`, with `offset_s` east of UTC.
pub(crate) fn local_minute(unix_s: i64, offset_s: i32) -> u32 {
    let local = unix_s.saturating_add(i64::from(offset_s));
    u32::try_from(local.rem_euclid(86_400) / 60).unwrap_or(0) % DAY_MINUTES
}

/// The UTC offset in seconds at `unix_s` from the TZif file at `path` (0 if unreadable).
/// Blocking (reads the file).
pub(crate) fn utc_offset(path: &Path, unix_s: i64) -> i32 {
    std::fs::read(path)
        .ok()
        .and_then(|data| tzif_offset(&data, unix_s))
        .unwrap_or(0)
}

/// The offset at `t` from TZif data: its transitions, and after the last one the POSIX rule of
/// its footer (RFC 8536 §3.3), so a "slim" file of a zone with daylight saving time is read
/// right. `None` if the data is not TZif or `t` is out of range.
fn tzif_offset(data: &[u8], t: i64) -> Option<i32> {
    let zone = jiff::tz::TimeZone::tzif("localtime", data).ok()?;
    let at = jiff::Timestamp::from_second(t).ok()?;
    Some(zone.to_offset(at).seconds())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap_midnight() {
        let day = Window::parse("02:00-04:30").unwrap();
        assert!(!day.contains(119));
        assert!(day.contains(120) && day.contains(269));
        assert!(!day.contains(270), "the end is exclusive");
        let night = Window::parse("22:00-03:00").unwrap();
        assert!(night.contains(22 * 60) && night.contains(23 * 60 + 59));
        assert!(night.contains(0) && night.contains(179));
        assert!(!night.contains(180) && !night.contains(12 * 60));
        for bad in [
            "",
            "02:00",
            "2:00-03:00",
            "24:00-01:00",
            "01:60-02:00",
            "03:00-03:00",
            "ab:cd-01:00",
        ] {
            assert_eq!(Window::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn local_minutes_follow_the_offset() {
        // 1970-01-02 00:30 UTC.
        let t = 86_400 + 30 * 60;
        assert_eq!(local_minute(t, 0), 30);
        assert_eq!(local_minute(t, 3600), 90);
        assert_eq!(local_minute(t, -3600), 23 * 60 + 30);
    }

    /// A version 2 TZif file with one transition (to +02:00 at t = 1000), built by hand.
    fn tzif(transition: i64) -> Vec<u8> {
        fn header(version: u8, timecnt: u32, typecnt: u32, charcnt: u32) -> Vec<u8> {
            let mut h = b"TZif".to_vec();
            h.push(version);
            h.extend_from_slice(&[0; 15]);
            for n in [0u32, 0, 0, timecnt, typecnt, charcnt] {
                h.extend_from_slice(&n.to_be_bytes());
            }
            h
        }
        let types = |out: &mut Vec<u8>| {
            out.extend_from_slice(&0i32.to_be_bytes());
            out.extend_from_slice(&[0, 0]);
            // EET is standard time (not DST), as the footer `EET-2` says.
            out.extend_from_slice(&7200i32.to_be_bytes());
            out.extend_from_slice(&[0, 4]);
            out.extend_from_slice(b"UTC\0EET\0");
        };
        let mut f = header(b'2', 1, 2, 8);
        f.extend_from_slice(&i32::try_from(transition).unwrap().to_be_bytes());
        f.push(1);
        types(&mut f);
        f.extend_from_slice(&header(b'2', 1, 2, 8));
        f.extend_from_slice(&transition.to_be_bytes());
        f.push(1);
        types(&mut f);
        f.extend_from_slice(b"\nEET-2\n");
        f
    }

    /// A "slim" version 2 TZif file of Central European Time, as `zic -b slim` writes it: no
    /// transitions, one type (CET, +01:00), and the daylight saving rule only in the footer.
    fn slim_cet() -> Vec<u8> {
        let block = |out: &mut Vec<u8>| {
            out.extend_from_slice(b"TZif2");
            out.extend_from_slice(&[0; 15]);
            for n in [0u32, 0, 0, 0, 1, 4] {
                out.extend_from_slice(&n.to_be_bytes());
            }
        };
        let mut f = Vec::new();
        block(&mut f);
        f.extend_from_slice(&3600i32.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(b"CET\0");
        block(&mut f);
        f.extend_from_slice(&3600i32.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(b"CET\0");
        f.extend_from_slice(b"\nCET-1CEST,M3.5.0,M10.5.0/3\n");
        f
    }

    #[test]
    fn a_slim_file_gets_daylight_saving_time_from_its_footer() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("localtime");
        std::fs::write(&path, slim_cet()).unwrap();
        // 2026-01-15 12:00 UTC: winter.
        assert_eq!(utc_offset(&path, 1_768_478_400), 3600);
        // 2026-07-01 12:00 UTC: summer, +02:00 by the footer's rule.
        assert_eq!(utc_offset(&path, 1_782_907_200), 7200);
        // The switches: 2026-03-29 01:00 UTC and 2026-10-25 01:00 UTC.
        assert_eq!(utc_offset(&path, 1_774_745_999), 3600);
        assert_eq!(utc_offset(&path, 1_774_746_000), 7200);
        assert_eq!(utc_offset(&path, 1_792_889_999), 7200);
        assert_eq!(utc_offset(&path, 1_792_890_000), 3600);
    }

    #[test]
    fn reads_offsets_from_tzif_data() {
        let data = tzif(1000);
        assert_eq!(tzif_offset(&data, 999), Some(0));
        assert_eq!(tzif_offset(&data, 1000), Some(7200));
        assert_eq!(tzif_offset(&data, 10_000_000), Some(7200));
        assert_eq!(tzif_offset(b"nope", 0), None);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("localtime");
        std::fs::write(&path, &data).unwrap();
        assert_eq!(utc_offset(&path, 2000), 7200);
        assert_eq!(utc_offset(&tmp.path().join("missing"), 2000), 0);
        // The machine's own file, if it has one, reads without error.
        let _ = utc_offset(Path::new("/etc/localtime"), 0);
    }
}
