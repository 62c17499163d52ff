//! [`ValidTx`]: a wire `Transaction` checked against the limits the controller accepts
//! (ADR 0006). A batch holding one invalid record is refused whole by ingest.
//!
//! Everything ends up in API responses, reports and on admins' terminals, so text is bounded
//! and free of control and bidi characters, amounts and times are in range, enums are known,
//! and no field may hold a full card number (PCI DSS; the guard of `posfleet_proto::pan`:
//! a 13–19 digit Luhn-valid run in any notation; SKUs checked as product codes, as the agent
//! does).

use posfleet_proto::pan::TextKind;
use posfleet_proto::pb;
use posfleet_proto::text::{TextProblem, check_text};

/// Longest `txn_id`, in bytes.
pub const MAX_TXN_ID_LEN: usize = 64;
/// Longest other text field (codes, ids, brand, SKU), in bytes.
pub const MAX_TEXT_LEN: usize = 64;
/// Longest `masked_card` / `card_token`, in bytes.
pub const MAX_CARD_FIELD_LEN: usize = 128;
/// Most line items in one transaction.
pub const MAX_ITEMS: usize = 256;
/// Largest amount or unit price in minor units (10^12: ten billion in a 2-decimal currency).
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000;
/// Latest transaction time accepted (9999-12-31T23:59:59.999Z).
pub const MAX_TIMESTAMP_MS: u64 = 253_402_300_799_999;
/// Most transactions in one `TransactionBatch`.
pub const MAX_BATCH_RECORDS: usize = 4096;
/// Largest line-item quantity.
pub const MAX_QUANTITY: u32 = 1_000_000;

/// A transaction that passed validation; the only kind the store accepts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ValidTx(pb::Transaction);

/// Why a transaction is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transaction seq {seq}: {detail}")]
pub(crate) struct InvalidTx {
    pub seq: u64,
    pub detail: String,
}

impl ValidTx {
    pub(crate) fn get(&self) -> &pb::Transaction {
        &self.0
    }

    pub(crate) fn seq(&self) -> u64 {
        self.0.seq
    }

    /// The canonical encoding stored and compared for duplicates (prost encodes fields in
    /// tag order and drops unknown fields, so equal content gives equal bytes).
    pub(crate) fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.0)
    }

    /// A record read back from the store (validated when it was stored).
    pub(crate) fn trusted(tx: pb::Transaction) -> Self {
        Self(tx)
    }
}

impl TryFrom<pb::Transaction> for ValidTx {
    type Error = InvalidTx;

    fn try_from(tx: pb::Transaction) -> Result<Self, InvalidTx> {
        check(&tx).map_err(|detail| InvalidTx {
            seq: tx.seq,
            detail,
        })?;
        Ok(Self(tx))
    }
}

fn check(tx: &pb::Transaction) -> Result<(), String> {
    if tx.seq == 0 {
        return Err("seq must be at least 1".into());
    }
    if tx.txn_id.is_empty() {
        return Err("txn_id is empty".into());
    }
    text("txn_id", &tx.txn_id, MAX_TXN_ID_LEN)?;
    if !(1..=MAX_TIMESTAMP_MS).contains(&tx.timestamp_ms) {
        return Err(format!(
            "timestamp_ms {} is outside 1..={MAX_TIMESTAMP_MS}",
            tx.timestamp_ms
        ));
    }
    amount("amount_minor", tx.amount_minor)?;
    if !(tx.currency.len() == 3 && tx.currency.bytes().all(|b| b.is_ascii_uppercase())) {
        return Err("currency must be an ISO 4217 code (three capital letters)".into());
    }
    match pb::TransactionKind::try_from(tx.kind) {
        Ok(pb::TransactionKind::Unspecified) | Err(_) => {
            return Err(format!("kind {} is not a known transaction kind", tx.kind));
        }
        Ok(_) => {}
    }
    match pb::TransactionStatus::try_from(tx.status) {
        Ok(pb::TransactionStatus::Unspecified) | Err(_) => {
            return Err(format!("status {} is not a known status", tx.status));
        }
        Ok(_) => {}
    }
    if pb::EntryMode::try_from(tx.entry_mode).is_err() {
        return Err(format!("entry_mode {} is not a known mode", tx.entry_mode));
    }
    text("masked_card", &tx.masked_card, MAX_CARD_FIELD_LEN)?;
    let masked_ok = tx
        .masked_card
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'*' | b'X' | b'x' | b'#' | b' ' | b'-'));
    if !masked_ok {
        return Err("masked_card may hold only digits, mask characters, spaces and dashes".into());
    }
    text("card_token", &tx.card_token, MAX_CARD_FIELD_LEN)?;
    for (field, value) in [
        ("card_brand", &tx.card_brand),
        ("auth_code", &tx.auth_code),
        ("response_code", &tx.response_code),
        ("merchant_id", &tx.merchant_id),
        ("store_id", &tx.store_id),
        ("operator_id", &tx.operator_id),
    ] {
        text(field, value, MAX_TEXT_LEN)?;
    }
    if tx.items.len() > MAX_ITEMS {
        return Err(format!(
            "{} line items; the limit is {MAX_ITEMS}",
            tx.items.len()
        ));
    }
    for (i, item) in tx.items.iter().enumerate() {
        text_of("items.sku", &item.sku, MAX_TEXT_LEN, TextKind::ProductCode)
            .map_err(|e| format!("item {i}: {e}"))?;
        if !(1..=MAX_QUANTITY).contains(&item.quantity) {
            return Err(format!(
                "item {i}: quantity {} is outside 1..={MAX_QUANTITY}",
                item.quantity
            ));
        }
        // Discount lines are negative; the agent accepts ±MAX_AMOUNT_MINOR, and anything the
        // agent accepts must be storable here, or that terminal's outbox would stall.
        if item.unit_price_minor.unsigned_abs() > MAX_AMOUNT_MINOR.unsigned_abs() {
            return Err(format!(
                "item {i}: items.unit_price_minor {} is outside ±{MAX_AMOUNT_MINOR}",
                item.unit_price_minor
            ));
        }
    }
    Ok(())
}

/// Bounded text without control or bidi characters or a card number.
fn text(field: &str, value: &str, max: usize) -> Result<(), String> {
    text_of(field, value, max, TextKind::General)
}

fn text_of(field: &str, value: &str, max: usize, kind: TextKind) -> Result<(), String> {
    if value.len() > max {
        return Err(format!(
            "{field} is {} bytes long; the limit is {max}",
            value.len()
        ));
    }
    // Never echo the value: it may be a card number.
    check_text(value, kind).map_err(|problem| match problem {
        TextProblem::CardNumber => format!(
            "{field} holds what looks like a full card number (PAN); only BIN + last four or \
             a token may be sent"
        ),
        other => format!("{field} {other}"),
    })
}

fn amount(field: &str, value: i64) -> Result<(), String> {
    if (0..=MAX_AMOUNT_MINOR).contains(&value) {
        Ok(())
    } else {
        Err(format!("{field} {value} is outside 0..={MAX_AMOUNT_MINOR}"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid approved sale.
    pub(crate) fn sale(seq: u64, amount_minor: i64) -> pb::Transaction {
        pb::Transaction {
            seq,
            txn_id: format!("txn-{seq}"),
            timestamp_ms: 1_700_000_000_000 + seq * 1000,
            amount_minor,
            currency: "EUR".into(),
            kind: pb::TransactionKind::Sale as i32,
            status: pb::TransactionStatus::Approved as i32,
            masked_card: "411111******1111".into(),
            card_brand: "VISA".into(),
            entry_mode: pb::EntryMode::Contactless as i32,
            auth_code: "A1B2C3".into(),
            response_code: "00".into(),
            ..Default::default()
        }
    }

    fn refused(tx: pb::Transaction) -> String {
        ValidTx::try_from(tx).unwrap_err().detail
    }

    #[test]
    fn a_normal_sale_is_valid() {
        let mut tx = sale(1, 1250);
        tx.items.push(pb::LineItem {
            sku: "COFFEE".into(),
            quantity: 2,
            unit_price_minor: 625,
        });
        assert!(ValidTx::try_from(tx).is_ok());
    }

    #[test]
    fn bad_fields_are_refused_with_their_name() {
        type Mutate = fn(&mut pb::Transaction);
        let cases: Vec<(Mutate, &str)> = vec![
            (|t| t.seq = 0, "seq"),
            (|t| t.txn_id.clear(), "txn_id"),
            (|t| t.txn_id = "x".repeat(65), "txn_id"),
            (|t| t.timestamp_ms = 0, "timestamp_ms"),
            (|t| t.amount_minor = -1, "amount_minor"),
            (|t| t.amount_minor = MAX_AMOUNT_MINOR + 1, "amount_minor"),
            (|t| t.currency = "eur".into(), "currency"),
            (|t| t.kind = 0, "kind"),
            (|t| t.kind = 42, "kind"),
            (|t| t.status = 0, "status"),
            (|t| t.entry_mode = 9, "entry_mode"),
            (|t| t.store_id = "a\u{1b}[2J".into(), "store_id"),
            (|t| t.masked_card = "4111 11AB".into(), "masked_card"),
        ];
        for (mutate, field) in cases {
            let mut tx = sale(1, 100);
            mutate(&mut tx);
            let detail = refused(tx);
            assert!(detail.contains(field), "{field}: {detail}");
        }
    }

    #[test]
    fn full_card_numbers_are_refused_anywhere_without_being_echoed() {
        for pan in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "ref 5555555555554444 x",
        ] {
            for field in ["masked_card", "operator_id", "txn_id"] {
                let mut tx = sale(1, 100);
                match field {
                    "masked_card" => tx.masked_card = pan.into(),
                    "operator_id" => tx.operator_id = pan.into(),
                    _ => tx.txn_id = pan.into(),
                }
                if field == "masked_card" && pan.contains("ref") {
                    continue; // letters are refused for another reason
                }
                let detail = refused(tx);
                assert!(detail.contains("card number"), "{field} {pan}: {detail}");
                assert!(!detail.contains("1111"), "{detail}");
            }
        }
        // The guard itself is tested in posfleet_proto::pan; masked cards pass it.
        assert!(!posfleet_proto::pan::contains_pan("411111******1111"));
    }

    /// Issue 10 item 7: the notations the security review stored at the controller are
    /// refused in every field it used, naming the field, never echoing the number.
    #[test]
    fn separated_and_letter_joined_pans_are_refused() {
        for &value in posfleet_proto::pan::REVIEW_EXAMPLES {
            for field in [
                "txn_id",
                "merchant_id",
                "store_id",
                "card_token",
                "items.sku",
            ] {
                let mut tx = sale(1, 100);
                match field {
                    "txn_id" => tx.txn_id = value.into(),
                    "merchant_id" => tx.merchant_id = value.into(),
                    "store_id" => tx.store_id = value.into(),
                    "card_token" => tx.card_token = value.into(),
                    _ => tx.items.push(pb::LineItem {
                        sku: value.into(),
                        quantity: 1,
                        unit_price_minor: 100,
                    }),
                }
                let detail = ValidTx::try_from(tx)
                    .map(|_| ())
                    .map_err(|e| e.detail)
                    .expect_err(&format!("{field} = {value} was accepted"));
                assert!(
                    detail.contains(field) && detail.contains("card number"),
                    "{field} = {value}: {detail}"
                );
                assert!(!detail.contains("1111"), "{detail}");
            }
        }
    }

    /// Whatever a terminal accepts (the agent's local API applies `posfleet_proto::txrules`),
    /// the controller must store: a record refused here would stall that terminal's outbox for
    /// good. Every terminal limit at its extreme.
    #[test]
    fn everything_the_agent_accepts_is_storable() {
        use posfleet_proto::txrules::{
            self, MAX_AMOUNT_MINOR as AGENT_MAX_AMOUNT, MAX_ITEMS as AGENT_MAX_ITEMS,
            MAX_QUANTITY as AGENT_MAX_QUANTITY, MAX_TIMESTAMP_MS as AGENT_MAX_TS,
            MIN_TIMESTAMP_MS as AGENT_MIN_TS, TxFields,
        };

        let id64 = "A._:/-".repeat(11)[..64].to_owned();
        let printable: String = (0x20u8..0x7f).map(char::from).collect();
        let extremes = |timestamp_ms, amount_minor, unit_price_minor| pb::Transaction {
            seq: 0,
            txn_id: id64.clone(),
            timestamp_ms,
            amount_minor,
            currency: "EUR".into(),
            kind: pb::TransactionKind::Refund.into(),
            status: pb::TransactionStatus::Error.into(),
            masked_card: "12345678*******1234".to_owned(),
            card_token: "aZ09._:+/=-".repeat(12)[..128].to_owned(),
            card_brand: "Visa Electron_-".repeat(3)[..32].to_owned(),
            entry_mode: pb::EntryMode::Wallet.into(),
            auth_code: "A".repeat(12),
            response_code: "9".repeat(8),
            merchant_id: id64.clone(),
            store_id: id64.clone(),
            operator_id: id64.clone(),
            items: (0..AGENT_MAX_ITEMS)
                .map(|i| pb::LineItem {
                    sku: printable[i % 32..i % 32 + 64].to_owned(),
                    quantity: AGENT_MAX_QUANTITY,
                    unit_price_minor,
                })
                .collect(),
        };
        for txn in [
            extremes(AGENT_MIN_TS, 0, -AGENT_MAX_AMOUNT),
            extremes(AGENT_MAX_TS, AGENT_MAX_AMOUNT, AGENT_MAX_AMOUNT),
        ] {
            let problems = txrules::check(&TxFields::of_wire(&txn));
            assert!(
                problems.is_empty(),
                "the terminal rules refuse their own extremes: {problems:?}"
            );
            let wire = pb::Transaction {
                seq: u64::MAX,
                ..txn
            };
            if let Err(e) = ValidTx::try_from(wire) {
                panic!(
                    "the controller refuses what the agent accepted: {}",
                    e.detail
                );
            }
        }
    }
}
