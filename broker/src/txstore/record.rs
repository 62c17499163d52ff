//! The stored value of a record (and of a conflict): a version byte, the controller's receive
//! time, and the transaction's canonical protobuf encoding. Plus the API view of a record.

use posfleet_proto::{DeviceId, pb};
use prost::Message;

use super::validate::ValidTx;
use crate::views::{LineItemView, TransactionView};

/// Version byte of the value layout.
const VALUE_VERSION: u8 = 1;
/// Version byte + receive time.
const HEADER_LEN: usize = 9;

/// Encodes a value: `[version][received_at_ms u64 BE][protobuf]`.
pub(crate) fn encode_value(received_at_ms: u64, proto: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(HEADER_LEN + proto.len());
    value.push(VALUE_VERSION);
    value.extend_from_slice(&received_at_ms.to_be_bytes());
    value.extend_from_slice(proto);
    value
}

/// A decoded value: the receive time and the protobuf bytes.
pub(crate) fn split_value(value: &[u8]) -> Result<(u64, &[u8]), String> {
    let (version, rest) = value.split_first().ok_or("empty value")?;
    if *version != VALUE_VERSION {
        return Err(format!("value version {version} is not supported"));
    }
    let at = rest.get(..8).ok_or("value shorter than its header")?;
    let at = u64::from_be_bytes(at.try_into().map_err(|_| "bad header")?);
    Ok((at, &rest[8..]))
}

/// A stored record read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredTx {
    pub received_at_ms: u64,
    pub tx: ValidTx,
}

impl StoredTx {
    pub(crate) fn decode(value: &[u8]) -> Result<Self, String> {
        let (received_at_ms, proto) = split_value(value)?;
        let tx = pb::Transaction::decode(proto).map_err(|e| e.to_string())?;
        Ok(Self {
            received_at_ms,
            tx: ValidTx::trusted(tx),
        })
    }
}

/// The API view of a record (with line items).
pub(crate) fn view(device: &DeviceId, tx: &ValidTx, received_at_ms: u64) -> TransactionView {
    let t = tx.get();
    TransactionView {
        device: device.to_string(),
        seq: t.seq,
        txn_id: t.txn_id.clone(),
        timestamp_ms: t.timestamp_ms,
        received_at_ms,
        amount_minor: t.amount_minor,
        currency: t.currency.clone(),
        kind: kind_name(t.kind).to_owned(),
        status: status_name(t.status).to_owned(),
        entry_mode: entry_mode_name(t.entry_mode).to_owned(),
        masked_card: t.masked_card.clone(),
        card_token: t.card_token.clone(),
        card_brand: t.card_brand.clone(),
        auth_code: t.auth_code.clone(),
        response_code: t.response_code.clone(),
        merchant_id: t.merchant_id.clone(),
        store_id: t.store_id.clone(),
        operator_id: t.operator_id.clone(),
        items: t
            .items
            .iter()
            .map(|i| LineItemView {
                sku: i.sku.clone(),
                quantity: i.quantity,
                unit_price_minor: i.unit_price_minor,
            })
            .collect(),
    }
}

pub(crate) fn kind_name(kind: i32) -> &'static str {
    match pb::TransactionKind::try_from(kind) {
        Ok(pb::TransactionKind::Sale) => "sale",
        Ok(pb::TransactionKind::Refund) => "refund",
        Ok(pb::TransactionKind::Void) => "void",
        Ok(pb::TransactionKind::Preauth) => "preauth",
        Ok(pb::TransactionKind::Capture) => "capture",
        Ok(pb::TransactionKind::Unspecified) | Err(_) => "unknown",
    }
}

pub(crate) fn status_name(status: i32) -> &'static str {
    match pb::TransactionStatus::try_from(status) {
        Ok(pb::TransactionStatus::Approved) => "approved",
        Ok(pb::TransactionStatus::Declined) => "declined",
        Ok(pb::TransactionStatus::Error) => "error",
        Ok(pb::TransactionStatus::Unspecified) | Err(_) => "unknown",
    }
}

/// The status named `name` ("approved", "declined", "error").
pub(crate) fn parse_status(name: &str) -> Option<pb::TransactionStatus> {
    match name {
        "approved" => Some(pb::TransactionStatus::Approved),
        "declined" => Some(pb::TransactionStatus::Declined),
        "error" => Some(pb::TransactionStatus::Error),
        _ => None,
    }
}

fn entry_mode_name(mode: i32) -> &'static str {
    match pb::EntryMode::try_from(mode) {
        Ok(pb::EntryMode::Chip) => "chip",
        Ok(pb::EntryMode::Contactless) => "contactless",
        Ok(pb::EntryMode::Swipe) => "swipe",
        Ok(pb::EntryMode::Manual) => "manual",
        Ok(pb::EntryMode::Wallet) => "wallet",
        Ok(pb::EntryMode::Unspecified) | Err(_) => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txstore::validate::tests::sale;

    #[test]
    fn values_round_trip() {
        let tx = ValidTx::try_from(sale(3, 500)).unwrap();
        let value = encode_value(42, &tx.encode());
        let back = StoredTx::decode(&value).unwrap();
        assert_eq!(back.received_at_ms, 42);
        assert_eq!(back.tx, tx);
        assert!(StoredTx::decode(&[2, 0]).is_err());
        assert!(StoredTx::decode(&[]).is_err());
        let d = DeviceId::new("T-1").unwrap();
        let v = view(&d, &tx, 42);
        assert_eq!(
            (v.kind.as_str(), v.status.as_str(), v.entry_mode.as_str()),
            ("sale", "approved", "contactless")
        );
        assert_eq!(
            parse_status(&v.status),
            Some(pb::TransactionStatus::Approved)
        );
    }
}
