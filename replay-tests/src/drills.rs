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
    let (running, url) = env.start_oversight().await;
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
    running.stop().await;

    let dir = tempfile::Builder::new()
        .prefix("creto-drill-")
        .tempdir()
        .unwrap();
    // The sandboxes' unprivileged uid must reach their layers.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (running, url) = env.start_runtime(dir.path(), "").await;
    let mut c = RuntimeServiceClient::connect(url).await.unwrap();
    for _ in 0..2 {
        let sb = c
            .create_sandbox(rpb::CreateSandboxRequest {
                template: "base".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = c
            .exec(rpb::ExecRequest {
                sandbox_id: sb.sandbox_id.clone(),
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        while out.message().await.unwrap().is_some() {}
        c.terminate_sandbox(rpb::TerminateSandboxRequest {
            sandbox_id: sb.sandbox_id,
        })
        .await
        .unwrap();
    }
    running.stop().await;

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
