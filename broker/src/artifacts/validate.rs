//! Validation of what an upload names: version, component, min_version, ids.

/// Longest version string.
pub const MAX_VERSION_LEN: usize = 64;

/// The components an artifact may update (`SoftwareVersions` fields, ADR 0008).
pub const COMPONENTS: [&str; 3] = ["payment_app", "firmware", "agent"];

/// The component when an upload names none.
pub const DEFAULT_COMPONENT: &str = "payment_app";

/// `[0-9A-Za-z.+-]{1,64}`; the message says what is wrong (never echoing the value).
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_VERSION_LEN {
        return Err(format!("must be 1 to {MAX_VERSION_LEN} characters"));
    }
    if !v
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-'))
    {
        return Err("may hold only letters, digits, '.', '+' and '-'".into());
    }
    Ok(())
}

/// A `min_version`: a valid version that can also be ordered against terminal versions
/// (`posfleet_proto::version`: dot-separated numbers, optionally `-pre-release` and
/// `+build`), since an artifact whose minimum cannot be compared could go to no terminal.
pub fn check_min_version(v: &str) -> Result<(), String> {
    check_version(v)?;
    if posfleet_proto::version::Version::parse(v).is_none() {
        return Err(
            "must be dot-separated numbers (like 9.0.0), optionally followed by \
                    -pre.release and +build: other versions cannot be compared"
                .into(),
        );
    }
    Ok(())
}

/// One of [`COMPONENTS`].
pub fn check_component(c: &str) -> Result<(), String> {
    if COMPONENTS.contains(&c) {
        Ok(())
    } else {
        Err(format!("must be one of {}", COMPONENTS.join(", ")))
    }
}

/// 64 lowercase hex digits (an artifact id = its SHA-256).
pub fn parse_id(id: &str) -> Option<[u8; 32]> {
    if id.len() != 64 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(id, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        for ok in ["1", "1.2.3", "2.0.0-rc.1+build.5", &"9".repeat(64)] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1 2", "1/2", "ü", "1_2", &"9".repeat(65)] {
            assert!(check_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn min_versions_must_be_comparable() {
        for ok in ["9", "9.0.0", "2.0.0-rc.1+build.5", "1.2.3.4"] {
            assert!(check_min_version(ok).is_ok(), "{ok}");
        }
        for bad in ["", "fw-9", "v9", "nine", "9.x", "1/2", &"9".repeat(65)] {
            assert!(check_min_version(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn components_and_ids() {
        assert!(check_component("firmware").is_ok());
        assert!(check_component("kernel").is_err());
        assert!(parse_id(&"ab".repeat(32)).is_some());
        assert!(parse_id(&"AB".repeat(32)).is_none());
        assert!(parse_id("abc").is_none());
        assert!(parse_id(&"zz".repeat(32)).is_none());
    }
}
