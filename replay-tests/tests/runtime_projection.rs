//! The runtime read model on PostgreSQL: sandbox lifecycles appended to the RUNTIME stream as
//! the engine appends them (each event guarded by the sandbox's last sequence, folded by the
//! domain's aggregate) and egress decisions are projected by the runner into sandboxes, Execs,
//! checkpoints and the egress audit; the gauges' counts equal the fold's; malformed events are
//! dead-lettered without stopping it; the same events delivered again change nothing (Execs
//! are not counted twice); and a rebuild from the stream gives the same tables, row for row.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Duration as Ch, DurationRound, Utc};
use creto_domain::runtime::sandbox::{self as domain, Aggregate};
use creto_projections::runtime::{self, RuntimeProjector, SandboxCounts};
use creto_projections::Projector;
use creto_replay_tests::{checksums, run_projector, stream_events, wait_checkpoint, Env};
use creto_schemas::runtime::v1::{self as pb, sandbox_event::Event, EgressDecided, State};
use creto_streams::deadletter::DeadLetter;
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Headers, StoredEvent, DEADLETTERS, RUNTIME};
use prost::Message;
use sqlx::Row;

const TABLES: &[(&str, &str)] = &[
    ("sandboxes", "sandbox_id"),
    ("sandbox_execs", "sandbox_id, exec_id"),
    ("sandbox_checkpoints", "checkpoint_id"),
    ("sandbox_egress", "sequence"),
];

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(domain::timestamp(t))
}

fn secs(s: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: s,
        nanos: 0,
    })
}

fn millis(ms: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: ms / 1000,
        nanos: (ms % 1000) as i32 * 1_000_000,
    })
}

fn strings(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn egress(allow: &[&str]) -> Option<pb::EgressPolicy> {
    Some(pb::EgressPolicy {
        allow: strings(allow),
    })
}

/// What the engine does around the domain: keeps each sandbox's aggregate, and appends its
/// events expecting the sandbox's last sequence.
struct Engine<'a> {
    env: &'a Env,
    sandboxes: BTreeMap<String, Aggregate>,
    ids: u64,
    last: u64,
}

impl<'a> Engine<'a> {
    fn new(env: &'a Env) -> Self {
        Engine {
            env,
            sandboxes: BTreeMap::new(),
            ids: 0,
            last: 0,
        }
    }

    async fn append(
        &mut self,
        logical: &str,
        event_type: &str,
        payload: Vec<u8>,
        expected: Option<u64>,
    ) -> u64 {
        self.ids += 1;
        let appended = self
            .env
            .platform
            .log
            .append(AppendEvent {
                subject: self.env.subject(logical),
                id: format!("rt-{}", self.ids),
                expected_subject_sequence: expected,
                headers: Headers::new()
                    .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                    .with(names::EVENT_TYPE, event_type),
                payload: Bytes::from(payload),
            })
            .await
            .unwrap();
        assert!(!appended.is_duplicate());
        self.last = appended.sequence();
        self.last
    }

    /// Appends the events of sandbox `id` at `at`, and folds them.
    async fn emit(&mut self, id: &str, at: DateTime<Utc>, events: Vec<Event>) {
        for e in events {
            let e = domain::event(at, e);
            let expected = self.sandboxes.get(id).map_or(0, |a| a.view.version);
            let sequence = self
                .append(
                    &format!("runtime.sandboxes.{id}"),
                    domain::event_type(&e),
                    e.encode_to_vec(),
                    Some(expected),
                )
                .await;
            self.sandboxes
                .entry(id.to_string())
                .or_default()
                .apply(id, &e, sequence);
        }
    }

    async fn egress(
        &mut self,
        id: &str,
        tenant: &str,
        destination: &str,
        rule: Option<&str>,
        at: DateTime<Utc>,
    ) -> u64 {
        let e = EgressDecided {
            at: ts(at),
            sandbox_id: id.into(),
            tenant: tenant.into(),
            destination: destination.into(),
            allowed: rule.is_some(),
            rule: rule.unwrap_or_default().into(),
            // As events recorded before the field: one attempt.
            attempts: 0,
        };
        self.append(
            &format!("runtime.egress.{id}"),
            "runtime.egress_decided",
            e.encode_to_vec(),
            None,
        )
        .await
    }

    fn agg(&self, id: &str) -> &Aggregate {
        &self.sandboxes[id]
    }
}

#[allow(clippy::too_many_arguments)]
fn requested(
    tenant: &str,
    pool: bool,
    resources: (u64, u32, u32),
    timeout: i64,
    metadata: &[(&str, &str)],
    allow: &[&str],
    env_names: &[&str],
    request_id: &str,
) -> Event {
    Event::Requested(pb::Requested {
        tenant: tenant.into(),
        template: "base".into(),
        resources: Some(pb::Resources {
            memory_mb: resources.0,
            pids: resources.1,
            cpu_millis: resources.2,
            disk_mb: 1024,
        }),
        timeout: secs(timeout),
        metadata: map(metadata),
        egress: egress(allow),
        env_names: strings(env_names),
        restore_checkpoint_id: String::new(),
        request_id: request_id.into(),
        pool,
        owner: String::new(),
    })
}

fn provisioning(backend: &str, node: &str) -> Event {
    Event::Provisioning(pb::Provisioning {
        backend: backend.into(),
        node: node.into(),
        template_digest: "sha256:1f2e3d".into(),
    })
}

fn ready() -> Event {
    Event::Ready(pb::Ready {
        spawn_duration: millis(42),
    })
}

fn exec_started(exec_id: &str, argv: &[&str]) -> Event {
    Event::ExecStarted(pb::ExecStarted {
        exec_id: exec_id.into(),
        argv: strings(argv),
    })
}

fn exec_finished(exec_id: &str, exit_code: Option<i32>, signal: i32, ms: i64) -> Event {
    Event::ExecFinished(pb::ExecFinished {
        result: Some(pb::ExecResult {
            exec_id: exec_id.into(),
            exit_code,
            signal,
            timed_out: signal != 0,
            oom_killed: false,
            pids_limited: false,
            duration: millis(ms),
            // A command that failed left the disk full, to see the column projected.
            disk_full: exit_code == Some(3),
            error: String::new(),
        }),
    })
}

/// Every row of every table, as text, in key order: what "identical" means, row by row.
async fn rows(pool: &sqlx::PgPool) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for (table, order) in TABLES {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {table} t ORDER BY {order}"))
                .fetch_all(pool)
                .await
                .unwrap();
        out.push((table.to_string(), rows));
    }
    out
}

fn ids(sandboxes: &[pb::Sandbox]) -> Vec<&str> {
    sandboxes.iter().map(|s| s.sandbox_id.as_str()).collect()
}

type ExecRow = (
    String,
    Vec<String>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<i32>,
    Option<i32>,
    Option<bool>,
    Option<f64>,
);

/// tenant, state, warm, pooled, expires_at, ended_at, failure_reason, execs, last_exit_code,
/// created_at
type SummaryRow = (
    String,
    String,
    bool,
    bool,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<String>,
    i64,
    Option<i32>,
    DateTime<Utc>,
);

type CheckpointRow = (String, String, String, String, i64, String, DateTime<Utc>);

async fn execs(pool: &sqlx::PgPool, sandbox_id: &str) -> Vec<ExecRow> {
    sqlx::query_as(
        "SELECT exec_id, argv, started_at, finished_at, exit_code, signal, timed_out, duration_ms
         FROM sandbox_execs WHERE sandbox_id = $1 ORDER BY exec_id",
    )
    .bind(sandbox_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

fn counts(
    by_state: &[(&str, i64)],
    active: &[(&str, i64)],
    warm_pool: &[(&str, i64)],
) -> SandboxCounts {
    let m = |pairs: &[(&str, i64)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect::<BTreeMap<_, _>>()
    };
    SandboxCounts {
        by_state: m(by_state),
        active: m(active),
        warm_pool: m(warm_pool),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_read_model_is_projected_idempotent_and_rebuilt_identically() {
    let env = Env::new().await;
    let pool = env.pool().clone();
    let log = env.platform.log.clone();
    let catalog = env.platform.catalog.clone();
    let projector = Arc::new(RuntimeProjector::new(
        pool.clone(),
        log.clone(),
        catalog.clone(),
    ));
    // The projector runs while the engine appends, as live.
    let (stop, task) = run_projector(&env, projector.clone());

    // Microseconds: what PostgreSQL keeps of a time.
    let t0 = Utc::now().duration_trunc(Ch::seconds(1)).unwrap() - Ch::hours(2);
    let at = |s: i64| t0 + Ch::seconds(s) + Ch::microseconds(123_456);
    let mut rt = Engine::new(&env);

    // ---- a cold sandbox, through its whole life ----
    rt.emit(
        "sb-cold",
        at(0),
        vec![requested(
            "acme",
            false,
            (512, 64, 500),
            300,
            &[("team", "ml"), ("run", "r1")],
            &["api.example.com:443"],
            &["API_KEY", "HOME"],
            "req-1",
        )],
    )
    .await;
    rt.emit("sb-cold", at(1), vec![provisioning("bwrap", "node-a")])
        .await;
    rt.emit("sb-cold", at(2), vec![ready()]).await;
    rt.emit(
        "sb-cold",
        at(3),
        vec![exec_started("e1", &["sh", "-c", "echo hi"])],
    )
    .await;
    rt.emit("sb-cold", at(4), vec![exec_finished("e1", Some(0), 0, 12)])
        .await;
    rt.egress(
        "sb-cold",
        "acme",
        "api.example.com:443",
        Some("api.example.com:443"),
        at(5),
    )
    .await;
    rt.egress("sb-cold", "acme", "evil.example.net:80", None, at(6))
        .await;
    rt.emit(
        "sb-cold",
        at(7),
        vec![exec_started("e2", &["sleep", "999"])],
    )
    .await;
    rt.emit("sb-cold", at(8), vec![exec_finished("e2", None, 9, 60_000)])
        .await;
    rt.emit(
        "sb-cold",
        at(9),
        vec![Event::TimeoutChanged(pb::TimeoutChanged {
            expires_at: ts(at(1_000)),
        })],
    )
    .await;
    rt.emit(
        "sb-cold",
        at(10),
        vec![Event::EgressPolicyChanged(pb::EgressPolicyChanged {
            egress: egress(&["api.example.com:443", "10.0.0.0/8:80-90"]),
        })],
    )
    .await;
    rt.emit(
        "sb-cold",
        at(11),
        vec![Event::Checkpointed(pb::Checkpointed {
            checkpoint: Some(pb::CheckpointRef {
                checkpoint_id: "cp-1".into(),
                object_key: "runtime/checkpoints/acme/cp-1.tar.gz".into(),
                size_bytes: 40_960,
                sha256: "ab".repeat(32),
                at: ts(at(11)),
            }),
        })],
    )
    .await;

    // ---- malformed events: parked with their reason, the projector goes on ----
    let bad_sequence = rt
        .append(
            "runtime.sandboxes.sb-bad",
            "runtime.requested",
            b"\xff\xff not protobuf".to_vec(),
            None,
        )
        .await;
    let ghost = domain::event(at(12), exec_started("e9", &["true"]));
    let ghost_sequence = rt
        .append(
            "runtime.sandboxes.sb-ghost",
            "runtime.exec_started",
            ghost.encode_to_vec(),
            Some(0),
        )
        .await;
    let unknown_sequence = rt
        .append(
            "runtime.pool.base",
            "runtime.refilled",
            b"{}".to_vec(),
            None,
        )
        .await;
    let mismatch = EgressDecided {
        at: ts(at(12)),
        sandbox_id: "sb-other".into(),
        ..Default::default()
    };
    let mismatch_sequence = rt
        .append(
            "runtime.egress.sb-cold",
            "runtime.egress_decided",
            mismatch.encode_to_vec(),
            None,
        )
        .await;

    rt.emit(
        "sb-cold",
        at(13),
        vec![Event::Terminated(pb::Terminated { by: "bot-1".into() })],
    )
    .await;

    // ---- two warm-pool sandboxes; one is claimed ----
    for (id, s) in [("sb-warm", 20), ("sb-pool", 21)] {
        rt.emit(
            id,
            at(s),
            vec![
                requested("", true, (256, 128, 1000), 0, &[], &[], &[], ""),
                provisioning("bwrap", "node-a"),
                ready(),
            ],
        )
        .await;
    }
    // Decided while still in the pool: no tenant yet.
    rt.egress("sb-warm", "", "pypi.org:443", None, at(25)).await;
    rt.emit(
        "sb-warm",
        at(30),
        vec![Event::Claimed(pb::Claimed {
            tenant: "acme".into(),
            timeout: secs(600),
            metadata: map(&[("team", "ml"), ("run", "r2")]),
            egress: egress(&["pypi.org:443"]),
            env_names: strings(&["TOKEN"]),
            request_id: "req-2".into(),
            claim_duration: millis(1),
            owner: "agent-2".into(),
        })],
    )
    .await;
    // The event says no tenant: the sandbox's (claimed by acme now) is recorded.
    rt.egress("sb-warm", "", "pypi.org:443", Some("pypi.org:443"), at(31))
        .await;
    rt.emit(
        "sb-warm",
        at(32),
        vec![
            exec_started("w1", &["python3", "-c", "import sys; sys.exit(3)"]),
            exec_finished("w1", Some(3), 0, 250),
        ],
    )
    .await;

    // ---- one fails while provisioning, one expires, one is still provisioning ----
    rt.emit(
        "sb-fail",
        at(40),
        vec![
            requested(
                "acme",
                false,
                (256, 128, 1000),
                300,
                &[("team", "data")],
                &[],
                &[],
                "req-3",
            ),
            provisioning("bwrap", "node-b"),
            Event::Failed(pb::Failed {
                reason: "bwrap: cannot create a user namespace".into(),
            }),
        ],
    )
    .await;
    rt.emit(
        "sb-exp",
        at(50),
        vec![
            requested(
                "globex",
                false,
                (1024, 256, 2000),
                60,
                &[("team", "ml")],
                &[],
                &[],
                "g-1",
            ),
            provisioning("runsc", "node-c"),
            ready(),
        ],
    )
    .await;
    rt.emit("sb-exp", at(111), vec![Event::Expired(pb::Expired {})])
        .await;
    rt.emit(
        "sb-prov",
        at(60),
        vec![
            requested("globex", false, (256, 128, 1000), 60, &[], &[], &[], "g-2"),
            provisioning("runsc", "node-c"),
        ],
    )
    .await;

    let last = rt.last;
    wait_checkpoint(&*projector, last).await;

    // ---- sandboxes: the row is the engine's own fold, field for field ----
    for (id, agg) in &rt.sandboxes {
        let tenant = &agg.view.tenant;
        let got = runtime::get_sandbox(&pool, tenant, id).await.unwrap();
        if agg.pooled {
            // Still in the pool: nobody's.
            assert_eq!(got, None, "{id}");
            continue;
        }
        assert_eq!(got.as_ref(), Some(&agg.view), "{id}");
    }
    assert_eq!(rt.sandboxes.len(), 6);

    let row = sqlx::query("SELECT * FROM sandboxes WHERE sandbox_id = 'sb-cold'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let text = |c: &str| row.get::<String, _>(c);
    assert_eq!(
        (
            text("tenant"),
            text("template"),
            text("template_digest"),
            text("backend"),
            text("node"),
            text("state"),
        ),
        (
            "acme".into(),
            "base".into(),
            "sha256:1f2e3d".into(),
            "bwrap".into(),
            "node-a".into(),
            "terminated".into()
        )
    );
    assert!(!row.get::<bool, _>("warm") && !row.get::<bool, _>("pooled"));
    assert_eq!(
        (
            row.get::<i64, _>("memory_mb"),
            row.get::<i32, _>("pids"),
            row.get::<i32, _>("cpu_millis"),
            row.get::<i64, _>("disk_mb")
        ),
        (512, 64, 500, 1024)
    );
    assert_eq!(
        row.get::<serde_json::Value, _>("metadata"),
        serde_json::json!({"team": "ml", "run": "r1"})
    );
    assert_eq!(
        row.get::<serde_json::Value, _>("egress"),
        serde_json::json!(["api.example.com:443", "10.0.0.0/8:80-90"])
    );
    assert_eq!(
        row.get::<Vec<String>, _>("env_names"),
        strings(&["API_KEY", "HOME"])
    );
    assert_eq!(row.get::<DateTime<Utc>, _>("created_at"), at(0));
    assert_eq!(
        row.get::<Option<DateTime<Utc>>, _>("expires_at"),
        Some(at(1_000))
    );
    assert_eq!(
        row.get::<Option<DateTime<Utc>>, _>("ended_at"),
        Some(at(13))
    );
    assert_eq!(row.get::<Option<String>, _>("failure_reason"), None);
    assert_eq!(row.get::<i64, _>("execs"), 2);
    // The last Exec was killed by a signal: no exit code.
    assert_eq!(row.get::<Option<i32>, _>("last_exit_code"), None);
    assert_eq!(text("request_id"), "req-1");
    assert_eq!(row.get::<i64, _>("timeout_ns"), 300_000_000_000);
    assert_eq!(
        row.get::<i64, _>("version"),
        rt.agg("sb-cold").view.version as i64
    );

    let summary = |id: &'static str| {
        let pool = pool.clone();
        async move {
            let s: SummaryRow = sqlx::query_as(
                "SELECT tenant, state, warm, pooled, expires_at, ended_at, failure_reason, execs,
                        last_exit_code, created_at
                 FROM sandboxes WHERE sandbox_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
            s
        }
    };
    assert_eq!(
        summary("sb-warm").await,
        (
            "acme".into(),
            "ready".into(),
            true,
            false,
            Some(at(30) + Ch::seconds(600)),
            None,
            None,
            1,
            Some(3),
            at(30)
        )
    );
    assert_eq!(
        summary("sb-pool").await,
        (
            "".into(),
            "ready".into(),
            false,
            true,
            None,
            None,
            None,
            0,
            None,
            at(21)
        )
    );
    assert_eq!(
        summary("sb-fail").await,
        (
            "acme".into(),
            "failed".into(),
            false,
            false,
            None,
            Some(at(40)),
            Some("bwrap: cannot create a user namespace".into()),
            0,
            None,
            at(40)
        )
    );
    assert_eq!(
        summary("sb-exp").await,
        (
            "globex".into(),
            "expired".into(),
            false,
            false,
            Some(at(50) + Ch::seconds(60)),
            Some(at(111)),
            None,
            0,
            None,
            at(50)
        )
    );
    let prov = summary("sb-prov").await;
    assert_eq!((prov.1.as_str(), prov.4), ("provisioning", None));

    // ---- Execs, checkpoints, egress decisions ----
    assert_eq!(
        execs(&pool, "sb-cold").await,
        vec![
            (
                "e1".into(),
                strings(&["sh", "-c", "echo hi"]),
                Some(at(3)),
                Some(at(4)),
                Some(0),
                Some(0),
                Some(false),
                Some(12.0)
            ),
            (
                "e2".into(),
                strings(&["sleep", "999"]),
                Some(at(7)),
                Some(at(8)),
                None,
                Some(9),
                Some(true),
                Some(60_000.0)
            ),
        ]
    );
    assert_eq!(
        execs(&pool, "sb-warm").await,
        vec![(
            "w1".into(),
            strings(&["python3", "-c", "import sys; sys.exit(3)"]),
            Some(at(32)),
            Some(at(32)),
            Some(3),
            Some(0),
            Some(false),
            Some(250.0)
        )]
    );
    let disk_full: Vec<(String, bool)> =
        sqlx::query_as("SELECT exec_id, disk_full FROM sandbox_execs ORDER BY exec_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        disk_full,
        [("e1", false), ("e2", false), ("w1", true)].map(|(id, full)| (id.to_string(), full))
    );
    let checkpoints: Vec<CheckpointRow> = sqlx::query_as(
        "SELECT checkpoint_id, sandbox_id, tenant, object_key, size_bytes, sha256, at
             FROM sandbox_checkpoints",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        checkpoints,
        vec![(
            "cp-1".into(),
            "sb-cold".into(),
            "acme".into(),
            "runtime/checkpoints/acme/cp-1.tar.gz".into(),
            40_960,
            "ab".repeat(32),
            at(11)
        )]
    );
    let decisions: Vec<(String, String, String, bool, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT sandbox_id, tenant, destination, allowed, rule, at FROM sandbox_egress
         ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        decisions,
        vec![
            (
                "sb-cold".into(),
                "acme".into(),
                "api.example.com:443".into(),
                true,
                "api.example.com:443".into(),
                at(5)
            ),
            (
                "sb-cold".into(),
                "acme".into(),
                "evil.example.net:80".into(),
                false,
                "".into(),
                at(6)
            ),
            (
                "sb-warm".into(),
                "".into(),
                "pypi.org:443".into(),
                false,
                "".into(),
                at(25)
            ),
            (
                "sb-warm".into(),
                "acme".into(),
                "pypi.org:443".into(),
                true,
                "pypi.org:443".into(),
                at(31)
            ),
        ]
    );

    // ---- the gauges: the read model counts what the fold counts ----
    let expected = counts(
        &[
            ("expired", 1),
            ("failed", 1),
            ("provisioning", 1),
            ("ready", 2),
            ("terminated", 1),
        ],
        &[("bwrap", 1), ("runsc", 1)],
        &[("bwrap", 1), ("runsc", 0)],
    );
    assert_eq!(SandboxCounts::of(rt.sandboxes.values()), expected);
    assert_eq!(runtime::count_by_state(&pool).await.unwrap(), expected);

    // ---- queries, and tenant isolation ----
    let list = |tenant: &'static str,
                states: &'static [State],
                metadata: &'static [(&'static str, &'static str)],
                limit: u32| {
        let pool = pool.clone();
        async move {
            runtime::list_sandboxes(&pool, tenant, states, &map(metadata), limit)
                .await
                .unwrap()
        }
    };
    // Newest first (a claimed sandbox was created when it was claimed); the pool is nobody's.
    assert_eq!(
        ids(&list("acme", &[], &[], 0).await),
        vec!["sb-fail", "sb-warm", "sb-cold"]
    );
    assert_eq!(
        ids(&list("acme", &[State::Ready], &[], 0).await),
        vec!["sb-warm"]
    );
    assert_eq!(
        ids(&list("acme", &[State::Terminated, State::Failed], &[], 0).await),
        vec!["sb-fail", "sb-cold"]
    );
    assert_eq!(
        ids(&list("acme", &[State::Unspecified], &[("team", "ml")], 0).await),
        vec!["sb-warm", "sb-cold"]
    );
    assert_eq!(
        ids(&list("acme", &[], &[("team", "ml"), ("run", "r1")], 0).await),
        vec!["sb-cold"]
    );
    assert!(list("acme", &[], &[("team", "nobody")], 0).await.is_empty());
    assert_eq!(
        ids(&list("acme", &[], &[], 2).await),
        vec!["sb-fail", "sb-warm"]
    );
    assert_eq!(
        ids(&list("globex", &[], &[("team", "ml")], 0).await),
        vec!["sb-exp"]
    );
    assert_eq!(
        ids(&list("globex", &[], &[], 0).await),
        vec!["sb-prov", "sb-exp"]
    );
    // Tenant B sees nothing of A's, and nobody sees the pool.
    assert!(runtime::get_sandbox(&pool, "globex", "sb-cold")
        .await
        .unwrap()
        .is_none());
    assert!(runtime::get_sandbox(&pool, "acme", "sb-exp")
        .await
        .unwrap()
        .is_none());
    assert!(runtime::get_sandbox(&pool, "", "sb-pool")
        .await
        .unwrap()
        .is_none());
    assert!(list("", &[], &[], 0).await.is_empty());
    assert!(list("initech", &[], &[], 0).await.is_empty());

    // ---- the malformed events were parked with their reason ----
    let parked = |letters: Vec<StoredEvent>| {
        let mut parked: Vec<(u64, String, String)> = letters
            .into_iter()
            .map(|e| DeadLetter::parse(e).unwrap())
            .map(|l| {
                (
                    l.original_sequence,
                    l.reason,
                    catalog.strip(&l.original_subject).to_string(),
                )
            })
            .collect();
        parked.sort();
        parked
    };
    let letters = vec![
        (
            bad_sequence,
            "invalid_protobuf".to_string(),
            "runtime.sandboxes.sb-bad".to_string(),
        ),
        (
            ghost_sequence,
            "no_sandbox".into(),
            "runtime.sandboxes.sb-ghost".into(),
        ),
        (
            unknown_sequence,
            "unknown_subject".into(),
            "runtime.pool.base".into(),
        ),
        (
            mismatch_sequence,
            "subject_mismatch".into(),
            "runtime.egress.sb-cold".into(),
        ),
    ];
    assert_eq!(parked(stream_events(&env, DEADLETTERS).await), letters);
    assert!(runtime::get_sandbox(&pool, "acme", "sb-ghost")
        .await
        .unwrap()
        .is_none());
    stop.send(true).unwrap();
    task.await.unwrap();

    // ---- the same events again change nothing: Execs are not counted twice ----
    let before = checksums(&pool, TABLES, "runtime").await;
    let before_rows = rows(&pool).await;
    let events = stream_events(&env, RUNTIME).await;
    assert_eq!(events.len() as u64, last);
    let valid = events.len() as u64 - 4;
    let report = projector.apply(&events).await.unwrap();
    assert_eq!((report.applied, report.checkpoint), (0, last));
    assert_eq!(checksums(&pool, TABLES, "runtime").await, before);
    // Past the checkpoint too: every row knows the events it holds.
    let report = projector.reapply(&events).await.unwrap();
    assert_eq!(
        (report.applied, report.duplicates, report.dead_lettered),
        (0, valid, 4)
    );
    assert_eq!(checksums(&pool, TABLES, "runtime").await, before);
    for chunk in events.chunks(5).rev() {
        let report = projector.reapply(chunk).await.unwrap();
        assert_eq!(report.applied, 0);
    }
    assert_eq!(checksums(&pool, TABLES, "runtime").await, before);
    // The consumer delivers everything again (a checkpoint lost): the live runner goes
    // through the whole stream once more and nothing changes, nothing is parked twice.
    sqlx::query("UPDATE projection_checkpoints SET last_sequence = 0 WHERE projector = 'runtime'")
        .execute(&pool)
        .await
        .unwrap();
    let (stop, task) = run_projector(&env, projector.clone());
    wait_checkpoint(&*projector, last).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(checksums(&pool, TABLES, "runtime").await, before);
    let (execs_total, execs_rows): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT sum(execs)::int8 FROM sandboxes), (SELECT count(*) FROM sandbox_execs)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((execs_total, execs_rows), (3, 3));
    assert_eq!(parked(stream_events(&env, DEADLETTERS).await), letters);

    // ---- a rebuild from the stream gives the same tables, row for row ----
    sqlx::query("UPDATE sandboxes SET state = 'garbage', execs = execs + 10")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM sandbox_execs WHERE sandbox_id = 'sb-cold'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM sandbox_egress WHERE allowed")
        .execute(&pool)
        .await
        .unwrap();
    assert_ne!(checksums(&pool, TABLES, "runtime").await, before);
    let rebuilt = runtime::rebuild(&pool, log.clone(), catalog.clone())
        .await
        .unwrap();
    assert_eq!(rebuilt, last);
    let after_rows = rows(&pool).await;
    for ((table, a), (_, b)) in before_rows.iter().zip(&after_rows) {
        assert_eq!(a.len(), b.len(), "{table}: row count after the rebuild");
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "{table}: a row differs after the rebuild");
        }
    }
    assert_eq!(checksums(&pool, TABLES, "runtime").await, before);
    assert_eq!(runtime::count_by_state(&pool).await.unwrap(), expected);
    // Nothing parked twice.
    assert_eq!(stream_events(&env, DEADLETTERS).await.len(), 4);

    // ---- the live projector goes on from the rebuilt checkpoint ----
    let (stop, task) = run_projector(&env, projector.clone());
    rt.emit(
        "sb-warm",
        at(200),
        vec![
            exec_started("w2", &["true"]),
            exec_finished("w2", Some(0), 0, 3),
            Event::Terminated(pb::Terminated { by: "bot-2".into() }),
        ],
    )
    .await;
    rt.emit("sb-prov", at(201), vec![ready()]).await;
    wait_checkpoint(&*projector, rt.last).await;
    let got = runtime::get_sandbox(&pool, "acme", "sb-warm")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, rt.agg("sb-warm").view);
    assert_eq!((got.state(), got.execs), (State::Terminated, 2));
    let got = runtime::get_sandbox(&pool, "globex", "sb-prov")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, rt.agg("sb-prov").view);
    // A cold sandbox's lifetime counts from Ready.
    assert_eq!(
        got.expires_at,
        ts(at(201) + Ch::seconds(60)),
        "expiry of sb-prov"
    );
    let now = SandboxCounts::of(rt.sandboxes.values());
    assert_eq!(
        now,
        counts(
            &[
                ("expired", 1),
                ("failed", 1),
                ("ready", 2),
                ("terminated", 2),
            ],
            &[("bwrap", 0), ("runsc", 1)],
            &[("bwrap", 1), ("runsc", 0)],
        )
    );
    assert_eq!(runtime::count_by_state(&pool).await.unwrap(), now);
    stop.send(true).unwrap();
    task.await.unwrap();
    env.drop().await;
}
