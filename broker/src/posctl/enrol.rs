//! `posctl enroll token create|list|revoke` and `posctl devices
//! revoke|decommission|certificates`.

use std::io::Write;

use posfleet_proto::DeviceId;
use reqwest::Method;
use serde_json::{Value, json};

use super::OutputFormat;
use super::client::ApiClient;
use super::devices::{print_json, typed};
use super::output::{or_dash, printable};
use crate::views::{DeviceCertificates, RevocationView, TokenCreated, TokenList};

/// What a new token is pinned to.
#[derive(Debug, Default)]
pub(crate) struct TokenPins {
    pub(crate) device: Option<DeviceId>,
    pub(crate) serial: Option<String>,
    pub(crate) group: Option<String>,
}

/// Creates a one-time enrolment token and prints it (the only time it is shown).
pub(crate) async fn create_token(
    api: &ApiClient,
    pins: TokenPins,
    expires: String,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "enrolment-tokens"]);
    if let Some(device) = &pins.device {
        super::check_new_device_id("--device", device)?;
    }
    let mut body = json!({"expires_in": expires});
    if let Some(device) = pins.device {
        body["device_id"] = device.as_str().into();
    }
    if let Some(serial) = pins.serial {
        body["serial"] = serial.into();
    }
    if let Some(group) = pins.group {
        body["group"] = group.into();
    }
    let value = api
        .send_json(Method::POST, url.clone(), Some(&body))
        .await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let t: TokenCreated = typed(&url, value)?;
    writeln!(out, "Enrolment token {} (shown once; single use):", t.id)?;
    writeln!(out, "  {}", t.token)?;
    writeln!(
        out,
        "  device {}  serial {}  group {}  expires {}",
        or_dash(t.device_id.as_deref().unwrap_or("")),
        or_dash(t.serial.as_deref().unwrap_or("")),
        or_dash(t.group.as_deref().unwrap_or("")),
        super::output::datetime(t.expires_at_ms)
    )?;
    Ok(())
}

pub(crate) async fn list_tokens(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "enrolment-tokens"]);
    let value = api.get_json(url.clone()).await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let list: TokenList = typed(&url, value)?;
    writeln!(
        out,
        "ID            STATE    DEVICE        SERIAL        GROUP         EXPIRES            USED BY"
    )?;
    for t in list.items {
        writeln!(
            out,
            "{:<13} {:<8} {:<13} {:<13} {:<13} {:<18} {}",
            printable(&t.id),
            t.state,
            printable(or_dash(t.device_id.as_deref().unwrap_or(""))),
            printable(or_dash(t.serial.as_deref().unwrap_or(""))),
            printable(or_dash(t.group.as_deref().unwrap_or(""))),
            super::output::datetime(t.expires_at_ms),
            printable(or_dash(t.used_by.as_deref().unwrap_or("")))
        )?;
    }
    Ok(())
}

pub(crate) async fn revoke_token(
    api: &ApiClient,
    id: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "enrolment-tokens", id]);
    let value = api.send_json(Method::DELETE, url, None).await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => Ok(writeln!(out, "Deleted enrolment token {}", printable(id))?),
    }
}

/// Revokes (or decommissions) a device.
pub(crate) async fn revoke_device(
    api: &ApiClient,
    id: &DeviceId,
    reason: String,
    decommission: bool,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let verb = if decommission {
        "decommission"
    } else {
        "revoke"
    };
    let url = api.url(&["api", "v1", "devices", id.as_str(), verb]);
    let body: Value = json!({ "reason": reason });
    let value = api
        .send_json(Method::POST, url.clone(), Some(&body))
        .await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let v: RevocationView = typed(&url, value)?;
    writeln!(
        out,
        "Device {} {}; {} certificate(s) on the CRL; live session {}",
        v.device_id,
        v.status,
        v.serials.len(),
        if v.session_closed { "closed" } else { "none" }
    )?;
    Ok(())
}

/// The certificates issued for a device.
pub(crate) async fn certificates(
    api: &ApiClient,
    id: &DeviceId,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "devices", id.as_str(), "certificates"]);
    let value = api.get_json(url.clone()).await?;
    if format == OutputFormat::Json {
        return print_json(out, &value);
    }
    let v: DeviceCertificates = typed(&url, value)?;
    let mut table =
        super::output::Table::new(vec!["SERIAL", "HOW", "ISSUED", "BY", "EXPIRES", "REVOKED"]);
    for c in &v.items {
        let kind = serde_json::to_value(c.kind)
            .ok()
            .and_then(|k| k.as_str().map(str::to_owned))
            .unwrap_or_default();
        table.row(vec![
            c.serial.clone(),
            kind,
            super::output::datetime(c.issued_at_ms),
            printable(&c.issued_by).into_owned(),
            super::output::datetime(u64::try_from(c.not_after).unwrap_or(0).saturating_mul(1000)),
            if c.revoked { "yes" } else { "no" }.to_owned(),
        ]);
    }
    writeln!(out, "Device {} ({})", printable(&v.device_id), v.status)?;
    out.write_all(table.render().as_bytes())?;
    for serial in &v.unrecorded_serials {
        writeln!(
            out,
            "also seen or revoked, issued before records were kept: {serial}"
        )?;
    }
    Ok(())
}
