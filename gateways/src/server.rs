//! Runs a product: its gRPC gateway (with health, reflection and gRPC metrics), its metrics
//! and health HTTP port, its projector, and the dependency checker.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use creto_projections::oversight::OversightProjector;
use creto_projections::runner::{self, RunnerConfig};
use creto_projections::runtime::RuntimeProjector;
use creto_schemas::messaging::v1::messaging_service_server::MessagingServiceServer;
use creto_schemas::metering::v1::metering_service_server::MeteringServiceServer;
use creto_schemas::oversight::v1::oversight_service_server::OversightServiceServer;
use creto_schemas::runtime::v1::runtime_service_server::RuntimeServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::Routes;

use crate::auth::layer::{Auth, AuthLayer};
use crate::grpc_metrics::GrpcMetricsLayer;
use crate::messaging::delivery::Queues;
use crate::messaging::directory::DirectoryView;
use crate::messaging::MessagingGateway;
use crate::metering::MeteringGateway;
use crate::oversight::fold::OversightView;
use crate::oversight::notify::{Notifier, NotifyConfig};
use crate::oversight::OversightGateway;
use crate::platform::Platform;
use crate::runtime::config::RuntimeConfig;
use crate::runtime::engine::{Runtime, RuntimeSettings};
use crate::runtime::view::RuntimeView;
use crate::runtime::RuntimeGateway;
use crate::status::{self, Health};
use crate::telemetry::GrpcTraceLayer;

pub const METERING_GRPC: &str = "0.0.0.0:50051";
pub const METERING_METRICS: &str = "0.0.0.0:9090";
pub const OVERSIGHT_GRPC: &str = "0.0.0.0:50052";
pub const OVERSIGHT_METRICS: &str = "0.0.0.0:9091";
pub const RUNTIME_GRPC: &str = "0.0.0.0:50053";
pub const RUNTIME_METRICS: &str = "0.0.0.0:9092";
pub const MESSAGING_GRPC: &str = "0.0.0.0:50054";
pub const MESSAGING_METRICS: &str = "0.0.0.0:9093";

/// What to run in this process.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub gateways: bool,
    pub projectors: bool,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
}

/// A running product; dropping `shutdown` (or sending `true`) stops it.
pub struct Running {
    pub grpc_addr: Option<SocketAddr>,
    pub metrics_addr: SocketAddr,
    pub shutdown: watch::Sender<bool>,
    pub tasks: JoinSet<()>,
}

impl Running {
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Listens on `addr` for `what`; `flag` is the option that moves it.
async fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for {what} ({e}); is another instance running? choose another address with {flag}"))
}

/// Keeps a projector running: restarts it with backoff when it stops on an error.
pub(crate) async fn supervise_projector(
    platform: Arc<Platform>,
    projector: Arc<dyn creto_projections::Projector>,
    shutdown: watch::Receiver<bool>,
) {
    const FIRST: Duration = Duration::from_secs(1);
    let mut backoff = FIRST;
    let mut shutdown_rx = shutdown.clone();
    loop {
        let started = tokio::time::Instant::now();
        // In a task of its own: a panic (a bug met on some event) is a failure to restart
        // from, not the end of the projection while the gateway goes on looking healthy.
        let result = tokio::spawn(runner::run(
            platform.log.clone(),
            platform.leadership(),
            projector.clone(),
            RunnerConfig::default(),
            shutdown.clone(),
        ))
        .await;
        if *shutdown.borrow() {
            return;
        }
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, product = projector.product(), "projector stopped; restarting")
            }
            Err(e) => {
                tracing::error!(error = %e, product = projector.product(), "projector panicked; restarting")
            }
        }
        // A run that lasted is a fresh failure, not the next of a series: wait the first delay.
        if started.elapsed() > Duration::from_secs(60) {
            backoff = FIRST;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown_rx.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// A product's gRPC service and what runs beside it.
struct Product {
    /// For messages: "metering", "messaging".
    name: &'static str,
    /// Full gRPC service name, for health and reflection.
    service: &'static str,
    needs: status::Needs,
    routes: Routes,
    /// More HTTP routes beside `/metrics` and `/health` (oversight's approval page).
    http: Option<axum::Router>,
}

pub async fn start_metering(
    platform: Arc<Platform>,
    options: ServeOptions,
    auth: Arc<Auth>,
) -> anyhow::Result<Running> {
    let quotas = crate::metering::quota::start(&platform);
    let gateway = MeteringGateway {
        log: platform.log.clone(),
        read_model: platform.metering.clone(),
        catalog: platform.catalog.clone(),
        limits: platform.settings.limits,
        quotas: quotas.clone(),
    };
    let product = Product {
        name: "metering",
        service: "creto.enablement.metering.v1.MeteringService",
        needs: status::Needs {
            stream: creto_streams::METERING,
            postgres: true,
            cache: true,
            // CheckQuota and GetQuota answer UNAVAILABLE until the book is warm: no traffic
            // before (a rollout would send it to pods that refuse it).
            warming: options.gateways.then(|| {
                let quotas = quotas.clone();
                let ready: status::Ready = Arc::new(move || quotas.is_warm());
                ("quota_book", ready)
            }),
        },
        routes: Routes::new(
            MeteringServiceServer::new(gateway).max_decoding_message_size(16 * 1024 * 1024),
        ),
        http: None,
    };
    let projectors = options.projectors;
    let gateways = options.gateways;
    start_product(
        platform.clone(),
        options,
        auth,
        product,
        |tasks, shutdown| {
            crate::metering::quota::spawn(
                &platform, quotas, gateways, projectors, tasks, &shutdown,
            );
            if projectors {
                let projector = platform.metering_projector();
                tasks.spawn(supervise_projector(platform, projector, shutdown));
            }
        },
    )
    .await
}

/// Messaging keeps no table: its directory and queues are read from the log by each replica,
/// so it has no projector to run and every replica can serve every recipient.
pub async fn start_messaging(
    platform: Arc<Platform>,
    options: ServeOptions,
    auth: Arc<Auth>,
) -> anyhow::Result<Running> {
    crate::messaging::metrics::register();
    let queues = Queues::new(platform.log.clone(), platform.catalog.clone());
    let directory = Arc::new(DirectoryView::new(
        platform.log.clone(),
        platform.catalog.clone(),
    ));
    let mut tail_from = 0;
    if options.gateways {
        // Every key event before the first call: a replica that served while still reading
        // the directory would take a key revoked later in the log for a valid one.
        directory
            .catch_up()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the MESSAGING key directory: {e}"))?;
        tail_from = queues
            .tail_start()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the MESSAGING stream: {e}"))?;
    }
    let limits = platform.settings.messaging;
    let gateway = MessagingGateway::new(queues.clone(), directory.clone(), limits);
    let product = Product {
        name: "messaging",
        service: "creto.enablement.messaging.v1.MessagingService",
        // Only the log: no table or cache key of messaging exists.
        needs: status::Needs {
            stream: creto_streams::MESSAGING,
            postgres: false,
            cache: false,
            warming: None,
        },
        // Room for the largest ciphertext plus its header, stanzas and signature, and for a
        // SendBatch of ordinary envelopes (each is checked against the limits on its own).
        routes: Routes::new(
            MessagingServiceServer::new(gateway).max_decoding_message_size(
                (limits.max_ciphertext_bytes + 64 * 1024)
                    .max(crate::messaging::service::MAX_BATCH_BYTES),
            ),
        ),
        http: None,
    };
    let gateways = options.gateways;
    start_product(platform, options, auth, product, |tasks, shutdown| {
        if gateways {
            tasks.spawn(directory.refresh(shutdown.clone()));
            let mut stop = shutdown.clone();
            let sessions = queues.clone();
            tasks.spawn(async move {
                let _ = stop.changed().await;
                sessions.stop_sessions();
            });
            tasks.spawn(queues.tail(tail_from, shutdown));
        }
    })
    .await
}

/// Oversight: the gateway decides on a view of the OVERSIGHT stream that every replica folds
/// (replayed before the first call is served), and every replica runs the durable timers.
pub async fn start_oversight(
    platform: Arc<Platform>,
    options: ServeOptions,
    auth: Arc<Auth>,
    notify: NotifyConfig,
) -> anyhow::Result<Running> {
    crate::oversight::metrics::register();
    let view = Arc::new(OversightView::new(
        platform.log.clone(),
        platform.catalog.clone(),
    ));
    if options.gateways {
        view.catch_up()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the OVERSIGHT stream: {e}"))?;
    }
    let (stop_watches, stopping) = watch::channel(false);
    let gateway = Arc::new(OversightGateway {
        log: platform.log.clone(),
        view: view.clone(),
        stopping,
    });
    // The approval page, on the metrics port of the replicas that serve.
    let page = options.gateways.then(|| {
        crate::oversight::page::router(
            gateway.clone(),
            crate::oversight::page::PageSigner::from_config(&notify),
        )
    });
    let product = Product {
        name: "oversight",
        service: "creto.enablement.oversight.v1.OversightService",
        needs: status::Needs {
            stream: creto_streams::OVERSIGHT,
            // Its projector writes the PostgreSQL read model; nothing of it uses the cache.
            postgres: options.projectors,
            cache: false,
            warming: None,
        },
        routes: Routes::new(OversightServiceServer::from_arc(gateway)),
        http: page,
    };
    let gateways = options.gateways;
    let log = platform.log.clone();
    let catalog = platform.catalog.clone();
    let notifier = Arc::new(Notifier::new(notify));
    // The PostgreSQL audit read model, when running on the services (embedded, the gateways'
    // fold is the read model).
    let projector = platform.pool().filter(|_| options.projectors).map(|pool| {
        Arc::new(OversightProjector::new(
            pool.clone(),
            platform.log.clone(),
            platform.catalog.clone(),
        )) as Arc<dyn creto_projections::Projector>
    });
    let supervised = platform.clone();
    start_product(platform, options, auth, product, |tasks, shutdown| {
        if let Some(projector) = projector {
            tasks.spawn(supervise_projector(supervised, projector, shutdown.clone()));
        }
        if gateways {
            tasks.spawn(view.clone().tail(shutdown.clone()));
            tasks.spawn(crate::oversight::timers::run(
                log.clone(),
                view.clone(),
                shutdown.clone(),
            ));
            tasks.spawn(crate::oversight::notifications::run(
                log,
                catalog,
                view,
                notifier,
                shutdown.clone(),
            ));
            let mut stop = shutdown;
            tasks.spawn(async move {
                let _ = stop.changed().await;
                let _ = stop_watches.send(true);
            });
        }
    })
    .await
}

/// Runtime: this replica's sandboxes on its isolation backend, its warm pool, expiry and egress
/// recording; every replica folds the RUNTIME stream for Get and List. With the services, the
/// PostgreSQL read model is projected too. Checkpoints go to `checkpoints` (the platform's
/// archive, normally).
pub async fn start_runtime(
    platform: Arc<Platform>,
    options: ServeOptions,
    auth: Arc<Auth>,
    config: RuntimeConfig,
    checkpoints: Option<Arc<dyn creto_projections::archive::Archive>>,
) -> anyhow::Result<Running> {
    crate::runtime::metrics::register();
    let view = Arc::new(RuntimeView::new(
        platform.log.clone(),
        platform.catalog.clone(),
        config.node.clone(),
    ));
    let runtime = if options.gateways {
        view.catch_up()
            .await
            .map_err(|e| anyhow::anyhow!("cannot read the RUNTIME stream: {e}"))?;
        let backend = crate::runtime::backend::select_backend(&config.backend_config())
            .map_err(|e| anyhow::anyhow!("runtime backend: {e}"))?;
        let settings = RuntimeSettings {
            node: config.node.clone(),
            limits: config.limits,
            pool: config.pool.clone(),
            attestation_key: config.load_attestation_key()?,
        };
        let runtime = Runtime::new(
            platform.log.clone(),
            view.clone(),
            backend,
            settings,
            checkpoints,
        );
        runtime.recover().await?;
        Some(runtime)
    } else {
        None
    };
    let gateway = runtime.clone().map(|runtime| RuntimeGateway { runtime });
    let product = Product {
        name: "runtime",
        service: "creto.enablement.runtime.v1.RuntimeService",
        needs: status::Needs {
            stream: creto_streams::RUNTIME,
            // Its projector writes the PostgreSQL read model; nothing of it uses the cache.
            postgres: options.projectors,
            cache: false,
            warming: None,
        },
        routes: match gateway {
            Some(g) => Routes::new(RuntimeServiceServer::new(g)),
            None => Routes::default(),
        },
        http: None,
    };
    let projector = platform.pool().filter(|_| options.projectors).map(|pool| {
        Arc::new(RuntimeProjector::new(
            pool.clone(),
            platform.log.clone(),
            platform.catalog.clone(),
        )) as Arc<dyn creto_projections::Projector>
    });
    let supervised = platform.clone();
    let mut running = start_product(platform, options, auth, product, |tasks, shutdown| {
        if let Some(projector) = projector {
            tasks.spawn(supervise_projector(supervised, projector, shutdown.clone()));
        }
        if let Some(runtime) = runtime.clone() {
            tasks.spawn(view.tail(shutdown.clone()));
            tasks.spawn(runtime.clone().refill_pool(shutdown.clone()));
            tasks.spawn(runtime.clone().expire(shutdown.clone()));
            tasks.spawn(runtime.record_egress(shutdown));
        }
    })
    .await?;
    if let Some(runtime) = runtime {
        // Sandboxes end with the replica that runs them: record it when it stops.
        let mut stop = running.shutdown.subscribe();
        running.tasks.spawn(async move {
            let _ = stop.changed().await;
            runtime.terminate_all("shutdown").await;
        });
    }
    Ok(running)
}

/// Metrics and health on HTTP, the dependency checker, the gRPC server with the shared layers
/// (metrics, tracing, auth), health and reflection, and the product's own background tasks.
async fn start_product(
    platform: Arc<Platform>,
    options: ServeOptions,
    auth: Arc<Auth>,
    product: Product,
    background: impl FnOnce(&mut JoinSet<()>, watch::Receiver<bool>),
) -> anyhow::Result<Running> {
    status::register_metrics();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let health = Health::default();

    let name = product.name;
    let metrics_listener = bind(
        options.metrics_addr,
        &format!("{name} metrics"),
        &format!("--{name}-metrics-addr"),
    )
    .await?;
    let metrics_addr = metrics_listener.local_addr()?;
    let router = match product.http {
        Some(extra) => status::router(health.clone()).merge(extra),
        None => status::router(health.clone()),
    };
    tasks.spawn(crate::http_server::serve(
        metrics_listener,
        router,
        shutdown_rx.clone(),
    ));
    tasks.spawn(status::watch_dependencies(
        platform.clone(),
        health.clone(),
        product.needs,
        shutdown_rx.clone(),
    ));

    let mut grpc_addr = None;
    if options.gateways {
        let listener = bind(
            options.grpc_addr,
            &format!("the {name} gRPC gateway"),
            &format!("--{name}-grpc-addr"),
        )
        .await?;
        grpc_addr = Some(listener.local_addr()?);
        // NOT_SERVING until the first dependency check says otherwise (below).
        let (reporter, health_service) = tonic_health::server::health_reporter();
        for service in ["", product.service] {
            reporter
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        let reflection = || {
            // Only what this server serves (the descriptor set also holds the other products'
            // and creto-authz's APIs).
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(creto_schemas::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(product.service)
                .with_service_name("grpc.health.v1.Health")
        };
        let reflection_v1 = reflection().build_v1()?;
        // grpcurl 1.8 only speaks v1alpha.
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let routes = product
            .routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        // No Nagle: a streamed answer's small frames (headers, a message, trailers) would
        // otherwise wait for the client's delayed ACK, up to 40 ms each.
        // TCP keepalive is set here: the builder's is not applied to an incoming of our own.
        let incoming = tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let mut rx = shutdown_rx.clone();
        tasks.spawn(async move {
            // Pings on idle connections: a client gone without a word (a host that vanished, a
            // NAT that forgot the flow) otherwise keeps its Watch, Receive or Exec stream, and
            // its share of the per-request and per-recipient limits, until TCP gives up.
            let mut builder = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .http2_keepalive_timeout(Some(Duration::from_secs(10)));
            if let Some(tls) = auth.tls.clone() {
                builder = match builder.tls_config(tls) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "TLS configuration refused; {name} gateway not started");
                        return;
                    }
                };
            }
            let result = builder
                .layer(GrpcMetricsLayer)
                // Outside authentication, so refused calls are traced and auth runs in the span.
                .layer(GrpcTraceLayer)
                .layer(AuthLayer(auth))
                .add_routes(routes)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.changed().await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "{name} gateway stopped");
            }
        });
        // gRPC health follows the dependencies: the product's service is SERVING only when all
        // are up, and each dependency has its own entry (`dependency.nats`, ...).
        let mut rx = shutdown_rx.clone();
        let h = health.clone();
        let service = product.service;
        tasks.spawn(async move {
            loop {
                let serving = |up: bool| {
                    if up {
                        tonic_health::ServingStatus::Serving
                    } else {
                        tonic_health::ServingStatus::NotServing
                    }
                };
                // The server as a whole ("", what a check without a service name asks, as the
                // runbook's does) follows the product: tonic-health would say SERVING for ever.
                for name in ["", service] {
                    reporter.set_service_status(name, serving(h.all_up())).await;
                }
                for (dependency, state) in h.snapshot() {
                    reporter
                        .set_service_status(
                            format!("dependency.{dependency}"),
                            serving(state == "up"),
                        )
                        .await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    _ = rx.changed() => return,
                }
            }
        });
    }
    background(&mut tasks, shutdown_rx);
    Ok(Running {
        grpc_addr,
        metrics_addr,
        shutdown,
        tasks,
    })
}
