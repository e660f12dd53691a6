//! `enablement backfill metering`: imports historical usage events (CloudEvents JSON, one per
//! line, the producers' contract) through the live ingestion path
//! ([`crate::metering::ingest`]): the same validation, the same dedupe (ids seen earlier in
//! the file, ids the read model already holds, the log's duplicate window), rate-limited.
//!
//! Backfilled events are appended to `metering.backfill.<subscription_id>` (see
//! [`decode::BACKFILL_SUBJECT_PREFIX`]). With `accept_late`, the late-event window is widened
//! to cover the oldest event of the file; that window travels with each event (header
//! [`decode::LATE_WINDOW_HOURS`]) so the projection and any replay accept them too. Without
//! it, events older than the live window are rejected as `time_too_old`, as live.
//!
//! Rejected lines are reported (count by reason, the first few with their line numbers); they
//! are not parked in the dead letters: the file is the place to fix them, and re-running the
//! backfill is idempotent.
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use creto_domain::metering::{IngestLimits, Invalid, RawUsageEvent};
use creto_projections::metering::decode;
use creto_projections::metering::read_model::MeteringReadModel;
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Catalog, EventLog, Headers};
use serde::Serialize;

use crate::metering::ingest::{self, Outcome};

/// How many rejected lines the report shows in full.
pub const SHOWN_REJECTIONS: usize = 10;

#[derive(Debug, Clone)]
pub struct BackfillOptions {
    /// Events per second (all lines, rejected ones included); 0: unlimited.
    pub rate: u32,
    /// Validate and dedupe, append nothing.
    pub dry_run: bool,
    /// Widen the late-event window to cover the oldest event of the input.
    pub accept_late: bool,
    /// Events per append batch (at most [`crate::metering::service::MAX_BATCH`] is sensible).
    pub batch: usize,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            rate: 5_000,
            dry_run: false,
            accept_late: false,
            batch: 1_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Rejection {
    /// 1-based line number in the input.
    pub line: u64,
    /// The event's id when it could be read.
    pub id: Option<String>,
    pub reason: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct BackfillReport {
    pub source: String,
    pub dry_run: bool,
    /// Non-blank lines read.
    pub events: u64,
    pub accepted: u64,
    pub duplicates: u64,
    /// `same_submission` (earlier in this input), `already_applied` (in the read model),
    /// `log_duplicate_window` (appended moments ago).
    pub duplicates_by_kind: BTreeMap<String, u64>,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// The first [`SHOWN_REJECTIONS`] rejected lines.
    pub first_rejections: Vec<Rejection>,
    /// The late-event window the events were validated with.
    pub late_window_hours: i64,
    /// Highest sequence appended (wait for it before querying).
    pub last_sequence: u64,
    pub elapsed_ms: u64,
    pub events_per_second: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0} (after {1} events; re-run the backfill: it is idempotent)")]
    Submit(ingest::SubmitError, u64),
}

/// Writes every `*.ndjson` / `*.ndjson.gz` object under `prefix` (in key order) into one NDJSON
/// file at `into`; returns how many objects it read.
pub async fn fetch_prefix(
    archive: &dyn creto_projections::archive::Archive,
    prefix: &str,
    into: &Path,
) -> Result<usize, String> {
    use std::io::{Read, Write};
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(into).map_err(|e| format!("cannot write {}: {e}", into.display()))?,
    );
    let mut objects = 0;
    for o in archive.list(prefix).await.map_err(|e| e.to_string())? {
        let gz = o.key.ends_with(".ndjson.gz");
        if !gz && !o.key.ends_with(".ndjson") {
            continue;
        }
        let body = archive
            .get(&o.key)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} disappeared while reading", o.key))?;
        let mut text = Vec::with_capacity(body.len());
        if gz {
            flate2::read::GzDecoder::new(body.as_ref())
                .read_to_end(&mut text)
                .map_err(|e| format!("{} is not valid gzip: {e}", o.key))?;
        } else {
            text.extend_from_slice(&body);
        }
        out.write_all(&text).map_err(|e| e.to_string())?;
        if !text.ends_with(b"\n") {
            out.write_all(b"\n").map_err(|e| e.to_string())?;
        }
        objects += 1;
    }
    out.flush().map_err(|e| e.to_string())?;
    if objects == 0 {
        return Err(format!(
            "no *.ndjson or *.ndjson.gz object under {prefix}: check the prefix and S3_BUCKET"
        ));
    }
    Ok(objects)
}

/// The event id of a raw event, when it is a string.
fn raw_id(raw: &Result<RawUsageEvent, Invalid>) -> Option<String> {
    raw.as_ref().ok()?.id.as_ref()?.as_str().map(str::to_string)
}

/// The time of a JSON event, when it has a readable one.
fn event_time(line: &str) -> Option<DateTime<Utc>> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let t = v.get("time")?.as_str()?;
    Some(DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc))
}

fn lines(path: &Path) -> Result<std::io::Lines<std::io::BufReader<std::fs::File>>, BackfillError> {
    let file = std::fs::File::open(path)
        .map_err(|e| BackfillError::Read(path.display().to_string(), e))?;
    Ok(std::io::BufReader::new(file).lines())
}

/// First pass: non-blank lines and the oldest event time.
pub fn scan(path: &Path) -> Result<(u64, Option<DateTime<Utc>>), BackfillError> {
    let mut count = 0;
    let mut oldest: Option<DateTime<Utc>> = None;
    for line in lines(path)? {
        let line = line.map_err(|e| BackfillError::Read(path.display().to_string(), e))?;
        if line.trim().is_empty() {
            continue;
        }
        count += 1;
        if let Some(t) = event_time(&line) {
            oldest = Some(oldest.map_or(t, |o| o.min(t)));
        }
    }
    Ok((count, oldest))
}

/// The late window that admits `oldest` (rounded up to the hour, plus one hour of margin),
/// never narrower than the live one.
pub fn late_window_covering(
    limits: &IngestLimits,
    oldest: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> chrono::Duration {
    let needed = oldest.map_or(0, |o| (now - o).num_hours() + 2);
    limits
        .late_window
        .max(chrono::Duration::hours(needed.clamp(0, 1_000_000)))
}

pub struct Backfill<'a> {
    pub log: &'a dyn EventLog,
    pub read_model: &'a dyn MeteringReadModel,
    pub catalog: &'a Catalog,
    pub limits: IngestLimits,
}

impl Backfill<'_> {
    /// Imports the NDJSON file at `path`. `progress(done, total)` is called after each batch.
    pub async fn file(
        &self,
        path: &Path,
        options: &BackfillOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<BackfillReport, BackfillError> {
        let started = Instant::now();
        let (total, oldest) = scan(path)?;
        let mut limits = self.limits;
        if options.accept_late {
            limits.late_window = late_window_covering(&self.limits, oldest, Utc::now());
        }
        let mut report = BackfillReport {
            source: path.display().to_string(),
            dry_run: options.dry_run,
            late_window_hours: limits.late_window.num_hours(),
            ..Default::default()
        };
        let mut batch_size = options.batch.max(1);
        if options.rate > 0 {
            // About ten batches a second at most, so the rate is smooth.
            batch_size = batch_size.min((options.rate as usize / 10).max(1));
        }
        let mut seen = ingest::Seen::new();
        let mut batch: Vec<(u64, String)> = Vec::with_capacity(batch_size);
        let mut line_no = 0u64;
        let mut reader = lines(path)?;
        loop {
            let next = reader.next();
            let end = next.is_none();
            if let Some(line) = next {
                let line = line.map_err(|e| BackfillError::Read(report.source.clone(), e))?;
                line_no += 1;
                if !line.trim().is_empty() {
                    batch.push((line_no, line));
                }
            }
            if batch.len() >= batch_size || (end && !batch.is_empty()) {
                // Each batch is checked against its own "now": a window fixed at the start
                // shrank, relative to the file's oldest event, as a long import went on, and
                // turned it away at the end.
                if options.accept_late {
                    limits.late_window = late_window_covering(&self.limits, oldest, Utc::now());
                    report.late_window_hours = limits.late_window.num_hours();
                }
                self.submit(&mut batch, &limits, options, &mut seen, &mut report)
                    .await?;
                progress(report.events, total);
                if options.rate > 0 {
                    let due = Duration::from_secs_f64(report.events as f64 / options.rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            if end {
                break;
            }
        }
        let elapsed = started.elapsed();
        report.elapsed_ms = elapsed.as_millis() as u64;
        report.events_per_second = (report.events as f64 / elapsed.as_secs_f64().max(1e-9)).round();
        Ok(report)
    }

    async fn submit(
        &self,
        batch: &mut Vec<(u64, String)>,
        limits: &IngestLimits,
        options: &BackfillOptions,
        seen: &mut ingest::Seen,
        report: &mut BackfillReport,
    ) -> Result<(), BackfillError> {
        let now = Utc::now();
        let mut items = Vec::with_capacity(batch.len());
        let mut ids = Vec::with_capacity(batch.len());
        for (_, line) in batch.iter() {
            let line = line.trim_end_matches('\r');
            let raw = RawUsageEvent::from_json(line.as_bytes());
            ids.push(raw_id(&raw));
            let checked = ingest::validate(raw, now, line.len(), limits);
            items.push(checked.map(|record| {
                let mut headers = Headers::new()
                    .with(names::CONTENT_TYPE, content_types::CLOUDEVENTS_JSON)
                    .with(names::EVENT_TYPE, &record.event_type);
                if options.accept_late {
                    headers.insert(
                        decode::LATE_WINDOW_HOURS,
                        limits.late_window.num_hours().to_string(),
                    );
                }
                ingest::Candidate {
                    append: AppendEvent {
                        subject: self.catalog.subject(&format!(
                            "{}{}",
                            decode::BACKFILL_SUBJECT_PREFIX,
                            record.subscription_id
                        )),
                        id: format!("{}:{}:{}", record.tenant, record.subscription_id, record.id),
                        expected_subject_sequence: None,
                        headers,
                        payload: Bytes::copy_from_slice(line.as_bytes()),
                    },
                    record,
                }
            }));
        }
        let outcomes = ingest::submit(self.log, self.read_model, items, seen, options.dry_run)
            .await
            .map_err(|e| BackfillError::Submit(e, report.events))?;
        for (((line, _), id), outcome) in batch.iter().zip(ids).zip(outcomes) {
            report.events += 1;
            match outcome {
                Outcome::Accepted { sequence } => {
                    report.accepted += 1;
                    report.last_sequence = report.last_sequence.max(sequence);
                }
                Outcome::Duplicate { sequence, of } => {
                    report.duplicates += 1;
                    *report
                        .duplicates_by_kind
                        .entry(of.as_str().to_string())
                        .or_default() += 1;
                    report.last_sequence = report.last_sequence.max(sequence);
                }
                Outcome::Rejected(invalid) => {
                    report.rejected += 1;
                    *report
                        .rejected_by_reason
                        .entry(invalid.reason.as_str().to_string())
                        .or_default() += 1;
                    if report.first_rejections.len() < SHOWN_REJECTIONS {
                        report.first_rejections.push(Rejection {
                            line: *line,
                            id,
                            reason: invalid.reason.as_str().to_string(),
                            detail: invalid.detail,
                        });
                    }
                }
            }
        }
        batch.clear();
        Ok(())
    }
}

impl BackfillReport {
    /// The human-readable report.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let verb = if self.dry_run {
            "would accept"
        } else {
            "accepted"
        };
        let _ = writeln!(
            out,
            "backfill of {}: {} events in {:.1} s ({} events/s), late window {} h{}",
            self.source,
            self.events,
            self.elapsed_ms as f64 / 1000.0,
            self.events_per_second,
            self.late_window_hours,
            if self.dry_run { " (dry run)" } else { "" }
        );
        let _ = writeln!(out, "  {verb:<12} {}", self.accepted);
        let _ = writeln!(out, "  {:<12} {}", "duplicate", self.duplicates);
        for (kind, n) in &self.duplicates_by_kind {
            let _ = writeln!(out, "    {kind:<28} {n}");
        }
        let _ = writeln!(out, "  {:<12} {}", "rejected", self.rejected);
        for (reason, n) in &self.rejected_by_reason {
            let _ = writeln!(out, "    {reason:<28} {n}");
        }
        for r in &self.first_rejections {
            let _ = writeln!(
                out,
                "    line {}{}: {}: {}",
                r.line,
                r.id.as_ref()
                    .map(|i| format!(" (id {i})"))
                    .unwrap_or_default(),
                r.reason,
                r.detail
            );
        }
        if self.rejected as usize > self.first_rejections.len() {
            let _ = writeln!(
                out,
                "    … {} more rejected line(s)",
                self.rejected as usize - self.first_rejections.len()
            );
        }
        if self.rejected_by_reason.contains_key("time_too_old") {
            let _ = writeln!(
                out,
                "  events older than the late window are history: re-run with --accept-late to import them"
            );
        }
        if !self.dry_run && self.last_sequence > 0 {
            let _ = writeln!(out, "  last sequence {}", self.last_sequence);
        }
        out
    }
}
