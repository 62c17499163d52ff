//! `posctl lock|unlock|reboot|wipe`, `posctl logs collect|get`,
//! `posctl commands list|show|cancel` and `posctl devices set-groups|set-labels`.

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use posfleet_proto::{DeviceId, now_ms};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::client::ApiClient;
use super::devices::{print_json, print_view, typed};
use super::output::{Table, datetime, or_dash, printable, relative};
use super::{CommandsListArgs, OutputFormat, TargetArgs};
use crate::views::{
    ApprovalRequired, CommandPage, CommandView, CommandsCreated, GroupsBody, LabelsBody,
};

/// Largest log upload `logs get` accepts.
const MAX_LOG_BYTES: usize = 64 * 1024 * 1024;

/// The `target` object of a create request.
fn target(t: &TargetArgs) -> Value {
    if let Some(id) = &t.id {
        json!({"devices": [id.as_str()]})
    } else if let Some(g) = &t.group {
        json!({"group": g})
    } else {
        let labels: Map<String, Value> = t
            .label
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({"labels": labels})
    }
}

/// Creates commands of `kind` with `params` and prints them.
pub(crate) async fn create(
    api: &ApiClient,
    kind: &str,
    target_args: &TargetArgs,
    params: Map<String, Value>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut body = params;
    body.insert("kind".into(), kind.into());
    body.insert("target".into(), target(target_args));
    let url = api.url(&["api", "v1", "commands"]);
    let value = api
        .send_json(Method::POST, url.clone(), Some(&Value::Object(body)))
        .await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table if value.get("approval").is_some() => {
            let required: ApprovalRequired = typed(&url, value)?;
            Ok(out.write_all(super::audit::approval_required(&required.approval).as_bytes())?)
        }
        OutputFormat::Table => {
            let created: CommandsCreated = typed(&url, value)?;
            let n = created.commands.len();
            let mut text = render_table(&created.commands, now_ms());
            let _ = writeln!(
                text,
                "\n{n} command{} queued; follow them with `posctl commands list` or `posctl watch`",
                if n == 1 { "" } else { "s" }
            );
            Ok(out.write_all(text.as_bytes())?)
        }
    }
}

pub(crate) async fn list(
    api: &ApiClient,
    args: &CommandsListArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut url = api.url(&["api", "v1", "commands"]);
    {
        let mut q = url.query_pairs_mut();
        if let Some(d) = &args.device {
            q.append_pair("device", d.as_str());
        }
        for (name, value) in [
            ("status", &args.status),
            ("kind", &args.kind),
            ("cursor", &args.cursor),
        ] {
            if let Some(v) = value {
                q.append_pair(name, v);
            }
        }
        q.append_pair("limit", &args.limit.to_string());
    }
    let value = api.get_json(url.clone()).await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let page: CommandPage = typed(&url, value)?;
            let mut text = if page.items.is_empty() {
                "no commands match\n".to_owned()
            } else {
                render_table(&page.items, now_ms())
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
    }
}

pub(crate) async fn show(
    api: &ApiClient,
    id: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "commands", id]);
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |cmd: &CommandView| {
        render_detail(cmd, now_ms())
    })
}

pub(crate) async fn cancel(
    api: &ApiClient,
    id: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "commands", id, "cancel"]);
    let value = api
        .send_json(Method::POST, url.clone(), Some(&json!({})))
        .await?;
    print_view(out, format, &url, value, |cmd: &CommandView| {
        render_detail(cmd, now_ms())
    })
}

/// Writes the uploaded logs to `file` (or stdout).
pub(crate) async fn logs_get(
    api: &ApiClient,
    id: &str,
    file: Option<&Path>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "commands", id, "logs"]);
    let bytes = api.get_bytes(url, MAX_LOG_BYTES).await?;
    match file {
        Some(path) => {
            std::fs::write(path, &bytes)
                .with_context(|| format!("cannot write {}", path.display()))?;
            writeln!(out, "{} bytes written to {}", bytes.len(), path.display())?;
        }
        None => out.write_all(&bytes)?,
    }
    Ok(())
}

pub(crate) async fn set_groups(
    api: &ApiClient,
    id: &DeviceId,
    groups: &[String],
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices", id.as_str(), "groups"]);
    let value = api
        .send_json(Method::PUT, url.clone(), Some(&json!({ "groups": groups })))
        .await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let body: GroupsBody = typed(&url, value)?;
            let names: Vec<&str> = body.groups.iter().map(String::as_str).collect();
            writeln!(out, "{id}: groups {}", or_dash(&names.join(", ")))?;
            Ok(())
        }
    }
}

pub(crate) async fn set_labels(
    api: &ApiClient,
    id: &DeviceId,
    labels: &[(String, String)],
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices", id.as_str(), "labels"]);
    let map: Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let value = api
        .send_json(Method::PUT, url.clone(), Some(&json!({ "labels": map })))
        .await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let body: LabelsBody = typed(&url, value)?;
            let pairs: Vec<String> = body
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            writeln!(out, "{id}: labels {}", or_dash(&pairs.join(", ")))?;
            Ok(())
        }
    }
}

/// One line per command.
pub(crate) fn render_table(cmds: &[CommandView], now_ms: u64) -> String {
    let mut table = Table::new(vec![
        "ID", "DEVICE", "KIND", "STATUS", "CREATED", "AUTHOR", "MESSAGE",
    ]);
    for c in cmds {
        let status = if c.status == crate::views::CommandState::InProgress {
            format!("in_progress {}%", c.progress_percent)
        } else {
            c.status.name().to_owned()
        };
        table.row(vec![
            c.id.clone(),
            c.device_id.clone(),
            c.body.kind().to_owned(),
            status,
            relative(now_ms, c.created_at_ms),
            c.author.clone(),
            printable(or_dash(&c.message)).into_owned(),
        ]);
    }
    table.render()
}

/// The `commands show` block.
pub(crate) fn render_detail(c: &CommandView, now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Command {}", printable(&c.id));
    let mut field = |label: &str, value: String| {
        let _ = writeln!(out, "  {label:<13}{}", printable(&value));
    };
    field("device", c.device_id.clone());
    field("kind", c.body.kind().to_owned());
    if let Ok(Value::Object(params)) =
        serde_json::to_value(&c.body).map(|v| v["parameters"].clone())
    {
        for (k, v) in params {
            let text = match v {
                Value::String(s) => s,
                Value::Object(o) => format!("{} keys", o.len()),
                other => other.to_string(),
            };
            field(&format!("  {k}"), text);
        }
    }
    field("status", c.status.name().to_owned());
    if let Some(r) = &c.rejection_reason {
        field("rejected", r.clone());
    }
    if !c.message.is_empty() {
        field("message", c.message.clone());
    }
    field("author", c.author.clone());
    field(
        "created",
        format!(
            "{} ({})",
            datetime(c.created_at_ms),
            relative(now_ms, c.created_at_ms)
        ),
    );
    field("valid until", datetime(c.not_after_ms));
    field(
        "sent",
        match c.last_sent_at_ms {
            Some(t) => format!("{} times, last {}", c.attempts, relative(now_ms, t)),
            None => "not yet".to_owned(),
        },
    );
    if let Some(bytes) = c.log_bytes {
        field(
            "logs",
            format!(
                "{bytes} bytes{}",
                if c.logs_complete { ", complete" } else { "" }
            ),
        );
    }
    for h in &c.history {
        field(
            "history",
            format!("{} {}", datetime(h.at_ms), h.status.name()),
        );
    }
    for (k, v) in &c.details {
        field(&format!("detail {k}"), v.clone());
    }
    out
}
