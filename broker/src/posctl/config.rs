//! `posctl config set|get|history|diff|schema`: the fleet configuration layers.
//!
//! `KEY=VALUE` values are JSON integers when they look like one (`-12`, `300`), booleans for
//! `true`/`false`, and strings otherwise; `--string` sends every value as a string. `null` is
//! refused (use `--unset KEY`), so a typo cannot silently become the string "null".

use std::fmt::Write as _;
use std::io::Write;

use anyhow::anyhow;
use reqwest::{Method, Url};
use serde_json::{Map, Value, json};

use super::client::{ApiClient, ApiError};
use super::devices::{print_json, print_view, typed};
use super::output::{Table, datetime, printable};
use super::{
    ConfigDiffArgs, ConfigGetArgs, ConfigHistoryArgs, ConfigSetArgs, OutputFormat, ScopeArgs,
};
use crate::fleetconfig::Scope;
use crate::views::{
    ConfigChangeKind, ConfigDiffView, ConfigHistoryPage, ConfigLayerView, ConfigSchemaView,
    EffectiveConfigView,
};

/// Clap value parser of `KEY=VALUE` (the value is interpreted later, knowing `--string`).
pub(crate) fn parse_assignment(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!(
            "{:?} is not KEY=VALUE (e.g. display.brightness=80)",
            printable(s)
        )),
    }
}

/// A value typed on the command line as JSON: integer, boolean, or string.
pub(crate) fn parse_value(raw: &str, force_string: bool) -> Result<Value, String> {
    if force_string {
        return Ok(Value::String(raw.to_owned()));
    }
    match raw {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        "null" => {
            return Err(
                "null is not a value: use --unset KEY to remove a key, or --string to \
                 set the text \"null\""
                    .to_owned(),
            );
        }
        _ => {}
    }
    let digits = raw.strip_prefix('-').unwrap_or(raw);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return raw.parse::<i64>().map(Value::from).map_err(|_| {
            "the number is outside the 64-bit integer range; pass --string to send it as text"
                .to_owned()
        });
    }
    Ok(Value::String(raw.to_owned()))
}

/// The `set` object of a PATCH from `KEY=VALUE` pairs; a key given twice is an error.
pub(crate) fn assignments(
    pairs: &[(String, String)],
    force_string: bool,
) -> anyhow::Result<Map<String, Value>> {
    let mut set = Map::new();
    for (key, raw) in pairs {
        let value = parse_value(raw, force_string).map_err(|e| anyhow!("{key}: {e}"))?;
        if set.insert(key.clone(), value).is_some() {
            return Err(anyhow!("{key} is given twice"));
        }
    }
    Ok(set)
}

/// The API path segments of a layer.
fn layer_segments(scope: &Scope) -> Vec<&str> {
    let mut segments = vec!["api", "v1", "config"];
    match scope {
        Scope::Fleet => segments.push("fleet"),
        Scope::Group(name) => segments.extend(["groups", name.as_str()]),
        Scope::Device(id) => segments.extend(["devices", id.as_str()]),
    }
    segments
}

impl ScopeArgs {
    pub(crate) fn scope(&self) -> Scope {
        match (&self.group, &self.device) {
            (Some(group), _) => Scope::Group(group.clone()),
            (None, Some(id)) => Scope::Device(id.clone()),
            (None, None) => Scope::Fleet,
        }
    }
}

pub(crate) async fn set(
    api: &ApiClient,
    args: &ConfigSetArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if args.assignments.is_empty() && args.unset.is_empty() {
        return Err(anyhow!(
            "nothing to change: give KEY=VALUE pairs and/or --unset KEY"
        ));
    }
    let set = assignments(&args.assignments, args.string)?;
    let body = json!({"set": set, "unset": args.unset, "comment": args.comment.clone().unwrap_or_default()});
    let scope = args.scope.scope();
    let url = api.url(&layer_segments(&scope));
    let value = api
        .send_json(Method::PATCH, url.clone(), Some(&body))
        .await?;
    print_view(out, format, &url, value, |layer: &ConfigLayerView| {
        render_layer(layer)
    })
}

pub(crate) async fn get(
    api: &ApiClient,
    args: &ConfigGetArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let scope = args.scope.scope();
    if args.effective {
        let Scope::Device(id) = &scope else {
            return Err(anyhow!("--effective needs --device ID"));
        };
        let url = api.url(&["api", "v1", "devices", id.as_str(), "config"]);
        let value = api.get_json(url.clone()).await?;
        return match format {
            OutputFormat::Json => print_json(out, &value),
            OutputFormat::Table => {
                let eff: EffectiveConfigView = typed(&url, value)?;
                Ok(out.write_all(render_effective(&eff).as_bytes())?)
            }
        };
    }
    let url = api.url(&layer_segments(&scope));
    let value = match api.get_json(url.clone()).await {
        Ok(value) => value,
        Err(ApiError::NotFound { body: Some(_), .. }) => {
            return Err(anyhow!(
                "there is no {scope} layer; `posctl config set --{} KEY=VALUE` creates it",
                match &scope {
                    Scope::Fleet => "fleet".to_owned(),
                    Scope::Group(g) => format!("group {g}"),
                    Scope::Device(d) => format!("device {d}"),
                }
            ));
        }
        Err(e) => return Err(e.into()),
    };
    print_view(out, format, &url, value, |layer: &ConfigLayerView| {
        render_layer(layer)
    })
}

pub(crate) async fn history(
    api: &ApiClient,
    args: &ConfigHistoryArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut url = api.url(&["api", "v1", "config", "history"]);
    {
        let mut q = url.query_pairs_mut();
        if let Some(scope) = &args.scope {
            q.append_pair("scope", &scope.to_string());
        }
        q.append_pair("limit", &args.limit.to_string());
        if let Some(before) = args.before {
            q.append_pair("before", &before.to_string());
        }
    }
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |page: &ConfigHistoryPage| {
        render_history(page)
    })
}

pub(crate) async fn diff(
    api: &ApiClient,
    args: &ConfigDiffArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut url = api.url(&["api", "v1", "config", "diff"]);
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("from", &args.from.to_string());
        if let Some(to) = args.to {
            q.append_pair("to", &to.to_string());
        }
        if let Some(scope) = &args.scope {
            q.append_pair("scope", &scope.to_string());
        }
    }
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |diff: &ConfigDiffView| {
        render_diff(diff)
    })
}

pub(crate) async fn schema(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url: Url = api.url(&["api", "v1", "config", "schema"]);
    let value = api.get_json(url.clone()).await?;
    print_view(out, format, &url, value, |schema: &ConfigSchemaView| {
        render_schema(schema)
    })
}

/// A value as JSON (strings quoted, so `"5"` and `5` differ); `-` when absent.
fn shown(value: Option<&Value>) -> String {
    value.map_or_else(|| "-".to_owned(), Value::to_string)
}

pub(crate) fn render_layer(layer: &ConfigLayerView) -> String {
    let mut out = String::new();
    let state = if layer.deleted { " (deleted)" } else { "" };
    let _ = writeln!(
        out,
        "Layer {}{state}: version {}{}",
        printable(&layer.scope),
        layer.version,
        if layer.changed_at_ms == 0 {
            String::new()
        } else {
            format!(
                ", changed {} by {}",
                datetime(layer.changed_at_ms),
                printable(&layer.author)
            )
        }
    );
    if layer.document.is_empty() {
        out.push_str("no keys\n");
        return out;
    }
    let mut table = Table::new(vec!["KEY", "VALUE"]);
    for (key, value) in &layer.document {
        table.row(vec![key.clone(), shown(Some(value))]);
    }
    out.push_str(&table.render());
    out
}

pub(crate) fn render_effective(eff: &EffectiveConfigView) -> String {
    let mut out = String::new();
    let groups = if eff.groups.is_empty() {
        "none".to_owned()
    } else {
        eff.groups.join(", ")
    };
    let _ = writeln!(
        out,
        "Effective configuration of {}: version {}, groups: {}",
        printable(&eff.device),
        eff.version,
        printable(&groups)
    );
    if eff.document.is_empty() {
        out.push_str("no keys\n");
        return out;
    }
    let mut table = Table::new(vec!["KEY", "VALUE", "FROM"]);
    for (key, value) in &eff.document {
        let source = eff.sources.get(key).map_or("-", String::as_str);
        table.row(vec![key.clone(), shown(Some(value)), source.to_owned()]);
    }
    out.push_str(&table.render());
    out
}

pub(crate) fn render_history(page: &ConfigHistoryPage) -> String {
    let mut out = String::new();
    if page.entries.is_empty() {
        out.push_str("no changes\n");
        return out;
    }
    let mut table = Table::new(vec![
        "VERSION",
        "TIME (UTC)",
        "SCOPE",
        "KIND",
        "AUTHOR",
        "CHANGES",
        "COMMENT",
    ]);
    for e in &page.entries {
        let changes: Vec<String> = e
            .diff
            .iter()
            .map(|c| match (&c.old, &c.new) {
                (None, _) => format!("+{}", c.key),
                (_, None) => format!("-{}", c.key),
                _ => format!("~{}", c.key),
            })
            .collect();
        let kind = match e.kind {
            ConfigChangeKind::Set => "set",
            ConfigChangeKind::Replace => "replace",
            ConfigChangeKind::Delete => "delete",
            ConfigChangeKind::Membership => "membership",
        };
        table.row(vec![
            e.version.to_string(),
            datetime(e.at_ms).trim_end_matches(" UTC").to_owned(),
            e.scope.clone(),
            kind.to_owned(),
            e.author.clone(),
            if changes.is_empty() {
                "-".to_owned()
            } else {
                changes.join(" ")
            },
            e.comment.clone(),
        ]);
    }
    out.push_str(&table.render());
    if let Some(before) = page.next_before {
        let _ = writeln!(out, "older: repeat the command with --before {before}");
    }
    out
}

pub(crate) fn render_diff(diff: &ConfigDiffView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Changes from version {} to {}{}",
        diff.from,
        diff.to,
        diff.scope
            .as_deref()
            .map(|s| format!(" in {}", printable(s)))
            .unwrap_or_default()
    );
    if diff.changes.is_empty() {
        out.push_str("no differences\n");
        return out;
    }
    let mut table = Table::new(vec!["SCOPE", "KEY", "OLD", "NEW"]);
    for c in &diff.changes {
        table.row(vec![
            c.scope.clone(),
            c.key.clone(),
            shown(c.old.as_ref()),
            shown(c.new.as_ref()),
        ]);
    }
    out.push_str(&table.render());
    out
}

pub(crate) fn render_schema(schema: &ConfigSchemaView) -> String {
    let mut out = String::new();
    for key in &schema.keys {
        let _ = writeln!(out, "{}  ({})", printable(&key.key), printable(&key.kind));
        let _ = writeln!(out, "    {}", printable(&key.rule));
        let _ = writeln!(out, "    {}", printable(&key.description));
    }
    let _ = writeln!(
        out,
        "\n{}*: any string (at most {} characters), integer or boolean\n\
         keys at most {} bytes; a layer at most {} keys and {} bytes of JSON",
        printable(&schema.custom_prefix),
        schema.max_custom_string_chars,
        schema.max_key_len,
        schema.max_keys,
        schema.max_document_bytes
    );
    out
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
