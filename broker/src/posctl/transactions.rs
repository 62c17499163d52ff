//! `posctl tx list` and `posctl tx summary`.

use std::fmt::Write as _;
use std::io::Write;

use posfleet_proto::{DeviceId, now_ms};

use super::client::ApiClient;
use super::devices::{get_device_json, print_view};
use super::output::{Table, datetime, money, or_dash, printable, relative};
use super::{OutputFormat, TxListArgs};
use crate::views::{TransactionPage, TransactionSummary};

pub(crate) async fn list(
    api: &ApiClient,
    args: &TxListArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut url = api.url(&["api", "v1", "transactions"]);
    {
        let mut q = url.query_pairs_mut();
        if let Some(device) = &args.device {
            q.append_pair("device", device.as_str());
        }
        for (name, value) in [
            ("from", &args.from),
            ("to", &args.to),
            ("status", &args.status),
            ("cursor", &args.cursor),
        ] {
            if let Some(value) = value {
                q.append_pair(name, value);
            }
        }
        q.append_pair("limit", &args.limit.to_string());
        if args.asc {
            q.append_pair("order", "asc");
        }
    }
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |page: &TransactionPage| {
        render_list(page)
    })
}

pub(crate) async fn summary(
    api: &ApiClient,
    id: &DeviceId,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&[
        "api",
        "v1",
        "devices",
        id.as_str(),
        "transactions",
        "summary",
    ]);
    let value = get_device_json(api, url.clone(), id).await?;
    print_view(out, format, &url, value, |summary: &TransactionSummary| {
        render_summary(summary, now_ms())
    })
}

/// The `tx list` table, with the next page's cursor if there is one.
pub(crate) fn render_list(page: &TransactionPage) -> String {
    let mut out = String::new();
    if page.transactions.is_empty() {
        out.push_str("no transactions match\n");
    } else {
        let mut table = Table::new(vec![
            "TIME (UTC)",
            "DEVICE",
            "SEQ",
            "KIND",
            "STATUS",
            "AMOUNT",
            "CARD",
            "TXN",
        ]);
        for t in &page.transactions {
            table.row(vec![
                datetime(t.timestamp_ms).trim_end_matches(" UTC").to_owned(),
                t.device.clone(),
                t.seq.to_string(),
                t.kind.clone(),
                t.status.clone(),
                money(t.amount_minor, &t.currency),
                or_dash(if t.masked_card.is_empty() {
                    &t.card_token
                } else {
                    &t.masked_card
                })
                .to_owned(),
                t.txn_id.clone(),
            ]);
        }
        out.push_str(&table.render());
        let n = page.transactions.len();
        let _ = writeln!(out, "\n{n} transaction{}", if n == 1 { "" } else { "s" });
    }
    if let Some(cursor) = &page.next_cursor {
        let _ = writeln!(
            out,
            "more: repeat the command with --cursor {}",
            printable(cursor)
        );
    }
    out
}

/// The `tx summary` block.
pub(crate) fn render_summary(s: &TransactionSummary, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Transactions of {}", printable(&s.device));
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<14}{}", printable(&value));
    };
    field("stored", s.count.to_string());
    field(
        "approved",
        if s.approved_amount_minor.is_empty() {
            "-".to_owned()
        } else {
            s.approved_amount_minor
                .iter()
                .map(|(currency, amount)| money(*amount, currency))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    field("last seq", s.last_seq.to_string());
    field("durable thru", s.durable_through_seq.to_string());
    let gaps = if s.gaps.is_empty() {
        "none".to_owned()
    } else {
        let mut ranges: Vec<String> = s
            .gaps
            .iter()
            .map(|g| {
                if g.first == g.last {
                    g.first.to_string()
                } else {
                    format!("{}-{}", g.first, g.last)
                }
            })
            .collect();
        if s.gaps_truncated {
            ranges.push("…".to_owned());
        }
        let since = s
            .gap_since_ms
            .map(|ms| format!(" (missing since {})", relative(now_ms, ms)))
            .unwrap_or_default();
        format!("{}{since}", ranges.join(", "))
    };
    field("gaps", gaps);
    field("conflicts", s.conflicts.to_string());
    for c in &s.recent_conflicts {
        field(
            "",
            format!(
                "seq {}: refused txn {} at {}",
                c.seq,
                c.txn_id,
                datetime(c.received_at_ms)
            ),
        );
    }
    field(
        "last stored",
        s.last_received_ms
            .map_or_else(|| "never".to_owned(), |ms| relative(now_ms, ms)),
    );
    if s.conflicts > 0 {
        out.push_str(
            "\n!!! conflicting records were refused: the terminal reused sequence numbers; \
             check it (outbox wiped or replaced?)\n",
        );
    }
    out
}
