//! `DeviceId::new` on arbitrary strings (ids arrive in topics, certificate CNs, CLI input).
//!
//! Invariants:
//! - differential: accepted exactly when an independent check of
//!   `[A-Za-z0-9][A-Za-z0-9._-]{0,63}` accepts;
//! - a valid id is non-empty, at most 64 bytes, never holds `/ + # $`, and is the input
//!   unchanged (also through `FromStr` / `TryFrom`);
//! - the error says why (`Empty`, `TooLong` with the length, `BadFirstCharacter`, `BadCharacter`
//!   at the first offending byte);
//! - every topic built from a valid id, and its downlink filter, parses back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use posfleet_proto::device_id::MAX_DEVICE_ID_LEN;
use posfleet_proto::{Channel, DeviceId, DeviceIdError, Filter, Topic};

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let s: &str = &s;
    let b = s.as_bytes();
    let reference = (1..=64).contains(&b.len())
        && b[0].is_ascii_alphanumeric()
        && b.iter().copied().all(allowed);

    match DeviceId::new(s) {
        Ok(id) => {
            assert!(reference, "accepted {s:?}");
            assert_eq!(id.as_str(), s);
            assert!(!s.is_empty() && s.len() <= MAX_DEVICE_ID_LEN);
            assert!(!s.contains(['/', '+', '#', '$']));
            assert_eq!(s.parse::<DeviceId>().as_ref(), Ok(&id));
            assert_eq!(DeviceId::try_from(s.to_owned()).as_ref(), Ok(&id));
            for channel in Channel::ALL {
                let topic = Topic::for_device(&id, channel);
                assert_eq!(Topic::parse(&topic.to_string()), Ok(topic));
            }
            let filter = Filter::device_downlink(&id);
            assert_eq!(Filter::parse(&filter.to_string()), Ok(filter));
        }
        Err(e) => {
            assert!(!reference, "refused {s:?}: {e}");
            match e {
                DeviceIdError::Empty => assert!(b.is_empty()),
                DeviceIdError::TooLong { len } => {
                    assert!(len == b.len() && len > MAX_DEVICE_ID_LEN)
                }
                DeviceIdError::BadFirstCharacter => assert!(!b[0].is_ascii_alphanumeric()),
                DeviceIdError::BadCharacter { position } => {
                    assert!(b[0].is_ascii_alphanumeric() && b.len() <= MAX_DEVICE_ID_LEN);
                    assert!(!allowed(b[position]));
                    assert!(b[..position].iter().copied().all(allowed));
                }
            }
        }
    }
});
