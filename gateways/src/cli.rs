//! The `enablement` command line.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use creto_projections::rebuild;
use creto_streams::{deadletter, EnsureOutcome, EventLog};
use futures::TryStreamExt;

use crate::config::{ConnectArgs, Settings};
use crate::platform::{self, ConnectError, Platform};
use crate::server::{self, ServeOptions};

#[derive(Parser, Debug)]
#[command(
    name = "enablement",
    version,
    about = "Creto Enablement Layer: metering, oversight, runtime and messaging for AI agents"
)]
pub struct Cli {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub auth: crate::auth::AuthArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    Metering,
    Oversight,
    Runtime,
    Messaging,
    All,
}

impl Product {
    fn metering(self) -> bool {
        matches!(self, Product::Metering | Product::All)
    }
    fn messaging(self) -> bool {
        matches!(self, Product::Messaging | Product::All)
    }
    fn oversight(self) -> bool {
        matches!(self, Product::Oversight | Product::All)
    }
    fn runtime(self) -> bool {
        matches!(self, Product::Runtime | Product::All)
    }
}

/// Backfill and replay work on metering's tables; messaging keeps none (its directory and
/// queues are read from the log), so there is nothing to import into or rebuild.
fn metering_only(product: Product, command: &str) -> Result<(), CliError> {
    let why = match product {
        Product::Messaging => "messaging has no read model tables (its key directory and queues are read from the MESSAGING stream by every gateway)",
        Product::Oversight if command == "backfill" => "oversight's history is its own requests' events",
        Product::Runtime if command == "backfill" => "runtime's history is its own sandboxes' events",
        _ => return Ok(()),
    };
    Err(CliError::Config(crate::config::ConfigError::Invalid(
        format!("{command} applies to metering: {why}"),
    )))
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole platform in this process with no external service: the log, the read
    /// models and the cache are embedded, with data kept under --data-dir across restarts.
    Dev {
        /// Where the embedded log and read models keep their data.
        #[arg(long, env = "ENABLEMENT_DATA_DIR", default_value = ".enablement")]
        data_dir: PathBuf,
        /// gRPC listen address of the metering gateway (loopback: no authentication yet).
        #[arg(long, env = "METERING_GRPC_ADDR", default_value = "127.0.0.1:50051")]
        metering_grpc_addr: SocketAddr,
        /// Metrics and health listen address of metering.
        #[arg(long, env = "METERING_METRICS_ADDR", default_value = "127.0.0.1:9090")]
        metering_metrics_addr: SocketAddr,
        /// gRPC listen address of the oversight gateway.
        #[arg(long, env = "OVERSIGHT_GRPC_ADDR", default_value = "127.0.0.1:50052")]
        oversight_grpc_addr: SocketAddr,
        /// Metrics, health and approval page address of oversight.
        #[arg(long, env = "OVERSIGHT_METRICS_ADDR", default_value = "127.0.0.1:9091")]
        oversight_metrics_addr: SocketAddr,
        /// gRPC listen address of the runtime gateway.
        #[arg(long, env = "RUNTIME_GRPC_ADDR", default_value = "127.0.0.1:50053")]
        runtime_grpc_addr: SocketAddr,
        /// Metrics and health listen address of runtime.
        #[arg(long, env = "RUNTIME_METRICS_ADDR", default_value = "127.0.0.1:9092")]
        runtime_metrics_addr: SocketAddr,
        /// gRPC listen address of the messaging gateway.
        #[arg(long, env = "MESSAGING_GRPC_ADDR", default_value = "127.0.0.1:50054")]
        messaging_grpc_addr: SocketAddr,
        /// Metrics and health listen address of messaging.
        #[arg(long, env = "MESSAGING_METRICS_ADDR", default_value = "127.0.0.1:9093")]
        messaging_metrics_addr: SocketAddr,
    },
    /// Run gateways and their projectors against NATS, PostgreSQL and Redis.
    Serve {
        #[arg(long, value_enum, default_value = "all")]
        product: Product,
        /// Run the gateways only; projectors run elsewhere (`enablement project`).
        #[arg(long)]
        no_projectors: bool,
        /// gRPC listen address of the metering gateway.
        #[arg(long, env = "METERING_GRPC_ADDR", default_value = server::METERING_GRPC)]
        metering_grpc_addr: SocketAddr,
        /// Metrics and health listen address of metering.
        #[arg(long, env = "METERING_METRICS_ADDR", default_value = server::METERING_METRICS)]
        metering_metrics_addr: SocketAddr,
        /// gRPC listen address of the oversight gateway.
        #[arg(long, env = "OVERSIGHT_GRPC_ADDR", default_value = server::OVERSIGHT_GRPC)]
        oversight_grpc_addr: SocketAddr,
        /// Metrics, health and approval page address of oversight.
        #[arg(long, env = "OVERSIGHT_METRICS_ADDR", default_value = server::OVERSIGHT_METRICS)]
        oversight_metrics_addr: SocketAddr,
        /// gRPC listen address of the runtime gateway.
        #[arg(long, env = "RUNTIME_GRPC_ADDR", default_value = server::RUNTIME_GRPC)]
        runtime_grpc_addr: SocketAddr,
        /// Metrics and health listen address of runtime.
        #[arg(long, env = "RUNTIME_METRICS_ADDR", default_value = server::RUNTIME_METRICS)]
        runtime_metrics_addr: SocketAddr,
        /// Where sandboxes keep their writable layers (RUNTIME_DIR overrides it).
        #[arg(
            long,
            env = "RUNTIME_DIR",
            default_value = "/var/lib/enablement/runtime"
        )]
        runtime_dir: PathBuf,
        /// gRPC listen address of the messaging gateway.
        #[arg(long, env = "MESSAGING_GRPC_ADDR", default_value = server::MESSAGING_GRPC)]
        messaging_grpc_addr: SocketAddr,
        /// Metrics and health listen address of messaging.
        #[arg(long, env = "MESSAGING_METRICS_ADDR", default_value = server::MESSAGING_METRICS)]
        messaging_metrics_addr: SocketAddr,
    },
    /// Run projectors only (workers that build the read models from the streams).
    Project {
        #[arg(long, value_enum, default_value = "all")]
        product: Product,
        #[arg(long, env = "METERING_METRICS_ADDR", default_value = server::METERING_METRICS)]
        metering_metrics_addr: SocketAddr,
        #[arg(long, env = "OVERSIGHT_METRICS_ADDR", default_value = server::OVERSIGHT_METRICS)]
        oversight_metrics_addr: SocketAddr,
        #[arg(long, env = "RUNTIME_METRICS_ADDR", default_value = server::RUNTIME_METRICS)]
        runtime_metrics_addr: SocketAddr,
    },
    /// Apply the database migrations and exit.
    Migrate,
    /// Mint bearer tokens and signing keys.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage the JetStream streams of the catalog.
    Streams {
        #[command(subcommand)]
        command: StreamsCommand,
    },
    /// List and re-drive dead letters.
    Deadletters {
        #[command(subcommand)]
        command: DeadlettersCommand,
    },
    /// Import historical usage events (CloudEvents JSON, one per line) through the live
    /// validation and dedupe, rate-limited; report accepted / duplicate / rejected by reason.
    Backfill {
        #[arg(value_enum)]
        product: Product,
        /// NDJSON file of CloudEvents (the producers' contract).
        #[arg(
            long,
            required_unless_present = "s3_prefix",
            conflicts_with = "s3_prefix"
        )]
        file: Option<PathBuf>,
        /// Or every `*.ndjson` / `*.ndjson.gz` object under this prefix of the archive bucket
        /// (S3_BUCKET ...), in key order; line numbers in the report count across them.
        #[arg(long)]
        s3_prefix: Option<String>,
        /// Events per second (0: unlimited).
        #[arg(long, default_value_t = 5_000)]
        rate: u32,
        /// Events per append batch.
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Validate with a late-event window covering the oldest event of the file (history);
        /// without it, events older than the live window are rejected as time_too_old.
        #[arg(long)]
        accept_late: bool,
        /// Validate and dedupe only; append nothing.
        #[arg(long)]
        dry_run: bool,
        /// Machine-readable report.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild read models from the streams.
    Replay {
        #[arg(value_enum)]
        product: Product,
        /// Rebuild into fresh tables and switch readers over when done (blue/green).
        #[arg(long)]
        rebuild: bool,
        /// Decode and validate every event without writing anything; report by outcome.
        #[arg(long, conflicts_with = "rebuild")]
        dry_run: bool,
        /// Discard an interrupted rebuild instead of resuming it.
        #[arg(long, requires = "rebuild")]
        restart: bool,
        /// Without --rebuild: re-apply this range to the live read models, idempotently
        /// (rows already there are skipped, the checkpoint does not move); with --dry-run:
        /// check only this range. A rebuild always replays the whole stream.
        #[command(flatten)]
        range: crate::replay::RangeArgs,
        /// Events per transaction.
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Audit archive of the streams: export, verify, restore (S3 when S3_BUCKET is set).
    Audit {
        #[command(subcommand)]
        command: crate::audit::AuditCommand,
    },
    /// Oversight helpers.
    Oversight {
        #[command(subcommand)]
        command: OversightCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum OversightCommand {
    /// Print an approver's link to the approval page, signed with OVERSIGHT_LINK_SECRET under
    /// OVERSIGHT_PUBLIC_URL (as the gateway has them): the tenant's pending requests, or one.
    PageLink {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        approver: String,
        /// Only this request (default: every request of the tenant).
        #[arg(long, default_value = "")]
        request_id: String,
        /// Lifetime (default: OVERSIGHT_LINK_TTL, else 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Print a token signed with the ring's signing key (ENABLEMENT_AUTH_KEYS / --auth-keys).
    Issue {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        subject: String,
        /// Comma-separated roles of the built-in policy (admin, operator, producer, reader,
        /// agent, approver, platform-operator) or of your policy's own.
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Lifetime, e.g. 15m, 12h, 30d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Print a new key entry to add to a key ring (rotation: add it first, then mark the old
    /// key `verify_only = true`, then remove the old one once its tokens expired).
    Keygen {
        #[arg(long)]
        kid: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum StreamsCommand {
    /// Create or update every stream of the catalog; a second run changes nothing.
    Init,
    /// Messages, bytes, sequences and durable consumers with their lag, per stream.
    Info {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeadlettersCommand {
    /// List dead letters of a product's stream (`--stream all`: every one), oldest first.
    List {
        #[arg(long, value_enum, default_value = "metering")]
        stream: Product,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters of a product's stream (`--stream all`: every one) back to their
    /// original subject (after fixing the cause).
    Redrive {
        #[arg(long, value_enum, default_value = "metering")]
        stream: Product,
        /// Only those parked for this reason (e.g. `time_too_old`).
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long)]
        dry_run: bool,
    },
}

/// Errors that end the process, with their exit codes.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("{0}")]
    Failed(String),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Connect(_) => 3,
            CliError::Config(_) => 2,
            _ => 1,
        }
    }
}

/// A progress bar for long CLI work (`template` in indicatif's syntax), hidden with `--json`.
pub fn progress_bar(json: bool, template: &str) -> indicatif::ProgressBar {
    if json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    // Not a terminal (`kubectl exec` without -t, a Job's log): indicatif draws nothing there,
    // so the same figures go out as a line every 10 seconds.
    if !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let watched = bar.downgrade();
        std::thread::spawn(move || loop {
            std::thread::sleep(PROGRESS_LINE_EVERY);
            let Some(bar) = watched.upgrade() else { return };
            if bar.is_finished() {
                return;
            }
            eprintln!(
                "progress: {} {}/{} ({:.0}/s, {} s elapsed)",
                bar.message(),
                bar.position(),
                bar.length().unwrap_or(0),
                bar.per_sec(),
                bar.elapsed().as_secs()
            );
        });
    }
    bar
}

/// How often long work says how far it is when stderr is not a terminal.
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(10);

fn fail(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = matches!(cli.command, Command::Serve { .. } | Command::Project { .. });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    // The OTLP exporter runs on this runtime; the guard (dropped before it) flushes the spans.
    let _telemetry = {
        let _runtime = runtime.enter();
        init_logging(json_logs)
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    };
    drop(_telemetry);
    // Blocking work still running (a host lookup, a cgroup kill) does not hold the exit past
    // a stop cut short.
    runtime.shutdown_timeout(Duration::from_secs(5));
    code
}

/// Logs on stderr, and traces over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
fn init_logging(json: bool) -> crate::telemetry::TelemetryGuard {
    crate::telemetry::init(json)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    let settings = Settings::resolve(&cli.connect)?;
    let auth_args = cli.auth;
    let auth = |dev_keys: Option<&std::path::Path>| {
        auth_args
            .build(dev_keys)
            .map_err(|e| CliError::Config(crate::config::ConfigError::Invalid(e)))
    };
    match cli.command {
        Command::Dev {
            data_dir,
            metering_grpc_addr,
            metering_metrics_addr,
            oversight_grpc_addr,
            oversight_metrics_addr,
            runtime_grpc_addr,
            runtime_metrics_addr,
            messaging_grpc_addr,
            messaging_metrics_addr,
        } => {
            let options = Products {
                runtime: Some((
                    ServeOptions {
                        gateways: true,
                        projectors: true,
                        grpc_addr: runtime_grpc_addr,
                        metrics_addr: runtime_metrics_addr,
                    },
                    data_dir.join("runtime"),
                )),
                metering: Some(ServeOptions {
                    gateways: true,
                    projectors: true,
                    grpc_addr: metering_grpc_addr,
                    metrics_addr: metering_metrics_addr,
                }),
                oversight: Some(ServeOptions {
                    gateways: true,
                    projectors: true,
                    grpc_addr: oversight_grpc_addr,
                    metrics_addr: oversight_metrics_addr,
                }),
                messaging: Some(ServeOptions {
                    gateways: true,
                    projectors: true,
                    grpc_addr: messaging_grpc_addr,
                    metrics_addr: messaging_metrics_addr,
                }),
                notify: Some(dev_notify(&data_dir, oversight_metrics_addr)?),
            };
            // The ring the gateways verify with: ENABLEMENT_AUTH_KEYS when set, else the data
            // directory's. The printed token is signed with the same one (signed with the
            // data directory's while the gateways used another, it was refused).
            let keys = match &auth_args.auth_keys {
                Some(ring) => ring.clone(),
                None => dev_key_ring(&data_dir)?,
            };
            let auth = auth(Some(&keys))?;
            dev(settings, &data_dir, options, auth, &keys).await
        }
        Command::Token { command } => {
            match command {
                TokenCommand::Keygen { kid } => {
                    print!("{}", crate::auth::token::keygen(&kid));
                    Ok(())
                }
                TokenCommand::Issue {
                    tenant,
                    subject,
                    roles,
                    ttl,
                } => {
                    let path = auth_args.auth_keys.clone().ok_or_else(|| {
                    fail("set ENABLEMENT_AUTH_KEYS or --auth-keys to the key ring that signs tokens")
                })?;
                    let ring = crate::auth::token::KeyRing::load(&path).map_err(fail)?;
                    println!(
                        "{}",
                        ring.issue(&tenant, &subject, &roles, ttl).map_err(fail)?
                    );
                    warn_of_roles_no_rule_names(auth_args.policy.as_deref(), &roles);
                    Ok(())
                }
            }
        }
        Command::Oversight {
            command:
                OversightCommand::PageLink {
                    tenant,
                    approver,
                    request_id,
                    ttl,
                },
        } => {
            let config = crate::oversight::notify::NotifyConfig::from_env();
            let (Some(url), Some(secret)) = (&config.public_url, &config.link_secret) else {
                return Err(fail("set OVERSIGHT_PUBLIC_URL and OVERSIGHT_LINK_SECRET (the same as the oversight gateway's)"));
            };
            let ttl = ttl
                .unwrap_or(config.link_ttl)
                .min(crate::oversight::notify::MAX_LINK_TTL);
            let token = crate::oversight::notify::links::page_token(
                secret.as_bytes(),
                &tenant,
                &request_id,
                &approver,
                std::time::SystemTime::now(),
                ttl,
            );
            let page = crate::oversight::page::page_url(url, &tenant, &request_id, &token);
            println!("{page}");
            Ok(())
        }
        Command::Serve {
            product,
            no_projectors,
            metering_grpc_addr,
            metering_metrics_addr,
            oversight_grpc_addr,
            oversight_metrics_addr,
            runtime_grpc_addr,
            runtime_metrics_addr,
            runtime_dir,
            messaging_grpc_addr,
            messaging_metrics_addr,
        } => {
            let options = Products {
                runtime: product.runtime().then_some((
                    ServeOptions {
                        gateways: true,
                        projectors: !no_projectors,
                        grpc_addr: runtime_grpc_addr,
                        metrics_addr: runtime_metrics_addr,
                    },
                    runtime_dir,
                )),
                metering: product.metering().then_some(ServeOptions {
                    gateways: true,
                    projectors: !no_projectors,
                    grpc_addr: metering_grpc_addr,
                    metrics_addr: metering_metrics_addr,
                }),
                oversight: product.oversight().then_some(ServeOptions {
                    gateways: true,
                    projectors: !no_projectors,
                    grpc_addr: oversight_grpc_addr,
                    metrics_addr: oversight_metrics_addr,
                }),
                messaging: product.messaging().then_some(ServeOptions {
                    gateways: true,
                    projectors: false,
                    grpc_addr: messaging_grpc_addr,
                    metrics_addr: messaging_metrics_addr,
                }),
                notify: None,
            };
            run_until_signal(settings, options, auth(None)?).await
        }
        Command::Project {
            product,
            metering_metrics_addr,
            oversight_metrics_addr,
            runtime_metrics_addr,
        } => {
            if product == Product::Messaging {
                return Err(fail(
                    "messaging runs no projector: its gateways read the directory and queues from the log",
                ));
            }
            let projector = |addr| ServeOptions {
                gateways: false,
                projectors: true,
                grpc_addr: addr,
                metrics_addr: addr,
            };
            let options = Products {
                metering: product.metering().then(|| projector(metering_metrics_addr)),
                oversight: product
                    .oversight()
                    .then(|| projector(oversight_metrics_addr)),
                runtime: product
                    .runtime()
                    .then(|| (projector(runtime_metrics_addr), PathBuf::new())),
                messaging: None,
                notify: None,
            };
            // Projectors serve no gRPC: nothing to authenticate.
            run_until_signal(settings, options, auth_args_disabled()?).await
        }
        Command::Migrate => {
            let pool = creto_projections::postgres::connect(&settings.database_url, 2)
                .await
                .map_err(ConnectError::from)?;
            let applied = creto_projections::postgres::migrate(&pool)
                .await
                .map_err(ConnectError::from)?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for m in applied {
                println!("applied migration {m}");
            }
            Ok(())
        }
        Command::Streams { command } => {
            let log = platform::connect_log(&settings).await?;
            let catalog = settings.catalog();
            match command {
                StreamsCommand::Init => streams_init(&*log, &catalog).await,
                StreamsCommand::Info { json } => streams_info(&*log, &catalog, json).await,
            }
        }
        Command::Audit { command } => {
            let log = platform::connect_log(&settings).await?;
            crate::audit::run(log, &settings.catalog(), command, shutdown_signal()).await
        }
        Command::Deadletters { command } => {
            let log = platform::connect_log(&settings).await?;
            deadletters(&*log, &settings.catalog(), command).await
        }
        Command::Backfill {
            product,
            file,
            s3_prefix,
            rate,
            batch,
            accept_late,
            dry_run,
            json,
        } => {
            metering_only(product, "backfill")?;
            let options = crate::backfill::BackfillOptions {
                rate,
                dry_run,
                accept_late,
                batch: batch.clamp(1, crate::metering::service::MAX_BATCH),
            };
            // Objects are fetched into one local NDJSON file first: the backfill reads its
            // input twice (count and oldest time, then the events). Only then: a container's
            // root filesystem is read-only, and `--file` needs no temporary file.
            let mut staged = None;
            let input = match (&file, &s3_prefix) {
                (Some(f), _) => f.clone(),
                (None, Some(prefix)) => {
                    let archive = crate::audit::archive_from_env()?;
                    let staged = staged.insert(tempfile::NamedTempFile::new().map_err(|e| {
                        CliError::Config(crate::config::ConfigError::Invalid(format!(
                            "cannot create the file the objects are fetched into ({e}); set TMPDIR to a writable directory"
                        )))
                    })?);
                    let objects = crate::backfill::fetch_prefix(&*archive, prefix, staged.path())
                        .await
                        .map_err(fail)?;
                    if !json {
                        eprintln!(
                            "fetched {objects} objects under {prefix} from {}",
                            archive.describe()
                        );
                    }
                    staged.path().to_path_buf()
                }
                (None, None) => return Err(fail("say --file or --s3-prefix")),
            };
            backfill(&settings, &input, &options, json).await
        }
        Command::Replay {
            product,
            rebuild,
            dry_run,
            restart,
            range,
            batch,
            json,
        } => {
            metering_only(product, "replay")?;
            let log = platform::connect_log(&settings).await?;
            if product == Product::Oversight {
                if !rebuild || dry_run || range.is_set() {
                    return Err(fail(
                        "oversight replays whole: say `enablement replay oversight --rebuild`",
                    ));
                }
                return replay_whole(Whole::Oversight, log, &settings, json).await;
            }
            if product == Product::Runtime {
                if !rebuild || dry_run || range.is_set() {
                    return Err(fail(
                        "runtime replays whole: say `enablement replay runtime --rebuild`",
                    ));
                }
                return replay_whole(Whole::Runtime, log, &settings, json).await;
            }
            if product == Product::All && (!rebuild || dry_run || range.is_set()) {
                return Err(fail("`replay all` rebuilds every product: say `enablement replay all --rebuild`; a range or a dry run is metering's alone (`enablement replay metering ...`)"));
            }
            if dry_run {
                return replay_dry_run(log, &settings, &range, json).await;
            }
            if rebuild && range.is_set() {
                return Err(fail("a rebuild replays the whole stream: drop the range flags, or drop --rebuild to re-apply the range to the live read models"));
            }
            if !rebuild && !range.is_set() {
                return Err(fail("say --rebuild to rebuild the read models (blue/green), --from-seq/--from-time to re-apply a range, or --dry-run to check the stream"));
            }
            if !rebuild {
                let pool = platform::connect_postgres(&settings).await?;
                let redis = platform::connect_redis(&settings).await?;
                let report = crate::replay::run_metering(
                    log,
                    pool,
                    redis,
                    &settings,
                    &range,
                    batch.max(1),
                    json,
                )
                .await
                .map_err(fail)?;
                if json {
                    println!("{}", serde_json::to_string(&report).map_err(fail)?);
                } else {
                    println!("{}", report.render());
                }
                return Ok(());
            }
            let pool = platform::connect_postgres(&settings).await?;
            let redis = platform::connect_redis(&settings).await?;
            replay_rebuild(
                log.clone(),
                pool,
                redis,
                &settings,
                restart,
                batch.max(1),
                json,
            )
            .await?;
            if product == Product::All {
                replay_whole(Whole::Oversight, log.clone(), &settings, json).await?;
                replay_whole(Whole::Runtime, log, &settings, json).await?;
            }
            Ok(())
        }
    }
}

fn auth_args_disabled() -> Result<Arc<crate::auth::layer::Auth>, CliError> {
    crate::auth::AuthArgs::disabled()
        .build(None)
        .map_err(|e| CliError::Config(crate::config::ConfigError::Invalid(e)))
}

/// Which read model a whole rebuild replaces.
#[derive(Clone, Copy)]
enum Whole {
    Oversight,
    Runtime,
}

/// Rebuilds a product's PostgreSQL tables from its stream in one transaction: readers see the
/// old tables until the new ones are complete.
async fn replay_whole(
    which: Whole,
    log: Arc<dyn EventLog>,
    settings: &Settings,
    json: bool,
) -> Result<(), CliError> {
    let pool = platform::connect_postgres(settings).await?;
    let started = std::time::Instant::now();
    let catalog = settings.catalog();
    let (name, through) = match which {
        Whole::Oversight => (
            "oversight",
            creto_projections::oversight::rebuild(&pool, log, catalog).await,
        ),
        Whole::Runtime => (
            "runtime",
            creto_projections::runtime::rebuild(&pool, log, catalog).await,
        ),
    };
    let through = through.map_err(fail)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"product": name, "checkpoint": through, "switched": true, "elapsed_ms": started.elapsed().as_millis()})
        );
    } else {
        println!(
            "{name}: rebuilt through sequence {through} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A token is issued with whatever roles it is given (a policy file may name its own), but a
/// role no rule of the policy in force names (`agnet`) allows nothing: say so on stderr.
fn warn_of_roles_no_rule_names(policy: Option<&std::path::Path>, roles: &[String]) {
    let text = match policy {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(_) => return,
        },
        None => crate::auth::policy::DEFAULT_POLICY.to_string(),
    };
    let Ok(rules) = crate::auth::policy::parse(&text, "policy") else {
        return;
    };
    // A rule naming no roles takes any; creto-authz decides by rules of its own.
    if rules.iter().any(|r| r.roles.is_empty()) || std::env::var_os("AUTHZ_ENDPOINT").is_some() {
        return;
    }
    let named: std::collections::BTreeSet<&str> = rules
        .iter()
        .flat_map(|r| r.roles.iter().map(String::as_str))
        .collect();
    for role in roles.iter().filter(|r| !named.contains(r.as_str())) {
        eprintln!(
            "warning: no rule of the policy names role {role:?}, so it allows nothing; the policy's roles are {}",
            named.iter().copied().collect::<Vec<_>>().join(", ")
        );
    }
}

/// The key ring `enablement dev` keeps in its data directory (created once, owner-only).
fn dev_key_ring(dir: &std::path::Path) -> Result<PathBuf, CliError> {
    let path = dir.join("auth-keys.toml");
    if !path.exists() {
        write_owner_only(&path, crate::auth::token::keygen("dev-1").as_bytes())?;
    }
    Ok(path)
}

/// Creates `path` (and its directory) holding `secret`, readable by its owner alone from its
/// creation: written first and restricted after, a key was readable by every local user in
/// between.
fn write_owner_only(path: &std::path::Path, secret: &[u8]) -> Result<(), CliError> {
    if let Some(dir) = path.parent() {
        platform::create_private_dir(dir).map_err(fail)?;
    }
    // Whole or not at all: written aside and synced, then linked in place (which fails if
    // another start got there first). Written in place, a start killed mid-write, or a
    // second one reading too early, left a short or empty secret for every later start.
    let aside = path.with_extension(format!("{}.partial", std::process::id()));
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    let written = file.open(&aside).and_then(|mut f| {
        std::io::Write::write_all(&mut f, secret)?;
        f.sync_all()
    });
    let linked = written.and_then(|()| match std::fs::hard_link(&aside, path) {
        // A file system without hard links (some FUSE and SMB mounts): moved in place,
        // unless another start got there first.
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists && !path.exists() => {
            std::fs::rename(&aside, path)
        }
        other => other,
    });
    let _ = std::fs::remove_file(&aside);
    match linked {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(fail(e)),
        _ => Ok(()),
    }
}

/// Oversight's notification settings for `enablement dev`: the environment's, with the
/// approval page on when neither OVERSIGHT_PUBLIC_URL nor OVERSIGHT_LINK_SECRET is set (on the
/// oversight HTTP port, its link secret kept owner-only in the data directory).
fn dev_notify(
    dir: &std::path::Path,
    oversight_http: std::net::SocketAddr,
) -> Result<crate::oversight::notify::NotifyConfig, CliError> {
    let mut config = crate::oversight::notify::NotifyConfig::from_env();
    if config.public_url.is_some() || config.link_secret.is_some() {
        return Ok(config);
    }
    let path = dir.join(DEV_LINK_SECRET);
    if !path.exists() {
        use rand::RngCore;
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        write_owner_only(&path, hex::encode(secret).as_bytes())?;
    }
    let secret = std::fs::read_to_string(&path).map_err(fail)?;
    if secret.trim().len() < crate::oversight::notify::MIN_LINK_SECRET_BYTES {
        // Anyone reaching the page could forge links signed with a short key.
        return Err(fail(format!(
            "the approval-link secret in {} is shorter than {} bytes: delete the file and start again (a new one is made)",
            path.display(),
            crate::oversight::notify::MIN_LINK_SECRET_BYTES
        )));
    }
    let host = if oversight_http.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), oversight_http.port())
    } else {
        oversight_http
    };
    config.public_url = Some(format!("http://{host}"));
    config.link_secret = Some(secret.trim().to_string());
    Ok(config)
}

/// Where `enablement dev` keeps the approval links' secret, in its data directory.
const DEV_LINK_SECRET: &str = "link-secret";

/// The embedded default: opens the data directory, starts every product, says where they are.
async fn dev(
    settings: Settings,
    dir: &std::path::Path,
    mut options: Products,
    auth: Arc<crate::auth::layer::Auth>,
    keys: &std::path::Path,
) -> Result<(), CliError> {
    let platform = Arc::new(Platform::open_embedded(settings, dir).await?);
    let archive = platform.archive.as_ref().map(|a| a.describe());
    let token = crate::auth::token::KeyRing::load(keys)
        .and_then(|ring| {
            ring.issue(
                creto_domain::metering::event::DEFAULT_TENANT,
                "developer",
                &["admin".to_string()],
                Duration::from_secs(30 * 24 * 3600),
            )
        })
        .map_err(fail)?;
    // Audit exports of every stream to the local archive, stopped with the rest.
    let mut exporters = tokio::task::JoinSet::new();
    let (stop_exporters, exporters_rx) = tokio::sync::watch::channel(false);
    if let Some(archive) = platform.archive.clone() {
        let streams = platform
            .catalog
            .specs()
            .into_iter()
            .map(|s| s.name)
            .collect();
        let _ = crate::audit::spawn_exporters(
            &mut exporters,
            platform.log.clone(),
            archive,
            streams,
            creto_projections::audit::ExportConfig::default(),
            exporters_rx,
        );
    }
    let approvals = options
        .notify
        .as_ref()
        .filter(|n| n.link_secret.is_some())
        .and_then(|n| n.public_url.clone());
    // Sandboxes need root, bubblewrap and nft: on a laptop without them the rest still runs.
    let runtime = options.runtime.take();
    let mut running = options.start(platform.clone(), auth.clone()).await?;
    let mut runtime_unavailable = None;
    if let Some((runtime_options, runtime_dir)) = runtime {
        match start_runtime(platform, runtime_options, auth, &runtime_dir).await {
            Ok(r) => running.push(("runtime", r)),
            Err(e) => runtime_unavailable = Some(e.to_string()),
        }
    }
    let data = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    println!(
        "Creto Enablement Layer: development mode, embedded (no NATS, PostgreSQL or Redis needed)"
    );
    println!(
        "  data       {} (kept across restarts; delete it to start over)",
        data.display()
    );
    for (name, product) in &running {
        let grpc = product.grpc_addr.expect("dev runs the gateways");
        let metrics = product.metrics_addr;
        println!("  {name:<10} grpc {grpc}   metrics http://{metrics}/metrics   health http://{metrics}/health");
    }
    if let Some(why) = runtime_unavailable {
        println!("  runtime    unavailable: {why}");
    }
    println!("  archive    {}", archive.unwrap_or_default());
    if let Some(url) = approvals {
        let secret = if std::env::var_os("OVERSIGHT_LINK_SECRET").is_some() {
            "$OVERSIGHT_LINK_SECRET".to_string()
        } else {
            format!("$(cat {})", data.join(DEV_LINK_SECRET).display())
        };
        println!(
            "  approvals  page on {url}; an approver's link: OVERSIGHT_PUBLIC_URL={url} OVERSIGHT_LINK_SECRET={secret} enablement oversight page-link --tenant default --approver NAME"
        );
    }
    println!(
        "  auth       bearer token for tenant default, role admin, valid 30 days (key ring {}):",
        keys.display()
    );
    println!("export ENABLEMENT_TOKEN={token}");
    if let Some((_, metering)) = running.first() {
        println!(
            "  try        grpcurl -plaintext -H \"authorization: Bearer $ENABLEMENT_TOKEN\" {} list",
            metering.grpc_addr.expect("dev runs the gateways")
        );
    }
    println!("ready");
    shutdown_signal().await;
    stopping(async move {
        // The exporters write what they hold before the log closes.
        let _ = stop_exporters.send(true);
        while exporters.join_next().await.is_some() {}
        stop_all(running).await;
    })
    .await;
    Ok(())
}

/// Which products this process runs, and where.
struct Products {
    metering: Option<ServeOptions>,
    oversight: Option<ServeOptions>,
    /// With the default directory of the sandboxes.
    runtime: Option<(ServeOptions, PathBuf)>,
    messaging: Option<ServeOptions>,
    /// Oversight's notification settings: the environment's when `None`.
    notify: Option<crate::oversight::notify::NotifyConfig>,
}

impl Products {
    async fn start(
        self,
        platform: Arc<Platform>,
        auth: Arc<crate::auth::layer::Auth>,
    ) -> Result<Vec<(&'static str, server::Running)>, CliError> {
        let mut running = Vec::new();
        if let Some(options) = self.metering {
            running.push((
                "metering",
                server::start_metering(platform.clone(), options, auth.clone()).await?,
            ));
        }
        if let Some(options) = self.oversight {
            running.push((
                "oversight",
                server::start_oversight(
                    platform.clone(),
                    options,
                    auth.clone(),
                    self.notify
                        .unwrap_or_else(crate::oversight::notify::NotifyConfig::from_env),
                )
                .await?,
            ));
        }
        if let Some((options, dir)) = self.runtime {
            running.push((
                "runtime",
                start_runtime(platform.clone(), options, auth.clone(), &dir).await?,
            ));
        }
        if let Some(options) = self.messaging {
            running.push((
                "messaging",
                server::start_messaging(platform, options, auth).await?,
            ));
        }
        Ok(running)
    }
}

async fn start_runtime(
    platform: Arc<Platform>,
    options: ServeOptions,
    auth: Arc<crate::auth::layer::Auth>,
    dir: &std::path::Path,
) -> Result<server::Running, CliError> {
    let config = crate::runtime::config::RuntimeConfig::from_env(dir)
        .map_err(|e| CliError::Config(crate::config::ConfigError::Invalid(e.to_string())))?;
    let archive = platform.archive.clone();
    Ok(server::start_runtime(platform, options, auth, config, archive).await?)
}

async fn stop_all(running: Vec<(&'static str, server::Running)>) {
    for (_, product) in running {
        product.stop().await;
    }
}

/// Connects, makes sure the streams exist, runs the products until SIGINT or SIGTERM.
async fn run_until_signal(
    settings: Settings,
    options: Products,
    auth: Arc<crate::auth::layer::Auth>,
) -> Result<(), CliError> {
    let platform = Arc::new(Platform::connect(settings).await?);
    ensure_streams(&*platform.log, &platform.catalog).await?;
    let running = options.start(platform, auth).await?;
    for (name, product) in &running {
        tracing::info!(grpc = ?product.grpc_addr, metrics = %product.metrics_addr, "{name} running");
    }
    shutdown_signal().await;
    stopping(stop_all(running)).await;
    Ok(())
}

/// The longest a graceful stop may take (the runtime's pods give it 120 s to end their
/// sandboxes; the others are killed at 30 s anyway).
const STOP_DEADLINE: Duration = Duration::from_secs(110);

/// Runs a graceful `stop`, cut short by a second SIGINT or SIGTERM or by [`STOP_DEADLINE`]:
/// a stop waiting on a stuck connection or a notification's retries does not hold the
/// process for ever (once the signal handlers are in, Ctrl-C no longer kills it).
pub(crate) async fn stopping(stop: impl std::future::Future<Output = ()>) {
    tracing::info!("stopping (a second SIGINT or SIGTERM stops at once)");
    tokio::select! {
        _ = stop => {}
        _ = shutdown_signal() => tracing::warn!("second signal: stopping now"),
        _ = tokio::time::sleep(STOP_DEADLINE) => {
            tracing::warn!("not stopped within {STOP_DEADLINE:?}: stopping now")
        }
    }
}

async fn ensure_streams(
    log: &dyn EventLog,
    catalog: &creto_streams::Catalog,
) -> Result<(), CliError> {
    for (name, outcome) in log
        .create_missing_streams(&catalog.specs())
        .await
        .map_err(fail)?
    {
        match outcome {
            EnsureOutcome::Created => tracing::info!(stream = %name, "stream created"),
            // (Updated does not come back from create_missing_streams.)
            EnsureOutcome::Updated(changes) | EnsureOutcome::Drifted(changes) => {
                tracing::warn!(stream = %name, ?changes, "stream config differs from this process's settings; left as it is (`enablement streams init` applies what can change in place)")
            }
            EnsureOutcome::Unchanged => {}
        }
    }
    Ok(())
}

async fn streams_init(
    log: &dyn EventLog,
    catalog: &creto_streams::Catalog,
) -> Result<(), CliError> {
    let specs = catalog.specs();
    let outcomes = log.ensure_streams(&specs).await.map_err(fail)?;
    let mut changed = 0;
    let mut drifted = false;
    for (name, outcome) in &outcomes {
        match outcome {
            EnsureOutcome::Created => {
                changed += 1;
                println!("{name}: created");
            }
            EnsureOutcome::Unchanged => println!("{name}: unchanged"),
            EnsureOutcome::Updated(changes) => {
                changed += 1;
                println!(
                    "{name}: drifted from the catalog, updated: {}",
                    changes.join("; ")
                );
            }
            EnsureOutcome::Drifted(changes) => {
                drifted = true;
                println!(
                    "{name}: DRIFTED and cannot be changed in place: {}",
                    changes.join("; ")
                );
            }
        }
    }
    if changed == 0 && !drifted {
        println!("no change: every stream matches the catalog");
    }
    if drifted {
        return Err(fail("some streams drifted in ways JetStream cannot update; see above (recreate them from a backup or the audit archive)"));
    }
    Ok(())
}

async fn streams_info(
    log: &dyn EventLog,
    catalog: &creto_streams::Catalog,
    json: bool,
) -> Result<(), CliError> {
    let mut states = Vec::new();
    for spec in catalog.specs() {
        match log.stream_state(&spec.name).await {
            Ok(s) => states.push(s),
            Err(creto_streams::LogError::UnknownStream(name)) => {
                return Err(fail(format!(
                    "stream {name} does not exist; run `enablement streams init`"
                )))
            }
            Err(e) => return Err(fail(e)),
        }
    }
    if json {
        let out: Vec<_> = states
            .iter()
            .map(|s| {
                serde_json::json!({
                    "stream": s.name, "messages": s.messages, "bytes": s.bytes,
                    "first_sequence": s.first_sequence, "last_sequence": s.last_sequence,
                    "consumers": s.consumers.iter().map(|c| serde_json::json!({
                        "name": c.name, "pending": c.pending, "ack_pending": c.ack_pending, "ack_floor": c.ack_floor
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).map_err(fail)?);
        return Ok(());
    }
    println!(
        "{:<24} {:>12} {:>14} {:>12} {:>12}",
        "STREAM", "MESSAGES", "BYTES", "FIRST SEQ", "LAST SEQ"
    );
    for s in &states {
        println!(
            "{:<24} {:>12} {:>14} {:>12} {:>12}",
            s.name, s.messages, s.bytes, s.first_sequence, s.last_sequence
        );
        for c in &s.consumers {
            println!(
                "  consumer {:<30} pending (lag) {:>10}   unacked {:>8}   ack floor {:>10}",
                c.name, c.pending, c.ack_pending, c.ack_floor
            );
        }
    }
    Ok(())
}

/// The dead-letter subject of `product`'s stream; `None` for all of them.
fn deadletter_subject(catalog: &creto_streams::Catalog, product: Product) -> Option<String> {
    let logical = match product {
        Product::Metering => creto_streams::METERING,
        Product::Oversight => creto_streams::OVERSIGHT,
        Product::Runtime => creto_streams::RUNTIME,
        Product::Messaging => creto_streams::MESSAGING,
        Product::All => return None,
    };
    Some(catalog.deadletter_subject(logical))
}

async fn deadletters(
    log: &dyn EventLog,
    catalog: &creto_streams::Catalog,
    command: DeadlettersCommand,
) -> Result<(), CliError> {
    match command {
        DeadlettersCommand::List {
            stream,
            after,
            limit,
            json,
        } => {
            let subject = deadletter_subject(catalog, stream);
            let letters =
                deadletter::list(log, catalog, subject.as_deref(), after, limit, |_| true)
                    .await
                    .map_err(fail)?;
            for l in &letters {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "sequence": l.sequence, "reason": l.reason, "detail": l.detail,
                            "original_stream": l.original_stream, "original_subject": l.original_subject,
                            "original_sequence": l.original_sequence,
                            "payload": String::from_utf8_lossy(&l.event.payload),
                        })
                    );
                } else {
                    println!(
                        "#{} {} {}:{} — {}",
                        l.sequence, l.reason, l.original_stream, l.original_sequence, l.detail
                    );
                }
            }
            if !json {
                println!("{} dead letter(s)", letters.len());
            }
            Ok(())
        }
        DeadlettersCommand::Redrive {
            stream,
            reason,
            after,
            dry_run,
        } => {
            let subject = deadletter_subject(catalog, stream);
            let letters =
                deadletter::list(log, catalog, subject.as_deref(), after, usize::MAX, |l| {
                    reason.as_ref().is_none_or(|r| *r == l.reason)
                })
                .await
                .map_err(fail)?;
            if let (Some(reason), true) = (&reason, letters.is_empty()) {
                // Nothing to re-drive, or a mistyped reason: say which ones are parked.
                let present: std::collections::BTreeSet<String> =
                    deadletter::list(log, catalog, subject.as_deref(), after, usize::MAX, |_| {
                        true
                    })
                    .await
                    .map_err(fail)?
                    .into_iter()
                    .map(|l| l.reason)
                    .collect();
                eprintln!(
                    "no dead letter has reason {reason:?}; those parked have: {}",
                    if present.is_empty() {
                        "none".to_string()
                    } else {
                        present.into_iter().collect::<Vec<_>>().join(", ")
                    }
                );
            }
            // Metering's projector drops an event id it already applied, so a copy of a
            // letter is safe there. Oversight's and runtime's events are folded by their
            // aggregates (every gateway's view, the timers), which would take a copy for a
            // new event: a decided request pending again, a sandbox requested again. Their
            // letters are left for a rebuild, which applies each event at its own place.
            let metering = catalog.stream(creto_streams::METERING);
            let (redrivable, folded): (Vec<_>, Vec<_>) = letters.iter().partition(|l| {
                l.original_stream == metering
                    || l.original_stream == crate::metering::service::GRPC_ORIGIN
            });
            let mut gone = Vec::new();
            for l in &redrivable {
                match l.redrive_from(log).await.map_err(fail)? {
                    Some(append) if !dry_run => {
                        log.append(append).await.map_err(fail)?;
                    }
                    Some(_) => {}
                    None => gone.push(l.sequence),
                }
            }
            println!(
                "{} {} dead letter(s)",
                if dry_run {
                    "would re-drive"
                } else {
                    "re-drove"
                },
                redrivable.len() - gone.len()
            );
            if !gone.is_empty() {
                // Letters too large to keep their payload, whose original the stream no
                // longer holds: nothing is left to send.
                return Err(fail(format!(
                    "{} dead letter(s) not re-driven: they were too large to keep their payload, and the log no longer holds the original (removed from {metering}, or refused by IngestEvents before it reached the log) (dead-letter sequences {gone:?})",
                    gone.len()
                )));
            }
            if folded.is_empty() {
                return Ok(());
            }
            let rebuilds: std::collections::BTreeSet<String> = folded
                .iter()
                .map(|l| {
                    let product = [
                        ("oversight", creto_streams::OVERSIGHT),
                        ("runtime", creto_streams::RUNTIME),
                    ]
                    .into_iter()
                    .find(|(_, s)| catalog.stream(s) == l.original_stream)
                    .map_or("<product>", |(p, _)| p);
                    format!("enablement replay {product} --rebuild")
                })
                .collect();
            Err(fail(format!(
                "{} dead letter(s) of oversight or runtime not re-driven: their events are folded by aggregates, which would apply a copy as a new event; fix the cause, then rebuild the read model from the stream ({})",
                folded.len(),
                rebuilds.into_iter().collect::<Vec<_>>().join("; ")
            )))
        }
    }
}

async fn backfill(
    settings: &Settings,
    file: &std::path::Path,
    options: &crate::backfill::BackfillOptions,
    json: bool,
) -> Result<(), CliError> {
    let log = platform::connect_log(settings).await?;
    let pool = platform::connect_postgres(settings).await?;
    let read_model = creto_projections::metering::PgReadModel::new(pool);
    let catalog = settings.catalog();
    let bar = crate::cli::progress_bar(
        json,
        "{spinner} metering backfill [{bar:40}] {pos}/{len} events  {per_sec}  ETA {eta}",
    );
    let report = crate::backfill::Backfill {
        log: &*log,
        read_model: &read_model,
        catalog: &catalog,
        limits: settings.limits,
    }
    .file(file, options, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await
    .map_err(fail)?;
    bar.finish_and_clear();
    if json {
        println!("{}", serde_json::to_string(&report).map_err(fail)?);
    } else {
        print!("{}", report.render());
    }
    // A job that imported part of its input must not look like one that imported it all.
    if report.rejected > 0 {
        return Err(fail(format!(
            "{} line(s) rejected (listed in the report): fix them and run the backfill again; lines already accepted count once",
            report.rejected
        )));
    }
    Ok(())
}

async fn replay_dry_run(
    log: Arc<dyn EventLog>,
    settings: &Settings,
    range: &crate::replay::RangeArgs,
    json: bool,
) -> Result<(), CliError> {
    let catalog = settings.catalog();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut events, _) = range
        .open(&*log, &catalog.stream(creto_streams::METERING))
        .await
        .map_err(fail)?;
    while let Some(e) = events.try_next().await.map_err(fail)? {
        if range.past_end(&e) {
            break;
        }
        let key = match creto_projections::metering::decode(&e, &catalog, &settings.limits) {
            creto_projections::metering::Decoded::Usage(_) => "usage".to_string(),
            creto_projections::metering::Decoded::Marker => "restore marker".to_string(),
            creto_projections::metering::Decoded::Quota => "quota".to_string(),
            creto_projections::metering::Decoded::MeterDefined { .. } => {
                "meter_defined".to_string()
            }
            creto_projections::metering::Decoded::Invalid(i) => {
                format!("invalid:{}", i.reason.as_str())
            }
            creto_projections::metering::Decoded::Billing(fact) => {
                creto_projections::metering::billing::fact_name(&fact).to_string()
            }
        };
        *counts.entry(key).or_default() += 1;
    }
    if json {
        println!("{}", serde_json::to_string(&counts).map_err(fail)?);
    } else {
        for (k, v) in counts {
            println!("{k:<32} {v}");
        }
    }
    Ok(())
}

async fn replay_rebuild(
    log: Arc<dyn EventLog>,
    pool: sqlx::PgPool,
    redis: redis::aio::ConnectionManager,
    settings: &Settings,
    restart: bool,
    batch: usize,
    json: bool,
) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    // Held until the rebuild ends (switch included); dropped with its connection otherwise.
    let _only_one = rebuild::only_rebuild(&pool).await.map_err(fail)?.ok_or_else(|| {
        fail("another metering rebuild is running (it holds the rebuild lock): wait for it, or stop it first")
    })?;
    let projector = rebuild::prepare_metering(
        &pool,
        log.clone(),
        settings.catalog(),
        settings.limits,
        restart,
    )
    .await
    .map_err(fail)?;
    let resumed_from = creto_projections::Projector::checkpoint(&projector)
        .await
        .map_err(fail)?;
    let bar = crate::cli::progress_bar(
        json,
        "{spinner} metering rebuild [{bar:40}] {pos}/{len} seq  {msg}  ETA {eta}",
    );
    if resumed_from > 0 && !json {
        bar.println(format!(
            "resuming an interrupted rebuild from sequence {resumed_from}"
        ));
    }
    let applied = rebuild::catch_up(&log, &projector, None, batch, |p| {
        bar.set_length(p.target);
        bar.set_position(p.applied_to);
        bar.set_message(format!(
            "{:.0} events/s",
            p.events as f64 / p.elapsed.as_secs_f64().max(1e-9)
        ));
    })
    .await
    .map_err(fail)?;
    let checkpoint = rebuild::switch_over(&pool, &log, &projector)
        .await
        .map_err(fail)?;
    bar.finish_and_clear();
    // Redis counters are a projection of the new tables too.
    creto_projections::metering::counters::Counters::new(
        Arc::new(creto_projections::cache::RedisCache::new(vec![redis])),
        &settings.redis_prefix(),
    )
    .resync(
        &creto_projections::metering::PgReadModel::new(pool.clone()),
        None,
    )
    .await;
    // The quota tables, whole, in one transaction.
    let quotas = creto_projections::metering::quotas::rebuild(&pool, log, settings.catalog())
        .await
        .map_err(fail)?;
    let elapsed = started.elapsed();
    let rate = applied as f64 / elapsed.as_secs_f64().max(1e-9);
    if json {
        println!(
            "{}",
            serde_json::json!({"product": "metering", "events": applied, "resumed_from": resumed_from, "checkpoint": checkpoint,
                "quotas_checkpoint": quotas, "elapsed_ms": elapsed.as_millis(), "events_per_second": rate.round(), "switched": true})
        );
    } else {
        println!("metering rebuilt: {applied} events in {:.1} s ({rate:.0} events/s), readers switched at sequence {checkpoint}; quota tables rebuilt through {quotas}", elapsed.as_secs_f64());
    }
    Ok(())
}
