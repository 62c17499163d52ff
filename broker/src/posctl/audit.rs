//! `posctl audit list|verify [--anchor FILE]|export|anchor export`, `posctl approvals
//! list|approve|reject`,
//! `posctl custody record|history` and `posctl devices lost|found`.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use posfleet_proto::{DeviceId, now_ms};
use reqwest::Method;
use serde_json::{Value, json};

use super::OutputFormat;
use super::client::ApiClient;
use super::devices::{print_json, typed};
use super::output::{Table, datetime, printable};
use crate::views::{
    ApprovalDecided, ApprovalList, ApprovalView, AuditAnchor, AuditPage, AuditVerifyView,
    CustodyEntry, CustodyHistory, LostFoundView,
};

/// Largest export `audit export` accepts.
const MAX_EXPORT_BYTES: usize = 1 << 30;

/// Filters of `audit list`.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct AuditListArgs {
    #[arg(long)]
    pub(crate) actor: Option<String>,
    /// `area.verb` or an area (`command`, `config`, ...).
    #[arg(long)]
    pub(crate) action: Option<String>,
    #[arg(long)]
    pub(crate) target: Option<String>,
    /// Unix ms or RFC 3339.
    #[arg(long)]
    pub(crate) from: Option<String>,
    /// Unix ms or RFC 3339.
    #[arg(long)]
    pub(crate) to: Option<String>,
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
    /// `next_cursor` of the previous page.
    #[arg(long)]
    pub(crate) cursor: Option<String>,
}

pub(crate) async fn list(
    api: &ApiClient,
    args: &AuditListArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut url = api.url(&["api", "v1", "audit"]);
    {
        let mut q = url.query_pairs_mut();
        for (name, value) in [
            ("actor", &args.actor),
            ("action", &args.action),
            ("target", &args.target),
            ("from", &args.from),
            ("to", &args.to),
            ("cursor", &args.cursor),
        ] {
            if let Some(v) = value {
                q.append_pair(name, v);
            }
        }
        q.append_pair("limit", &args.limit.to_string());
    }
    let value = api.get_json(url.clone()).await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let page: AuditPage = typed(&url, value)?;
    let mut table = Table::new(vec![
        "SEQ", "TIME", "ACTOR", "SOURCE", "ACTION", "TARGET", "OUTCOME", "DETAIL",
    ]);
    for e in &page.entries {
        table.row(vec![
            e.seq.to_string(),
            datetime(e.at_ms),
            printable(&e.actor).into_owned(),
            printable(&e.source).into_owned(),
            printable(&e.action).into_owned(),
            printable(&e.target).into_owned(),
            crate::audit::outcome_label(e.outcome).to_owned(),
            printable(&e.detail).into_owned(),
        ]);
    }
    let mut text = if page.entries.is_empty() {
        "no audit entries match\n".to_owned()
    } else {
        table.render()
    };
    if let Some(c) = &page.next_cursor {
        let _ = writeln!(
            text,
            "more: repeat the command with --cursor {}",
            printable(c)
        );
    }
    Ok(out.write_all(text.as_bytes())?)
}

/// Largest anchor file `audit verify --anchor` reads.
const MAX_ANCHOR_BYTES: u64 = 16 * 1024;

/// Exit code 1 when the chain is broken; an error when the anchor is refused.
pub(crate) async fn verify(
    api: &ApiClient,
    anchor: Option<&Path>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let url = api.url(&["api", "v1", "audit", "verify"]);
    let value = match anchor {
        None => api.get_json(url.clone()).await?,
        Some(path) => {
            let size = std::fs::metadata(path)
                .with_context(|| format!("cannot read the anchor {}", path.display()))?
                .len();
            anyhow::ensure!(
                size <= MAX_ANCHOR_BYTES,
                "{} is {size} bytes: not an anchor from `posctl audit anchor export`",
                path.display()
            );
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the anchor {}", path.display()))?;
            let body: Value = serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not JSON: not an anchor from `posctl audit anchor export`",
                    path.display()
                )
            })?;
            api.send_json(Method::POST, url.clone(), Some(&body))
                .await?
        }
    };
    let report: AuditVerifyView = typed(&url, value.clone())?;
    if format == OutputFormat::Json {
        print_json(out, &value)?;
    } else if report.ok {
        writeln!(
            out,
            "audit log intact: {} entries ({}..{}){}",
            report.entries,
            report.first_seq.map_or("-".into(), |s| s.to_string()),
            report.last_seq.map_or("-".into(), |s| s.to_string()),
            report.anchor_seq.map_or(String::new(), |s| format!(
                "; matches the anchor at entry {s}"
            )),
        )?;
    } else {
        writeln!(
            out,
            "AUDIT LOG BROKEN at entry {}: {} ({} entries verified before it)",
            report.first_bad_seq.map_or("-".into(), |s| s.to_string()),
            printable(report.reason.as_deref().unwrap_or("")),
            report.entries
        )?;
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A signed anchor of the newest entry, to `file` or stdout.
pub(crate) async fn anchor_export(
    api: &ApiClient,
    file: Option<&Path>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "audit", "anchor"]);
    let value = api.get_json(url.clone()).await?;
    let anchor: AuditAnchor = typed(&url, value.clone())?;
    let text = format!("{}\n", serde_json::to_string_pretty(&value)?);
    match file {
        None => Ok(out.write_all(text.as_bytes())?),
        Some(path) => {
            posfleet_proto::pki::write_public_file(path, &text)
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            if format == OutputFormat::Json {
                return print_json(out, &value);
            }
            writeln!(
                out,
                "audit anchor at entry {} (installation {}, audit key {}) written to {}; keep a \
                 copy off this host (e.g. WORM storage) and check with `posctl audit verify \
                 --anchor {}`",
                anchor.seq,
                printable(&anchor.installation),
                printable(&anchor.key_id),
                path.display(),
                path.display()
            )?;
            Ok(())
        }
    }
}

/// JSON lines to `file` (0600) or stdout.
pub(crate) async fn export(
    api: &ApiClient,
    file: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "audit", "export"]);
    let bytes = api.get_bytes(url, MAX_EXPORT_BYTES).await?;
    match file {
        None => Ok(out.write_all(&bytes)?),
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            let lines = bytes.iter().filter(|b| **b == b'\n').count();
            writeln!(out, "{lines} audit entries written to {}", path.display())?;
            Ok(())
        }
    }
}

fn approval_rows(approvals: &[ApprovalView]) -> String {
    let now = now_ms();
    let mut table = Table::new(vec![
        "ID",
        "KIND",
        "DEVICES",
        "REQUESTED BY",
        "STATE",
        "EXPIRES",
        "DECIDED BY",
    ]);
    for a in approvals {
        table.row(vec![
            a.id.clone(),
            a.kind.clone(),
            a.devices.len().to_string(),
            printable(&a.requested_by).into_owned(),
            a.state.name().to_owned(),
            if a.expires_at_ms > now {
                datetime(a.expires_at_ms)
            } else {
                "-".into()
            },
            printable(a.decided_by.as_deref().unwrap_or("-")).into_owned(),
        ]);
    }
    table.render()
}

pub(crate) async fn approvals_list(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "approvals"]);
    let value = api.get_json(url.clone()).await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let list: ApprovalList = typed(&url, value)?;
    if list.approvals.is_empty() {
        return Ok(writeln!(out, "no approvals")?);
    }
    Ok(out.write_all(approval_rows(&list.approvals).as_bytes())?)
}

/// `verb` is `approve` or `reject`.
pub(crate) async fn approvals_decide(
    api: &ApiClient,
    id: &str,
    verb: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "approvals", id, verb]);
    let value = api.send_json(Method::POST, url.clone(), None).await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let decided: ApprovalDecided = typed(&url, value)?;
    writeln!(
        out,
        "approval {} {}; {} command(s) created",
        decided.approval.id,
        decided.approval.state.name(),
        decided.commands.len()
    )?;
    Ok(())
}

/// What `posctl lock|wipe|devices lost` prints when the controller asks for a second admin
/// (a wipe always; a lock that takes the account's locks within the window over the
/// threshold).
pub(crate) fn approval_required(approval: &ApprovalView) -> String {
    format!(
        "{} of {} terminal(s) needs a second admin's approval (two-person rule).\n\
         approval {} expires {}; another admin runs `posctl approvals approve {}`\n",
        approval.kind,
        approval.devices.len(),
        approval.id,
        datetime(approval.expires_at_ms),
        approval.id
    )
}

fn custody_rows(entries: &[CustodyEntry]) -> String {
    let mut table = Table::new(vec![
        "SEQ",
        "TIME",
        "KIND",
        "FROM",
        "TO",
        "LOCATION",
        "RECORDED BY",
        "NOTE",
    ]);
    for e in entries {
        table.row(vec![
            e.seq.to_string(),
            datetime(e.at_ms),
            e.kind.clone(),
            printable(&e.from).into_owned(),
            printable(&e.to).into_owned(),
            printable(&e.location).into_owned(),
            printable(&e.recorded_by).into_owned(),
            printable(&e.note).into_owned(),
        ]);
    }
    table.render()
}

pub(crate) struct Handover<'a> {
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) location: &'a str,
    pub(crate) note: Option<&'a str>,
}

pub(crate) async fn custody_record(
    api: &ApiClient,
    id: &DeviceId,
    h: &Handover<'_>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices", id.as_str(), "custody"]);
    let mut body = json!({"from": h.from, "to": h.to, "location": h.location});
    if let (Some(note), Some(obj)) = (h.note, body.as_object_mut()) {
        obj.insert("note".into(), Value::String(note.to_owned()));
    }
    let value = api
        .send_json(Method::POST, url.clone(), Some(&body))
        .await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let entry: CustodyEntry = typed(&url, value)?;
    Ok(out.write_all(custody_rows(&[entry]).as_bytes())?)
}

/// Exit code 1 when the ledger does not verify.
pub(crate) async fn custody_history(
    api: &ApiClient,
    id: &DeviceId,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let url = api.url(&["api", "v1", "devices", id.as_str(), "custody"]);
    let value = api.get_json(url.clone()).await?;
    let history: CustodyHistory = typed(&url, value.clone())?;
    if format == OutputFormat::Json {
        print_json(out, &value)?;
    } else {
        if history.entries.is_empty() {
            writeln!(out, "no custody entries for {id}")?;
        } else {
            out.write_all(custody_rows(&history.entries).as_bytes())?;
        }
        if !history.ok {
            writeln!(
                out,
                "CUSTODY LEDGER BROKEN at entry {}: {}",
                history.first_bad_seq.map_or("-".into(), |s| s.to_string()),
                printable(history.reason.as_deref().unwrap_or(""))
            )?;
        }
    }
    Ok(if history.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `verb` is `lost` (with a reason) or `found`.
pub(crate) async fn lost_found(
    api: &ApiClient,
    id: &DeviceId,
    verb: &str,
    body: Value,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices", id.as_str(), verb]);
    let value = api
        .send_json(Method::POST, url.clone(), Some(&body))
        .await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    // Beyond the account's lock window a lost report waits for a second admin.
    if value.get("approval").is_some() {
        let required: crate::views::ApprovalRequired = typed(&url, value)?;
        return Ok(out.write_all(approval_required(&required.approval).as_bytes())?);
    }
    let view: LostFoundView = typed(&url, value)?;
    let lock = view
        .commands
        .first()
        .map(|c| format!("; lock command {}", c.id))
        .unwrap_or_default();
    writeln!(out, "{} is now {:?}{lock}", view.device_id, view.lifecycle)?;
    Ok(())
}
