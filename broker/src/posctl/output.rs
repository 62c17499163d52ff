//! Text formatting shared by the commands: tables, times, sizes, and making strings that came
//! from terminals safe to print.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::time::Duration;

/// Widest a table cell gets before it is cut (device-reported strings can be long).
const MAX_CELL_CHARS: usize = 40;

/// Columns of a text table; the last column is not padded.
#[derive(Debug)]
pub(crate) struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(headers: Vec<&'static str>) -> Self {
        Self {
            headers,
            rows: Vec::new(),
        }
    }

    /// Adds a row; cells are made printable and cut to a sane width.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.iter().map(|c| truncate(&printable(c))).collect());
    }

    pub(crate) fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let _ = write!(line, "{cell:<width$}  ");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Replaces control characters (terminal escape sequences, newlines) with visible escapes, so a
/// string reported by a terminal cannot rewrite the operator's screen.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

fn truncate(s: &str) -> String {
    if s.chars().count() <= MAX_CELL_CHARS {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(MAX_CELL_CHARS - 1).collect();
    cut.push('…');
    cut
}

/// `"-"` for an empty string, else the string.
pub(crate) fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// How long ago `then_ms` was, seen from `now_ms`: "now", "4s ago", "3m ago", "2h ago",
/// "5d ago"; "never" for 0; "in 3s" if `then_ms` is ahead (clock skew between hosts).
pub(crate) fn relative(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".to_owned();
    }
    if then_ms > now_ms {
        let ahead = (then_ms - now_ms) / 1000;
        return if ahead == 0 {
            "now".to_owned()
        } else {
            format!("in {}", coarse(ahead))
        };
    }
    let secs = (now_ms - then_ms) / 1000;
    if secs == 0 {
        "now".to_owned()
    } else {
        format!("{} ago", coarse(secs))
    }
}

fn coarse(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// An uptime or interval: "42s", "5m03s", "1h02m", "3d04h".
pub(crate) fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// Wall-clock time of day, UTC: "HH:MM:SS".
pub(crate) fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

/// Date and time, UTC: "YYYY-MM-DD HH:MM:SS UTC".
pub(crate) fn datetime(ms: u64) -> String {
    let days = i64::try_from(ms / 86_400_000).unwrap_or(i64::MAX / 2);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {} UTC", clock(ms))
}

/// Howard Hinnant's `civil_from_days`: days since 1970-01-01 → (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both are in range by construction (1..=31, 1..=12).
    (
        year,
        u32::try_from(month).unwrap_or(0),
        u32::try_from(day).unwrap_or(0),
    )
}

/// An amount in minor units with its currency, two decimals assumed: "12.50 EUR".
pub(crate) fn money(amount_minor: i64, currency: &str) -> String {
    let sign = if amount_minor < 0 { "-" } else { "" };
    let abs = amount_minor.unsigned_abs();
    format!(
        "{sign}{}.{:02} {}",
        abs / 100,
        abs % 100,
        printable(currency)
    )
}

/// Bytes as MiB, no decimals.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{}", bytes / (1024 * 1024))
}

/// Bytes as GiB with one decimal.
pub(crate) fn gib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let gib = bytes as f64 / (1024.0 * 1024.0 * 1024.0);
    format!("{gib:.1}")
}

/// `used / total` as a whole percentage (0 when the total is unknown).
pub(crate) fn percent(used: u64, total: u64) -> u64 {
    if total == 0 {
        0
    } else {
        u64::try_from(u128::from(used) * 100 / u128::from(total)).unwrap_or(u64::MAX)
    }
}

/// Parses "30", "30s", "500ms", "2m" or "1h" into a duration (not zero).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let duration = parse_duration_or_zero(s)?;
    if duration.is_zero() {
        return Err("the duration must be greater than zero".to_owned());
    }
    Ok(duration)
}

/// [`parse_duration`] that also takes zero ("0", "0s"), for settings where zero means
/// "none" (e.g. `rollout create --soak 0`).
pub(crate) fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 30s, 500ms, 2m or 1h"))?;
    let duration = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?}; use ms, s, m, h or d (e.g. 30s)"
            ));
        }
    };
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_time_reads_naturally() {
        let now = 1_000_000_000;
        assert_eq!(relative(now, 0), "never");
        assert_eq!(relative(now, now), "now");
        assert_eq!(relative(now, now - 999), "now");
        assert_eq!(relative(now, now - 4_000), "4s ago");
        assert_eq!(relative(now, now - 59_999), "59s ago");
        assert_eq!(relative(now, now - 60_000), "1m ago");
        assert_eq!(relative(now, now - 3 * 3_600_000), "3h ago");
        assert_eq!(relative(now, now - 5 * 86_400_000), "5d ago");
        assert_eq!(relative(now, now + 3_000), "in 3s");
        assert_eq!(relative(now, now + 500), "now");
    }

    #[test]
    fn zero_durations_only_where_allowed() {
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_zero("0"), Ok(Duration::ZERO));
        assert!(parse_duration_or_zero("x").is_err());
    }

    #[test]
    fn spans_and_clock() {
        assert_eq!(span(42), "42s");
        assert_eq!(span(303), "5m03s");
        assert_eq!(span(3720), "1h02m");
        assert_eq!(span(3 * 86_400 + 4 * 3600 + 59), "3d04h");
        // 2024-02-29 13:05:09.750 UTC
        let ms = 1_709_211_909_750;
        assert_eq!(clock(ms), "13:05:09");
        assert_eq!(datetime(ms), "2024-02-29 13:05:09 UTC");
        assert_eq!(datetime(0), "1970-01-01 00:00:00 UTC");
    }

    #[test]
    fn money_has_two_decimals() {
        assert_eq!(money(1250, "EUR"), "12.50 EUR");
        assert_eq!(money(5, "USD"), "0.05 USD");
        assert_eq!(money(-199, "GBP"), "-1.99 GBP");
    }

    #[test]
    fn sizes() {
        assert_eq!(mib(512 * 1024 * 1024 + 1), "512");
        assert_eq!(gib(3 * 1024 * 1024 * 1024 / 2), "1.5");
        assert_eq!(percent(1, 4), 25);
        assert_eq!(percent(1, 0), 0);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }

    #[test]
    fn table_aligns_columns_and_neutralises_control_characters() {
        let mut table = Table::new(vec!["ID", "STATE", "MODEL"]);
        table.row(vec!["T-1".into(), "active".into(), "PAX A920".into()]);
        table.row(vec![
            "T-0002".into(),
            "locked".into(),
            "evil\u{1b}[2Jmodel".into(),
        ]);
        assert_eq!(
            table.render(),
            "ID      STATE   MODEL\n\
             T-1     active  PAX A920\n\
             T-0002  locked  evil\\u{1b}[2Jmodel\n"
        );
    }

    #[test]
    fn long_cells_are_cut() {
        let mut table = Table::new(vec!["A", "B"]);
        table.row(vec!["x".repeat(100), "y".into()]);
        let rendered = table.render();
        let row = rendered.lines().nth(1).unwrap();
        assert!(row.starts_with(&format!("{}…  y", "x".repeat(MAX_CELL_CHARS - 1))));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }
}
