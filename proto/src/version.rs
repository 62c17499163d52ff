//! Software versions and an artifact's `min_version` (ADR 0008): the one comparison the
//! controller's rollout engine (at wave start) and the agent (before it downloads anything)
//! both apply, so they never disagree about a terminal.
//!
//! A comparable version is `CORE[-PRE][+BUILD]`, SemVer-like:
//!
//! - `CORE`: 1 to [`MAX_CORE_PARTS`] dot-separated numbers (ASCII digits, each fitting a
//!   `u64`). Missing parts count as 0: `9` = `9.0` = `9.0.0` < `9.0.1` < `10`.
//! - `PRE` (pre-release): dot-separated, non-empty identifiers of `[0-9A-Za-z-]`. A version
//!   with one is below the same `CORE` without (`9.0.0-rc.1` < `9.0.0`); two are ordered as
//!   SemVer 2.0.0 §11 orders them (numeric identifiers numerically and below alphanumeric
//!   ones, alphanumeric ones by ASCII, a list below a longer one it starts).
//! - `BUILD`: non-empty identifiers of `[0-9A-Za-z-]`, ignored when ordering.
//!
//! Anything else (`fw-9`, `v1.2`, `1..2`, an empty string) cannot be ordered:
//! [`Version::parse`] says `None` and [`check_min_version`] refuses, so a version nobody can
//! compare never passes as "recent enough".

use std::cmp::Ordering;

/// Most numbers in a version's core (`1.2.3.4.5.6.7.8`).
pub const MAX_CORE_PARTS: usize = 8;
/// Longest version string compared (the artifact and report limits are 64).
pub const MAX_VERSION_LEN: usize = 64;

/// `details.reason` / skip reason: the terminal's version is below the artifact's
/// `min_version`.
pub const REASON_BELOW_MIN_VERSION: &str = "below_min_version";
/// The terminal reported no version of the component, so it cannot show it meets
/// `min_version`.
pub const REASON_VERSION_UNKNOWN: &str = "version_unknown";
/// The terminal's version (or `min_version`) cannot be compared (see the module docs).
pub const REASON_VERSION_UNPARSEABLE: &str = "version_unparseable";

/// One pre-release identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ident {
    /// Digits only; sorts below every alphanumeric identifier.
    Num(u64),
    Alnum(String),
}

/// A parsed, comparable version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// Without trailing zeros, so `9` and `9.0.0` are equal.
    core: Vec<u64>,
    /// Empty: a release.
    pre: Vec<Ident>,
}

fn ident_ok(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Version {
    /// Parses `CORE[-PRE][+BUILD]`; `None` if `s` is not of that form.
    pub fn parse(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > MAX_VERSION_LEN {
            return None;
        }
        let (rest, build) = match s.split_once('+') {
            Some((rest, build)) => (rest, Some(build)),
            None => (s, None),
        };
        if let Some(build) = build {
            if !build.split('.').all(ident_ok) {
                return None;
            }
        }
        let (core, pre) = match rest.split_once('-') {
            Some((core, pre)) => (core, Some(pre)),
            None => (rest, None),
        };
        let mut parts = Vec::new();
        for part in core.split('.') {
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            parts.push(part.parse::<u64>().ok()?);
        }
        if parts.len() > MAX_CORE_PARTS {
            return None;
        }
        while parts.last() == Some(&0) {
            parts.pop();
        }
        let mut idents = Vec::new();
        if let Some(pre) = pre {
            for id in pre.split('.') {
                if !ident_ok(id) {
                    return None;
                }
                idents.push(if id.bytes().all(|b| b.is_ascii_digit()) {
                    Ident::Num(id.parse().ok()?)
                } else {
                    Ident::Alnum(id.to_owned())
                });
            }
        }
        Some(Self {
            core: parts,
            pre: idents,
        })
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        let n = self.core.len().max(other.core.len());
        let part = |v: &Self, i: usize| v.core.get(i).copied().unwrap_or(0);
        (0..n)
            .map(|i| part(self, i).cmp(&part(other, i)))
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Lexicographic over identifiers; a prefix sorts first.
                (false, false) => self.pre.cmp(&other.pre),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What [`check_min_version`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinVersionCheck {
    /// The installed version is at least the minimum: the update may go ahead.
    Meets,
    /// Below the minimum.
    Below,
    /// No version reported (empty).
    Unknown,
    /// The installed version or the minimum cannot be compared.
    Unparseable,
}

impl MinVersionCheck {
    /// The refusal reason (`None` for [`MinVersionCheck::Meets`]).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            MinVersionCheck::Meets => None,
            MinVersionCheck::Below => Some(REASON_BELOW_MIN_VERSION),
            MinVersionCheck::Unknown => Some(REASON_VERSION_UNKNOWN),
            MinVersionCheck::Unparseable => Some(REASON_VERSION_UNPARSEABLE),
        }
    }
}

/// Whether a component at `installed` may take an artifact whose minimum is `min`. Only
/// [`MinVersionCheck::Meets`] allows it: an unknown or unparseable version is refused.
pub fn check_min_version(installed: &str, min: &str) -> MinVersionCheck {
    if installed.is_empty() {
        return MinVersionCheck::Unknown;
    }
    match (Version::parse(installed), Version::parse(min)) {
        (Some(i), Some(m)) if i >= m => MinVersionCheck::Meets,
        (Some(_), Some(_)) => MinVersionCheck::Below,
        _ => MinVersionCheck::Unparseable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    #[test]
    fn versions_order_numerically_not_as_text() {
        // Each is strictly below the next.
        let ascending = [
            "0.9",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.0.1",
            "1.2",
            "1.10",
            "2",
            "3.3.0",
            "9.0.0-rc.1",
            "9.0.0",
            "9.0.0.1",
            "10.0.0",
            "18446744073709551615",
        ];
        for pair in ascending.windows(2) {
            assert!(v(pair[0]) < v(pair[1]), "{} < {}", pair[0], pair[1]);
            assert!(v(pair[1]) > v(pair[0]), "{} > {}", pair[1], pair[0]);
        }
        for (a, b) in [
            ("9", "9.0.0"),
            ("9.0", "9.0.0.0"),
            ("1.2.3+build.5", "1.2.3"),
            ("1.2.3-rc.1+a", "1.2.3-rc.1+b"),
            ("007.1", "7.1"),
        ] {
            assert_eq!(v(a), v(b), "{a} = {b}");
            assert_eq!(v(a).cmp(&v(b)), Ordering::Equal, "{a} = {b}");
        }
    }

    #[test]
    fn what_is_not_a_version_does_not_parse() {
        for bad in [
            "",
            "fw-9",
            "pay-4",
            "v1.2.3",
            "1..2",
            ".1",
            "1.",
            "1.2.x",
            "1 2",
            "1.2.3-",
            "1.2.3-rc..1",
            "1.2.3+",
            "1.2.3-rc_1",
            "1.2.3+b+c",
            "18446744073709551616",
            "1.2.3.4.5.6.7.8.9",
            "+1",
            "-1",
            "١.٢",
            &"9".repeat(65),
        ] {
            assert!(Version::parse(bad).is_none(), "{bad:?} parsed");
        }
        assert!(Version::parse("1.2.3.4.5.6.7.8").is_some());
    }

    #[test]
    fn the_minimum_check_refuses_whatever_it_cannot_prove() {
        use MinVersionCheck::*;
        for (installed, min, want) in [
            ("3.3.0", "9.0.0", Below),
            ("9.0.0", "9.0.0", Meets),
            ("9", "9.0.0", Meets),
            ("9.0.1", "9.0.0", Meets),
            ("10.0.0", "9.0.0", Meets),
            ("9.0.0-rc.1", "9.0.0", Below),
            ("8.99.99", "9", Below),
            ("", "9.0.0", Unknown),
            ("fw-9", "9.0.0", Unparseable),
            ("9.0.0", "nine", Unparseable),
            ("", "nine", Unknown),
        ] {
            assert_eq!(
                check_min_version(installed, min),
                want,
                "{installed:?} vs {min:?}"
            );
        }
        assert_eq!(Meets.reason(), None);
        assert_eq!(Below.reason(), Some("below_min_version"));
        assert_eq!(Unknown.reason(), Some("version_unknown"));
        assert_eq!(Unparseable.reason(), Some("version_unparseable"));
    }
}
