//! Device identifiers: the one validated type every boundary converts to.

use std::fmt;
use std::str::FromStr;

/// Longest device id accepted (one leading character plus 63 more).
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// A validated device id: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
///
/// The pattern keeps MQTT wildcards (`+`, `#`), separators (`/`), `$` and empty ids out of
/// topics, file names and certificate subjects. Construct it only through [`DeviceId::new`] or
/// `parse`, so every `DeviceId` in the program is known to be valid.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

/// Why a string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {len} characters long; the maximum is {MAX_DEVICE_ID_LEN}")]
    TooLong { len: usize },
    #[error("device id must start with a letter or digit")]
    BadFirstCharacter,
    #[error(
        "device id holds a character other than letters, digits, '.', '_' or '-' at byte {position}"
    )]
    BadCharacter { position: usize },
}

impl DeviceId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, DeviceIdError> {
        let id = id.into();
        validate(&id)?;
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn validate(id: &str) -> Result<(), DeviceIdError> {
    let bytes = id.as_bytes();
    let Some(first) = bytes.first() else {
        return Err(DeviceIdError::Empty);
    };
    if bytes.len() > MAX_DEVICE_ID_LEN {
        return Err(DeviceIdError::TooLong { len: bytes.len() });
    }
    if !first.is_ascii_alphanumeric() {
        return Err(DeviceIdError::BadFirstCharacter);
    }
    match bytes
        .iter()
        .position(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
    {
        Some(position) => Err(DeviceIdError::BadCharacter { position }),
        None => Ok(()),
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for DeviceId {
    type Error = DeviceIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for DeviceId {
    type Error = DeviceIdError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["a", "T-0001", "store_12.lane-3", "9", &"x".repeat(64)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_wildcards_separators_and_bad_shapes() {
        assert_eq!(DeviceId::new(""), Err(DeviceIdError::Empty));
        assert_eq!(DeviceId::new("-a"), Err(DeviceIdError::BadFirstCharacter));
        assert_eq!(DeviceId::new(".a"), Err(DeviceIdError::BadFirstCharacter));
        assert_eq!(
            DeviceId::new("x".repeat(65)),
            Err(DeviceIdError::TooLong { len: 65 })
        );
        for bad in ["a/b", "a+", "a#", "$SYS", "a b", "ä", "a\0", "a:b"] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} must be refused");
        }
    }

    proptest! {
        #[test]
        fn valid_ids_never_contain_topic_metacharacters(s in "\\PC{0,80}") {
            if let Ok(id) = DeviceId::new(s) {
                prop_assert!(!id.as_str().is_empty());
                prop_assert!(!id.as_str().contains(['/', '+', '#', '$']));
                prop_assert!(id.as_str().len() <= MAX_DEVICE_ID_LEN);
            }
        }
    }
}
