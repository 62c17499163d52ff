//! Layer scopes: `fleet`, `group/<name>`, `device/<id>`, and their order of precedence.

use std::fmt;

use posfleet_proto::DeviceId;

/// Longest group name.
pub const MAX_GROUP_NAME_LEN: usize = 64;

/// Which layer a document belongs to. Ordered so that a sorted list reads fleet, groups (by
/// name), devices (by id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// The fleet-wide defaults.
    Fleet,
    /// A group's overrides; the name is valid (see [`validate_group_name`]).
    Group(String),
    /// One device's overrides.
    Device(DeviceId),
}

/// Why a string is not a scope or a group name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("scope {0:?} is not `fleet`, `group/<name>` or `device/<id>`")]
    Malformed(String),
    #[error("group name is empty")]
    EmptyGroup,
    #[error("group name is {len} characters long; the maximum is {MAX_GROUP_NAME_LEN}")]
    GroupTooLong { len: usize },
    #[error("group name holds a character other than letters, digits, '.', '_' or '-'")]
    GroupCharacter,
    #[error("{0}")]
    Device(#[from] posfleet_proto::DeviceIdError),
}

/// Hint for a malformed scope, group name or device id.
pub const SCOPE_HINT: &str = "a scope is `fleet`, `group/<name>` or `device/<id>`; group names are \
     1-64 letters, digits, '.', '_' or '-'; device ids are 1-64 of the same, starting with a \
     letter or digit";

/// Checks a group name: `[A-Za-z0-9._-]{1,64}`.
pub fn validate_group_name(name: &str) -> Result<(), ScopeError> {
    if name.is_empty() {
        return Err(ScopeError::EmptyGroup);
    }
    if name.len() > MAX_GROUP_NAME_LEN {
        return Err(ScopeError::GroupTooLong { len: name.len() });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ScopeError::GroupCharacter);
    }
    Ok(())
}

impl Scope {
    /// The layer of group `name`, validated.
    pub fn group(name: impl Into<String>) -> Result<Self, ScopeError> {
        let name = name.into();
        validate_group_name(&name)?;
        Ok(Scope::Group(name))
    }

    /// Parses `fleet`, `group/<name>` or `device/<id>`.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        if s == "fleet" {
            return Ok(Scope::Fleet);
        }
        if let Some(name) = s.strip_prefix("group/") {
            return Scope::group(name);
        }
        if let Some(id) = s.strip_prefix("device/") {
            return Ok(Scope::Device(DeviceId::new(id)?));
        }
        let shown: String = s.chars().take(80).collect();
        Err(ScopeError::Malformed(shown))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Fleet => f.write_str("fleet"),
            Scope::Group(name) => write!(f, "group/{name}"),
            Scope::Device(id) => write!(f, "device/{id}"),
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_round_trip_and_sort_by_precedence() {
        for s in ["fleet", "group/store-12", "group/a.b_c", "device/T-1"] {
            assert_eq!(Scope::parse(s).unwrap().to_string(), s);
        }
        let mut scopes = [
            Scope::parse("device/A").unwrap(),
            Scope::parse("group/b").unwrap(),
            Scope::Fleet,
            Scope::parse("group/a").unwrap(),
        ];
        scopes.sort();
        let shown: Vec<String> = scopes.iter().map(Scope::to_string).collect();
        assert_eq!(shown, ["fleet", "group/a", "group/b", "device/A"]);
    }

    #[test]
    fn bad_scopes_are_refused() {
        let long = format!("group/{}", "g".repeat(65));
        for s in [
            "",
            "Fleet",
            "fleet/",
            "group/",
            "group/a/b",
            "group/a b",
            "group/ä",
            long.as_str(),
            "device/",
            "device/-x",
            "devices/T-1",
            "other",
        ] {
            assert!(Scope::parse(s).is_err(), "{s:?}");
        }
        assert!(Scope::parse(&format!("group/{}", "g".repeat(64))).is_ok());
        assert!(Scope::parse("group/-starts-with-dash").is_ok());
    }
}
