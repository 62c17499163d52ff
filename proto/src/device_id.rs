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

/// Why a string cannot become a *new* device id ([`DeviceId::new_for_issue`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NewDeviceIdError {
    #[error(transparent)]
    Invalid(#[from] DeviceIdError),
    #[error(
        "device id looks like a full card number (PAN); it would be written into the \
         certificate, topics, logs and the audit log: choose another id"
    )]
    CardNumber,
}

impl DeviceId {
    /// Validates `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, DeviceIdError> {
        let id = id.into();
        validate(&id)?;
        Ok(Self(id))
    }

    /// Validates an id that enters the fleet here for the first time: enrolment, a token
    /// pinned to it, a certificate issued through the API or offline, `posfleet-agent
    /// enroll`. Besides the pattern of [`DeviceId::new`] it must pass the one text check
    /// ([`crate::text`]): an id that looks like a card number (`4111.1111.1111.1111` fits the
    /// pattern) is refused. Ids already in use are read with [`DeviceId::new`], so a terminal
    /// enrolled before this check keeps working.
    pub fn new_for_issue(id: impl Into<String>) -> Result<Self, NewDeviceIdError> {
        let id = Self::new(id)?;
        // The pattern admits no control or bidi character: a card number is all that is left.
        crate::text::check_operator_text(id.as_str()).map_err(|_| NewDeviceIdError::CardNumber)?;
        Ok(id)
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

    #[test]
    fn new_ids_that_look_like_card_numbers_are_refused() {
        for card in crate::pan::REVIEW_EXAMPLES
            .iter()
            .copied()
            .chain([
                "4111-1111-1111-1111",
                "4111111111111111",
                "T-4111111111111111",
            ])
            .filter(|c| DeviceId::new(*c).is_ok())
        {
            assert_eq!(
                DeviceId::new_for_issue(card),
                Err(NewDeviceIdError::CardNumber),
                "{card}"
            );
            assert!(!NewDeviceIdError::CardNumber.to_string().contains("1111"));
        }
        for ok in [
            "T-0001",
            "store_12.lane-3",
            "sim-00042",
            "4111",
            "2026-12-07",
        ] {
            assert!(DeviceId::new_for_issue(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            DeviceId::new_for_issue("a/b"),
            Err(NewDeviceIdError::Invalid(DeviceIdError::BadCharacter {
                position: 1
            }))
        );
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
