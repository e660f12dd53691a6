//! What the disaster-recovery drills need besides metering: oversight and runtime activity
//! made through their gateways and projected into PostgreSQL by their live projectors, the
//! checksums of those read models (the metering quotas' too), the disaster (every row gone)
//! and the recovery (`enablement replay oversight|runtime --rebuild`, and the quotas' rebuild
//! that `replay metering --rebuild` ends with).
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creto_projections::metering::quotas;
use creto_projections::runner::{self, Projector, RunnerConfig};
use creto_projections::{oversight, runtime};
use creto_schemas::oversight::v1 as opb;
use creto_schemas::oversight::v1::oversight_service_client::OversightServiceClient;
use creto_schemas::runtime::v1 as rpb;
use creto_schemas::runtime::v1::runtime_service_client::RuntimeServiceClient;
use creto_streams::{OVERSIGHT, RUNTIME};
use futures::StreamExt;
use sqlx::Executor;

use crate::{rebuild_whole, table_checksums, Env};

/// Every table of the read models this module covers.
fn tables() -> impl Iterator<Item = &'static str> {
    oversight::TABLES
        .iter()
        .chain(runtime::TABLES)
        .chain(quotas::TABLES)
        .copied()
}

/// Oversight requests (approved, denied, left pending) and runtime sandboxes (created, one
/// exec each, terminated), made through the gateways as agents and approvers would, then
/// projected by the live oversight and runtime projectors until they have applied it all.
pub async fn oversight_and_runtime_activity(env: &Env) {
    // A webhook receiver that takes every announcement: their outcomes are notification rows.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", axum::routing::post(|| async { "" }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let running = env
        .start_oversight_notifying(creto_gateways::oversight::notify::NotifyConfig {
            webhook_url: Some(format!("http://{hook}/hook")),
            webhook_secret: Some("drill-secret".into()),
            ..Default::default()
        })
        .await;
    let url = format!("http://{}", running.grpc_addr.unwrap());
    let mut c = OversightServiceClient::connect(url).await.unwrap();
    c.put_policy(opb::PutPolicyRequest {
        policy: Some(opb::Policy {
            policy_id: "refunds".into(),
            action: "refund.*".into(),
            require_approval: true,
            quorum: 1,
            levels: vec![opb::Level {
                approvers: vec!["alice".into()],
                timeout: Some(Duration::from_secs(600).try_into().unwrap()),
            }],
            on_timeout: opb::TimeoutAction::Deny as i32,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    // A policy defined, then removed: its row stays, marked removed, in live and rebuilt tables.
    let mut retired = c
        .list_policies(opb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies
        .remove(0);
    retired.policy_id = "retired".into();
    retired.action = "retired.*".into();
    c.put_policy(opb::PutPolicyRequest {
        policy: Some(retired),
    })
    .await
    .unwrap();
    c.delete_policy(opb::DeletePolicyRequest {
        policy_id: "retired".into(),
    })
    .await
    .unwrap();
    for i in 0..6 {
        let request_id = format!("refund-{i}");
        c.create_request(opb::CreateRequestRequest {
            request_id: request_id.clone(),
            agent_id: "billing-bot".into(),
            action: Some(opb::Action {
                name: "refund.issue".into(),
                parameters_json: format!(r#"{{"amount": {}, "currency": "EUR"}}"#, 10 * i),
            }),
            context: format!("order {i}"),
            priority: opb::Priority::High as i32,
        })
        .await
        .unwrap();
        let decision = match i % 3 {
            0 => opb::Decision::Approve,
            1 => opb::Decision::Deny,
            _ => continue, // left pending
        };
        c.respond(opb::RespondRequest {
            request_id,
            decision: decision as i32,
            approver: "alice".into(),
            reason: "checked the order".into(),
            channel: 0,
        })
        .await
        .unwrap();
    }
    // The two left pending announced (their outcomes on the log) before the gateway stops;
    // the decided ones may have been decided before their turn, and are then not announced.
    let announced = env.platform.catalog.subject("oversight.notifications.>");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outcomes = env
            .platform
            .log
            .replay(
                &env.platform.catalog.stream(OVERSIGHT),
                creto_streams::ReplayFrom::Start,
                None,
                Some(&announced),
            )
            .await
            .unwrap()
            .count()
            .await;
        if outcomes >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{outcomes} requests announced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;

    let dir = tempfile::Builder::new()
        .prefix("creto-drill-")
        .tempdir()
        .unwrap();
    // The sandboxes' unprivileged uid must reach their layers.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (running, url) = env.start_runtime(dir.path(), "").await;
    let mut c = RuntimeServiceClient::connect(url).await.unwrap();
    for i in 0..2 {
        let sb = c
            .create_sandbox(rpb::CreateSandboxRequest {
                template: "base".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // The first one also tries a connection its (empty) egress policy denies, and is
        // checkpointed: rows in sandbox_egress and sandbox_checkpoints.
        let argv = if i == 0 {
            vec![
                "python3".into(),
                "-c".into(),
                "import socket\ntry: socket.create_connection(('203.0.113.7', 80), timeout=3)\nexcept OSError: pass".into(),
            ]
        } else {
            vec!["true".into()]
        };
        let mut out = c
            .exec(rpb::ExecRequest {
                sandbox_id: sb.sandbox_id.clone(),
                argv,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while out.message().await.unwrap().is_some() {}
        if i == 0 {
            c.checkpoint(rpb::CheckpointRequest {
                sandbox_id: sb.sandbox_id.clone(),
            })
            .await
            .unwrap();
        }
        c.terminate_sandbox(rpb::TerminateSandboxRequest {
            sandbox_id: sb.sandbox_id,
        })
        .await
        .unwrap();
    }
    running.stop().await;
    quota_activity(env).await;

    let (pool, log, catalog) = (env.pool(), &env.platform.log, &env.platform.catalog);
    project_to_the_end(
        env,
        Arc::new(oversight::OversightProjector::new(
            pool.clone(),
            log.clone(),
            catalog.clone(),
        )),
        OVERSIGHT,
    )
    .await;
    project_to_the_end(
        env,
        Arc::new(runtime::RuntimeProjector::new(
            pool.clone(),
            log.clone(),
            catalog.clone(),
        )),
        RUNTIME,
    )
    .await;
}

/// A quota whose thresholds are crossed, through a metering gateway whose projectors put it
/// and the crossings in `quotas` and `quota_thresholds_reached`.
async fn quota_activity(env: &Env) {
    use creto_schemas::metering::v1 as mpb;
    let (running, mut c) = env.start_metering(true).await;
    c.set_quota(mpb::SetQuotaRequest {
        subscription_id: "sub-drill".into(),
        event_type: "drill.calls".into(),
        limit: "10".into(),
        period: Some(mpb::QuotaPeriod {
            kind: mpb::QuotaPeriodKind::PeriodMonth as i32,
            anchor: None,
            time_zone: String::new(),
        }),
        hard: true,
        thresholds_pct: vec![50, 100],
    })
    .await
    .unwrap();
    let quantity = prost_types::Struct {
        fields: [(
            "quantity".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(6.0)),
            },
        )]
        .into(),
    };
    let answer = c
        .ingest_events(mpb::IngestEventsRequest {
            events: vec![mpb::UsageEvent {
                id: "drill-1".into(),
                source: "drill".into(),
                r#type: "drill.calls".into(),
                subject: "sub-drill".into(),
                time: Some(creto_streams::envelope::timestamp(chrono::Utc::now())),
                data: Some(quantity),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.accepted, 1, "{answer:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let crossed: i64 = sqlx::query_scalar("SELECT count(*) FROM quota_thresholds_reached")
            .fetch_one(env.pool())
            .await
            .unwrap();
        if crossed > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no threshold crossing projected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.stop().await;
}

/// Runs `projector` live until it has applied its stream to the end, then stops it.
async fn project_to_the_end(env: &Env, projector: Arc<dyn Projector>, logical: &str) {
    let last = env
        .platform
        .log
        .stream_state(&env.platform.catalog.stream(logical))
        .await
        .unwrap()
        .last_sequence;
    assert!(last > 0, "no {logical} events");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(runner::run(
        env.platform.log.clone(),
        runner::Leadership::Postgres(env.pool().clone()),
        projector.clone(),
        RunnerConfig::default(),
        stop_rx,
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while projector.checkpoint().await.unwrap() < last {
        assert!(Instant::now() < deadline, "{logical} projector stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}

/// A checksum of every row of each table (oversight, runtime, metering quotas), in order.
pub async fn checksums(env: &Env) -> Vec<(&'static str, String)> {
    let tables: Vec<&'static str> = tables().collect();
    let sums = table_checksums(env.pool(), &tables).await;
    tables.into_iter().zip(sums).collect()
}

/// The checksums of a drill's activity: every table holds rows (two empty tables are equal
/// before and after any recovery, and would prove nothing).
pub async fn checksums_of_activity(env: &Env) -> Vec<(&'static str, String)> {
    let sums = checksums(env).await;
    let empty: Vec<&str> = sums
        .iter()
        .filter(|(_, sum)| sum == "empty")
        .map(|(table, _)| *table)
        .collect();
    assert!(
        empty.is_empty(),
        "the drill's activity left {empty:?} empty"
    );
    sums
}

/// The disaster: every row of these read models and their checkpoints gone.
pub async fn wipe(env: &Env) {
    for table in tables() {
        env.pool()
            .execute(format!("DELETE FROM {table}").as_str())
            .await
            .unwrap();
    }
    sqlx::query("DELETE FROM projection_checkpoints WHERE projector = ANY($1)")
        .bind([oversight::PRODUCT, runtime::PRODUCT, quotas::PRODUCT])
        .execute(env.pool())
        .await
        .unwrap();
}

/// The recovery: each read model rebuilt from its stream, each to the stream's end.
pub async fn rebuild(env: &Env) {
    let (log, catalog) = (&env.platform.log, &env.platform.catalog);
    for logical in [OVERSIGHT, RUNTIME] {
        let end = log
            .stream_state(&catalog.stream(logical))
            .await
            .unwrap()
            .last_sequence;
        assert_eq!(rebuild_whole(env, logical).await, end, "{logical}");
    }
    quotas::rebuild(env.pool(), log.clone(), catalog.clone())
        .await
        .unwrap();
}
