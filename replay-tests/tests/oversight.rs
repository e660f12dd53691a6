//! Oversight end to end on a running gateway, on both adapters: an agent asks, approvers
//! answer, the agent's watch ends with the decision; quorum, one deny, timeouts with each
//! default action, escalation through levels, cancellation, timers that fire after every
//! replica restarted, and bad input.
use std::time::{Duration, Instant};

use creto_replay_tests::faulty_log::FaultyLog;
use creto_replay_tests::Env;
use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::oversight_service_client::OversightServiceClient;
use creto_schemas::oversight::v1::{Decision, Priority, State, TimeoutAction};
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

type Client = OversightServiceClient<Channel>;

creto_replay_tests::on_both_adapters!(
    approval_reaches_the_watching_agent,
    one_deny_denies_and_answers_are_final,
    timeouts_take_the_default_action,
    escalation_walks_the_levels,
    cancellation_and_auto_approval,
    timers_fire_after_every_replica_restarted,
    bad_input_gets_clear_statuses,
    notifications_reach_the_webhook_signed_and_are_recorded,
    a_slow_receiver_does_not_hold_back_other_announcements,
    a_redelivered_announcement_skips_the_channels_already_recorded,
    a_request_has_a_bounded_number_of_watchers,
    every_escalation_is_announced,
    a_request_with_an_undecodable_event_still_takes_answers,
    a_policy_stored_through_one_replica_decides_the_next_request_on_another,
    a_deleted_policy_governs_nothing_more,
);

fn level(approvers: &[&str], timeout: Duration) -> pb::Level {
    pb::Level {
        approvers: approvers.iter().map(|s| s.to_string()).collect(),
        timeout: Some(timeout.try_into().unwrap()),
    }
}

fn policy(
    id: &str,
    action: &str,
    quorum: u32,
    levels: Vec<pb::Level>,
    on_timeout: TimeoutAction,
) -> pb::Policy {
    pb::Policy {
        policy_id: id.into(),
        action: action.into(),
        require_approval: true,
        quorum,
        levels,
        on_timeout: on_timeout as i32,
        ..Default::default()
    }
}

async fn client(url: &str) -> Client {
    OversightServiceClient::connect(url.to_string())
        .await
        .unwrap()
}

/// An oversight gateway with one policy in place, and a client of it.
async fn start_with_policy(
    env: &Env,
    p: pb::Policy,
) -> (creto_gateways::server::Running, String, Client) {
    let (running, url) = env.start_oversight().await;
    let mut c = client(&url).await;
    put(&mut c, p).await;
    (running, url, c)
}

async fn put(c: &mut Client, p: pb::Policy) {
    c.put_policy(pb::PutPolicyRequest { policy: Some(p) })
        .await
        .unwrap();
}

async fn ask(c: &mut Client, id: &str, action: &str) -> pb::CreateRequestResponse {
    c.create_request(pb::CreateRequestRequest {
        request_id: id.into(),
        agent_id: "deploy-bot".into(),
        action: Some(pb::Action {
            name: action.into(),
            parameters_json: r#"{"amount": 120, "currency": "EUR"}"#.into(),
        }),
        context: "Refund for order 42 after a failed delivery".into(),
        priority: Priority::High as i32,
    })
    .await
    .unwrap()
    .into_inner()
}

async fn answer(
    c: &mut Client,
    id: &str,
    approver: &str,
    decision: Decision,
) -> Result<pb::ApprovalRequest, tonic::Status> {
    c.respond(pb::RespondRequest {
        request_id: id.into(),
        decision: decision as i32,
        approver: approver.into(),
        reason: format!("{approver} decided"),
        channel: 0,
    })
    .await
    .map(|r| r.into_inner())
}

async fn get(c: &mut Client, id: &str) -> pb::ApprovalRequest {
    c.get_request(pb::GetRequestRequest {
        request_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// Waits until the request leaves `pending` (timers run in the gateway).
async fn settled(c: &mut Client, id: &str, within: Duration) -> pb::ApprovalRequest {
    let until = Instant::now() + within;
    loop {
        let r = get(c, id).await;
        if r.state != State::Pending as i32 || Instant::now() > until {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn approval_reaches_the_watching_agent(env: &Env) {
    let (running, _, mut c) = start_with_policy(
        env,
        policy(
            "refunds",
            "payments.*",
            2,
            vec![level(&["ann", "bob", "cy"], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    let created = ask(&mut c, "req-1", "payments.refund").await;
    assert!(!created.auto_approved);
    let r = created.request.unwrap();
    assert_eq!(
        (r.state, r.policy_id.as_str(), r.quorum),
        (State::Pending as i32, "refunds", 2)
    );

    // The agent watches; two of three approve.
    let mut watch = c
        .watch_request(pb::WatchRequestRequest {
            request_id: "req-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.state, State::Pending as i32);
    let after_ann = answer(&mut c, "req-1", "ann", Decision::Approve)
        .await
        .unwrap();
    assert_eq!(after_ann.state, State::Pending as i32, "1 of 2");
    answer(&mut c, "req-1", "bob", Decision::Approve)
        .await
        .unwrap();
    let mut last = first;
    while let Some(update) = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the watch ends with the decision")
        .unwrap()
    {
        last = update;
    }
    assert_eq!(last.state, State::Approved as i32);
    assert_eq!(last.responses.len(), 2);
    assert_eq!(last.responses[1].approver, "bob");
    assert_eq!(last.responses[1].reason, "bob decided");

    // The same id again is the same request.
    let again = ask(&mut c, "req-1", "payments.refund").await;
    assert_eq!(again.request.unwrap().state, State::Approved as i32);
    // Listing: pending first by priority; filters.
    ask(&mut c, "req-2", "payments.charge").await;
    let listed = c
        .list_requests(pb::ListRequestsRequest {
            state: State::Pending as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .requests;
    assert_eq!(
        listed
            .iter()
            .map(|r| r.request_id.as_str())
            .collect::<Vec<_>>(),
        vec!["req-2"]
    );
    running.stop().await;
}

async fn one_deny_denies_and_answers_are_final(env: &Env) {
    let (running, url, mut c) = start_with_policy(
        env,
        policy(
            "deploys",
            "deploy.*",
            2,
            vec![level(&["ann", "bob", "cy"], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    ask(&mut c, "d-1", "deploy.prod").await;
    answer(&mut c, "d-1", "ann", Decision::Approve)
        .await
        .unwrap();
    // Ann again: the same answer changes nothing (a retry); another is refused, not shown
    // as accepted.
    let same = answer(&mut c, "d-1", "ann", Decision::Approve)
        .await
        .unwrap();
    assert_eq!(
        (same.state, same.responses.len()),
        (State::Pending as i32, 1)
    );
    let e = answer(&mut c, "d-1", "ann", Decision::Deny)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("cannot be changed"), "{}", e.message());
    // Someone who is not an approver.
    let e = answer(&mut c, "d-1", "mallory", Decision::Approve)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let denied = answer(&mut c, "d-1", "bob", Decision::Deny).await.unwrap();
    assert_eq!(denied.state, State::Denied as i32);
    // A decided request takes no new answer.
    let e = answer(&mut c, "d-1", "cy", Decision::Approve)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert_eq!(get(&mut c, "d-1").await.state, State::Denied as i32);

    // Concurrent answers: exactly the quorum decides, never both outcomes.
    ask(&mut c, "d-2", "deploy.staging").await;
    let (mut c1, mut c2, mut c3) = (client(&url).await, client(&url).await, client(&url).await);
    let (a, b, cc) = tokio::join!(
        answer(&mut c1, "d-2", "ann", Decision::Approve),
        answer(&mut c2, "d-2", "bob", Decision::Approve),
        answer(&mut c3, "d-2", "cy", Decision::Deny),
    );
    let r = get(&mut c, "d-2").await;
    assert!(
        r.state == State::Approved as i32 || r.state == State::Denied as i32,
        "{r:?}"
    );
    // Every accepted answer is recorded; the others were refused as too late.
    let accepted = [a, b, cc].iter().filter(|x| x.is_ok()).count();
    assert_eq!(accepted, r.responses.len(), "{r:?}");
    // What the log says agrees with the answers that were accepted.
    let approvals = r
        .responses
        .iter()
        .filter(|x| x.decision == Decision::Approve as i32)
        .count();
    let denials = r.responses.len() - approvals;
    if r.state == State::Approved as i32 {
        assert_eq!((approvals, denials), (2, 0), "{r:?}");
    } else {
        assert!(denials == 1 && approvals <= 1, "{r:?}");
    }
    running.stop().await;
}

async fn timeouts_take_the_default_action(env: &Env) {
    let (running, url) = env.start_oversight().await;
    let mut c = client(&url).await;
    for (id, action, on_timeout) in [
        ("t-deny", "ops.restart", TimeoutAction::Deny),
        ("t-approve", "ops.scale", TimeoutAction::Approve),
    ] {
        put(
            &mut c,
            policy(
                id,
                action,
                1,
                vec![level(&["ann"], Duration::from_millis(600))],
                on_timeout,
            ),
        )
        .await;
    }
    let started = Instant::now();
    ask(&mut c, "t-1", "ops.restart").await;
    ask(&mut c, "t-2", "ops.scale").await;
    let r1 = settled(&mut c, "t-1", Duration::from_secs(5)).await;
    let r2 = settled(&mut c, "t-2", Duration::from_secs(5)).await;
    assert_eq!(
        (r1.state, r1.resolution),
        (State::TimedOut as i32, Decision::Deny as i32)
    );
    assert_eq!(
        (r2.state, r2.resolution),
        (State::TimedOut as i32, Decision::Approve as i32)
    );
    // Loose enough for a loaded 2-core machine, tight enough to catch a timer that waits for
    // some later poll instead of its deadline.
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(4), "fired late: {elapsed:?}");
    // Past the deadline, an answer is refused.
    let e = answer(&mut c, "t-1", "ann", Decision::Approve)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    running.stop().await;
}

async fn escalation_walks_the_levels(env: &Env) {
    let (running, url) = env.start_oversight().await;
    let mut c = client(&url).await;
    // Level 2 is the one answered: it is given seconds, so that a busy machine does not move
    // the request on before the answer arrives.
    let step = Duration::from_millis(500);
    put(
        &mut c,
        policy(
            "pager",
            "infra.*",
            1,
            vec![
                level(&["l1"], step),
                level(&["l2"], Duration::from_secs(4)),
                level(&["l3"], step),
            ],
            TimeoutAction::Escalate,
        ),
    )
    .await;
    // One request is answered at level 2 by its approver; the other runs out of levels.
    ask(&mut c, "e-1", "infra.failover").await;
    ask(&mut c, "e-2", "infra.failover").await;
    let until = Instant::now() + Duration::from_secs(5);
    while get(&mut c, "e-1").await.level < 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let at_level_1 = get(&mut c, "e-1").await;
    assert_eq!(
        (at_level_1.state, at_level_1.level),
        (State::Pending as i32, 1)
    );
    assert_eq!(at_level_1.approvers, vec!["l2"]);
    let approved = answer(&mut c, "e-1", "l2", Decision::Approve)
        .await
        .unwrap();
    assert_eq!(approved.state, State::Approved as i32);
    assert_eq!(approved.responses[0].level, 1);

    let r = settled(&mut c, "e-2", Duration::from_secs(15)).await;
    assert_eq!(
        (r.state, r.resolution, r.level),
        (State::TimedOut as i32, Decision::Deny as i32, 2)
    );
    running.stop().await;
}

async fn cancellation_and_auto_approval(env: &Env) {
    let (running, _, mut c) = start_with_policy(
        env,
        policy(
            "mail",
            "email.*",
            1,
            vec![level(&[], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    let mut allow = policy("reads", "search.*", 1, vec![], TimeoutAction::Deny);
    allow.require_approval = false;
    put(&mut c, allow).await;

    ask(&mut c, "c-1", "email.send").await;
    let cancelled = c
        .cancel_request(pb::CancelRequestRequest {
            request_id: "c-1".into(),
            reason: "user withdrew".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, State::Cancelled as i32);
    assert_eq!(cancelled.cancel_reason, "user withdrew");
    let e = answer(&mut c, "c-1", "anyone", Decision::Approve)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // With no named approvers anyone allowed to call Respond may answer.
    ask(&mut c, "c-2", "email.send").await;
    assert_eq!(
        answer(&mut c, "c-2", "someone", Decision::Approve)
            .await
            .unwrap()
            .state,
        State::Approved as i32
    );
    let e = c
        .cancel_request(pb::CancelRequestRequest {
            request_id: "c-2".into(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    for (id, action) in [("c-3", "search.web"), ("c-4", "unknown.action")] {
        let r = ask(&mut c, id, action).await;
        assert!(r.auto_approved, "{action}");
        assert_eq!(r.request.unwrap().state, State::Approved as i32);
    }
    running.stop().await;
}

async fn timers_fire_after_every_replica_restarted(env: &Env) {
    let (running, _, mut c) = start_with_policy(
        env,
        policy(
            "slow",
            "db.*",
            1,
            vec![level(&["ann"], Duration::from_millis(800))],
            TimeoutAction::Approve,
        ),
    )
    .await;
    ask(&mut c, "r-1", "db.migrate").await;
    // Every replica goes away before the deadline and comes back after it.
    running.stop().await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let (running, url) = env.start_oversight().await;
    let mut c = client(&url).await;
    let started = Instant::now();
    let r = settled(&mut c, "r-1", Duration::from_secs(5)).await;
    assert_eq!(
        (r.state, r.resolution),
        (State::TimedOut as i32, Decision::Approve as i32)
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "an overdue timer fires at once after a restart: {:?}",
        started.elapsed()
    );
    // Two replicas firing the same deadline store one event.
    put(
        &mut c,
        policy(
            "race",
            "race.*",
            1,
            vec![level(&["ann"], Duration::from_millis(500))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    let (second, _) = env.start_oversight().await;
    for i in 0..10 {
        ask(&mut c, &format!("race-{i}"), "race.it").await;
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for i in 0..10 {
        let r = get(&mut c, &format!("race-{i}")).await;
        assert_eq!(r.state, State::TimedOut as i32);
        let events = count_events(env, &format!("race-{i}")).await;
        assert_eq!(events, 2, "requested + one timeout for race-{i}");
    }
    second.stop().await;
    running.stop().await;
}

async fn count_events(env: &Env, id: &str) -> usize {
    let subject = format!("oversight.requests.default.{id}");
    creto_replay_tests::subject_events(env, creto_streams::OVERSIGHT, &subject)
        .await
        .len()
}

async fn bad_input_gets_clear_statuses(env: &Env) {
    let (running, url) = env.start_oversight().await;
    let mut c = client(&url).await;
    // Policies: each mistake named.
    for (p, needle) in [
        (
            policy(
                "bad id!",
                "x",
                1,
                vec![level(&[], Duration::from_secs(1))],
                TimeoutAction::Deny,
            ),
            "policy_id",
        ),
        (
            policy(
                "p",
                "x",
                3,
                vec![level(&["a"], Duration::from_secs(1))],
                TimeoutAction::Deny,
            ),
            "never be reached",
        ),
        (policy("p", "x", 1, vec![], TimeoutAction::Deny), "levels"),
        (
            policy(
                "p",
                "x",
                1,
                vec![level(&[], Duration::from_secs(1))],
                TimeoutAction::Unspecified,
            ),
            "on_timeout",
        ),
        (
            policy(
                "p",
                "x",
                1,
                vec![level(&["ann\0"], Duration::from_secs(1))],
                TimeoutAction::Deny,
            ),
            "`levels[0].approvers` contains U+0000",
        ),
    ] {
        let e = c
            .put_policy(pb::PutPolicyRequest { policy: Some(p) })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    // Requests.
    let base = pb::CreateRequestRequest {
        request_id: "b-1".into(),
        agent_id: "bot".into(),
        action: Some(pb::Action {
            name: "x.y".into(),
            parameters_json: "{}".into(),
        }),
        ..Default::default()
    };
    for (cmd, needle) in [
        (
            pb::CreateRequestRequest {
                request_id: "a.b".into(),
                ..base.clone()
            },
            "request_id",
        ),
        (
            pb::CreateRequestRequest {
                agent_id: String::new(),
                ..base.clone()
            },
            "agent_id",
        ),
        (
            pb::CreateRequestRequest {
                action: None,
                ..base.clone()
            },
            "action.name",
        ),
        (
            pb::CreateRequestRequest {
                action: Some(pb::Action {
                    name: "x".into(),
                    parameters_json: "[1,2]".into(),
                }),
                ..base.clone()
            },
            "JSON object",
        ),
        (
            pb::CreateRequestRequest {
                action: Some(pb::Action {
                    name: "x".into(),
                    parameters_json: "{oops".into(),
                }),
                ..base.clone()
            },
            "not JSON",
        ),
        (
            pb::CreateRequestRequest {
                context: "x".repeat(20_000),
                ..base.clone()
            },
            "context",
        ),
        (
            pb::CreateRequestRequest {
                priority: 42,
                ..base.clone()
            },
            "priority",
        ),
        // U+0000, which PostgreSQL's text and jsonb cannot hold: the projector would stop.
        (
            pb::CreateRequestRequest {
                context: "before\0after".into(),
                ..base.clone()
            },
            "`context` contains U+0000",
        ),
        (
            pb::CreateRequestRequest {
                action: Some(pb::Action {
                    name: "x".into(),
                    parameters_json: r#"{"sql": ["drop\u0000"]}"#.into(),
                }),
                ..base.clone()
            },
            "`action.parameters_json.sql[0]` contains U+0000",
        ),
        (
            pb::CreateRequestRequest {
                action: Some(pb::Action {
                    name: "x\0y".into(),
                    parameters_json: "{}".into(),
                }),
                ..base.clone()
            },
            "control characters",
        ),
    ] {
        let e = c.create_request(cmd).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    // The same id for another ask.
    c.create_request(base.clone()).await.unwrap();
    let e = c
        .create_request(pb::CreateRequestRequest {
            action: Some(pb::Action {
                name: "other".into(),
                parameters_json: "{}".into(),
            }),
            ..base.clone()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    // Unknown request, missing decision.
    let e = answer(&mut c, "nope", "ann", Decision::Approve)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    put(
        &mut c,
        policy(
            "any",
            "*",
            1,
            vec![level(&[], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    ask(&mut c, "b-2", "z.z").await;
    let e = answer(&mut c, "b-2", "ann", Decision::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .respond(pb::RespondRequest {
            request_id: "b-2".into(),
            decision: Decision::Deny as i32,
            approver: "ann".into(),
            reason: "no\0".into(),
            channel: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("`reason` contains U+0000"), "{e:?}");
    running.stop().await;
}

/// A gateway notifying as `notify` says, with a policy that has `payments.*` requests
/// announced to approver `ann`.
async fn start_hooked(
    env: &Env,
    notify: creto_gateways::oversight::notify::NotifyConfig,
) -> (creto_gateways::server::Running, Client) {
    let running = env.start_oversight_notifying(notify).await;
    let mut c = client(&format!("http://{}", running.grpc_addr.unwrap())).await;
    put(
        &mut c,
        policy(
            "hooked",
            "payments.*",
            1,
            vec![level(&["ann"], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    (running, c)
}

async fn notifications_reach_the_webhook_signed_and_are_recorded(env: &Env) {
    use creto_gateways::oversight::notify::webhook::verify_signature;
    use std::sync::{Arc, Mutex};
    // A real HTTP receiver: records what it gets, fails the first call.
    let hits: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>> = Arc::default();
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (h, n) = (hits.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let (h, n) = (h.clone(), n.clone());
            async move {
                if n.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    // A NUL in the answer: kept in the outcome, it would stop the projector.
                    return (axum::http::StatusCode::SERVICE_UNAVAILABLE, "busy\0");
                }
                h.lock().unwrap().push((headers, body));
                (axum::http::StatusCode::OK, "")
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let notify = creto_gateways::oversight::notify::NotifyConfig {
        webhook_url: Some(format!("http://{addr}/hook")),
        webhook_secret: Some("hook-secret".into()),
        public_url: Some("http://approvals.example".into()),
        link_secret: Some("link-secret".into()),
        backoff: Duration::from_millis(50),
        ..Default::default()
    };
    let (running, mut c) = start_hooked(env, notify).await;
    let started = Instant::now();
    ask(&mut c, "n-1", "payments.refund").await;
    let until = Instant::now() + Duration::from_secs(10);
    while hits.lock().unwrap().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (headers, body) = hits
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("webhook delivered");
    println!(
        "request created -> webhook delivered: {:?}",
        started.elapsed()
    );
    let ts = headers["x-creto-timestamp"].to_str().unwrap();
    let sig = headers["x-creto-signature"].to_str().unwrap();
    assert!(verify_signature(b"hook-secret", ts, body.as_bytes(), sig));
    assert!(!verify_signature(b"other", ts, body.as_bytes(), sig));
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["request_id"], "n-1");
    assert!(
        body.contains("http://approvals.example/approvals/default/n-1/respond?token="),
        "{body}"
    );

    // The outcome is an event: delivered on the second attempt.
    let until = Instant::now() + Duration::from_secs(5);
    let outcome = loop {
        if let Some(first) = outcomes(env, "n-1").await.into_iter().next() {
            break first;
        }
        assert!(Instant::now() < until, "no notification outcome recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(outcome.ok);
    assert_eq!(outcome.attempts, 2);
    assert!(
        outcome.detail.contains("HTTP 503: busy\u{FFFD}"),
        "{:?}",
        outcome.detail
    );
    assert_eq!(outcome.channel, pb::Channel::Webhook as i32);

    // Anyone may answer, two must: a link answers as "anyone" and could never make that
    // quorum, so the channel gets none.
    put(
        &mut c,
        policy(
            "crowd",
            "crowd.*",
            2,
            vec![level(&[], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    ask(&mut c, "n-2", "crowd.vote").await;
    let until = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let found = hits
            .lock()
            .unwrap()
            .iter()
            .find(|(_, b)| b.contains(r#""request_id":"n-2""#))
            .map(|(_, b)| b.clone());
        if let Some(b) = found {
            break b;
        }
        assert!(Instant::now() < until, "n-2 not announced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!body.contains("respond?token="), "{body}");
    running.stop().await;
}

/// The notification outcomes recorded so far for request `id` of tenant `default`.
async fn outcomes(env: &Env, id: &str) -> Vec<pb::NotificationDelivered> {
    let subject = format!("oversight.notifications.default.{id}");
    creto_replay_tests::subject_events(env, creto_streams::OVERSIGHT, &subject)
        .await
        .iter()
        .map(|e| pb::NotificationDelivered::decode(e.payload.as_ref()).unwrap())
        .collect()
}

/// A webhook receiver on loopback (`POST /hook`): `on` gets each call's JSON body, then the
/// call is answered 200. Returns its address.
async fn webhook_receiver<F, Fut>(on: F) -> std::net::SocketAddr
where
    F: Fn(serde_json::Value) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let on = on.clone();
            async move {
                on(serde_json::from_str(&body).unwrap()).await;
                axum::http::StatusCode::OK
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// The log refused Slack's outcome once, so the announcement came back: only Slack is sent
/// again, not the webhook whose outcome is recorded (it was called twice).
async fn a_redelivered_announcement_skips_the_channels_already_recorded(env: &Env) {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    let counting = |n: Arc<AtomicU32>| {
        move |_: serde_json::Value| {
            let n = n.clone();
            async move {
                n.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let (hooks, slacks) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let hook = webhook_receiver(counting(hooks.clone())).await;
    let slack = webhook_receiver(counting(slacks.clone())).await;
    let refused = AtomicBool::new(false);
    let log = FaultyLog::new(env.platform.log.clone(), move |e| {
        e.headers.get(creto_streams::headers::names::EVENT_TYPE)
            == Some("oversight.notification_delivered")
            && pb::NotificationDelivered::decode(e.payload.as_ref())
                .is_ok_and(|o| o.channel == pb::Channel::Slack as i32)
            && !refused.swap(true, Ordering::SeqCst)
    });
    let notify = creto_gateways::oversight::notify::NotifyConfig {
        webhook_url: Some(format!("http://{hook}/hook")),
        webhook_secret: Some("hook-secret".into()),
        slack_webhook_url: Some(format!("http://{slack}/hook")),
        backoff: Duration::from_millis(50),
        ..Default::default()
    };
    let running = env
        .start_oversight_on(env.platform_with_log(log), notify)
        .await;
    let mut c = client(&format!("http://{}", running.grpc_addr.unwrap())).await;
    let mut both = policy(
        "both",
        "payments.*",
        1,
        vec![level(&["ann"], Duration::from_secs(60))],
        TimeoutAction::Deny,
    );
    let channels = vec![pb::Channel::Webhook as i32, pb::Channel::Slack as i32];
    both.channels
        .insert(Priority::High as i32, pb::ChannelList { channels });
    put(&mut c, both).await;
    ask(&mut c, "r-twice", "payments.refund").await;
    // Slack's outcome goes in on the redelivery, 5 s after the refusal.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let recorded = outcomes(env, "r-twice").await.len();
        if recorded == 2 {
            break;
        }
        assert!(Instant::now() < until, "outcomes: {recorded}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(slacks.load(Ordering::SeqCst), 2);
    assert_eq!(
        hooks.load(Ordering::SeqCst),
        1,
        "the webhook was called again"
    );
    running.stop().await;
}

async fn a_slow_receiver_does_not_hold_back_other_announcements(env: &Env) {
    use std::sync::{Arc, Mutex};
    // A receiver that takes 3 s over each `slow-*` request (within the webhook's timeout) and
    // answers the others at once, noting when.
    let arrived: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let seen = arrived.clone();
    let addr = webhook_receiver(move |json| {
        let seen = seen.clone();
        async move {
            let id = json["request_id"].as_str().unwrap().to_string();
            if id.starts_with("slow-") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            seen.lock().unwrap().push((id, Instant::now()));
        }
    })
    .await;
    let notify = creto_gateways::oversight::notify::NotifyConfig {
        webhook_url: Some(format!("http://{addr}/hook")),
        webhook_secret: Some("hook-secret".into()),
        ..Default::default()
    };
    let (running, mut c) = start_hooked(env, notify).await;
    for i in 0..8 {
        ask(&mut c, &format!("slow-{i}"), "payments.refund").await;
    }
    let asked = Instant::now();
    ask(&mut c, "fast", "payments.refund").await;
    let until = Instant::now() + Duration::from_secs(30);
    let fast = loop {
        let at = arrived
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _)| id == "fast")
            .map(|(_, at)| *at);
        if let Some(at) = at {
            break at.duration_since(asked);
        }
        assert!(
            Instant::now() < until,
            "the fast request was never announced"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // One after the other it waited for the eight slow ones: 24 s.
    println!("announced after 8 slow ones: {fast:?}");
    assert!(fast < Duration::from_secs(2), "announced after {fast:?}");
    running.stop().await;
}

async fn watch(
    c: &mut Client,
    id: &str,
) -> Result<tonic::Streaming<pb::ApprovalRequest>, tonic::Status> {
    c.watch_request(pb::WatchRequestRequest {
        request_id: id.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn a_request_has_a_bounded_number_of_watchers(env: &Env) {
    use creto_gateways::oversight::fold::MAX_WATCHERS;
    let (running, _, mut c) = start_with_policy(
        env,
        policy(
            "refunds",
            "payments.*",
            1,
            vec![level(&["ann"], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    ask(&mut c, "req-w", "payments.refund").await;
    ask(&mut c, "req-other", "payments.refund").await;
    let mut watches = Vec::new();
    for _ in 0..MAX_WATCHERS {
        let mut w = watch(&mut c, "req-w").await.unwrap();
        assert_eq!(
            w.message().await.unwrap().unwrap().state,
            State::Pending as i32
        );
        watches.push(w);
    }
    let refused = watch(&mut c, "req-w").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("WatchRequest streams"),
        "{refused:?}"
    );
    // Another request is watched as before.
    let mut other = watch(&mut c, "req-other").await.unwrap();
    other.message().await.unwrap().unwrap();

    // The decision reaches every watcher of the request, and their streams end.
    answer(&mut c, "req-w", "ann", Decision::Approve)
        .await
        .unwrap();
    for w in &mut watches {
        let mut last = None;
        while let Some(update) = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("the watch ends with the decision")
            .unwrap()
        {
            last = Some(update.state);
        }
        assert_eq!(last, Some(State::Approved as i32));
    }
    // Ended watchers make room: a new watch sees the decision and ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        match watch(&mut c, "req-w").await {
            Ok(w) => break w,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no room after the watches ended: {e:?}"),
        }
    };
    assert_eq!(
        again.message().await.unwrap().unwrap().state,
        State::Approved as i32
    );
    assert!(again.message().await.unwrap().is_none());
    running.stop().await;
}

/// Each level a request escalates to is announced to its approvers. The notifier used to read
/// the request from the replica's view without catching up to the escalation it announced: a
/// copy still at the previous level was taken for stale, and the new level was never told.
async fn every_escalation_is_announced(env: &Env) {
    use std::sync::{Arc, Mutex};
    let levels: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let seen = levels.clone();
    let addr = webhook_receiver(move |json| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push((
                json["request_id"].as_str().unwrap_or_default().to_string(),
                json["level"].as_u64().unwrap_or(u64::MAX),
            ));
        }
    })
    .await;
    let notify = creto_gateways::oversight::notify::NotifyConfig {
        webhook_url: Some(format!("http://{addr}/hook")),
        ..Default::default()
    };
    let running = env.start_oversight_notifying(notify).await;
    let mut c = client(&format!("http://{}", running.grpc_addr.unwrap())).await;
    let step = Duration::from_millis(400);
    put(
        &mut c,
        policy(
            "pager",
            "infra.*",
            1,
            vec![
                level(&["l1"], step),
                level(&["l2"], step),
                level(&["l3"], Duration::from_secs(60)),
            ],
            TimeoutAction::Escalate,
        ),
    )
    .await;
    let ids: Vec<String> = (0..5).map(|i| format!("esc-{i}")).collect();
    for id in &ids {
        ask(&mut c, id, "infra.failover").await;
    }
    let until = Instant::now() + Duration::from_secs(10);
    let complete = |seen: &[(String, u64)]| {
        ids.iter()
            .all(|id| (0..3).all(|l| seen.iter().any(|(r, s)| r == id && *s == l)))
    };
    while !complete(&levels.lock().unwrap()) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = levels.lock().unwrap().clone();
    assert!(complete(&seen), "levels announced: {seen:?}");
    running.stop().await;
}

/// The notifier's consumer deleted under it (by hand, or with its stream): fetches fail, and
/// after a few the notifier opens it again and announces what comes next, instead of failing
/// every second for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notifier_opens_its_consumer_again_when_it_is_gone() {
    use std::sync::{Arc, Mutex};
    let env = Env::new().await;
    let announced: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen = announced.clone();
    let addr = webhook_receiver(move |json| {
        let seen = seen.clone();
        async move {
            seen.lock()
                .unwrap()
                .push(json["request_id"].as_str().unwrap_or_default().to_string());
        }
    })
    .await;
    let notify = creto_gateways::oversight::notify::NotifyConfig {
        webhook_url: Some(format!("http://{addr}/hook")),
        ..Default::default()
    };
    let (running, mut c) = start_hooked(&env, notify).await;
    let wait_for = |id: &'static str| {
        let announced = announced.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(30);
            while !announced.lock().unwrap().iter().any(|r| r == id) {
                assert!(Instant::now() < until, "{id} was never announced");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    ask(&mut c, "before", "payments.refund").await;
    wait_for("before").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.platform
        .log
        .delete_consumer(
            &env.platform.catalog.stream(creto_streams::OVERSIGHT),
            creto_gateways::oversight::notifications::DURABLE,
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    ask(&mut c, "after", "payments.refund").await;
    wait_for("after").await;
    let before = announced
        .lock()
        .unwrap()
        .iter()
        .filter(|r| *r == "before")
        .count();
    assert_eq!(
        before, 1,
        "announced again when the consumer was made again"
    );
    running.stop().await;
    env.drop().await;
}

/// An event on a request's subject that does not decode is skipped by the fold, but it is
/// still the subject's last: the fold's copy kept the version before it, so every answer and
/// timer conflicted with it for ever (ABORTED after the retries; the timer spun).
async fn a_request_with_an_undecodable_event_still_takes_answers(env: &Env) {
    use creto_streams::headers::{content_types, names};
    let (running, _url, mut c) = start_with_policy(
        env,
        policy(
            "deploys",
            "deploy.*",
            1,
            vec![level(&["ann"], Duration::from_secs(60))],
            TimeoutAction::Deny,
        ),
    )
    .await;
    let asked = ask(&mut c, "d-garbled", "deploy.prod").await;
    let version = asked.request.unwrap().version;
    env.platform
        .log
        .append(creto_streams::AppendEvent {
            subject: env.subject("oversight.requests.default.d-garbled"),
            id: "garbled".into(),
            expected_subject_sequence: Some(version),
            headers: creto_streams::Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::TENANT, "default"),
            payload: vec![0xff; 7].into(),
        })
        .await
        .unwrap();
    let approved = answer(&mut c, "d-garbled", "ann", Decision::Approve)
        .await
        .expect("the request takes answers after the undecodable event");
    assert_eq!(approved.state, State::Approved as i32);
    running.stop().await;
}

/// A policy stored through one replica decides the very next request made through another.
/// Each replica used to follow the log every 200 ms and decide a request on what it had
/// folded: in between, the other replica auto-approved actions the new policy gates.
async fn a_policy_stored_through_one_replica_decides_the_next_request_on_another(env: &Env) {
    let (a_running, a_url) = env.start_oversight().await;
    let (b_running, b_url) = env.start_oversight().await;
    let (mut a, mut b) = (client(&a_url).await, client(&b_url).await);
    assert!(ask(&mut b, "gate-0", "deploy0.prod").await.auto_approved);
    for i in 1..=5 {
        let gate = policy(
            &format!("gate-{i}"),
            &format!("deploy{i}.*"),
            1,
            vec![level(&["ann"], Duration::from_secs(60))],
            TimeoutAction::Deny,
        );
        put(&mut a, gate).await;
        let r = ask(&mut b, &format!("gate-{i}"), &format!("deploy{i}.prod")).await;
        assert!(
            !r.auto_approved,
            "decided without the policy just stored: {r:?}"
        );
        let r = r.request.unwrap();
        assert_eq!(
            (r.state, r.policy_id),
            (State::Pending as i32, format!("gate-{i}"))
        );
    }
    a_running.stop().await;
    b_running.stop().await;
}

/// DeletePolicy: the actions a removed policy governed fall to the next policy that matches,
/// then to none (approved at once); the id can be defined again. Before it, retiring an exact
/// policy meant setting require_approval false, which then won over the broader pattern.
async fn a_deleted_policy_governs_nothing_more(env: &Env) {
    let (running, url) = env.start_oversight().await;
    let mut c = client(&url).await;
    let wide = policy(
        "wide",
        "ship.*",
        1,
        vec![level(&["ann"], Duration::from_secs(60))],
        TimeoutAction::Deny,
    );
    let exact = policy(
        "exact",
        "ship.parcel",
        1,
        vec![level(&["bob"], Duration::from_secs(60))],
        TimeoutAction::Deny,
    );
    put(&mut c, wide).await;
    put(&mut c, exact.clone()).await;
    let governed = |r: pb::CreateRequestResponse| r.request.unwrap().policy_id;
    assert_eq!(governed(ask(&mut c, "d-1", "ship.parcel").await), "exact");
    let delete = |id: &str| pb::DeletePolicyRequest {
        policy_id: id.into(),
    };
    let removed = c.delete_policy(delete("exact")).await.unwrap().into_inner();
    assert!(removed.version > 0);
    assert_eq!(governed(ask(&mut c, "d-2", "ship.parcel").await), "wide");
    let listed: Vec<String> = c
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies
        .into_iter()
        .map(|p| p.policy_id)
        .collect();
    assert_eq!(listed, vec!["wide"]);
    let e = c.delete_policy(delete("exact")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    c.delete_policy(delete("wide")).await.unwrap();
    assert!(ask(&mut c, "d-3", "ship.parcel").await.auto_approved);
    // Defined again after its removal.
    put(&mut c, exact).await;
    assert_eq!(governed(ask(&mut c, "d-4", "ship.parcel").await), "exact");
    // The request made under a removed policy keeps it.
    assert_eq!(get(&mut c, "d-2").await.policy_id, "wide");
    running.stop().await;
}
