//! The oversight read model on PostgreSQL: events appended to the OVERSIGHT stream as the
//! gateway appends them (each request event guarded by the request's last sequence, produced
//! by the domain's commands) are projected by the runner into requests, audit rows, policies
//! and notification outcomes; malformed events are dead-lettered without stopping it; the
//! same events applied again change nothing; and a rebuild from the stream gives the same
//! tables, byte for byte.
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Duration as Ch, DurationRound, Utc};
use creto_domain::oversight::request::{self, Aggregate};
use creto_projections::oversight::{self, OversightProjector};
use creto_projections::Projector;
use creto_replay_tests::{
    checksums, rebuild_whole, run_projector, stream_events, wait_checkpoint, Env,
};
use creto_schemas::oversight::v1::{
    request_event, Action, ApprovalRequest, Channel, ChannelList, CreateRequestRequest, Decision,
    Level, NotificationDelivered, Policy, PolicyDefined, Priority, RequestEvent, State,
    TimeoutAction,
};
use creto_streams::deadletter::DeadLetter;
use creto_streams::headers::{content_types, names};
use creto_streams::{AppendEvent, Headers, DEADLETTERS, OVERSIGHT};
use prost::Message;

const TABLES: &[(&str, &str)] = &[
    ("oversight_requests", "tenant, request_id"),
    ("oversight_audit", "tenant, request_id, sequence"),
    ("oversight_policies", "tenant, policy_id"),
    ("oversight_notifications", "tenant, request_id, sequence"),
];

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

fn level(approvers: &[&str], secs: i64) -> Level {
    Level {
        approvers: approvers.iter().map(|s| s.to_string()).collect(),
        timeout: Some(prost_types::Duration {
            seconds: secs,
            nanos: 0,
        }),
    }
}

fn policy(
    id: &str,
    precedence: i32,
    action: &str,
    quorum: u32,
    levels: Vec<Level>,
    on_timeout: TimeoutAction,
) -> Policy {
    Policy {
        policy_id: id.into(),
        precedence,
        action: action.into(),
        require_approval: true,
        quorum,
        levels,
        on_timeout: on_timeout as i32,
        ..Default::default()
    }
}

fn event_type(e: &RequestEvent) -> &'static str {
    match e.event {
        Some(request_event::Event::Requested(_)) => "oversight.requested",
        Some(request_event::Event::Responded(_)) => "oversight.responded",
        Some(request_event::Event::TimedOut(_)) => "oversight.timed_out",
        Some(request_event::Event::Escalated(_)) => "oversight.escalated",
        Some(request_event::Event::Cancelled(_)) => "oversight.cancelled",
        None => "oversight.unknown",
    }
}

/// What the gateway does around the domain: keeps each request's aggregate and last
/// sequence, and appends the events the commands return with that expected sequence.
struct Gateway<'a> {
    env: &'a Env,
    policies: HashMap<String, Vec<Policy>>,
    requests: HashMap<(String, String), (Aggregate, u64)>,
    ids: u64,
    last: u64,
}

impl<'a> Gateway<'a> {
    fn new(env: &'a Env) -> Self {
        Gateway {
            env,
            policies: HashMap::new(),
            requests: HashMap::new(),
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
                id: format!("gw-{}", self.ids),
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

    async fn put_policy(&mut self, tenant: &str, p: Policy, at: DateTime<Utc>) {
        let logical = format!("oversight.policies.{tenant}.{}", p.policy_id);
        let log = &self.env.platform.log;
        let stream = self.env.platform.catalog.stream(OVERSIGHT);
        let expected = log
            .last_subject_sequence(&stream, &self.env.subject(&logical))
            .await
            .unwrap();
        let defined = PolicyDefined {
            policy: Some(p.clone()),
            at: ts(at),
            removed: false,
        };
        self.append(
            &logical,
            "oversight.policy_defined",
            defined.encode_to_vec(),
            Some(expected),
        )
        .await;
        let list = self.policies.entry(tenant.to_string()).or_default();
        list.retain(|q| q.policy_id != p.policy_id);
        list.push(p);
    }

    /// DeletePolicy's event: `p`'s last definition, marked removed.
    async fn remove_policy(&mut self, tenant: &str, p: Policy, at: DateTime<Utc>) {
        let logical = format!("oversight.policies.{tenant}.{}", p.policy_id);
        let expected = self
            .env
            .platform
            .log
            .last_subject_sequence(
                &self.env.platform.catalog.stream(OVERSIGHT),
                &self.env.subject(&logical),
            )
            .await
            .unwrap();
        let removed = PolicyDefined {
            policy: Some(p.clone()),
            at: ts(at),
            removed: true,
        };
        self.append(
            &logical,
            "oversight.policy_removed",
            removed.encode_to_vec(),
            Some(expected),
        )
        .await;
        if let Some(list) = self.policies.get_mut(tenant) {
            list.retain(|q| q.policy_id != p.policy_id);
        }
    }

    /// Appends `events` to the request's subject, each guarded by the last sequence, and
    /// folds them into the gateway's aggregate.
    async fn emit(&mut self, tenant: &str, request_id: &str, events: Vec<RequestEvent>) {
        let key = (tenant.to_string(), request_id.to_string());
        for e in events {
            let last = self.requests.get(&key).map_or(0, |(_, last)| *last);
            let sequence = self
                .append(
                    &format!("oversight.requests.{tenant}.{request_id}"),
                    event_type(&e),
                    e.encode_to_vec(),
                    Some(last),
                )
                .await;
            let (agg, last) = self.requests.entry(key.clone()).or_default();
            agg.apply(&e, sequence);
            *last = sequence;
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create(
        &mut self,
        tenant: &str,
        request_id: &str,
        agent: &str,
        action: &str,
        parameters: &str,
        priority: Priority,
        now: DateTime<Utc>,
    ) {
        let cmd = CreateRequestRequest {
            request_id: request_id.into(),
            agent_id: agent.into(),
            action: Some(Action {
                name: action.into(),
                parameters_json: parameters.into(),
            }),
            context: format!("{agent} wants to {action}"),
            priority: priority as i32,
        };
        let policies = self.policies.get(tenant).cloned().unwrap_or_default();
        let e = request::create(&cmd, &policies, now).unwrap();
        self.emit(tenant, request_id, vec![e]).await;
    }

    fn agg(&self, tenant: &str, request_id: &str) -> &Aggregate {
        &self.requests[&(tenant.to_string(), request_id.to_string())].0
    }

    #[allow(clippy::too_many_arguments)]
    async fn respond(
        &mut self,
        tenant: &str,
        request_id: &str,
        approver: &str,
        decision: Decision,
        reason: &str,
        channel: Channel,
        now: DateTime<Utc>,
    ) {
        let e = request::respond(
            self.agg(tenant, request_id),
            approver,
            decision,
            reason,
            channel as i32,
            now,
        )
        .unwrap();
        assert_eq!(e.len(), 1);
        self.emit(tenant, request_id, e).await;
    }

    async fn deadline(&mut self, tenant: &str, request_id: &str, now: DateTime<Utc>) {
        let e = request::on_deadline(self.agg(tenant, request_id), now);
        assert_eq!(e.len(), 1, "the deadline of {request_id} has passed");
        self.emit(tenant, request_id, e).await;
    }

    async fn cancel(
        &mut self,
        tenant: &str,
        request_id: &str,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) {
        let e = request::cancel(self.agg(tenant, request_id), by, reason, now).unwrap();
        self.emit(tenant, request_id, e).await;
    }

    async fn notified(&mut self, tenant: &str, request_id: &str, n: NotificationDelivered) {
        self.append(
            &format!("oversight.notifications.{tenant}.{request_id}"),
            "oversight.notification_delivered",
            n.encode_to_vec(),
            None,
        )
        .await;
    }
}

type NotificationRow = (String, Option<String>, i32, bool, i32, String, f64);

type AuditRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    i32,
    Option<String>,
    Option<String>,
    String,
);

async fn audit(pool: &sqlx::PgPool, tenant: &str, request_id: &str) -> Vec<AuditRow> {
    sqlx::query_as(
        "SELECT event_type, actor, decision, channel, level, reason, from_state, to_state
         FROM oversight_audit WHERE tenant = $1 AND request_id = $2 ORDER BY sequence",
    )
    .bind(tenant)
    .bind(request_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[allow(clippy::too_many_arguments)]
fn row(
    event_type: &str,
    actor: &str,
    decision: Option<&str>,
    channel: Option<&str>,
    level: i32,
    reason: Option<&str>,
    from: Option<&str>,
    to: &str,
) -> AuditRow {
    (
        event_type.into(),
        actor.into(),
        decision.map(Into::into),
        channel.map(Into::into),
        level,
        reason.map(Into::into),
        from.map(Into::into),
        to.into(),
    )
}

fn ids(requests: &[ApprovalRequest]) -> Vec<&str> {
    requests.iter().map(|r| r.request_id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversight_read_model_is_projected_idempotent_and_rebuilt_identically() {
    let env = Env::new().await;
    let pool = env.pool().clone();
    let log = env.platform.log.clone();
    let catalog = env.platform.catalog.clone();
    let projector = Arc::new(OversightProjector::new(
        pool.clone(),
        log.clone(),
        catalog.clone(),
    ));
    // The projector runs while the gateway appends, as live.
    let (stop, task) = run_projector(&env, projector.clone());

    let t0 = Utc::now().duration_trunc(Ch::seconds(1)).unwrap() - Ch::hours(2);
    let at = |s: i64| t0 + Ch::seconds(s) + Ch::microseconds(123_456);
    let mut gw = Gateway::new(&env);

    // ---- policies ----
    let mut refunds = policy(
        "refunds",
        10,
        "payments.*",
        2,
        vec![level(&["ann", "bob", "cy"], 600)],
        TimeoutAction::Deny,
    );
    // Several entries: a map, whose encoding must not depend on its iteration order.
    refunds.channels = [
        (
            Priority::Normal as i32,
            ChannelList {
                channels: vec![Channel::Webhook as i32],
            },
        ),
        (
            Priority::High as i32,
            ChannelList {
                channels: vec![Channel::Slack as i32, Channel::Email as i32],
            },
        ),
        (
            Priority::Critical as i32,
            ChannelList {
                channels: vec![
                    Channel::Slack as i32,
                    Channel::Email as i32,
                    Channel::Webhook as i32,
                ],
            },
        ),
    ]
    .into_iter()
    .collect();
    gw.put_policy("acme", refunds.clone(), at(0)).await;
    let deploys = policy(
        "deploys",
        5,
        "deploy.prod",
        1,
        vec![level(&["ops1"], 300)],
        TimeoutAction::Deny,
    );
    gw.put_policy("acme", deploys.clone(), at(1)).await;
    let exports = policy(
        "exports",
        5,
        "data.export",
        1,
        vec![level(&["dpo"], 120)],
        TimeoutAction::Approve,
    );
    gw.put_policy("acme", exports.clone(), at(2)).await;
    let infra = policy(
        "infra",
        3,
        "infra.*",
        1,
        vec![level(&["l1"], 60), level(&["l2"], 120), level(&["l3"], 300)],
        TimeoutAction::Escalate,
    );
    gw.put_policy("acme", infra.clone(), at(3)).await;
    let search = Policy {
        policy_id: "search".into(),
        action: "search.*".into(),
        require_approval: false,
        ..Default::default()
    };
    gw.put_policy("acme", search.clone(), at(4)).await;
    let globex = policy(
        "globex-pay",
        1,
        "payments.*",
        1,
        vec![level(&["gina"], 600)],
        TimeoutAction::Deny,
    );
    gw.put_policy("globex", globex.clone(), at(5)).await;
    // Defined, then removed: its row stays (removed), and it is listed nowhere.
    let retired = Policy {
        policy_id: "retired".into(),
        action: "retired.*".into(),
        ..search.clone()
    };
    gw.put_policy("acme", retired.clone(), at(5)).await;
    gw.remove_policy("acme", retired, at(5)).await;

    // ---- requests ----
    // Quorum 2 of 3: two approvals.
    gw.create(
        "acme",
        "r-quorum",
        "bot-1",
        "payments.refund",
        r#"{"amount": 10, "order": "42"}"#,
        Priority::High,
        at(10),
    )
    .await;
    gw.respond(
        "acme",
        "r-quorum",
        "ann",
        Decision::Approve,
        "looks right",
        Channel::Slack,
        at(20),
    )
    .await;
    gw.notified(
        "acme",
        "r-quorum",
        NotificationDelivered {
            request_id: "r-quorum".into(),
            channel: Channel::Slack as i32,
            level: 0,
            ok: true,
            attempts: 1,
            detail: String::new(),
            duration_seconds: 0.25,
        },
    )
    .await;
    gw.notified(
        "acme",
        "r-quorum",
        NotificationDelivered {
            request_id: "r-quorum".into(),
            channel: Channel::Email as i32,
            level: 0,
            ok: false,
            attempts: 3,
            detail: "451 try again later".into(),
            duration_seconds: 7.5,
        },
    )
    .await;
    gw.respond(
        "acme",
        "r-quorum",
        "bob",
        Decision::Approve,
        "ok",
        Channel::Email,
        at(30),
    )
    .await;
    // Decided: a third approver is refused by the domain, nothing is appended.
    assert!(request::respond(
        gw.agg("acme", "r-quorum"),
        "cy",
        Decision::Deny,
        "",
        0,
        at(31)
    )
    .is_err());

    // One deny denies.
    gw.create(
        "acme",
        "r-deny",
        "bot-2",
        "payments.transfer",
        r#"{"to": "IBAN"}"#,
        Priority::Critical,
        at(40),
    )
    .await;
    // A malformed event and one for a request never created, in the middle of the stream.
    gw.append(
        "oversight.requests.acme.bad",
        "oversight.requested",
        b"not protobuf".to_vec(),
        None,
    )
    .await;
    let bad_sequence = gw.last;
    let ghost = request::respond(
        &Aggregate {
            view: ApprovalRequest {
                request_id: "ghost".into(),
                state: State::Pending as i32,
                ..Default::default()
            },
            policy: Policy::default(),
        },
        "ann",
        Decision::Approve,
        "",
        0,
        at(41),
    )
    .unwrap();
    gw.append(
        "oversight.requests.acme.ghost",
        "oversight.responded",
        ghost[0].encode_to_vec(),
        Some(0),
    )
    .await;
    let ghost_sequence = gw.last;
    gw.respond(
        "acme",
        "r-deny",
        "ann",
        Decision::Deny,
        "suspicious payee",
        Channel::Webhook,
        at(50),
    )
    .await;

    // Timeouts: deny, approve.
    gw.create(
        "acme",
        "r-timeout-deny",
        "bot-1",
        "deploy.prod",
        "",
        Priority::Unspecified,
        at(60),
    )
    .await;
    gw.deadline("acme", "r-timeout-deny", at(60 + 301)).await;
    gw.create(
        "acme",
        "r-timeout-approve",
        "bot-3",
        "data.export",
        r#"{"table": "users"}"#,
        Priority::Low,
        at(70),
    )
    .await;
    gw.deadline("acme", "r-timeout-approve", at(70 + 121)).await;

    // Escalation through levels 1 and 2, then the last level times out: deny.
    gw.create(
        "acme",
        "r-escalate",
        "bot-2",
        "infra.scale",
        r#"{"replicas": 40}"#,
        Priority::High,
        at(80),
    )
    .await;
    gw.deadline("acme", "r-escalate", at(80 + 61)).await;
    gw.deadline("acme", "r-escalate", at(80 + 200)).await;
    gw.deadline("acme", "r-escalate", at(80 + 600)).await;

    // Cancelled after one of two approvals.
    gw.create(
        "acme",
        "r-cancel",
        "bot-1",
        "payments.refund",
        r#"{"amount": 5}"#,
        Priority::Normal,
        at(90),
    )
    .await;
    gw.respond(
        "acme",
        "r-cancel",
        "cy",
        Decision::Approve,
        "",
        Channel::Slack,
        at(95),
    )
    .await;
    gw.cancel("acme", "r-cancel", "bot-1", "refunded by hand", at(100))
        .await;

    // Auto-approved: by an allow-list policy, and with no policy at all.
    gw.create(
        "acme",
        "r-auto",
        "bot-3",
        "search.web",
        r#"{"q": "weather"}"#,
        Priority::Low,
        at(110),
    )
    .await;
    gw.create(
        "acme",
        "r-nopolicy",
        "bot-3",
        "weather.lookup",
        "",
        Priority::Low,
        at(120),
    )
    .await;

    // Still pending.
    gw.create(
        "acme",
        "r-pend-low",
        "bot-1",
        "payments.refund",
        "{}",
        Priority::Low,
        at(130),
    )
    .await;
    gw.create(
        "acme",
        "r-pend-crit",
        "bot-2",
        "payments.refund",
        r#"{"amount": 9000}"#,
        Priority::Critical,
        at(140),
    )
    .await;
    gw.respond(
        "acme",
        "r-pend-crit",
        "cy",
        Decision::Approve,
        "fine by me",
        Channel::Email,
        at(145),
    )
    .await;
    gw.create(
        "acme",
        "r-pend-high",
        "bot-1",
        "infra.restart",
        "{}",
        Priority::High,
        at(150),
    )
    .await;
    gw.create(
        "globex",
        "g-1",
        "bot-1",
        "payments.refund",
        "{}",
        Priority::Normal,
        at(160),
    )
    .await;

    // A policy redefined: the row follows; requests keep the policy they came with.
    let mut refunds_v2 = refunds.clone();
    refunds_v2.precedence = 20;
    refunds_v2.levels = vec![level(&["ann", "bob", "cy", "dee"], 900)];
    gw.put_policy("acme", refunds_v2.clone(), at(170)).await;

    let last = gw.last;
    wait_checkpoint(&*projector, last).await;

    // ---- requests: the row is the gateway's own fold, field for field ----
    for (tenant, request_id) in gw.requests.keys() {
        let got = oversight::get_request(&pool, tenant, request_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{request_id} projected"));
        assert_eq!(&got, &gw.agg(tenant, request_id).view, "{request_id}");
    }
    assert_eq!(gw.requests.len(), 12);
    assert!(oversight::get_request(&pool, "acme", "ghost")
        .await
        .unwrap()
        .is_none());
    assert!(oversight::get_request(&pool, "globex", "r-quorum")
        .await
        .unwrap()
        .is_none());

    type Summary = (
        String,
        Option<String>,
        i32,
        Vec<String>,
        i32,
        String,
        String,
        Option<String>,
        Option<String>,
        bool,
        i64,
    );
    let summary = |id: &'static str| {
        let pool = pool.clone();
        async move {
            let s: Summary = sqlx::query_as(
                "SELECT state, resolution, level, approvers, quorum, priority, policy_id,
                        cancelled_by, cancel_reason, decided_at IS NOT NULL, version
                 FROM oversight_requests WHERE tenant = 'acme' AND request_id = $1",
            )
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
            s
        }
    };
    let v = |id: &str| gw.requests[&("acme".to_string(), id.to_string())].1 as i64;
    let strings = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let abc = strings(&["ann", "bob", "cy"]);
    let none = || None::<String>;
    assert_eq!(
        summary("r-quorum").await,
        (
            "approved".into(),
            none(),
            0,
            abc.clone(),
            2,
            "high".into(),
            "refunds".into(),
            none(),
            none(),
            true,
            v("r-quorum")
        )
    );
    assert_eq!(summary("r-deny").await.0, "denied");
    assert_eq!(summary("r-deny").await.5, "critical");
    let td = summary("r-timeout-deny").await;
    assert_eq!(
        (td.0.as_str(), td.1.as_deref(), td.5.as_str(), td.6.as_str()),
        ("timed_out", Some("deny"), "normal", "deploys")
    );
    let ta = summary("r-timeout-approve").await;
    assert_eq!(
        (ta.0.as_str(), ta.1.as_deref(), ta.5.as_str()),
        ("timed_out", Some("approve"), "low")
    );
    let esc = summary("r-escalate").await;
    assert_eq!(
        (
            esc.0.as_str(),
            esc.1.as_deref(),
            esc.2,
            esc.3.clone(),
            esc.9
        ),
        ("timed_out", Some("deny"), 2, strings(&["l3"]), true)
    );
    let c = summary("r-cancel").await;
    assert_eq!(
        (c.0.as_str(), c.7.as_deref(), c.8.as_deref(), c.9),
        ("cancelled", Some("bot-1"), Some("refunded by hand"), true)
    );
    let auto = summary("r-auto").await;
    assert_eq!(
        (auto.0.as_str(), auto.6.as_str(), auto.9, auto.4),
        ("approved", "search", true, 0)
    );
    let nopolicy = summary("r-nopolicy").await;
    assert_eq!(
        (nopolicy.0.as_str(), nopolicy.6.as_str(), nopolicy.3.len()),
        ("approved", "", 0)
    );
    let pending = summary("r-pend-crit").await;
    assert_eq!((pending.0.as_str(), pending.9), ("pending", false));
    let (amount, created, deadline): (i64, DateTime<Utc>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT (parameters->>'amount')::int8, created_at, deadline FROM oversight_requests
             WHERE tenant = 'acme' AND request_id = 'r-pend-crit'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(amount, 9000);
    assert_eq!(created, at(140));
    assert_eq!(deadline, Some(at(140 + 600)));
    // The request keeps the policy it came with (one level of three approvers), not v2.
    let stored_policy: Vec<u8> = sqlx::query_scalar(
        "SELECT policy FROM oversight_requests WHERE tenant = 'acme' AND request_id = 'r-quorum'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(Policy::decode(stored_policy.as_slice()).unwrap(), refunds);

    // ---- the audit: who decided what, when, through which channel, and why ----
    assert_eq!(
        audit(&pool, "acme", "r-quorum").await,
        vec![
            row("requested", "bot-1", None, None, 0, None, None, "pending"),
            row(
                "responded",
                "ann",
                Some("approve"),
                Some("slack"),
                0,
                Some("looks right"),
                Some("pending"),
                "pending"
            ),
            row(
                "responded",
                "bob",
                Some("approve"),
                Some("email"),
                0,
                Some("ok"),
                Some("pending"),
                "approved"
            ),
        ]
    );
    assert_eq!(
        audit(&pool, "acme", "r-deny").await[1],
        row(
            "responded",
            "ann",
            Some("deny"),
            Some("webhook"),
            0,
            Some("suspicious payee"),
            Some("pending"),
            "denied"
        )
    );
    assert_eq!(
        audit(&pool, "acme", "r-timeout-deny").await[1],
        row(
            "timed_out",
            "timer",
            Some("deny"),
            None,
            0,
            None,
            Some("pending"),
            "timed_out"
        )
    );
    assert_eq!(
        audit(&pool, "acme", "r-timeout-approve").await[1],
        row(
            "timed_out",
            "timer",
            Some("approve"),
            None,
            0,
            None,
            Some("pending"),
            "timed_out"
        )
    );
    assert_eq!(
        audit(&pool, "acme", "r-escalate").await,
        vec![
            row("requested", "bot-2", None, None, 0, None, None, "pending"),
            row(
                "escalated",
                "timer",
                None,
                None,
                1,
                None,
                Some("pending"),
                "escalated"
            ),
            row(
                "escalated",
                "timer",
                None,
                None,
                2,
                None,
                Some("pending"),
                "escalated"
            ),
            row(
                "timed_out",
                "timer",
                Some("deny"),
                None,
                2,
                None,
                Some("pending"),
                "timed_out"
            ),
        ]
    );
    assert_eq!(
        audit(&pool, "acme", "r-cancel").await,
        vec![
            row("requested", "bot-1", None, None, 0, None, None, "pending"),
            row(
                "responded",
                "cy",
                Some("approve"),
                Some("slack"),
                0,
                None,
                Some("pending"),
                "pending"
            ),
            row(
                "cancelled",
                "bot-1",
                None,
                None,
                0,
                Some("refunded by hand"),
                Some("pending"),
                "cancelled"
            ),
        ]
    );
    assert_eq!(
        audit(&pool, "acme", "r-auto").await,
        vec![row(
            "requested",
            "bot-3",
            Some("approve"),
            None,
            0,
            None,
            None,
            "approved"
        )]
    );
    let (audit_rows, audit_at): (i64, DateTime<Utc>) = sqlx::query_as(
        "SELECT count(*), max(at) FILTER (WHERE request_id = 'r-escalate')
         FROM oversight_audit",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    // 12 requested, 5 responded, 3 timed out, 2 escalated, 1 cancelled.
    assert_eq!(audit_rows, 23);
    assert_eq!(audit_at, at(80 + 600));
    let (audit_ghosts,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM oversight_audit WHERE request_id IN ('bad', 'ghost')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(audit_ghosts, 0);

    // ---- notifications ----
    let notifications: Vec<NotificationRow> = sqlx::query_as(
        "SELECT request_id, channel, level, ok, attempts, detail, duration_seconds
             FROM oversight_notifications WHERE tenant = 'acme' ORDER BY sequence",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        notifications,
        vec![
            (
                "r-quorum".into(),
                Some("slack".into()),
                0,
                true,
                1,
                String::new(),
                0.25
            ),
            (
                "r-quorum".into(),
                Some("email".into()),
                0,
                false,
                3,
                "451 try again later".into(),
                7.5
            ),
        ]
    );

    // ---- queries ----
    let list = |state: Option<State>,
                priority: Option<Priority>,
                agent: Option<&'static str>,
                limit: u32| {
        let pool = pool.clone();
        async move {
            oversight::list_requests(&pool, "acme", state, priority, agent, limit)
                .await
                .unwrap()
        }
    };
    // The approvers' queue: by priority, then oldest first.
    assert_eq!(
        ids(&list(Some(State::Pending), None, None, 0).await),
        vec!["r-pend-crit", "r-pend-high", "r-pend-low"]
    );
    // Otherwise newest first.
    assert_eq!(
        ids(&list(Some(State::Approved), None, None, 0).await),
        vec!["r-nopolicy", "r-auto", "r-quorum"]
    );
    assert_eq!(
        ids(&list(None, None, Some("bot-3"), 0).await),
        vec!["r-nopolicy", "r-auto", "r-timeout-approve"]
    );
    assert_eq!(
        ids(&list(None, Some(Priority::Critical), None, 0).await),
        vec!["r-pend-crit", "r-deny"]
    );
    assert_eq!(
        ids(&list(Some(State::TimedOut), None, Some("bot-2"), 0).await),
        vec!["r-escalate"]
    );
    assert_eq!(list(None, None, None, 0).await.len(), 11);
    assert_eq!(
        ids(&list(
            Some(State::Unspecified),
            Some(Priority::Unspecified),
            None,
            2
        )
        .await),
        vec!["r-pend-high", "r-pend-crit"]
    );
    assert!(list(Some(State::Escalated), None, None, 0).await.is_empty());
    assert_eq!(
        ids(
            &oversight::list_requests(&pool, "globex", None, None, None, 0)
                .await
                .unwrap()
        ),
        vec!["g-1"]
    );
    assert_eq!(
        oversight::list_policies(&pool, "acme").await.unwrap(),
        vec![refunds_v2.clone(), deploys, exports, infra, search]
    );
    assert_eq!(
        oversight::list_policies(&pool, "globex").await.unwrap(),
        vec![globex]
    );
    let (precedence, version): (i32, i64) = sqlx::query_as(
        "SELECT precedence, version FROM oversight_policies
         WHERE tenant = 'acme' AND policy_id = 'refunds'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((precedence, version), (20, last as i64));

    // ---- the malformed events were parked with their reason; the projector went on ----
    let letters: Vec<DeadLetter> = stream_events(&env, DEADLETTERS)
        .await
        .into_iter()
        .map(|e| DeadLetter::parse(e).unwrap())
        .collect();
    let mut parked: Vec<(u64, String, String)> = letters
        .iter()
        .map(|l| {
            (
                l.original_sequence,
                l.reason.clone(),
                catalog.strip(&l.original_subject).to_string(),
            )
        })
        .collect();
    parked.sort();
    assert_eq!(
        parked,
        vec![
            (
                bad_sequence,
                "invalid_protobuf".into(),
                "oversight.requests.acme.bad".into()
            ),
            (
                ghost_sequence,
                "no_request".into(),
                "oversight.requests.acme.ghost".into()
            ),
        ]
    );
    stop.send(true).unwrap();
    task.await.unwrap();

    // ---- the same events again change nothing ----
    let before = checksums(&pool, TABLES, "oversight").await;
    let events = stream_events(&env, OVERSIGHT).await;
    assert_eq!(events.len() as u64, last);
    let valid = events.len() as u64 - 2;
    let report = projector.apply(&events).await.unwrap();
    assert_eq!((report.applied, report.checkpoint), (0, last));
    assert_eq!(checksums(&pool, TABLES, "oversight").await, before);
    // Past the checkpoint too: every row knows the events it holds.
    let report = projector.reapply(&events).await.unwrap();
    assert_eq!(
        (report.applied, report.duplicates, report.dead_lettered),
        (0, valid, 2)
    );
    assert_eq!(checksums(&pool, TABLES, "oversight").await, before);
    for chunk in events.chunks(5).rev() {
        let report = projector.reapply(chunk).await.unwrap();
        assert_eq!(report.applied, 0);
    }
    assert_eq!(checksums(&pool, TABLES, "oversight").await, before);

    // ---- a rebuild from the stream gives the same tables ----
    sqlx::query("UPDATE oversight_requests SET state = 'garbage'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM oversight_audit WHERE request_id = 'r-quorum'")
        .execute(&pool)
        .await
        .unwrap();
    assert_ne!(checksums(&pool, TABLES, "oversight").await, before);
    let rebuilt = oversight::rebuild(&pool, log.clone(), catalog.clone())
        .await
        .unwrap();
    assert_eq!(rebuilt, last);
    let after = checksums(&pool, TABLES, "oversight").await;
    for ((table, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a, b, "{table} differs after the rebuild");
    }
    // Nothing parked twice.
    assert_eq!(stream_events(&env, DEADLETTERS).await.len(), 2);

    // ---- the live projector goes on from the rebuilt checkpoint ----
    let (stop, task) = run_projector(&env, projector.clone());
    gw.respond(
        "acme",
        "r-pend-crit",
        "bob",
        Decision::Approve,
        "approved, large but expected",
        Channel::Slack,
        at(200),
    )
    .await;
    wait_checkpoint(&*projector, gw.last).await;
    let got = oversight::get_request(&pool, "acme", "r-pend-crit")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, gw.agg("acme", "r-pend-crit").view);
    assert_eq!(got.state, State::Approved as i32);
    assert_eq!(
        ids(&list(Some(State::Pending), None, None, 0).await),
        vec!["r-pend-high", "r-pend-low"]
    );
    stop.send(true).unwrap();
    task.await.unwrap();
    env.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_set_aside_live_and_in_a_rebuild() {
    let env = Env::new().await;
    let pool = env.pool().clone();
    // A rule of this database that the events do not know: one agent's requests are refused
    // (SQLSTATE 23514), as a value PostgreSQL cannot hold would be. Before, the projector
    // retried that batch for ever and no later event of any tenant was projected.
    sqlx::query(
        "ALTER TABLE oversight_requests
           ADD CONSTRAINT refuses_one_agent CHECK (agent_id <> 'bot-refused')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let projector = Arc::new(OversightProjector::new(
        pool.clone(),
        env.platform.log.clone(),
        env.platform.catalog.clone(),
    ));
    // Batches of 3: the refused request is in the middle of one, between requests applied.
    let (stop, task) = run_projector(&env, projector.clone());
    let mut gw = Gateway::new(&env);
    let t0 = Utc::now() - Ch::minutes(5);
    let deploys = policy(
        "deploys",
        5,
        "deploy.prod",
        1,
        vec![level(&["ops1"], 600)],
        TimeoutAction::Deny,
    );
    gw.put_policy("acme", deploys, t0).await;
    let mut refused = 0;
    for i in 0..7 {
        let agent = if i == 3 { "bot-refused" } else { "bot-ok" };
        let id = format!("r-{i}");
        let at = t0 + Ch::seconds(i);
        gw.create(
            "acme",
            &id,
            agent,
            "deploy.prod",
            "{}",
            Priority::Normal,
            at,
        )
        .await;
        if i == 3 {
            refused = gw.last;
        }
    }
    wait_checkpoint(&*projector, gw.last).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    let projected: Vec<String> =
        sqlx::query_scalar("SELECT request_id FROM oversight_requests ORDER BY request_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(projected, ["r-0", "r-1", "r-2", "r-4", "r-5", "r-6"]);
    let letters: Vec<DeadLetter> = stream_events(&env, DEADLETTERS)
        .await
        .into_iter()
        .map(|e| DeadLetter::parse(e).unwrap())
        .collect();
    assert_eq!(letters.len(), 1);
    assert_eq!(
        (letters[0].reason.as_str(), letters[0].original_sequence),
        ("projection_failed", refused)
    );
    assert!(
        letters[0].detail.contains("refuses_one_agent"),
        "{}",
        letters[0].detail
    );

    // A rebuild (one transaction) skips it too, in a savepoint, and gives the same tables.
    let before = checksums(&pool, TABLES, "oversight").await;
    assert_eq!(rebuild_whole(&env, OVERSIGHT).await, gw.last);
    assert_eq!(checksums(&pool, TABLES, "oversight").await, before);
    assert_eq!(
        stream_events(&env, DEADLETTERS).await.len(),
        1,
        "parked once"
    );

    // The operator fixes the cause. Re-driving oversight's letters is refused (a copy on the
    // request's subject would be folded as a new event by every gateway); asking for
    // metering's re-drives none of them; a rebuild applies the event at its own place.
    sqlx::query("ALTER TABLE oversight_requests DROP CONSTRAINT refuses_one_agent")
        .execute(&pool)
        .await
        .unwrap();
    let nats_url = creto_replay_tests::nats_url();
    let redrive = |product: &str| {
        let cli = <creto_gateways::cli::Cli as clap::Parser>::parse_from([
            "enablement",
            "--nats-url",
            &nats_url,
            "--namespace",
            &env.name,
            "deadletters",
            "redrive",
            "--stream",
            product,
            "--reason",
            "projection_failed",
        ]);
        creto_gateways::cli::run(cli)
    };
    redrive("metering").await.unwrap();
    let e = redrive("oversight").await.unwrap_err();
    assert!(
        e.to_string()
            .contains("enablement replay oversight --rebuild"),
        "{e}"
    );
    assert_eq!(stream_events(&env, OVERSIGHT).await.len() as u64, gw.last);
    assert_eq!(rebuild_whole(&env, OVERSIGHT).await, gw.last);
    let agent: String = sqlx::query_scalar(
        "SELECT agent_id FROM oversight_requests WHERE tenant = 'acme' AND request_id = 'r-3'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(agent, "bot-refused");
    env.drop().await;
}
