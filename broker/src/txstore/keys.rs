//! Key layout of the transaction store. Everything lives in one sled tree so that one
//! `apply_batch` covers a whole commit (a batch cannot span trees); the first byte of a key
//! names its namespace. Device ids never contain `/` (`DeviceId`), so `device/` is an
//! unambiguous per-device prefix; numbers are 8-byte big-endian so byte order is numeric.
//!
//! | namespace | key | value |
//! | --- | --- | --- |
//! | record | `r device/seq` | `record` value |
//! | time index | `t ts device/seq` | empty |
//! | device time index | `d device/ts seq` | empty |
//! | conflict | `c device/seq n` (n: u32) | `record` value of the refused record |
//! | ledger | `l device` | `Ledger` JSON |
//! | meta | `m name` | bytes |

use posfleet_proto::DeviceId;

pub(crate) const RECORD: u8 = b'r';
pub(crate) const BY_TIME: u8 = b't';
pub(crate) const BY_DEVICE_TIME: u8 = b'd';
pub(crate) const CONFLICT: u8 = b'c';
pub(crate) const LEDGER: u8 = b'l';
pub(crate) const META: u8 = b'm';

const SEP: u8 = b'/';

/// `ns device/`: the prefix of a device's keys in namespace `ns`.
pub(crate) fn device_prefix(ns: u8, device: &DeviceId) -> Vec<u8> {
    let mut key = Vec::with_capacity(device.as_str().len() + 18);
    key.push(ns);
    key.extend_from_slice(device.as_str().as_bytes());
    key.push(SEP);
    key
}

/// Record key.
pub(crate) fn record(device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = device_prefix(RECORD, device);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Time index key.
pub(crate) fn by_time(ts_ms: u64, device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = vec![BY_TIME];
    key.extend_from_slice(&ts_ms.to_be_bytes());
    key.extend_from_slice(device.as_str().as_bytes());
    key.push(SEP);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Device time index key.
pub(crate) fn by_device_time(device: &DeviceId, ts_ms: u64, seq: u64) -> Vec<u8> {
    let mut key = device_prefix(BY_DEVICE_TIME, device);
    key.extend_from_slice(&ts_ms.to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Conflict key: the record key's place in the conflict namespace, plus a counter.
pub(crate) fn conflict(device: &DeviceId, seq: u64, n: u32) -> Vec<u8> {
    let mut key = conflict_prefix(device, seq);
    key.extend_from_slice(&n.to_be_bytes());
    key
}

/// Prefix of every conflict recorded for (device, seq).
pub(crate) fn conflict_prefix(device: &DeviceId, seq: u64) -> Vec<u8> {
    let mut key = device_prefix(CONFLICT, device);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Ledger key.
pub(crate) fn ledger(device: &DeviceId) -> Vec<u8> {
    let mut key = vec![LEDGER];
    key.extend_from_slice(device.as_str().as_bytes());
    key
}

/// Meta key.
pub(crate) fn meta(name: &str) -> Vec<u8> {
    let mut key = vec![META];
    key.extend_from_slice(name.as_bytes());
    key
}

/// The smallest key greater than every key starting with `prefix` (`None`: no such key).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// `device/seq` (the tail of record and time index keys).
fn parse_device_seq(tail: &[u8]) -> Option<(DeviceId, u64)> {
    let split = tail.len().checked_sub(9)?;
    let (head, rest) = tail.split_at(split);
    let (sep, seq) = rest.split_first()?;
    if *sep != SEP {
        return None;
    }
    let device = DeviceId::new(std::str::from_utf8(head).ok()?).ok()?;
    Some((device, u64::from_be_bytes(seq.try_into().ok()?)))
}

/// (device, seq) of a time index key.
pub(crate) fn parse_by_time(key: &[u8]) -> Option<(DeviceId, u64)> {
    if key.first() != Some(&BY_TIME) {
        return None;
    }
    parse_device_seq(key.get(9..)?)
}

/// (device, seq) of a device time index key.
pub(crate) fn parse_by_device_time(key: &[u8]) -> Option<(DeviceId, u64)> {
    let (ns, rest) = key.split_first()?;
    if *ns != BY_DEVICE_TIME {
        return None;
    }
    let split = rest.len().checked_sub(17)?;
    let (head, tail) = rest.split_at(split);
    let (sep, nums) = tail.split_first()?;
    if *sep != SEP {
        return None;
    }
    let device = DeviceId::new(std::str::from_utf8(head).ok()?).ok()?;
    Some((device, u64::from_be_bytes(nums.get(8..)?.try_into().ok()?)))
}

/// The device of a ledger key.
pub(crate) fn parse_ledger(key: &[u8]) -> Option<DeviceId> {
    let (ns, rest) = key.split_first()?;
    if *ns != LEDGER {
        return None;
    }
    DeviceId::new(std::str::from_utf8(rest).ok()?).ok()
}

/// The seq of a record key under `device_prefix(RECORD, device)`.
pub(crate) fn record_seq(key: &[u8], prefix_len: usize) -> Option<u64> {
    Some(u64::from_be_bytes(key.get(prefix_len..)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_numerically() {
        let d = DeviceId::new("T-1").unwrap();
        let prefix = device_prefix(RECORD, &d);
        assert_eq!(record_seq(&record(&d, 258), prefix.len()), Some(258));
        assert_eq!(parse_by_time(&by_time(7, &d, 3)), Some((d.clone(), 3)));
        assert_eq!(
            parse_by_device_time(&by_device_time(&d, 7, 3)),
            Some((d.clone(), 3))
        );
        assert_eq!(parse_ledger(&ledger(&d)), Some(d.clone()));
        assert!(record(&d, 255) < record(&d, 256));
        assert!(by_time(1, &d, 9) < by_time(2, &d, 1));
        assert!(by_device_time(&d, 1, 9) < by_device_time(&d, 2, 1));
        assert!(conflict(&d, 5, 2).starts_with(&conflict_prefix(&d, 5)));
        // Another device whose id extends this one is not under its prefix.
        let other = DeviceId::new("T-1-2").unwrap();
        assert!(!record(&other, 1).starts_with(&prefix));
        assert_eq!(parse_by_time(b"tshort"), None);
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 255]), Some(vec![2]));
        assert_eq!(prefix_end(&[255]), None);
    }
}
