//! CollectLogs, through the `collect_logs` hook.
//!
//! The hook gets `POSFLEET_LOGS_SINCE_MS` and `POSFLEET_LOGS_MAX_BYTES` and writes the logs
//! to stdout, which is kept up to `max_bytes` (0: [`DEFAULT_MAX_BYTES`]; at most
//! [`HARD_MAX_BYTES`]). The bytes go up as `LogChunk`s on `up/log`, at most
//! [`LOG_CHUNK_MAX_DATA`] each, in order, the last one marked, each with the total size; then
//! `SUCCEEDED` with `details.bytes`. Without a hook, or if it fails: `FAILED`.

use posfleet_proto::{LOG_CHUNK_MAX_DATA, pb};

use super::{Executor, hooks, result};
use crate::state::Changes;

/// Logs uploaded when the command does not say.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// Most bytes of logs one command uploads.
pub const HARD_MAX_BYTES: usize = 16 * 1024 * 1024;

impl Executor {
    pub(super) async fn collect_logs(
        &mut self,
        cmd: &pb::Command,
        bytes: &[u8],
        c: &pb::CollectLogs,
    ) {
        let Some(hook) = self.settings.hooks.collect_logs.clone() else {
            let r = result::failed(&cmd.id, "no collect_logs hook configured");
            self.finish(cmd, r, Changes::durable()).await;
            return;
        };
        let max = match c.max_bytes as usize {
            0 => DEFAULT_MAX_BYTES,
            n => n.min(HARD_MAX_BYTES),
        };
        let progress = result::in_progress(&cmd.id, "collecting logs");
        if !self.begin(cmd, bytes, &progress, Changes::durable()).await {
            return;
        }
        self.publish_result(progress).await;
        let mut env = self.hook_env();
        env.push(("POSFLEET_LOGS_SINCE_MS", c.since_ms.to_string()));
        env.push(("POSFLEET_LOGS_MAX_BYTES", max.to_string()));
        let run = hooks::run(&hook, &env, self.settings.hooks.timeout, max).await;
        if !run.succeeded() {
            let r = result::with(
                result::failed(&cmd.id, format!("the collect_logs hook {}", run.describe())),
                "hook_exit",
                run.exit_detail(),
            );
            self.finish(cmd, r, Changes::durable()).await;
            return;
        }
        let total = run.stdout.len();
        let r = if self.upload(&cmd.id, &run.stdout).await {
            result::with(
                result::succeeded(&cmd.id, format!("{total} bytes of logs uploaded")),
                "bytes",
                total,
            )
        } else {
            result::failed(
                &cmd.id,
                "the log upload could not be queued (not connected?)",
            )
        };
        self.finish(cmd, r, Changes::durable()).await;
    }

    /// Publishes `data` as `LogChunk`s; false if one could not be queued.
    async fn upload(&self, command_id: &str, data: &[u8]) -> bool {
        let total = data.len() as u64;
        let mut pieces: Vec<&[u8]> = data.chunks(LOG_CHUNK_MAX_DATA).collect();
        if pieces.is_empty() {
            pieces.push(&[]);
        }
        let count = pieces.len();
        let mut offset = 0u64;
        for (i, piece) in pieces.into_iter().enumerate() {
            let chunk = pb::LogChunk {
                command_id: command_id.to_owned(),
                offset,
                data: piece.to_vec(),
                last: i + 1 == count,
                total_bytes: total,
            };
            if !self.mqtt.is_connected()
                || !crate::agent::publish(&self.mqtt, &self.id, &chunk).await
            {
                return false;
            }
            offset += piece.len() as u64;
        }
        true
    }
}
