//! Opaque page cursors: the last index key a page scanned, bound to the query it belongs to
//! by an HMAC-SHA256 tag (key kept in the store's `meta` tree, so cursors survive restarts).
//! An altered cursor, or one used with other filters, is refused rather than silently
//! continuing somewhere else.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

use super::error::QueryError;
use super::query::{Order, TxQuery};

/// Layout version of a cursor.
const CURSOR_VERSION: u8 = 1;
/// Bytes of the HMAC tag kept.
const TAG_LEN: usize = 16;
/// Longest index key (8 + 64 + 1 + 8 + 8 bytes, with room to spare).
const MAX_KEY_LEN: usize = 128;

/// Signs and checks cursors.
pub(crate) struct CursorKey(hmac::Key);

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(<redacted>)")
    }
}

impl CursorKey {
    pub(crate) fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The cursor resuming `query` after index key `position`.
    pub(crate) fn encode(&self, query: &TxQuery, position: &[u8]) -> String {
        let mut raw = vec![CURSOR_VERSION];
        raw.extend_from_slice(position);
        let tag = self.tag(query, position);
        raw.extend_from_slice(&tag.as_ref()[..TAG_LEN]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The index key a cursor resumes after, if it was made by [`CursorKey::encode`] for the
    /// same query.
    pub(crate) fn decode(&self, query: &TxQuery, cursor: &str) -> Result<Vec<u8>, QueryError> {
        if cursor.len() > 4 * (MAX_KEY_LEN + TAG_LEN) {
            return Err(QueryError::BadCursor("it is too long"));
        }
        let raw = URL_SAFE_NO_PAD
            .decode(cursor)
            .map_err(|_| QueryError::BadCursor("it is not base64url"))?;
        let (version, rest) = raw
            .split_first()
            .ok_or(QueryError::BadCursor("it is empty"))?;
        if *version != CURSOR_VERSION || rest.len() < TAG_LEN {
            return Err(QueryError::BadCursor("unknown layout"));
        }
        let (position, tag) = rest.split_at(rest.len() - TAG_LEN);
        let expected = self.tag(query, position);
        // Constant-time comparison of the truncated tag (no early exit on a difference).
        let diff = expected.as_ref()[..TAG_LEN]
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if std::hint::black_box(diff) != 0 {
            return Err(QueryError::BadCursor(
                "it was altered or belongs to other filters",
            ));
        }
        Ok(position.to_vec())
    }

    fn tag(&self, query: &TxQuery, position: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.0);
        ctx.update(b"posfleet-tx-cursor-v1\n");
        ctx.update(canonical(query).as_bytes());
        ctx.update(position);
        ctx.sign()
    }
}

/// The filters a cursor is bound to (the limit may change between pages).
fn canonical(q: &TxQuery) -> String {
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    format!(
        "device={}\nfrom={}\nto={}\nstatus={}\norder={}\n",
        q.device.as_ref().map_or("-", |d| d.as_str()),
        opt(q.from_ms),
        opt(q.to_ms),
        q.status.map_or("-", |s| s.as_str_name()),
        match q.order {
            Order::Asc => "asc",
            Order::Desc => "desc",
        }
    )
}
