//! Synthetic payment transactions for the simulator: a seeded model of one store's till.
//!
//! Each terminal has a merchant, a store, a few operators, a currency and a catalogue of
//! SKUs with fixed prices. Transactions are mostly sales of 1–6 catalogue lines; some are
//! refunds of one line, voids of an earlier sale, pre-authorisations and their captures.
//! About 5% are declined and 1% end in an error. Cards are masked (BIN + last 4) from real
//! scheme BIN ranges, or payment tokens for wallets.
//!
//! **No generated string ever holds 13 or more digits in a row** (separators included), so
//! the PAN guard never refuses one and a PAN scan of logs or data directories never flags
//! one: txn ids start with a run tag of letters, tokens have a letter at least every fourth
//! character, and every other field has a handful of digits at most. The tests check it.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::transaction::{EntryMode, Kind, LineItemRequest, Status, TransactionRequest};

/// (BIN, brand, card number length) of common scheme ranges (test BINs included).
const BINS: [(&str, &str, usize); 10] = [
    ("411111", "visa", 16),
    ("453201", "visa", 16),
    ("476173", "visa", 16),
    ("401288", "visa", 16),
    ("510510", "mastercard", 16),
    ("555555", "mastercard", 16),
    ("222300", "mastercard", 16),
    ("520082", "mastercard", 16),
    ("378282", "amex", 15),
    ("601111", "discover", 16),
];
const CURRENCIES: [&str; 6] = ["EUR", "EUR", "EUR", "USD", "GBP", "CHF"];
const DECLINE_CODES: [&str; 4] = ["05", "51", "54", "61"];
const ERROR_CODES: [&str; 2] = ["91", "96"];
/// Alphabet of tokens and run tags without digits that look like letters.
const LETTERS: &[u8] = b"abcdefghjkmnpqrstuvwxyz";
const TOKEN_CHARS: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
/// SKUs in one store's catalogue.
const CATALOGUE: usize = 120;

/// One terminal's till.
#[derive(Debug)]
pub struct TxnGenerator {
    rng: StdRng,
    /// Letters, random per generator: makes txn ids unique across simulator runs.
    run_tag: String,
    counter: u64,
    merchant_id: String,
    store_id: String,
    operators: Vec<String>,
    currency: &'static str,
    /// (sku, unit price) of the store's catalogue.
    catalogue: Vec<(String, i64)>,
    /// The last approved sale (txn id, amount), for voids.
    last_sale: Option<(String, i64)>,
    /// An open pre-authorisation amount, for a later capture.
    open_preauth: Option<i64>,
}

impl TxnGenerator {
    /// The till of terminal `index`; `seed` varies the run (txn ids, amounts).
    pub fn new(index: usize, seed: u64) -> Self {
        // The store's shape depends on the index only: the same terminal sells the same things.
        let mut shape = StdRng::seed_from_u64(index as u64 ^ 0x7a11_5eed);
        let store = index / 4;
        let merchant_id = format!(
            "MER-{}{:03}",
            letters(&mut shape, 3).to_uppercase(),
            store % 1000
        );
        let store_id = format!("ST-{:04}", store % 10_000);
        let operators = (0..shape.random_range(2..6))
            .map(|_| format!("OP-{:02}", shape.random_range(1..100)))
            .collect();
        let currency = CURRENCIES[shape.random_range(0..CURRENCIES.len())];
        let catalogue = (0..CATALOGUE)
            .map(|_| {
                let sku = format!("SKU-{:05}", shape.random_range(10_000..100_000));
                let cents = [0, 49, 95, 99][shape.random_range(0..4)];
                let price = shape.random_range(1..=150) * 100 + cents;
                (sku, price)
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(seed ^ (index as u64).rotate_left(17));
        let run_tag = letters(&mut rng, 8);
        Self {
            rng,
            run_tag,
            counter: 0,
            merchant_id,
            store_id,
            operators,
            currency,
            catalogue,
            last_sale: None,
            open_preauth: None,
        }
    }

    /// The next transaction at `now_ms`.
    pub fn next_transaction(&mut self, now_ms: u64) -> TransactionRequest {
        self.counter += 1;
        let txn_id = format!("{}-{}", self.run_tag, self.counter);
        let roll = self.rng.random_range(0..100);
        let kind = match roll {
            0..6 => Kind::Refund,
            6..9 if self.last_sale.is_some() => Kind::Void,
            9..13 => Kind::Preauth,
            13..15 if self.open_preauth.is_some() => Kind::Capture,
            _ => Kind::Sale,
        };
        let status = match self.rng.random_range(0..100) {
            0..5 => Status::Declined,
            5..6 => Status::Error,
            _ => Status::Approved,
        };
        let (amount_minor, items) = match kind {
            Kind::Sale => {
                let items = self.basket();
                (
                    items
                        .iter()
                        .map(|i| i64::from(i.quantity) * i.unit_price_minor)
                        .sum(),
                    items,
                )
            }
            Kind::Refund => {
                let (sku, price) = self.pick();
                let item = LineItemRequest {
                    sku,
                    quantity: 1,
                    unit_price_minor: price,
                };
                (price, vec![item])
            }
            Kind::Void => (self.last_sale.take().map_or(0, |(_, a)| a), Vec::new()),
            Kind::Preauth => {
                let amount = self.rng.random_range(50..=300) * 100;
                if status == Status::Approved {
                    self.open_preauth = Some(amount);
                }
                (amount, Vec::new())
            }
            Kind::Capture => {
                let authorised = self.open_preauth.take().unwrap_or(0);
                (
                    authorised * self.rng.random_range(80..=100) / 100,
                    Vec::new(),
                )
            }
        };
        if kind == Kind::Sale && status == Status::Approved {
            self.last_sale = Some((txn_id.clone(), amount_minor));
        }
        let entry_mode = match self.rng.random_range(0..100) {
            0..55 => EntryMode::Contactless,
            55..85 => EntryMode::Chip,
            85..93 => EntryMode::Wallet,
            93..97 => EntryMode::Swipe,
            _ => EntryMode::Manual,
        };
        let (bin, brand, len) = BINS[self.rng.random_range(0..BINS.len())];
        let tokenised = entry_mode == EntryMode::Wallet || self.rng.random_bool(0.1);
        let masked_card = (!tokenised).then(|| {
            format!(
                "{bin}{}{:04}",
                "*".repeat(len - bin.len() - 4),
                self.rng.random_range(0..10_000)
            )
        });
        let card_token = tokenised.then(|| self.token());
        let response_code = match status {
            Status::Approved => "00",
            Status::Declined => DECLINE_CODES[self.rng.random_range(0..DECLINE_CODES.len())],
            Status::Error => ERROR_CODES[self.rng.random_range(0..ERROR_CODES.len())],
        };
        let auth_code = (status == Status::Approved).then(|| self.auth_code());
        let operator = self.operators[self.rng.random_range(0..self.operators.len())].clone();
        TransactionRequest {
            txn_id,
            timestamp_ms: now_ms,
            amount_minor,
            currency: self.currency.to_owned(),
            kind,
            status,
            masked_card,
            card_token,
            card_brand: Some(brand.to_owned()),
            entry_mode: Some(entry_mode),
            auth_code,
            response_code: Some(response_code.to_owned()),
            merchant_id: self.merchant_id.clone(),
            store_id: Some(self.store_id.clone()),
            operator_id: Some(operator),
            items,
        }
    }

    fn pick(&mut self) -> (String, i64) {
        self.catalogue[self.rng.random_range(0..self.catalogue.len())].clone()
    }

    fn basket(&mut self) -> Vec<LineItemRequest> {
        let lines = match self.rng.random_range(0..100) {
            0..40 => 1,
            40..70 => 2,
            70..85 => 3,
            _ => self.rng.random_range(4..=6),
        };
        (0..lines)
            .map(|_| {
                let (sku, unit_price_minor) = self.pick();
                let quantity = if self.rng.random_bool(0.8) {
                    1
                } else {
                    self.rng.random_range(2..=4)
                };
                LineItemRequest {
                    sku,
                    quantity,
                    unit_price_minor,
                }
            })
            .collect()
    }

    /// `tok_` and 24 characters, every fourth a letter.
    fn token(&mut self) -> String {
        let mut token = String::from("tok_");
        for i in 0..24 {
            let alphabet = if i % 4 == 3 { LETTERS } else { TOKEN_CHARS };
            token.push(char::from(
                alphabet[self.rng.random_range(0..alphabet.len())],
            ));
        }
        token
    }

    fn auth_code(&mut self) -> String {
        const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ0123456789";
        (0..6)
            .map(|_| char::from(CHARS[self.rng.random_range(0..CHARS.len())]))
            .collect()
    }
}

fn letters(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(LETTERS[rng.random_range(0..LETTERS.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transaction::pan::{MIN_PAN_DIGITS, longest_digit_run};

    fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            serde_json::Value::Object(m) => m.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }

    #[test]
    fn generated_transactions_are_valid_realistic_and_never_look_like_a_pan() {
        let mut declined = 0;
        let mut kinds = std::collections::HashMap::new();
        let mut total = 0;
        for index in 0..40 {
            let mut till = TxnGenerator::new(index, 99);
            for i in 0..500u64 {
                let txn = till.next_transaction(1_764_242_400_000 + i * 1000);
                txn.validate().unwrap_or_else(|e| panic!("{e}: {txn:?}"));
                let mut texts = Vec::new();
                strings(&serde_json::to_value(&txn).unwrap(), &mut texts);
                for text in texts {
                    assert!(longest_digit_run(&text) < MIN_PAN_DIGITS, "{text}");
                }
                declined += usize::from(txn.status == Status::Declined);
                *kinds.entry(txn.kind).or_insert(0) += 1;
                total += 1;
            }
        }
        let rate = declined as f64 / total as f64;
        assert!((0.04..0.06).contains(&rate), "decline rate {rate}");
        for kind in [
            Kind::Sale,
            Kind::Refund,
            Kind::Void,
            Kind::Preauth,
            Kind::Capture,
        ] {
            assert!(
                kinds.get(&kind).copied().unwrap_or(0) > 50,
                "{kind:?}: {kinds:?}"
            );
        }
    }

    #[test]
    fn txn_ids_are_unique_per_run_and_differ_between_runs() {
        let mut a = TxnGenerator::new(3, 1);
        let mut b = TxnGenerator::new(3, 2);
        let ids: std::collections::HashSet<String> = (0..1000)
            .map(|_| a.next_transaction(1_764_242_400_000).txn_id)
            .collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&b.next_transaction(1_764_242_400_000).txn_id));
        assert_eq!(
            a.merchant_id, b.merchant_id,
            "the store depends on the index only"
        );
    }
}
