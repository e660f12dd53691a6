//! `enablement audit export | verify | restore`: the audit archive of the streams (see
//! `creto_projections::audit`). Connects to the log and the archive only.
use std::sync::Arc;
use std::time::Duration;

use creto_projections::archive::{Archive, S3Archive, S3Settings};
use creto_projections::audit::{self, AuditExporter, ExportConfig, RestoreOptions};
use creto_streams::{Catalog, EventLog, MESSAGING, METERING, OVERSIGHT, RUNTIME};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::cli::CliError;

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Export the streams to the archive continuously (until SIGINT/SIGTERM), or with --once
    /// up to their current end.
    Export {
        /// A stream (METERING, OVERSIGHT, RUNTIME, MESSAGING, DEADLETTERS) or `all`.
        #[arg(long, default_value = "all")]
        stream: String,
        /// The oldest event not yet archived is written within this time (the archive's RPO).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        max_age: Duration,
        /// Events per object at most.
        #[arg(long, default_value_t = 20_000)]
        max_events: usize,
        /// Export everything up to the current end of each stream, then exit.
        #[arg(long)]
        once: bool,
        /// Serve /metrics and /health here while exporting continuously (a Deployment's
        /// probes); /health is 503 while an exporter is down.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Check the archive: hashes, the manifest chain, ranges without gaps, coverage of the log.
    /// Exits with 1 when a stream's archive is broken.
    Verify {
        #[arg(long, default_value = "all")]
        stream: String,
        #[arg(long)]
        json: bool,
    },
    /// Replay a stream's archive into the stream, which must be empty (freshly created).
    Restore {
        #[arg(long)]
        stream: String,
        /// Restore what can be read even when the archive does not verify.
        #[arg(long)]
        force: bool,
    },
}

/// The archive the CLI works on: S3 from the environment.
pub fn archive_from_env() -> Result<Arc<dyn Archive>, CliError> {
    match S3Settings::from_env() {
        Some(s) => Ok(Arc::new(S3Archive::new(s))),
        // A configuration error (exit 2, as the README says), not a failure of the work.
        None => Err(CliError::Config(crate::config::ConfigError::Invalid(
            "no archive configured: set S3_BUCKET (with S3_ENDPOINT, S3_REGION, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY as needed) to the bucket that holds the audit exports".into(),
        ))),
    }
}

/// Full stream names for `--stream`: a logical name (any case) or `all`.
pub fn streams(catalog: &Catalog, which: &str) -> Result<Vec<String>, CliError> {
    if which.eq_ignore_ascii_case("all") {
        return Ok(catalog.specs().into_iter().map(|s| s.name).collect());
    }
    match catalog.spec(&which.to_ascii_uppercase()) {
        Some(spec) => Ok(vec![spec.name]),
        None => Err(fail(format!(
            "unknown stream {which}: say one of METERING, OVERSIGHT, RUNTIME, MESSAGING, DEADLETTERS or all"
        ))),
    }
}

/// How long a restarted exporter runs without failing before its stream is reported up again.
const HEALTHY_AFTER: Duration = Duration::from_secs(300);

/// One exporter task per stream, each restarted with backoff when it fails, until `shutdown`.
pub fn spawn_exporters(
    tasks: &mut JoinSet<()>,
    log: Arc<dyn EventLog>,
    archive: Arc<dyn Archive>,
    streams: Vec<String>,
    config: ExportConfig,
    shutdown: watch::Receiver<bool>,
) -> crate::status::Health {
    let health = crate::status::Health::default();
    for stream in streams {
        // One health entry per stream (a few per process, kept for its life).
        let name: &'static str = Box::leak(format!("archive {stream}").into_boxed_str());
        health.set(name, "up");
        let exporter = AuditExporter::new(log.clone(), archive.clone(), stream, config);
        let shutdown = shutdown.clone();
        let health = health.clone();
        tasks.spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                // Up again only once a restart has run a while: an exporter failing every
                // few minutes (an S3 that refuses writes) stays down, not up between tries.
                let run = exporter.run(false, shutdown.clone());
                tokio::pin!(run);
                let result = loop {
                    tokio::select! {
                        result = &mut run => break result,
                        _ = tokio::time::sleep(HEALTHY_AFTER) => {
                            health.set(name, "up");
                            backoff = Duration::from_secs(1);
                        }
                    }
                };
                match result {
                    Ok(_) if *shutdown.borrow() => return,
                    Ok(_) => {}
                    Err(e) => {
                        health.set(name, format!("down: {e}"));
                        tracing::error!(stream = exporter.stream(), error = %e, "audit exporter stopped; restarting")
                    }
                }
                if *shutdown.borrow() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        });
    }
    health
}

pub async fn run(
    log: Arc<dyn EventLog>,
    catalog: &Catalog,
    command: AuditCommand,
    shutdown_signal: impl std::future::Future<Output = ()>,
) -> Result<(), CliError> {
    let archive = archive_from_env()?;
    match command {
        AuditCommand::Export {
            stream,
            max_age,
            max_events,
            once,
            metrics_addr,
        } => {
            let config = ExportConfig {
                max_age,
                max_events,
                ..ExportConfig::default()
            };
            let streams = streams(catalog, &stream)?;
            if once {
                let (_stop, rx) = watch::channel(false);
                for s in streams {
                    let stats = AuditExporter::new(log.clone(), archive.clone(), &s, config)
                        .run(true, rx.clone())
                        .await
                        .map_err(fail)?;
                    println!(
                        "{s}: {} event(s) in {} object(s) ({} bytes), archived through sequence {}",
                        stats.events, stats.objects, stats.compressed_bytes, stats.checkpoint
                    );
                }
                return Ok(());
            }
            let (stop, rx) = watch::channel(false);
            let mut tasks = JoinSet::new();
            tracing::info!(archive = %archive.describe(), ?streams, "exporting");
            let health = spawn_exporters(&mut tasks, log, archive, streams, config, rx.clone());
            if let Some(addr) = metrics_addr {
                crate::status::register_metrics();
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| fail(format!("cannot listen on {addr} (--metrics-addr): {e}")))?;
                tasks.spawn(crate::http_server::serve(
                    listener,
                    crate::status::router(health),
                    rx,
                ));
            }
            shutdown_signal.await;
            crate::cli::stopping(async move {
                let _ = stop.send(true);
                while tasks.join_next().await.is_some() {}
            })
            .await;
            Ok(())
        }
        AuditCommand::Verify { stream, json } => {
            let mut broken = Vec::new();
            for s in streams(catalog, &stream)? {
                let report = audit::verify(&*archive, &s, Some(&*log))
                    .await
                    .map_err(fail)?;
                if json {
                    println!("{}", serde_json::to_string(&report).map_err(fail)?);
                } else {
                    println!("{report}");
                }
                if !report.ok() {
                    broken.push(s);
                }
            }
            if broken.is_empty() {
                Ok(())
            } else {
                Err(fail(format!(
                    "the archive of {} is broken (see above)",
                    broken.join(", ")
                )))
            }
        }
        AuditCommand::Restore { stream, force } => {
            let [stream] = <[String; 1]>::try_from(streams(catalog, &stream)?)
                .map_err(|_| fail("restore one stream at a time: --stream METERING"))?;
            let bar = crate::cli::progress_bar(
                false,
                "{spinner} restore {msg} [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}",
            );
            bar.set_message(stream.clone());
            let started = std::time::Instant::now();
            let report = audit::restore(&*archive, &stream, &*log, RestoreOptions { force }, |p| {
                bar.set_length(p.total);
                bar.set_position(p.restored);
            })
            .await
            .map_err(fail)?;
            bar.finish_and_clear();
            println!(
                "{stream}: restored {} event(s) from {} object(s) in {:.1} s, sequences {}-{}{}{}",
                report.events,
                report.objects,
                started.elapsed().as_secs_f64(),
                report.first_sequence,
                report.last_sequence,
                if report.sequences_preserved {
                    " (equal to the originals)"
                } else {
                    " (NOT the original sequences: the archive does not start at 1 or has gaps)"
                },
                if report.reused_ids > 0 {
                    format!(
                        "; {} event(s) re-used an earlier id and were appended without it",
                        report.reused_ids
                    )
                } else {
                    String::new()
                }
            );
            // What a forced restore passed over, for the incident notes.
            for problem in &report.verify.problems {
                println!("skipped or suspect: {problem}");
            }
            for object in &report.unvouched {
                println!("skipped: object {object}, which its manifest does not vouch for");
            }
            let product = [METERING, OVERSIGHT, RUNTIME]
                .into_iter()
                .find(|p| catalog.stream(p) == stream);
            match product {
                Some(p) => println!(
                    "next: rebuild the read models (`enablement replay {} --rebuild`)",
                    p.to_lowercase()
                ),
                None if catalog.stream(MESSAGING) == stream => println!(
                    "next: start the messaging gateways again (they read {stream} when they start)"
                ),
                None => println!("next: nothing to rebuild from {stream}"),
            }
            Ok(())
        }
    }
}
