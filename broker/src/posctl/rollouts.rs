//! `posctl rollout create|list|show|pause|resume|abort` (ADR 0008). `show --follow` polls the
//! API and draws one indicatif bar per wave until the rollout is completed or aborted.

use std::fmt::Write as _;
use std::io::Write;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use posfleet_proto::now_ms;
use posfleet_proto::version::{
    REASON_BELOW_MIN_VERSION, REASON_VERSION_UNKNOWN, REASON_VERSION_UNPARSEABLE,
};
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::client::ApiClient;
use super::devices::{print_json, print_view, typed};
use super::output::{Table, datetime, printable, relative, span};
use super::{OutputFormat, RolloutCreateArgs};
use crate::views::{
    RolloutList, RolloutState, RolloutView, SkippedCounts, StatusCounts, TargetView,
};

pub(crate) async fn create(
    api: &ApiClient,
    args: &RolloutCreateArgs,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let target = if !args.device.is_empty() {
        json!({"devices": args.device.iter().map(|d| d.as_str()).collect::<Vec<_>>()})
    } else if let Some(g) = &args.group {
        json!({"group": g})
    } else {
        let labels: Map<String, Value> = args
            .label
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({"labels": labels})
    };
    let mut body = Map::new();
    body.insert("artifact_id".into(), args.artifact_id.clone().into());
    body.insert("target".into(), target);
    if let Some(w) = &args.waves {
        body.insert("waves".into(), json!(w));
    }
    if let Some(t) = args.success_threshold {
        body.insert("success_threshold".into(), json!(t));
    }
    if let Some(t) = args.failure_threshold {
        body.insert("failure_threshold".into(), json!(t));
    }
    if let Some(d) = args.soak {
        body.insert("soak_s".into(), json!(d.as_secs()));
    }
    if let Some(d) = args.wave_timeout {
        body.insert("wave_timeout_s".into(), json!(d.as_secs().max(1)));
    }
    let url = api.url(&["api", "v1", "rollouts"]);
    let value = api
        .send_json(Method::POST, url.clone(), Some(&Value::Object(body)))
        .await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let view: RolloutView = typed(&url, value)?;
            let mut text = render_detail(&view, now_ms());
            let _ = writeln!(
                text,
                "\nfollow it with `posctl rollout show {} --follow`",
                view.id
            );
            Ok(out.write_all(text.as_bytes())?)
        }
    }
}

pub(crate) async fn list(
    api: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "rollouts"]);
    let value = api.get_json(url.clone()).await?;
    match format {
        OutputFormat::Json => print_json(out, &value),
        OutputFormat::Table => {
            let list: RolloutList = typed(&url, value)?;
            if list.rollouts.is_empty() {
                writeln!(out, "no rollouts")?;
                return Ok(());
            }
            let now = now_ms();
            let mut t = Table::new(vec![
                "ID",
                "VERSION",
                "COMPONENT",
                "STATE",
                "WAVE",
                "DONE",
                "CREATED",
            ]);
            for r in &list.rollouts {
                let done: u32 = r.waves.iter().map(|w| w.counts.succeeded).sum();
                t.row(vec![
                    printable(&r.id).into_owned(),
                    printable(&r.version).into_owned(),
                    printable(&r.component).into_owned(),
                    r.state.name().to_owned(),
                    r.state
                        .wave()
                        .map_or("-".to_owned(), |w| format!("{w}/{}", r.waves.len())),
                    format!("{done}/{}", r.members),
                    relative(now, r.created_at_ms),
                ]);
            }
            Ok(out.write_all(t.render().as_bytes())?)
        }
    }
}

/// `show`, with `--follow` until the rollout ends (or `stop`, or `timeout`).
pub(crate) async fn show(
    api: &ApiClient,
    id: &str,
    follow: Option<(Duration, Option<Duration>)>,
    format: OutputFormat,
    out: &mut dyn Write,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "rollouts", id]);
    let mut value = api.get_json(url.clone()).await?;
    if let Some((every, timeout)) = follow {
        let bars = Bars::new(ProgressDrawTarget::stderr());
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        tokio::pin!(stop);
        loop {
            let view: RolloutView = typed(&url, value.clone())?;
            bars.draw(&view);
            if view.state.is_final() {
                break;
            }
            let sleep = tokio::time::sleep(every);
            tokio::select! {
                () = sleep => {}
                () = &mut stop => break,
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                bars.clear();
                anyhow::bail!(
                    "rollout {id} is still {} after the --timeout; it goes on without posctl",
                    view.state.name()
                );
            }
            value = api.get_json(url.clone()).await?;
        }
        bars.clear();
    }
    print_view(out, format, &url, value, |view: &RolloutView| {
        render_detail(view, now_ms())
    })
}

/// `pause`, `resume` or `abort`.
pub(crate) async fn control(
    api: &ApiClient,
    id: &str,
    verb: &str,
    reason: Option<&str>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let url = api.url(&["api", "v1", "rollouts", id, verb]);
    let body = match reason {
        Some(r) => json!({ "reason": r }),
        None => json!({}),
    };
    let value = api
        .send_json(Method::POST, url.clone(), Some(&body))
        .await?;
    print_view(out, format, &url, value, |view: &RolloutView| {
        render_detail(view, now_ms())
    })
}

/// One progress bar per wave.
struct Bars {
    multi: MultiProgress,
    bars: std::cell::RefCell<Vec<ProgressBar>>,
}

impl Bars {
    fn new(target: ProgressDrawTarget) -> Self {
        Self {
            multi: MultiProgress::with_draw_target(target),
            bars: std::cell::RefCell::new(Vec::new()),
        }
    }

    fn draw(&self, view: &RolloutView) {
        let mut bars = self.bars.borrow_mut();
        let style = ProgressStyle::with_template("wave {prefix:>2} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        while bars.len() < view.waves.len() {
            let w = &view.waves[bars.len()];
            let bar = self
                .multi
                .add(ProgressBar::new(u64::from(w.members)).with_style(style.clone()));
            bar.set_prefix(w.number.to_string());
            bars.push(bar);
        }
        for (bar, w) in bars.iter().zip(&view.waves) {
            // Skipped members (min_version) have nothing left to do either.
            bar.set_position(u64::from(w.counts.finished() + w.counts.skipped));
            let state = match (w.outcome, w.started_at_ms) {
                (Some(o), _) => format!("{o:?}").to_lowercase(),
                (None, None) => "waiting".to_owned(),
                (None, Some(_)) => counts_text(&w.counts),
            };
            bar.set_message(state);
        }
    }

    fn clear(&self) {
        let _ = self.multi.clear();
    }
}

fn counts_text(c: &StatusCounts) -> String {
    let mut parts = vec![format!("{} ok", c.succeeded)];
    if c.unsuccessful() > 0 {
        parts.push(format!("{} failed", c.unsuccessful()));
    }
    let running = c.queued + c.delivered + c.in_progress;
    if running > 0 {
        parts.push(format!("{running} running"));
    }
    if c.skipped > 0 {
        parts.push(format!("{} skipped", c.skipped));
    }
    parts.join(", ")
}

/// `2 below_min_version, 1 version_unknown` (the reasons with a count).
fn skipped_text(s: &SkippedCounts) -> String {
    [
        (s.below_min_version, REASON_BELOW_MIN_VERSION),
        (s.version_unknown, REASON_VERSION_UNKNOWN),
        (s.version_unparseable, REASON_VERSION_UNPARSEABLE),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, reason)| format!("{n} {reason}"))
    .collect::<Vec<_>>()
    .join(", ")
}

fn target_text(t: &TargetView) -> String {
    match t {
        TargetView::Devices(d) if d.len() <= 5 => format!("devices {}", d.join(", ")),
        TargetView::Devices(d) => format!("{} devices", d.len()),
        TargetView::Group(g) => format!("group {g}"),
        TargetView::Labels(l) => {
            let pairs: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("labels {}", pairs.join(","))
        }
    }
}

/// The detail block (also the summary `show --follow` ends with).
pub(crate) fn render_detail(v: &RolloutView, now: u64) -> String {
    let mut s = String::new();
    let state = match &v.state {
        RolloutState::Running { wave } => format!("running (wave {wave}/{})", v.waves.len()),
        RolloutState::Soaking { wave, until_ms } => format!(
            "soaking (wave {wave}/{}, until {})",
            v.waves.len(),
            datetime(*until_ms)
        ),
        RolloutState::Paused { wave } => format!("paused (wave {wave}/{})", v.waves.len()),
        RolloutState::Completed => "completed".to_owned(),
        RolloutState::Aborted { reason } => format!("aborted: {}", printable(reason)),
    };
    let _ = writeln!(s, "rollout      {}", printable(&v.id));
    let _ = writeln!(s, "state        {state}");
    let _ = writeln!(
        s,
        "artifact     {} {} ({}){}",
        printable(&v.component),
        printable(&v.version),
        printable(&v.artifact_id),
        v.min_version
            .as_deref()
            .map_or(String::new(), |m| format!(", min_version {}", printable(m)))
    );
    let _ = writeln!(
        s,
        "target       {} ({} terminals)",
        printable(&target_text(&v.target)),
        v.members
    );
    let _ = writeln!(
        s,
        "thresholds   success >= {:.0}%, failure > {:.0}% aborts; soak {}, wave timeout {}",
        v.success_threshold * 100.0,
        v.failure_threshold * 100.0,
        span(v.soak_s),
        span(v.wave_timeout_s)
    );
    let _ = writeln!(
        s,
        "created      {} by {}",
        relative(now, v.created_at_ms),
        printable(&v.created_by)
    );
    let mut t = Table::new(vec![
        "WAVE", "%", "MEMBERS", "OK", "FAILED", "RUNNING", "SKIPPED", "OUTCOME", "GATE",
    ]);
    for w in &v.waves {
        let c = &w.counts;
        let outcome = match (w.outcome, w.started_at_ms) {
            (Some(o), _) => format!("{o:?}").to_lowercase(),
            (None, Some(_)) => "running".to_owned(),
            (None, None) => "-".to_owned(),
        };
        let gate = w.gate.as_ref().map_or("-".to_owned(), |g| {
            let rate = |r: Option<f64>| r.map_or("-".to_owned(), |r| format!("{:.1}%", r * 100.0));
            let mut text = format!(
                "approved {} vs {}",
                rate(g.updated_approval_rate),
                rate(g.other_approval_rate)
            );
            if let (Some(u), Some(o)) = (g.updated_mean_outbox, g.other_mean_outbox) {
                let _ = write!(text, ", outbox {u:.1} vs {o:.1}");
            }
            if g.tripped.is_some() {
                text.push_str(" TRIPPED");
            }
            text
        });
        t.row(vec![
            w.number.to_string(),
            w.percent.to_string(),
            w.members.to_string(),
            c.succeeded.to_string(),
            c.unsuccessful().to_string(),
            (c.queued + c.delivered + c.in_progress).to_string(),
            c.skipped.to_string(),
            outcome,
            gate,
        ]);
    }
    let _ = write!(s, "\n{}", t.render());
    for w in v.waves.iter().filter(|w| w.skipped.total() > 0) {
        let _ = writeln!(
            s,
            "skipped      wave {}: {}",
            w.number,
            skipped_text(&w.skipped)
        );
    }
    if let Some(rb) = &v.rollback {
        let _ = writeln!(
            s,
            "\nrollback     {} terminals: {}",
            rb.counts.total(),
            counts_text(&rb.counts)
        );
    }
    s
}
