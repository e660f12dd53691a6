//! Tenant isolation matrix: for oversight, runtime and metering (core, corrections, billing,
//! quotas), each gateway runs with authentication on and real tokens of two tenants. Tenant A
//! writes through every write method; then tenant B calls every read and write method of the
//! product on A's ids and must get PERMISSION_DENIED or NOT_FOUND (or, for a list, nothing of
//! A's; a few methods refuse with the code that says "you have no such thing", noted in their
//! row). A's data is unchanged afterwards, B writing the same ids gets B's own independent
//! data, and the read models (the PostgreSQL projections, and the embedded ones where the
//! product has them) key every row by the tenant that wrote it.
//!
//! Messaging's matrix is in `messaging.rs` (`tenants_are_isolated`).
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as Ch, DurationRound, Utc};
use creto_gateways::auth::layer::Auth;
use creto_gateways::auth::token::{keygen, KeyRing};
use creto_gateways::auth::{AuthArgs, Bearer};
use creto_gateways::server::Running;
use creto_replay_tests::{run_projector, stream_events, wait_checkpoint, Env};
use futures::future::BoxFuture;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

creto_replay_tests::on_both_adapters!(
    oversight_tenants_are_isolated,
    runtime_tenants_are_isolated,
    runtime_agents_act_on_their_own_sandboxes,
    metering_tenants_are_isolated,
);

const A: &str = "tenant-a";
const B: &str = "tenant-b";

type Authed = InterceptedService<Channel, Bearer>;

// ---- the matrix ------------------------------------------------------------------------------

/// What a call of tenant B on tenant A's data must get.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// PERMISSION_DENIED or NOT_FOUND: A's data does not exist for B.
    Hidden,
    /// Refused with this code, which says what B lacks of its own (no quota, no plan), never
    /// anything of A's.
    Refused(Code),
    /// Answered with nothing of A's: the call returns what it showed of A's.
    NothingOfA,
}

/// One row: the method, what B must get, and B's call (what it returned of A's, on success).
type Probe = (
    &'static str,
    Want,
    BoxFuture<'static, Result<Vec<String>, Status>>,
);

fn probe<F>(method: &'static str, want: Want, call: F) -> Probe
where
    F: std::future::Future<Output = Result<Vec<String>, Status>> + Send + 'static,
{
    (method, want, Box::pin(call))
}

/// Runs every row and fails with all the rows that leaked or answered unexpectedly; returns
/// the methods covered.
async fn run_matrix(product: &str, probes: Vec<Probe>) -> BTreeSet<&'static str> {
    let mut covered = BTreeSet::new();
    let mut failures = Vec::new();
    for (method, want, call) in probes {
        covered.insert(method);
        let got = call.await;
        let ok = match (&want, &got) {
            (Want::Hidden, Err(e)) => matches!(e.code(), Code::PermissionDenied | Code::NotFound),
            (Want::Refused(code), Err(e)) => e.code() == *code,
            (Want::NothingOfA, Ok(seen)) => seen.is_empty(),
            _ => false,
        };
        // A refusal never names A's tenant.
        let named = matches!(&got, Err(e) if e.message().contains(&format!("{A:?}")));
        if !ok || named {
            failures.push(format!("{product}.{method}: wanted {want:?}, got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "tenant {B} reached tenant {A}'s data:\n{}",
        failures.join("\n")
    );
    covered
}

/// Asserts `covered` is every method of the service (the matrix misses none).
/// Every method `service` (its full name) declares in the schemas is in the matrix: one added
/// to the proto fails here until a case covers it (a hand-written list passed whatever the
/// proto gained).
fn assert_every_method(covered: &BTreeSet<&str>, service: &str) {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(creto_schemas::FILE_DESCRIPTOR_SET).unwrap();
    let (package, name) = service.rsplit_once('.').unwrap();
    let all: BTreeSet<String> = set
        .file
        .iter()
        .filter(|f| f.package() == package)
        .flat_map(|f| f.service.iter())
        .filter(|s| s.name() == name)
        .flat_map(|s| s.method.iter().map(|m| m.name().to_string()))
        .collect();
    assert!(!all.is_empty(), "no service {service} in the schemas");
    let missing: Vec<&String> = all
        .iter()
        .filter(|m| !covered.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "methods of {service} not in the matrix: {missing:?}"
    );
}

// ---- tokens ----------------------------------------------------------------------------------

/// A key ring in a temporary directory and the gateway authentication that trusts it.
struct Tokens {
    ring: KeyRing,
    _dir: tempfile::TempDir,
}

fn tokens() -> (Tokens, Arc<Auth>) {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, keygen("k1")).unwrap();
    let auth = AuthArgs {
        auth_keys: Some(keys.clone()),
        ..Default::default()
    }
    .build(None)
    .unwrap();
    let ring = KeyRing::load(&keys).unwrap();
    (Tokens { ring, _dir: dir }, auth)
}

impl Tokens {
    fn bearer(&self, tenant: &str, subject: &str, roles: &[&str]) -> Bearer {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        let token = self
            .ring
            .issue(tenant, subject, &roles, Duration::from_secs(600))
            .unwrap();
        Bearer::new(&token)
    }
}

async fn channel(running: &Running) -> Channel {
    Channel::from_shared(format!("http://{}", running.grpc_addr.unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(creto_streams::envelope::timestamp(t))
}

fn pb_duration(secs: i64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: secs,
        nanos: 0,
    })
}

/// Waits until the projector has applied everything on `logical`'s stream.
async fn project_all(env: &Env, projector: &dyn creto_projections::Projector, logical: &str) {
    let last = stream_events(env, logical)
        .await
        .last()
        .map_or(0, |e| e.sequence);
    wait_checkpoint(projector, last).await;
}

// ---- oversight -------------------------------------------------------------------------------

mod oversight {
    pub use creto_schemas::oversight::v1::oversight_service_client::OversightServiceClient;
    pub use creto_schemas::oversight::v1::*;
}

type OversightClient = oversight::OversightServiceClient<Authed>;

fn approval_policy(approver: &str) -> oversight::Policy {
    oversight::Policy {
        policy_id: "payments".into(),
        precedence: 10,
        action: "payments.*".into(),
        require_approval: true,
        quorum: 1,
        levels: vec![oversight::Level {
            approvers: vec![approver.into()],
            timeout: pb_duration(3600),
        }],
        on_timeout: oversight::TimeoutAction::Deny as i32,
        ..Default::default()
    }
}

fn approval_ask(request_id: &str) -> oversight::CreateRequestRequest {
    oversight::CreateRequestRequest {
        request_id: request_id.into(),
        agent_id: "agent-7".into(),
        action: Some(oversight::Action {
            name: "payments.refund".into(),
            parameters_json: r#"{"amount": 120}"#.into(),
        }),
        context: "refund order 42".into(),
        priority: oversight::Priority::High as i32,
    }
}

async fn get_request(c: &mut OversightClient, id: &str) -> oversight::ApprovalRequest {
    c.get_request(oversight::GetRequestRequest {
        request_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn list_requests(c: &mut OversightClient) -> Vec<oversight::ApprovalRequest> {
    c.list_requests(oversight::ListRequestsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .requests
}

async fn policy_ids_and_approvers(c: &mut OversightClient) -> Vec<(String, Vec<String>)> {
    c.list_policies(oversight::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies
        .into_iter()
        .map(|p| (p.policy_id, p.levels[0].approvers.clone()))
        .collect()
}

fn oversight_probes(
    b_admin: &OversightClient,
    b_agent: &OversightClient,
    b_approver: &OversightClient,
    id: &str,
) -> Vec<Probe> {
    let id = id.to_string();
    let request_ids = |r: Vec<oversight::ApprovalRequest>| -> Vec<String> {
        r.into_iter().map(|r| r.request_id).collect()
    };
    let mut rows = Vec::new();
    // The admin (every role), an agent and an approver whose names are A's agent's and
    // approver's: names are per tenant.
    for (who, c) in [
        ("admin", b_admin),
        ("agent", b_agent),
        ("approver", b_approver),
    ] {
        let (mut c1, mut c2, mut c3, mut c4) = (c.clone(), c.clone(), c.clone(), c.clone());
        let (id1, id2, id3) = (id.clone(), id.clone(), id.clone());
        rows.push(probe("GetRequest", Want::Hidden, async move {
            let r = c1
                .get_request(oversight::GetRequestRequest { request_id: id1 })
                .await?;
            Ok(vec![format!("{who}: {:?}", r.into_inner())])
        }));
        rows.push(probe("ListRequests", Want::NothingOfA, async move {
            let all = c2
                .list_requests(oversight::ListRequestsRequest::default())
                .await?
                .into_inner()
                .requests;
            let theirs = c2
                .list_requests(oversight::ListRequestsRequest {
                    state: oversight::State::Pending as i32,
                    priority: oversight::Priority::High as i32,
                    agent_id: "agent-7".into(),
                    limit: 1000,
                })
                .await?
                .into_inner()
                .requests;
            Ok(request_ids(all)
                .into_iter()
                .chain(request_ids(theirs))
                .collect())
        }));
        rows.push(probe("WatchRequest", Want::Hidden, async move {
            let mut stream = c3
                .watch_request(oversight::WatchRequestRequest { request_id: id2 })
                .await?
                .into_inner();
            Ok(vec![format!("{who}: {:?}", stream.message().await?)])
        }));
        rows.push(probe("Respond", Want::Hidden, async move {
            // As the approver A's policy names (the admin records it for them).
            let r = c4
                .respond(oversight::RespondRequest {
                    request_id: id3,
                    decision: oversight::Decision::Approve as i32,
                    approver: if who == "admin" {
                        "alice".into()
                    } else {
                        String::new()
                    },
                    reason: "not mine to approve".into(),
                    channel: 0,
                })
                .await?;
            Ok(vec![format!("{who}: {:?}", r.into_inner())])
        }));
    }
    for (who, c) in [("admin", b_admin), ("agent", b_agent)] {
        let mut c = c.clone();
        let id = id.clone();
        rows.push(probe("CancelRequest", Want::Hidden, async move {
            let r = c
                .cancel_request(oversight::CancelRequestRequest {
                    request_id: id,
                    reason: "not mine to cancel".into(),
                })
                .await?;
            Ok(vec![format!("{who}: {:?}", r.into_inner())])
        }));
    }
    {
        // A's policy id, removed by B's admin: B has none of that id (A's stays, checked after).
        let mut c = b_admin.clone();
        rows.push(probe("DeletePolicy", Want::Hidden, async move {
            let r = c
                .delete_policy(oversight::DeletePolicyRequest {
                    policy_id: "payments".into(),
                })
                .await?;
            Ok(vec![format!("admin removed: {:?}", r.into_inner())])
        }));
    }
    for (who, c) in [("admin", b_admin), ("approver", b_approver)] {
        let mut c = c.clone();
        rows.push(probe("ListPolicies", Want::NothingOfA, async move {
            let r = c.list_policies(oversight::ListPoliciesRequest {}).await?;
            Ok(r.into_inner()
                .policies
                .into_iter()
                .map(|p| format!("{who}: {}", p.policy_id))
                .collect())
        }));
    }
    rows
}

async fn oversight_tenants_are_isolated(env: &Env) {
    let (tokens, auth) = tokens();
    let running = env.start_oversight_with(auth, Default::default()).await;
    let channel = channel(&running).await;
    let client = |tenant: &str, subject: &str, roles: &[&str]| -> OversightClient {
        oversight::OversightServiceClient::with_interceptor(
            channel.clone(),
            tokens.bearer(tenant, subject, roles),
        )
    };
    let mut a = client(A, "a-admin", &["admin"]);
    let mut b = client(B, "b-admin", &["admin"]);
    let b_agent = client(B, "agent-7", &["agent"]);
    let b_approver = client(B, "alice", &["approver"]);
    let id = "req-1";

    // A writes: a policy, and a request it holds pending for alice.
    a.put_policy(oversight::PutPolicyRequest {
        policy: Some(approval_policy("alice")),
    })
    .await
    .unwrap();
    let created = a
        .create_request(approval_ask(id))
        .await
        .unwrap()
        .into_inner();
    assert!(!created.auto_approved);
    let before = get_request(&mut a, id).await;
    assert_eq!(before.state(), oversight::State::Pending);
    assert_eq!(before.approvers, vec!["alice".to_string()]);

    // An approver asks only as itself: asking as another agent, then answering, would approve
    // its own action under that agent's name.
    let mut two_hats = client(A, "mallory", &["agent", "approver"]);
    let mut ask = approval_ask("req-2");
    ask.agent_id = "someone-else".into();
    let e = two_hats.create_request(ask).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // B on A's ids: nothing.
    let mut covered =
        run_matrix("oversight", oversight_probes(&b, &b_agent, &b_approver, id)).await;

    // A's request and policy are as they were.
    assert_eq!(get_request(&mut a, id).await, before);
    assert_eq!(
        policy_ids_and_approvers(&mut a).await,
        vec![("payments".to_string(), vec!["alice".to_string()])]
    );

    // B writes the same ids: its own policy and request, decided by its own approver.
    let put = b
        .put_policy(oversight::PutPolicyRequest {
            policy: Some(approval_policy("bob")),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.policy.unwrap().levels[0].approvers, vec!["bob"]);
    let mine = b
        .create_request(approval_ask(id))
        .await
        .unwrap()
        .into_inner()
        .request
        .unwrap();
    assert_eq!(mine.state(), oversight::State::Pending);
    assert_eq!(
        mine.approvers,
        vec!["bob".to_string()],
        "B's request follows B's policy"
    );
    assert!(mine.version > before.version);
    let mut b_bob = client(B, "bob", &["approver"]);
    let decided = b_bob
        .respond(oversight::RespondRequest {
            request_id: id.into(),
            decision: oversight::Decision::Approve as i32,
            reason: "fine".into(),
            // Not an operator: the channel the audit records is not the caller's to choose.
            channel: oversight::Channel::Slack as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(decided.state(), oversight::State::Approved);
    assert_eq!(
        decided.responses[0].channel,
        oversight::Channel::Unspecified as i32
    );
    // Who recorded the answer: the approver's own token.
    assert_eq!(decided.responses[0].recorded_by, "bob");
    covered.extend(["PutPolicy", "CreateRequest"]);
    // Each sees only its own.
    assert_eq!(get_request(&mut a, id).await, before);
    assert_eq!(get_request(&mut b, id).await, decided);
    assert_eq!(list_requests(&mut a).await, vec![before.clone()]);
    assert_eq!(list_requests(&mut b).await, vec![decided.clone()]);
    assert_eq!(
        policy_ids_and_approvers(&mut b).await,
        vec![("payments".to_string(), vec!["bob".to_string()])]
    );
    assert_eq!(
        policy_ids_and_approvers(&mut a).await,
        vec![("payments".to_string(), vec!["alice".to_string()])]
    );

    // The PostgreSQL projection keys every row by the tenant that wrote it.
    if let Some(pool) = env.platform.pool() {
        let projector = Arc::new(creto_projections::oversight::OversightProjector::new(
            pool.clone(),
            env.platform.log.clone(),
            env.platform.catalog.clone(),
        ));
        let (stop, task) = run_projector(env, projector.clone());
        project_all(env, &*projector, creto_streams::OVERSIGHT).await;
        stop.send(true).unwrap();
        task.await.unwrap();

        let requests: Vec<(String, String, String, Vec<String>, i64)> = sqlx::query_as(
            "SELECT tenant, request_id, state, approvers, version FROM oversight_requests \
             ORDER BY tenant, request_id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(
            requests,
            vec![
                (
                    A.into(),
                    id.into(),
                    "pending".into(),
                    vec!["alice".into()],
                    before.version as i64
                ),
                (
                    B.into(),
                    id.into(),
                    "approved".into(),
                    vec!["bob".into()],
                    decided.version as i64
                ),
            ]
        );
        let audit: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT tenant, request_id, event_type, actor FROM oversight_audit \
             ORDER BY tenant, request_id, sequence",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let row = |t: &str, e: &str, actor: &str| (t.into(), id.into(), e.into(), actor.into());
        assert_eq!(
            audit,
            vec![
                row(A, "requested", "agent-7"),
                row(B, "requested", "agent-7"),
                row(B, "responded", "bob"),
            ]
        );
        let policies: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
            "SELECT tenant, policy_id, definition FROM oversight_policies ORDER BY tenant",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let approvers: Vec<(String, String, Vec<String>)> = policies
            .into_iter()
            .map(|(t, p, d)| {
                let p2: oversight::Policy = prost::Message::decode(d.as_slice()).unwrap();
                (t, p, p2.levels[0].approvers.clone())
            })
            .collect();
        assert_eq!(
            approvers,
            vec![
                (A.into(), "payments".into(), vec!["alice".into()]),
                (B.into(), "payments".into(), vec!["bob".into()]),
            ]
        );
        // Notification outcomes, if any, are about each tenant's own request.
        let notified: Vec<(String, String)> =
            sqlx::query_as("SELECT DISTINCT tenant, request_id FROM oversight_notifications")
                .fetch_all(pool)
                .await
                .unwrap();
        assert!(
            notified.iter().all(|(t, r)| (t == A || t == B) && r == id),
            "{notified:?}"
        );
    }
    assert_every_method(&covered, "creto.enablement.oversight.v1.OversightService");
    running.stop().await;
}

// ---- runtime ---------------------------------------------------------------------------------

mod runtime {
    pub use creto_schemas::runtime::v1::runtime_service_client::RuntimeServiceClient;
    pub use creto_schemas::runtime::v1::*;
}

type RuntimeClient = runtime::RuntimeServiceClient<Authed>;

/// A directory the unprivileged sandbox user can traverse to reach its layer.
fn sandbox_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("creto-isolation-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Runs `argv` in the sandbox; returns (stdout, exit code).
async fn exec(c: &mut RuntimeClient, id: &str, argv: &[&str]) -> Result<(String, i32), Status> {
    let mut stream = c
        .exec(runtime::ExecRequest {
            sandbox_id: id.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        match m.output {
            Some(runtime::exec_response::Output::Stdout(b)) => out.extend(b),
            Some(runtime::exec_response::Output::Finished(r)) => {
                return Ok((
                    String::from_utf8_lossy(&out).into(),
                    r.exit_code.unwrap_or(-1),
                ))
            }
            _ => {}
        }
    }
    Err(Status::internal("exec stream ended without a result"))
}

async fn get_sandbox(c: &mut RuntimeClient, id: &str) -> Result<runtime::Sandbox, Status> {
    c.get_sandbox(runtime::GetSandboxRequest {
        sandbox_id: id.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn list_sandbox_ids(c: &mut RuntimeClient) -> Vec<String> {
    c.list_sandboxes(runtime::ListSandboxesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .sandboxes
        .into_iter()
        .map(|s| s.sandbox_id)
        .collect()
}

fn create_request(request_id: &str, team: &str) -> runtime::CreateSandboxRequest {
    runtime::CreateSandboxRequest {
        template: "base".into(),
        metadata: HashMap::from([("team".to_string(), team.to_string())]),
        egress: Some(runtime::EgressPolicy {
            allow: vec!["api.example.com:443".into()],
        }),
        timeout: pb_duration(600),
        request_id: request_id.into(),
        ..Default::default()
    }
}

fn runtime_probes(b: &RuntimeClient, sandbox: &str, checkpoint: &str) -> Vec<Probe> {
    let sb = sandbox.to_string();
    let c = || b.clone();
    let shown = |s: runtime::Sandbox| vec![format!("{} of {}", s.sandbox_id, s.tenant)];
    let (mut c1, mut c2, mut c3, mut c4, mut c5) = (c(), c(), c(), c(), c());
    let (mut c6, mut c7, mut c8, mut c9) = (c(), c(), c(), c());
    let (s1, s2, s3, s4, s5, s6, s7) = (
        sb.clone(),
        sb.clone(),
        sb.clone(),
        sb.clone(),
        sb.clone(),
        sb.clone(),
        sb.clone(),
    );
    let ck = checkpoint.to_string();
    vec![
        probe("GetSandbox", Want::Hidden, async move {
            Ok(shown(get_sandbox(&mut c1, &s1).await?))
        }),
        probe("ListSandboxes", Want::NothingOfA, async move {
            let all = list_sandbox_ids(&mut c2).await;
            let by_metadata = c2
                .list_sandboxes(runtime::ListSandboxesRequest {
                    states: vec![runtime::State::Ready as i32],
                    metadata: HashMap::from([("team".to_string(), "a".to_string())]),
                    limit: 1000,
                })
                .await?
                .into_inner()
                .sandboxes;
            Ok(all
                .into_iter()
                .chain(by_metadata.into_iter().map(|s| s.sandbox_id))
                .collect())
        }),
        probe("Exec", Want::Hidden, async move {
            let (out, code) = exec(&mut c3, &s2, &["cat", "/home/sandbox/secret"]).await?;
            Ok(vec![format!("exit {code}: {out}")])
        }),
        probe("SetTimeout", Want::Hidden, async move {
            let r = c4
                .set_timeout(runtime::SetTimeoutRequest {
                    sandbox_id: s3,
                    timeout: pb_duration(120),
                })
                .await?;
            Ok(shown(r.into_inner()))
        }),
        probe("SetEgressPolicy", Want::Hidden, async move {
            let r = c5
                .set_egress_policy(runtime::SetEgressPolicyRequest {
                    sandbox_id: s4,
                    egress: Some(runtime::EgressPolicy {
                        allow: vec!["evil.example.com:443".into()],
                    }),
                })
                .await?;
            Ok(shown(r.into_inner()))
        }),
        probe("Checkpoint", Want::Hidden, async move {
            let r = c6
                .checkpoint(runtime::CheckpointRequest { sandbox_id: s5 })
                .await?;
            Ok(vec![format!("{:?}", r.into_inner())])
        }),
        probe("GetAttestation", Want::Hidden, async move {
            let r = c7
                .get_attestation(runtime::GetAttestationRequest { sandbox_id: s6 })
                .await?;
            Ok(vec![
                String::from_utf8_lossy(&r.into_inner().statement).into()
            ])
        }),
        probe("TerminateSandbox", Want::Hidden, async move {
            let r = c8
                .terminate_sandbox(runtime::TerminateSandboxRequest { sandbox_id: s7 })
                .await?;
            Ok(shown(r.into_inner()))
        }),
        // Restoring A's checkpoint into a sandbox of B's.
        probe("CreateSandbox", Want::Hidden, async move {
            let mut req = create_request("", "b");
            req.restore_checkpoint_id = ck;
            Ok(shown(c9.create_sandbox(req).await?.into_inner()))
        }),
    ]
}

/// Within a tenant an agent sees and acts on the sandboxes it created: another agent's files,
/// environment and egress are not its to read or change. The tenant's admin acts on all.
async fn runtime_agents_act_on_their_own_sandboxes(env: &Env) {
    let dir = sandbox_dir();
    let (tokens, auth) = tokens();
    let running = env.start_runtime_with(dir.path(), "", auth).await;
    let channel = channel(&running).await;
    let client = |subject: &str, roles: &[&str]| -> RuntimeClient {
        runtime::RuntimeServiceClient::with_interceptor(
            channel.clone(),
            tokens.bearer(A, subject, roles),
        )
    };
    let (mut alice, mut bob, mut admin) = (
        client("alice", &["agent"]),
        client("bob", &["agent"]),
        client("ops", &["admin"]),
    );
    let theirs = alice
        .create_sandbox(create_request("job-1", "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(theirs.owner, "alice");
    let ck = alice
        .checkpoint(runtime::CheckpointRequest {
            sandbox_id: theirs.sandbox_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();

    let e = get_sandbox(&mut bob, &theirs.sandbox_id).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = exec(&mut bob, &theirs.sandbox_id, &["true"])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = bob
        .set_egress_policy(runtime::SetEgressPolicyRequest {
            sandbox_id: theirs.sandbox_id.clone(),
            egress: Some(runtime::EgressPolicy {
                allow: vec!["0.0.0.0/0".into()],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let mut restore = create_request("", "b");
    restore.restore_checkpoint_id = ck.checkpoint_id.clone();
    let e = bob.create_sandbox(restore).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = bob
        .create_sandbox(create_request("job-1", "b"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert!(list_sandbox_ids(&mut bob).await.is_empty());
    assert_eq!(
        list_sandbox_ids(&mut alice).await,
        vec![theirs.sandbox_id.clone()]
    );

    // The tenant's admin acts on every agent's.
    assert_eq!(
        list_sandbox_ids(&mut admin).await,
        vec![theirs.sandbox_id.clone()]
    );
    let ended = admin
        .terminate_sandbox(runtime::TerminateSandboxRequest {
            sandbox_id: theirs.sandbox_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ended.state(), runtime::State::Terminated);
}

async fn runtime_tenants_are_isolated(env: &Env) {
    let dir = sandbox_dir();
    let (tokens, auth) = tokens();
    let running = env.start_runtime_with(dir.path(), "", auth).await;
    let channel = channel(&running).await;
    let client = |tenant: &str| -> RuntimeClient {
        runtime::RuntimeServiceClient::with_interceptor(
            channel.clone(),
            tokens.bearer(tenant, "tester", &["admin"]),
        )
    };
    let (mut a, mut b) = (client(A), client(B));

    // A writes: a sandbox (idempotency key "job-1"), a file in it, a checkpoint of it.
    let sa = a
        .create_sandbox(create_request("job-1", "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((sa.tenant.as_str(), sa.state()), (A, runtime::State::Ready));
    let (_, code) = exec(
        &mut a,
        &sa.sandbox_id,
        &["sh", "-c", "echo a-secret > /home/sandbox/secret"],
    )
    .await
    .unwrap();
    assert_eq!(code, 0);
    let ck = a
        .checkpoint(runtime::CheckpointRequest {
            sandbox_id: sa.sandbox_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .unwrap();
    let before = get_sandbox(&mut a, &sa.sandbox_id).await.unwrap();

    let mut covered = run_matrix(
        "runtime",
        runtime_probes(&b, &sa.sandbox_id, &ck.checkpoint_id),
    )
    .await;

    // A's sandbox is as it was (no event appended: same version) and still runs.
    assert_eq!(get_sandbox(&mut a, &sa.sandbox_id).await.unwrap(), before);
    let (out, _) = exec(&mut a, &sa.sandbox_id, &["cat", "/home/sandbox/secret"])
        .await
        .unwrap();
    assert_eq!(out, "a-secret\n");

    // B with A's idempotency key: a new sandbox of B's, with a fresh layer.
    let sb = b
        .create_sandbox(create_request("job-1", "b"))
        .await
        .unwrap()
        .into_inner();
    covered.insert("CreateSandbox");
    assert_ne!(sb.sandbox_id, sa.sandbox_id, "A's sandbox handed to B");
    assert_eq!((sb.tenant.as_str(), sb.state()), (B, runtime::State::Ready));
    assert!(sb.checkpoints.is_empty());
    let (out, code) = exec(
        &mut b,
        &sb.sandbox_id,
        &["sh", "-c", "cat /home/sandbox/secret 2>/dev/null; true"],
    )
    .await
    .unwrap();
    assert_eq!((out.as_str(), code), ("", 0), "B's layer holds A's file");
    // The same key again is idempotent within each tenant.
    let again = a
        .create_sandbox(create_request("job-1", "a"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.sandbox_id, sa.sandbox_id);
    let e = get_sandbox(&mut a, &sb.sandbox_id).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(list_sandbox_ids(&mut a).await, vec![sa.sandbox_id.clone()]);
    assert_eq!(list_sandbox_ids(&mut b).await, vec![sb.sandbox_id.clone()]);

    // Each ends its own.
    for (c, id) in [(&mut a, &sa.sandbox_id), (&mut b, &sb.sandbox_id)] {
        let ended = c
            .terminate_sandbox(runtime::TerminateSandboxRequest {
                sandbox_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ended.state(), runtime::State::Terminated);
    }

    if let Some(pool) = env.platform.pool() {
        let projector = Arc::new(creto_projections::runtime::RuntimeProjector::new(
            pool.clone(),
            env.platform.log.clone(),
            env.platform.catalog.clone(),
        ));
        let (stop, task) = run_projector(env, projector.clone());
        project_all(env, &*projector, creto_streams::RUNTIME).await;
        stop.send(true).unwrap();
        task.await.unwrap();

        let mut expected = vec![
            (sa.sandbox_id.clone(), A.to_string(), "job-1".to_string()),
            (sb.sandbox_id.clone(), B.to_string(), "job-1".to_string()),
        ];
        expected.sort();
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT sandbox_id, tenant, request_id FROM sandboxes ORDER BY sandbox_id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(rows, expected);
        let checkpoints: Vec<(String, String, String)> =
            sqlx::query_as("SELECT checkpoint_id, sandbox_id, tenant FROM sandbox_checkpoints")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(
            checkpoints,
            vec![(ck.checkpoint_id.clone(), sa.sandbox_id.clone(), A.into())]
        );
        assert!(
            ck.object_key.contains(&format!("/{A}/")),
            "{}",
            ck.object_key
        );
        // Execs: A's two in A's sandbox (none of B's attempts), B's one in B's.
        let execs: Vec<(String, i64)> = sqlx::query_as(
            "SELECT sandbox_id, count(*) FROM sandbox_execs GROUP BY sandbox_id ORDER BY sandbox_id",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let mut want = vec![(sa.sandbox_id.clone(), 2), (sb.sandbox_id.clone(), 1)];
        want.sort();
        assert_eq!(execs, want);
        let mixed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sandbox_egress e JOIN sandboxes s USING (sandbox_id) \
             WHERE e.tenant <> s.tenant",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(mixed, 0);
    }
    assert_every_method(&covered, "creto.enablement.runtime.v1.RuntimeService");
    running.stop().await;
}

// ---- metering --------------------------------------------------------------------------------

mod metering {
    pub use creto_schemas::metering::v1::metering_service_client::MeteringServiceClient;
    pub use creto_schemas::metering::v1::*;
}

type MeteringClient = metering::MeteringServiceClient<Authed>;

const CALLS: &str = "api.call";
const SUB: &str = "sub_shared";

fn usage_event(id: &str, quantity: f64) -> metering::UsageEvent {
    metering::UsageEvent {
        id: id.into(),
        source: "isolation-test".into(),
        r#type: CALLS.into(),
        subject: SUB.into(),
        time: ts(Utc::now() - Ch::seconds(30)),
        data: Some(prost_types::Struct {
            fields: [(
                "quantity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::NumberValue(quantity)),
                },
            )]
            .into(),
        }),
    }
}

fn this_hour() -> DateTime<Utc> {
    Utc::now().duration_trunc(Ch::hours(1)).unwrap()
}

/// A flat fee per day plus a price per call.
fn plan(currency: &str, fee: &str) -> metering::Plan {
    metering::Plan {
        plan_id: "pro".into(),
        version: 1,
        currency: currency.into(),
        charges: vec![
            metering::Charge {
                id: "base".into(),
                model: Some(metering::charge::Model::Flat(metering::FlatModel {
                    amount: fee.into(),
                })),
                ..Default::default()
            },
            metering::Charge {
                id: "calls".into(),
                meter: CALLS.into(),
                model: Some(metering::charge::Model::PerUnit(metering::PerUnitModel {
                    unit_price: "1.00".into(),
                })),
                ..Default::default()
            },
        ],
        minimum: String::new(),
        billing_interval: metering::BillingInterval::BillingDaily as i32,
    }
}

fn attach(from: DateTime<Utc>) -> metering::AttachPlanRequest {
    metering::AttachPlanRequest {
        subscription_id: SUB.into(),
        plan_id: "pro".into(),
        version: 1,
        effective_from: ts(from),
    }
}

/// A period long past the grace: generating it issues the invoice.
/// A UTC calendar day: the plan bills by the day, and an invoice stays in one.
fn past_period() -> metering::GenerateInvoiceRequest {
    let day = Utc::now().duration_trunc(Ch::days(1)).unwrap();
    metering::GenerateInvoiceRequest {
        subscription_id: SUB.into(),
        period_start: ts(day - Ch::days(20)),
        period_end: ts(day - Ch::days(19)),
    }
}

/// The UTC day holding `h` (this hour): a draft.
fn current_period(h: DateTime<Utc>) -> metering::GenerateInvoiceRequest {
    let day = h.duration_trunc(Ch::days(1)).unwrap();
    metering::GenerateInvoiceRequest {
        subscription_id: SUB.into(),
        period_start: ts(day),
        period_end: ts(day + Ch::days(1)),
    }
}

fn set_quota(limit: &str) -> metering::SetQuotaRequest {
    metering::SetQuotaRequest {
        subscription_id: SUB.into(),
        event_type: CALLS.into(),
        limit: limit.into(),
        period: Some(metering::QuotaPeriod {
            kind: metering::QuotaPeriodKind::PeriodMonth as i32,
            anchor: None,
            time_zone: String::new(),
        }),
        hard: true,
        thresholds_pct: vec![],
    }
}

fn grant(id: &str, amount: &str) -> metering::AddGrantRequest {
    metering::AddGrantRequest {
        subscription_id: SUB.into(),
        event_type: CALLS.into(),
        grant_id: id.into(),
        amount: amount.into(),
        ..Default::default()
    }
}

fn entitlement(enabled: bool) -> metering::SetEntitlementRequest {
    metering::SetEntitlementRequest {
        subscription_id: SUB.into(),
        feature: "sso".into(),
        value: Some(metering::set_entitlement_request::Value::Enabled(enabled)),
    }
}

fn quota_key(event_type: &str) -> metering::GetQuotaRequest {
    metering::GetQuotaRequest {
        subscription_id: SUB.into(),
        event_type: event_type.into(),
    }
}

fn usage_query(meter: &str, min_sequence: u64) -> metering::QueryUsageRequest {
    let now = Utc::now();
    metering::QueryUsageRequest {
        meter: meter.into(),
        subscription_id: SUB.into(),
        event_type: if meter.is_empty() {
            CALLS.into()
        } else {
            String::new()
        },
        from: ts(now - Ch::days(1)),
        to: ts(now + Ch::hours(1)),
        window: metering::Window::Day as i32,
        min_sequence,
        wait_ms: 10_000,
        ..Default::default()
    }
}

async fn total_usage(c: &mut MeteringClient, min_sequence: u64) -> f64 {
    c.query_usage(usage_query("", min_sequence))
        .await
        .unwrap()
        .into_inner()
        .rows
        .iter()
        .map(|r| r.value)
        .sum()
}

/// Retried while the replica's quota view warms (UNAVAILABLE).
async fn warm<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match call().await {
            Err(e) if e.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            r => return r,
        }
    }
}

async fn get_quota(c: &MeteringClient, event_type: &str) -> Result<metering::Quota, Status> {
    warm(|| {
        let mut c = c.clone();
        async move {
            Ok(c.get_quota(quota_key(event_type))
                .await?
                .into_inner()
                .quota
                .unwrap())
        }
    })
    .await
}

/// What of a quota must not change under another tenant's calls (usage and periods move
/// with time; these do not).
fn quota_terms(q: &metering::Quota) -> (String, String, String, bool, bool, Vec<String>) {
    (
        q.kind.clone(),
        q.limit.clone(),
        q.granted.clone(),
        q.hard,
        q.enabled,
        q.grants
            .iter()
            .map(|g| format!("{}={}", g.grant_id, g.amount))
            .collect(),
    )
}

/// What tenant A can see of its own data.
#[derive(Debug, PartialEq)]
struct MeteringSnapshot {
    usage: f64,
    meters: Vec<String>,
    invoices: Vec<metering::Invoice>,
    draft: String,
    quota: (String, String, String, bool, bool, Vec<String>),
    entitlement: (String, String, String, bool, bool, Vec<String>),
    corrections: Vec<(String, String, bool)>,
}

async fn metering_snapshot(
    env: &Env,
    c: &mut MeteringClient,
    h: DateTime<Utc>,
    min_sequence: u64,
) -> MeteringSnapshot {
    let corrections = env
        .platform
        .metering
        .billing()
        .corrections(A, SUB)
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.event_id, c.kind.as_str().to_string(), c.applied))
        .collect();
    MeteringSnapshot {
        usage: total_usage(c, min_sequence).await,
        meters: c
            .list_meters(metering::ListMetersRequest {})
            .await
            .unwrap()
            .into_inner()
            .meters
            .into_iter()
            .map(|m| format!("{}:{}", m.slug, m.event_type))
            .collect(),
        invoices: c
            .list_invoices(metering::ListInvoicesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .invoices,
        draft: c
            .generate_invoice(current_period(h))
            .await
            .unwrap()
            .into_inner()
            .invoice
            .unwrap()
            .document,
        quota: quota_terms(&get_quota(c, CALLS).await.unwrap()),
        entitlement: quota_terms(&get_quota(c, "sso").await.unwrap()),
        corrections,
    }
}

fn metering_probes(b: &MeteringClient, a_invoice: &str, a_sequence: u64) -> Vec<Probe> {
    let c = || b.clone();
    let number = a_invoice.to_string();
    let (mut c1, mut c2, mut c3, mut c4, mut c5, mut c6) = (c(), c(), c(), c(), c(), c());
    let (mut c7, mut c8, mut c9, mut c10, c11, c12) = (c(), c(), c(), c(), c(), c());
    let (mut c13, mut c14, mut c15, c16) = (c(), c(), c(), c());
    let invoice_numbers =
        |r: Vec<metering::Invoice>| -> Vec<String> { r.into_iter().map(|i| i.number).collect() };
    vec![
        // Core: usage under A's subscription id and A's meter, meters, dead letters.
        probe("QueryUsage", Want::NothingOfA, async move {
            let rows = c1.query_usage(usage_query("", a_sequence)).await?;
            Ok(rows
                .into_inner()
                .rows
                .into_iter()
                .filter(|r| r.value != 0.0)
                .map(|r| format!("{r:?}"))
                .collect())
        }),
        probe("QueryUsage", Want::Hidden, async move {
            let rows = c2.query_usage(usage_query("m1", a_sequence)).await?;
            Ok(vec![format!("{:?}", rows.into_inner())])
        }),
        probe("ListMeters", Want::NothingOfA, async move {
            let r = c3.list_meters(metering::ListMetersRequest {}).await?;
            Ok(r.into_inner().meters.into_iter().map(|m| m.slug).collect())
        }),
        probe("ListDeadLetters", Want::NothingOfA, async move {
            let r = c4
                .list_dead_letters(metering::ListDeadLettersRequest::default())
                .await?;
            Ok(r.into_inner()
                .dead_letters
                .into_iter()
                .map(|l| l.original_subject)
                .collect())
        }),
        // Corrections of A's events.
        probe("VoidEvent", Want::Hidden, async move {
            let r = c5
                .void_event(metering::VoidEventRequest {
                    subscription_id: SUB.into(),
                    event_id: "e1".into(),
                    reason: "not mine".into(),
                })
                .await?;
            Ok(vec![format!("{:?}", r.into_inner())])
        }),
        probe("AmendEvent", Want::Hidden, async move {
            let r = c6
                .amend_event(metering::AmendEventRequest {
                    subscription_id: SUB.into(),
                    event_id: "e1".into(),
                    quantity: Some(1000.0),
                    reason: "not mine".into(),
                    ..Default::default()
                })
                .await?;
            Ok(vec![format!("{:?}", r.into_inner())])
        }),
        // Billing: A's plan is not B's to attach; A's attachment does not bill B; A's invoice
        // number does not exist for B.
        probe(
            "AttachPlan",
            Want::Refused(Code::InvalidArgument),
            async move {
                let r = c7.attach_plan(attach(this_hour() - Ch::days(30))).await?;
                Ok(vec![format!("{:?}", r.into_inner())])
            },
        ),
        probe(
            "GenerateInvoice",
            Want::Refused(Code::FailedPrecondition),
            async move {
                let r = c8.generate_invoice(past_period()).await?;
                Ok(vec![format!("{:?}", r.into_inner())])
            },
        ),
        probe("GetInvoice", Want::Hidden, async move {
            let r = c9
                .get_invoice(metering::GetInvoiceRequest { number })
                .await?;
            Ok(vec![format!("{:?}", r.into_inner())])
        }),
        probe("ListInvoices", Want::NothingOfA, async move {
            let all = c10
                .list_invoices(metering::ListInvoicesRequest::default())
                .await?
                .into_inner()
                .invoices;
            let of_sub = c10
                .list_invoices(metering::ListInvoicesRequest {
                    subscription_id: SUB.into(),
                })
                .await?
                .into_inner()
                .invoices;
            Ok(invoice_numbers(all)
                .into_iter()
                .chain(invoice_numbers(of_sub))
                .collect())
        }),
        // Quotas and entitlements.
        probe("GetQuota", Want::Hidden, async move {
            let q = get_quota(&c11, CALLS).await?;
            Ok(vec![format!("{q:?}")])
        }),
        probe("GetQuota", Want::Hidden, async move {
            let q = get_quota(&c12, "sso").await?;
            Ok(vec![format!("{q:?}")])
        }),
        probe("CheckQuota", Want::Hidden, async move {
            let r = warm(|| {
                let mut c = c16.clone();
                async move {
                    c.check_quota(metering::CheckQuotaRequest {
                        subscription_id: SUB.into(),
                        event_type: CALLS.into(),
                        quantity: Some(1.0),
                        min_sequence: a_sequence,
                    })
                    .await
                }
            })
            .await?;
            Ok(vec![format!("{:?}", r.into_inner())])
        }),
        probe("RemoveQuota", Want::Hidden, async move {
            let r = c13
                .remove_quota(metering::RemoveQuotaRequest {
                    subscription_id: SUB.into(),
                    event_type: CALLS.into(),
                })
                .await?;
            Ok(vec![format!("{:?}", r.into_inner())])
        }),
        probe(
            "AddGrant",
            Want::Refused(Code::FailedPrecondition),
            async move {
                let r = c14.add_grant(grant("steal", "100")).await?;
                Ok(vec![format!("{:?}", r.into_inner())])
            },
        ),
        probe(
            "VoidGrant",
            Want::Refused(Code::FailedPrecondition),
            async move {
                let r = c15
                    .void_grant(metering::VoidGrantRequest {
                        subscription_id: SUB.into(),
                        event_type: CALLS.into(),
                        grant_id: "g1".into(),
                    })
                    .await?;
                Ok(vec![format!("{:?}", r.into_inner())])
            },
        ),
    ]
}

async fn metering_tenants_are_isolated(env: &Env) {
    let (tokens, auth) = tokens();
    let running = env.start_metering_with(true, auth).await;
    let channel = channel(&running).await;
    let client = |tenant: &str| -> MeteringClient {
        metering::MeteringServiceClient::with_interceptor(
            channel.clone(),
            tokens.bearer(tenant, "tester", &["admin"]),
        )
    };
    let (mut a, mut b) = (client(A), client(B));
    let h = this_hour();

    // A writes through every write method: usage (and a dead letter), a meter, corrections,
    // a plan attached to the subscription, an issued invoice, a quota with a grant, an
    // entitlement.
    let r = a
        .ingest_events(metering::IngestEventsRequest {
            events: vec![
                usage_event("e1", 4.0),
                usage_event("e2", 6.0),
                usage_event("bad", -1.0),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.rejected), (2, 1), "{r:?}");
    env.wait_applied(r.sequence).await;
    a.create_meter(metering::CreateMeterRequest {
        meter: Some(metering::Meter {
            slug: "m1".into(),
            event_type: CALLS.into(),
            aggregation: metering::Aggregation::Sum as i32,
            value_property: "$.quantity".into(),
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let voided = a
        .void_event(metering::VoidEventRequest {
            subscription_id: SUB.into(),
            event_id: "e2".into(),
            reason: "duplicate call".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(voided.voided);
    let amended = a
        .amend_event(metering::AmendEventRequest {
            subscription_id: SUB.into(),
            event_id: "e1".into(),
            quantity: Some(3.0),
            reason: "recount".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    env.wait_applied(amended.sequence).await;
    let put = a
        .put_plan(metering::PutPlanRequest {
            plan: Some(plan("USD", "10")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(put.created);
    a.attach_plan(attach(h - Ch::days(30))).await.unwrap();
    let a_invoice = a
        .generate_invoice(past_period())
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(a_invoice.status, metering::InvoiceStatus::Issued as i32);
    assert_eq!(a_invoice.number, format!("INV-{A}-000001"));
    a.set_quota(set_quota("100")).await.unwrap();
    a.add_grant(grant("g1", "50")).await.unwrap();
    let last = a
        .set_entitlement(entitlement(true))
        .await
        .unwrap()
        .into_inner()
        .sequence;
    env.wait_applied(last).await;
    let before = metering_snapshot(env, &mut a, h, last).await;
    assert_eq!(before.usage, 3.0, "{before:?}");
    assert_eq!(before.invoices, vec![a_invoice.clone()]);
    assert_eq!(before.quota.1, "100");
    assert!(before.entitlement.4);

    // B on A's ids.
    let mut covered = run_matrix("metering", metering_probes(&b, &a_invoice.number, last)).await;

    // Nothing of A's changed.
    assert_eq!(metering_snapshot(env, &mut a, h, last).await, before);

    // B writes the same ids: its own events (not duplicates of A's), meter, plan, invoice
    // (numbered in B's own sequence), corrections, quota, grant and entitlement.
    let r = b
        .ingest_events(metering::IngestEventsRequest {
            events: vec![usage_event("e1", 5.0), usage_event("e2", 7.0)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.duplicates), (2, 0), "{r:?}");
    env.wait_applied(r.sequence).await;
    b.create_meter(metering::CreateMeterRequest {
        meter: Some(metering::Meter {
            slug: "m1".into(),
            event_type: CALLS.into(),
            aggregation: metering::Aggregation::Count as i32,
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let b_void = b
        .void_event(metering::VoidEventRequest {
            subscription_id: SUB.into(),
            event_id: "e2".into(),
            reason: "B's own".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(b_void.voided, "A's void of e2 is not B's");
    b.amend_event(metering::AmendEventRequest {
        subscription_id: SUB.into(),
        event_id: "e1".into(),
        quantity: Some(5.5),
        reason: "B's own".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let put = b
        .put_plan(metering::PutPlanRequest {
            plan: Some(plan("EUR", "99")),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(put.created, "A's plan pro v1 is not B's");
    b.attach_plan(attach(h - Ch::days(30))).await.unwrap();
    let b_invoice = b
        .generate_invoice(past_period())
        .await
        .unwrap()
        .into_inner()
        .invoice
        .unwrap();
    assert_eq!(b_invoice.number, format!("INV-{B}-000001"));
    assert_eq!(
        (b_invoice.currency.as_str(), b_invoice.total.as_str()),
        ("EUR", "99.00")
    );
    b.set_quota(set_quota("5")).await.unwrap();
    b.add_grant(grant("g1", "1")).await.unwrap();
    b.void_grant(metering::VoidGrantRequest {
        subscription_id: SUB.into(),
        event_type: CALLS.into(),
        grant_id: "g1".into(),
    })
    .await
    .unwrap();
    b.set_entitlement(entitlement(false)).await.unwrap();
    let last_b = b
        .remove_quota(metering::RemoveQuotaRequest {
            subscription_id: SUB.into(),
            event_type: CALLS.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sequence;
    env.wait_applied(last_b).await;
    covered.extend([
        "IngestEvents",
        "CreateMeter",
        "PutPlan",
        "SetQuota",
        "SetEntitlement",
    ]);

    // A's data is still exactly A's; B's is B's.
    assert_eq!(metering_snapshot(env, &mut a, h, last_b).await, before);
    assert_eq!(total_usage(&mut b, last_b).await, 5.5);
    let e = get_quota(&b, CALLS).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "B removed its own quota: {e:?}");
    assert!(!get_quota(&b, "sso").await.unwrap().enabled);
    let b_invoices = b
        .list_invoices(metering::ListInvoicesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .invoices;
    assert_eq!(b_invoices, vec![b_invoice.clone()]);
    let e = b
        .get_invoice(metering::GetInvoiceRequest {
            number: a_invoice.number.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // The read models (PostgreSQL or embedded) keep the tenants apart.
    let billing = env.platform.metering.billing();
    let corrections = |t: &'static str| async move {
        billing
            .corrections(t, SUB)
            .await
            .unwrap()
            .into_iter()
            .map(|c| (c.event_id, c.kind.as_str().to_string()))
            .collect::<Vec<_>>()
    };
    let pair = |e: &str, k: &str| (e.to_string(), k.to_string());
    assert_eq!(
        corrections(A).await,
        vec![pair("e2", "void"), pair("e1", "amend")]
    );
    assert_eq!(
        corrections(B).await,
        vec![pair("e2", "void"), pair("e1", "amend")]
    );
    for (tenant, currency, invoice) in [(A, "USD", &a_invoice), (B, "EUR", &b_invoice)] {
        let plan = billing.plan(tenant, "pro", 1).await.unwrap().unwrap();
        assert_eq!(
            serde_json::to_value(&plan).unwrap()["currency"],
            currency,
            "{tenant}"
        );
        assert_eq!(billing.assignments(tenant, SUB).await.unwrap().len(), 1);
        let docs = billing.invoices(tenant, None).await.unwrap();
        assert_eq!(docs, vec![invoice.document.clone()], "{tenant}");
        assert_eq!(
            billing.invoice(tenant, &invoice.number).await.unwrap(),
            Some(invoice.document.clone())
        );
    }
    assert_eq!(billing.invoice(B, &a_invoice.number).await.unwrap(), None);
    assert_eq!(billing.invoice(A, &b_invoice.number).await.unwrap(), None);

    if let Some(pool) = env.platform.pool() {
        let events: Vec<(String, String, f64)> = sqlx::query_as(
            "SELECT tenant, event_id, quantity::float8 FROM metering_events \
             WHERE subscription_id = $1 ORDER BY tenant, event_id",
        )
        .bind(SUB)
        .fetch_all(pool)
        .await
        .unwrap();
        let row = |t: &str, e: &str, q: f64| (t.to_string(), e.to_string(), q);
        assert_eq!(
            events,
            vec![
                row(A, "e1", 4.0),
                row(A, "e2", 6.0),
                row(B, "e1", 5.0),
                row(B, "e2", 7.0)
            ]
        );
        let meters: Vec<(String, String, String)> =
            sqlx::query_as("SELECT tenant, slug, aggregation FROM meters ORDER BY tenant")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(meters.len(), 2, "{meters:?}");
        assert_ne!(meters[0].2, meters[1].2, "{meters:?}");
        // Every keyed row names its own tenant in its content.
        let mixed: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant, correction_id FROM metering_corrections \
               WHERE correction_id NOT LIKE '%:' || tenant || ':%' \
             UNION ALL SELECT tenant, number FROM invoices \
               WHERE number NOT LIKE 'INV-' || tenant || '-%' \
                  OR (document::jsonb ->> 'tenant') IS DISTINCT FROM tenant",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        assert!(
            mixed.is_empty(),
            "rows of one tenant under another: {mixed:?}"
        );
        let plans: Vec<(String, String)> =
            sqlx::query_as("SELECT tenant, currency FROM plans ORDER BY tenant")
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(
            plans,
            vec![(A.into(), "USD".into()), (B.into(), "EUR".into())]
        );
        let hourly: Vec<(String, f64)> = sqlx::query_as(
            "SELECT tenant, sum(quantity_sum)::float8 FROM usage_hourly \
             WHERE subscription_id = $1 GROUP BY tenant ORDER BY tenant",
        )
        .bind(SUB)
        .fetch_all(pool)
        .await
        .unwrap();
        assert_eq!(hourly, vec![(A.into(), 3.0), (B.into(), 5.5)]);
    }
    assert_every_method(&covered, "creto.enablement.metering.v1.MeteringService");
    running.stop().await;
}
