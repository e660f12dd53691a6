//! `creto.enablement.runtime.v1.RuntimeService`: checks each request, then lets the replica's
//! [`Runtime`] act on the backend and record the step.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use creto_domain::runtime::attestation::{self, Statement};
use creto_domain::runtime::egress::EgressPolicy;
use creto_domain::runtime::sandbox::{self as domain, Aggregate};
use creto_schemas::runtime::v1::runtime_service_server::RuntimeService;
use creto_schemas::runtime::v1::{self as pb, sandbox_event::Event, State};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::backend::{BackendError, ExecChunk, ExecRequest};
use super::engine::{Live, NewSandbox, Runtime, RuntimeError, MAX_EXECS_PER_SANDBOX};
use super::metrics;
use crate::auth::Identity;
use crate::log_status::log_status;

const MAX_LIST: u32 = 1_000;

/// How long an Exec stream may wait for its client to take the next output before the client
/// is dropped (the command's output is then drained unread).
const STALLED_CLIENT: Duration = Duration::from_secs(30);

pub struct RuntimeGateway {
    pub runtime: Arc<Runtime>,
}

impl From<RuntimeError> for Status {
    fn from(e: RuntimeError) -> Status {
        match e {
            RuntimeError::Invalid(m) => Status::invalid_argument(m),
            RuntimeError::NotFound(m) => Status::not_found(m),
            RuntimeError::Precondition(m) => Status::failed_precondition(m),
            RuntimeError::Backend(m) => Status::unavailable(m),
            RuntimeError::Exhausted(m) => Status::resource_exhausted(m),
            RuntimeError::Log(e) => log_status(e),
        }
    }
}

fn invalid(r: domain::Refusal) -> Status {
    RuntimeError::from(r).into()
}

fn egress(p: Option<&pb::EgressPolicy>) -> Result<EgressPolicy, Status> {
    EgressPolicy::parse(p.map(|p| p.allow.as_slice()).unwrap_or_default())
        .map_err(|e| Status::invalid_argument(e.to_string()))
}

/// Runs a command that changes a sandbox to its end even when its caller goes away (a client
/// deadline or disconnect drops the handler's future): dropped half way, a create left a
/// sandbox recorded as provisioning for ever (its retry by `request_id` got that one back) or
/// a process no replica tracked, a terminate a killed sandbox recorded as running, an egress
/// change a policy recorded but not applied.
async fn to_completion<T: Send + 'static>(
    command: impl std::future::Future<Output = Result<T, Status>> + Send + 'static,
) -> Result<T, Status> {
    tokio::spawn(command)
        .await
        .map_err(|e| Status::internal(format!("the command's task failed: {e}")))?
}

fn check_id(id: &str) -> Result<(), Status> {
    domain::check_name("sandbox_id", id).map_err(invalid)
}

/// The owner a caller is confined to: its subject when, of admin, operator and agent, it
/// holds agent alone (an agent acts on the sandboxes it created, not on its tenant's others:
/// their files, environment and egress are theirs). `None`: the whole tenant.
fn confined_to(caller: &Identity) -> Option<&str> {
    let tenant_wide = caller.has_role("admin") || caller.has_role("operator");
    (caller.has_role("agent") && !tenant_wide).then_some(caller.subject.as_str())
}

impl RuntimeGateway {
    fn caller<T>(request: &Request<T>) -> Result<Identity, Status> {
        Ok(crate::auth::layer::caller(request)?.clone())
    }

    /// The caller's sandbox as this replica's view has it; another tenant's (or, for an
    /// agent, another agent's) is NOT_FOUND.
    async fn sandbox(&self, caller: &Identity, id: &str) -> Result<Aggregate, Status> {
        check_id(id)?;
        let owner = confined_to(caller);
        let agg = self
            .runtime
            .view
            .get_fresh(id)
            .await
            .map_err(log_status)?
            .filter(|a| !a.pooled && a.view.tenant == caller.tenant)
            .filter(|a| owner.is_none_or(|o| a.view.owner == o))
            .ok_or_else(|| Status::not_found(format!("no sandbox {id}")))?;
        Ok(agg)
    }

    /// The caller's sandbox running on this replica.
    async fn running(&self, caller: &Identity, id: &str) -> Result<Arc<Live>, Status> {
        let agg = self.sandbox(caller, id).await?;
        agg.require_ready().map_err(invalid)?;
        if agg.view.node != self.runtime.settings.node {
            return Err(Status::failed_precondition(format!(
                "sandbox {id} runs on node {:?}, this is {:?}; send the call to that replica",
                agg.view.node, self.runtime.settings.node
            )));
        }
        self.runtime.live(id).ok_or_else(|| {
            Status::failed_precondition(format!("sandbox {id} is no longer running here"))
        })
    }

    /// The sandbox a create under `req.request_id` made before, if any (the same request
    /// again), or why the id cannot be used. `catch_up`: read the log first when this
    /// replica's view does not know the id (another replica may have made it).
    async fn made_for(
        &self,
        caller: &Identity,
        req: &pb::CreateSandboxRequest,
        catch_up: bool,
    ) -> Result<Option<pb::Sandbox>, Status> {
        let view = &self.runtime.view;
        if catch_up && view.by_request(&caller.tenant, &req.request_id).is_none() {
            view.catch_up().await.map_err(log_status)?;
        }
        let Some(agg) = view.by_request(&caller.tenant, &req.request_id) else {
            return Ok(None);
        };
        if confined_to(caller).is_some_and(|o| agg.view.owner != o) {
            return Err(Status::already_exists(format!(
                "request_id {} names another agent's sandbox; use your own ids",
                req.request_id
            )));
        }
        if !self.same_ask(&agg.view, req) {
            return Err(Status::already_exists(format!(
                "request_id {} made sandbox {} from another request (template, resources, metadata or environment names differ); use a new id",
                req.request_id, agg.view.sandbox_id
            )));
        }
        if agg.view.state() == pb::State::Failed {
            // OK with a dead sandbox read as success to a client retrying after an error:
            // the request's outcome was the failure.
            return Err(Status::failed_precondition(format!(
                "request_id {} made sandbox {}, which failed ({}); retry with a new request_id",
                req.request_id, agg.view.sandbox_id, agg.view.failure_reason
            )));
        }
        Ok(Some(agg.view))
    }

    /// Whether `req`, sent again under a request id already used, asks for what `existing`
    /// was made from (what the sandbox records of it: template, resources, metadata and
    /// environment names).
    fn same_ask(&self, existing: &pb::Sandbox, req: &pb::CreateSandboxRequest) -> bool {
        let limits = &self.runtime.settings.limits;
        let template = if req.template.is_empty() {
            "base"
        } else {
            req.template.as_str()
        };
        let mut env_names: Vec<&String> = req.env.keys().collect();
        env_names.sort();
        let mut had: Vec<&String> = existing.env_names.iter().collect();
        had.sort();
        template == existing.template
            && domain::resources(req.resources.as_ref(), limits).ok() == existing.resources
            && req.metadata == existing.metadata
            && env_names == had
    }

    async fn new_sandbox(
        &self,
        caller: &Identity,
        req: pb::CreateSandboxRequest,
    ) -> Result<NewSandbox, Status> {
        let limits = &self.runtime.settings.limits;
        let template = if req.template.is_empty() {
            "base".to_string()
        } else {
            req.template
        };
        domain::check_name("template", &template).map_err(invalid)?;
        self.runtime.template(&template)?;
        let resources = domain::resources(req.resources.as_ref(), limits).map_err(invalid)?;
        let timeout = domain::timeout(
            req.timeout.as_ref(),
            limits.default_timeout,
            limits.max_timeout,
            "timeout",
        )
        .map_err(invalid)?;
        let env: BTreeMap<String, String> = req.env.into_iter().collect();
        domain::check_env(&env, limits).map_err(invalid)?;
        let metadata: BTreeMap<String, String> = req.metadata.into_iter().collect();
        domain::check_metadata(&metadata, limits).map_err(invalid)?;
        if !req.request_id.is_empty() && req.request_id.len() > 128 {
            return Err(Status::invalid_argument(
                "request_id is longer than 128 bytes",
            ));
        }
        let restore = if req.restore_checkpoint_id.is_empty() {
            None
        } else {
            Some(
                self.fetch_checkpoint(caller, &req.restore_checkpoint_id)
                    .await?,
            )
        };
        Ok(NewSandbox {
            tenant: caller.tenant.clone(),
            template,
            resources,
            timeout,
            env,
            metadata,
            egress: egress(req.egress.as_ref())?,
            restore,
            request_id: req.request_id,
            owner: caller.subject.clone(),
        })
    }

    /// The archive of a checkpoint of one of the caller's sandboxes, checked against its hash.
    async fn fetch_checkpoint(
        &self,
        caller: &Identity,
        checkpoint_id: &str,
    ) -> Result<(String, Bytes), Status> {
        domain::check_name("restore_checkpoint_id", checkpoint_id).map_err(invalid)?;
        let archive = self.runtime.archive.as_ref().ok_or_else(|| {
            Status::failed_precondition("no object storage is configured for checkpoints")
        })?;
        let found = self
            .runtime
            .view
            .checkpoint(&caller.tenant, confined_to(caller), checkpoint_id)
            .ok_or_else(|| Status::not_found(format!("no checkpoint {checkpoint_id}")))?;
        let body = archive
            .get(&found.object_key)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| {
                Status::data_loss(format!(
                    "checkpoint {checkpoint_id} is recorded but its object {} is missing",
                    found.object_key
                ))
            })?;
        if hex::encode(Sha256::digest(&body)) != found.sha256 {
            return Err(Status::data_loss(format!(
                "checkpoint {checkpoint_id}: the object's SHA-256 does not match the recorded one"
            )));
        }
        Ok((checkpoint_id.to_string(), body))
    }
}

type ExecStream = ReceiverStream<Result<pb::ExecResponse, Status>>;

fn exec_outcome(r: &pb::ExecResult) -> &'static str {
    if !r.error.is_empty() {
        "failed"
    } else if r.timed_out {
        "timeout"
    } else if r.oom_killed {
        "oom"
    } else if r.pids_limited {
        "pids_limit"
    } else if r.disk_full {
        "disk_full"
    } else {
        match r.exit_code {
            Some(0) => "exit_zero",
            Some(_) => "exit_nonzero",
            None => "signal",
        }
    }
}

#[tonic::async_trait]
impl RuntimeService for RuntimeGateway {
    async fn create_sandbox(
        &self,
        request: Request<pb::CreateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let caller = Self::caller(&request)?;
        let req = request.into_inner();
        let mut in_flight = None;
        if !req.request_id.is_empty() {
            if let Some(made) = self.made_for(&caller, &req, true).await? {
                return Ok(Response::new(made));
            }
            in_flight = Some(
                self.runtime
                    .request_in_flight(&caller.tenant, &req.request_id)
                    .ok_or_else(|| {
                        Status::aborted(format!(
                            "a create with request_id {} is under way; retry to get its sandbox",
                            req.request_id
                        ))
                    })?,
            );
            // A create here that held the id until just now has put its sandbox in the view
            // (its own appends are folded at once: no need to read the log again).
            if let Some(made) = self.made_for(&caller, &req, false).await? {
                return Ok(Response::new(made));
            }
        }
        // A restore holds its archive from the fetch until the layer is unpacked, in one of the
        // replica's few archive turns: a request the cheap checks refuse does not wait for one.
        let _turn = match req.restore_checkpoint_id.is_empty() {
            true => None,
            false => {
                egress(req.egress.as_ref())?;
                domain::resources(req.resources.as_ref(), &self.runtime.settings.limits)
                    .map_err(invalid)?;
                Some(self.runtime.archive_turn().await)
            }
        };
        let new = self.new_sandbox(&caller, req).await?;
        let runtime = self.runtime.clone();
        let sandbox = to_completion(async move {
            let (_turn, _in_flight) = (_turn, in_flight);
            runtime.create(new).await.map_err(Status::from)
        })
        .await?;
        Ok(Response::new(sandbox))
    }

    type ExecStream = ExecStream;

    async fn exec(
        &self,
        request: Request<pb::ExecRequest>,
    ) -> Result<Response<ExecStream>, Status> {
        let caller = Self::caller(&request)?;
        let req = request.into_inner();
        let limits = &self.runtime.settings.limits;
        domain::check_argv(&req.argv, limits).map_err(invalid)?;
        if req.stdin.len() > limits.max_stdin_bytes {
            return Err(Status::invalid_argument(format!(
                "stdin is {} bytes; at most {}",
                req.stdin.len(),
                limits.max_stdin_bytes
            )));
        }
        let env: BTreeMap<String, String> = req.env.into_iter().collect();
        domain::check_env(&env, limits).map_err(invalid)?;
        if !req.workdir.is_empty() && (!req.workdir.starts_with('/') || req.workdir.contains('\0'))
        {
            return Err(Status::invalid_argument(
                "workdir must be an absolute path inside the sandbox",
            ));
        }
        let live = self.running(&caller, &req.sandbox_id).await?;
        let running = live.execs.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "sandbox {} runs {MAX_EXECS_PER_SANDBOX} execs already; wait for one to end",
                req.sandbox_id
            ))
        })?;
        let left = self
            .runtime
            .view
            .get(&req.sandbox_id)
            .and_then(|a| a.expires_at())
            .map(|at| (at - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .unwrap_or(limits.max_timeout);
        if left.is_zero() {
            // Its expiry is being recorded: a command with no time left could not be run.
            return Err(Status::failed_precondition(format!(
                "sandbox {} has reached the end of its lifetime; SetTimeout earlier to keep it",
                req.sandbox_id
            )));
        }
        let timeout = domain::timeout(
            req.timeout.as_ref(),
            limits.default_exec_timeout,
            limits.max_timeout,
            "timeout",
        )
        .map_err(invalid)?
        .min(left);
        let exec_id = format!("ex-{}", uuid::Uuid::new_v4().simple());
        let mut all_env = live.env.lock().expect("env lock").clone();
        all_env.extend(env);
        let exec = ExecRequest {
            argv: req.argv,
            stdin: req.stdin,
            env: all_env,
            timeout,
            workdir: (!req.workdir.is_empty()).then_some(req.workdir),
        };
        let (tx, rx) = mpsc::channel(64);
        let runtime = self.runtime.clone();
        let id = req.sandbox_id;
        let started = Event::ExecStarted(pb::ExecStarted {
            exec_id: exec_id.clone(),
            argv: exec.argv.clone(),
        });
        let (start_tx, start_rx) = tokio::sync::oneshot::channel();
        // The start is recorded, and the command run, in one task: a caller that gives up
        // while the start is appended would otherwise leave a started exec that never runs
        // nor ends. It then runs with no one reading, as one whose caller leaves later does.
        tokio::spawn(async move {
            let start = async {
                let mut agg = live.agg.lock().await;
                agg.require_ready().map_err(invalid)?;
                runtime
                    .append(&mut agg, &id, vec![started])
                    .await
                    .map_err(log_status)
            }
            .await;
            let begun = start.is_ok();
            let _ = start_tx.send(start);
            if !begun {
                return;
            }
            let _running = running;
            let (chunks_tx, mut chunks) = mpsc::channel(64);
            // A client that stops reading (but keeps the stream open) is dropped after
            // [`STALLED_CLIENT`]: the command's output is then drained unread, so the command
            // ends (by itself or at its timeout) and its end is recorded.
            let mut reading = true;
            let handle = live.handle.clone();
            let run = tokio::spawn(async move { handle.exec(exec, chunks_tx).await });
            while let Some(chunk) = chunks.recv().await {
                let output = match chunk {
                    ExecChunk::Stdout(b) => pb::exec_response::Output::Stdout(b.to_vec()),
                    ExecChunk::Stderr(b) => pb::exec_response::Output::Stderr(b.to_vec()),
                };
                // A caller that went away does not stop the command; its timeout does.
                if reading {
                    let sent = tx.send_timeout(
                        Ok(pb::ExecResponse {
                            output: Some(output),
                        }),
                        STALLED_CLIENT,
                    );
                    reading = sent.await.is_ok();
                }
            }
            let failed = match run.await {
                Ok(Ok(o)) => Ok(o),
                Ok(Err(e @ BackendError::InvalidSpec(_))) => {
                    Err(Status::invalid_argument(format!("exec refused: {e}")))
                }
                Ok(Err(e @ BackendError::Terminated(_))) => {
                    Err(Status::failed_precondition(format!("exec not run: {e}")))
                }
                Ok(Err(e)) => Err(Status::unavailable(format!("exec failed: {e}"))),
                Err(e) => Err(Status::internal(format!("exec task: {e}"))),
            };
            // A command that could not be run ends too (recorded with its error): left at
            // ExecStarted, it stayed open in the exec history for good.
            let (result, failure) = match failed {
                Ok(outcome) => (
                    pb::ExecResult {
                        exec_id,
                        exit_code: outcome.exit_code,
                        signal: outcome.signal.unwrap_or(0),
                        timed_out: outcome.timed_out,
                        oom_killed: outcome.oom_killed,
                        pids_limited: outcome.pids_limited,
                        disk_full: outcome.disk_full,
                        duration: Some(prost_types::Duration {
                            seconds: outcome.duration.as_secs() as i64,
                            nanos: outcome.duration.subsec_nanos() as i32,
                        }),
                        error: String::new(),
                    },
                    None,
                ),
                Err(status) => (
                    pb::ExecResult {
                        exec_id,
                        error: status.message().to_string(),
                        ..Default::default()
                    },
                    Some(status),
                ),
            };
            metrics::EXECS
                .with_label_values(&[exec_outcome(&result)])
                .inc();
            let finished = Event::ExecFinished(pb::ExecFinished {
                result: Some(result.clone()),
            });
            let recorded = {
                let mut agg = live.agg.lock().await;
                runtime.append(&mut agg, &id, vec![finished]).await
            };
            let last = match (recorded, failure) {
                (_, Some(status)) => Err(status),
                (Ok(()), None) => Ok(pb::ExecResponse {
                    output: Some(pb::exec_response::Output::Finished(result)),
                }),
                (Err(e), None) => Err(log_status(e)),
            };
            if reading {
                let _ = tx.send_timeout(last, STALLED_CLIENT).await;
            }
        });
        start_rx
            .await
            .map_err(|_| Status::internal("the exec's task ended before it started"))??;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_sandbox(
        &self,
        request: Request<pb::GetSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let caller = Self::caller(&request)?;
        let agg = self.sandbox(&caller, &request.get_ref().sandbox_id).await?;
        Ok(Response::new(agg.view))
    }

    async fn list_sandboxes(
        &self,
        request: Request<pb::ListSandboxesRequest>,
    ) -> Result<Response<pb::ListSandboxesResponse>, Status> {
        let caller = Self::caller(&request)?;
        let req = request.into_inner();
        let states = req
            .states
            .iter()
            .map(|s| {
                State::try_from(*s)
                    .ok()
                    .filter(|s| *s != State::Unspecified)
                    .ok_or_else(|| Status::invalid_argument(format!("unknown state {s}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if req.limit > MAX_LIST {
            return Err(Status::invalid_argument(format!(
                "limit {} is over {MAX_LIST}",
                req.limit
            )));
        }
        let limit = if req.limit == 0 { 100 } else { req.limit } as usize;
        self.runtime.view.catch_up().await.map_err(log_status)?;
        let sandboxes = self.runtime.view.list(
            &caller.tenant,
            confined_to(&caller),
            &states,
            &req.metadata,
            limit,
        );
        Ok(Response::new(pb::ListSandboxesResponse { sandboxes }))
    }

    async fn set_timeout(
        &self,
        request: Request<pb::SetTimeoutRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let caller = Self::caller(&request)?;
        let req = request.into_inner();
        let limits = &self.runtime.settings.limits;
        let Some(asked) = req
            .timeout
            .as_ref()
            .filter(|d| d.seconds > 0 || d.nanos > 0)
        else {
            return Err(Status::invalid_argument(
                "timeout must be positive; use TerminateSandbox to end it now",
            ));
        };
        let timeout = domain::timeout(
            Some(asked),
            limits.default_timeout,
            limits.max_timeout,
            "timeout",
        )
        .map_err(invalid)?;
        let live = self.running(&caller, &req.sandbox_id).await?;
        let mut agg = live.agg.lock().await;
        agg.require_ready().map_err(invalid)?;
        let at = Utc::now() + chrono::Duration::from_std(timeout).expect("bounded timeout");
        let changed = Event::TimeoutChanged(pb::TimeoutChanged {
            expires_at: Some(domain::timestamp(at)),
        });
        self.runtime
            .append(&mut agg, &req.sandbox_id, vec![changed])
            .await
            .map_err(log_status)?;
        Ok(Response::new(agg.view.clone()))
    }

    async fn set_egress_policy(
        &self,
        request: Request<pb::SetEgressPolicyRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let caller = Self::caller(&request)?;
        let req = request.into_inner();
        let policy = egress(req.egress.as_ref())?;
        let live = self.running(&caller, &req.sandbox_id).await?;
        let runtime = self.runtime.clone();
        to_completion(async move {
            let mut agg = live.agg.lock().await;
            agg.require_ready().map_err(invalid)?;
            let changed = Event::EgressPolicyChanged(pb::EgressPolicyChanged {
                egress: Some(pb::EgressPolicy {
                    allow: policy.to_strings(),
                }),
            });
            let appended = runtime
                .append(&mut agg, &req.sandbox_id, vec![changed])
                .await;
            // An append that failed ambiguously may have been stored (the append re-reads the
            // sandbox then): what the log records is what the sandbox must enforce, or GetSandbox
            // and attestations would show a policy the proxy does not apply.
            let allow = policy.to_strings();
            let recorded = agg.view.egress.as_ref().is_some_and(|e| e.allow == allow);
            if let (Err(e), false) = (appended, recorded) {
                return Err(log_status(e));
            }
            // Recorded first: a connection the new policy allows is never let through
            // unrecorded.
            live.handle.set_egress(policy);
            Ok(Response::new(agg.view.clone()))
        })
        .await
    }

    async fn checkpoint(
        &self,
        request: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointInfo>, Status> {
        let caller = Self::caller(&request)?;
        let id = request.into_inner().sandbox_id;
        let archive = self.runtime.archive.clone().ok_or_else(|| {
            Status::failed_precondition("no object storage is configured for checkpoints")
        })?;
        let live = self.running(&caller, &id).await?;
        // Held until the archive is stored; taken before the sandbox's lock, so waiting for it
        // does not hold up the sandbox's other commands. Waited for here, not in the task: a
        // caller that gives up while queued leaves no checkpoint to be taken later.
        let turn = self.runtime.archive_turn().await;
        let (runtime, tenant) = (self.runtime.clone(), caller.tenant);
        // To its end once begun: an archive stored but not recorded is storage nobody finds.
        to_completion(async move {
            let _turn = turn;
            let mut agg = live.agg.lock().await;
            agg.require_ready().map_err(invalid)?;
            let body = live.handle.checkpoint().await.map_err(|e| match e {
                // What the layer holds (too big, nested too deep): retrying will not help.
                BackendError::Checkpoint(m) => {
                    Status::failed_precondition(format!("checkpoint refused: {m}"))
                }
                e => Status::unavailable(format!("checkpoint failed: {e}")),
            })?;
            let checkpoint_id = format!("ck-{}", uuid::Uuid::new_v4().simple());
            let object_key = format!("runtime/checkpoints/{}/{id}/{checkpoint_id}.tar.gz", tenant);
            let reference = pb::CheckpointRef {
                checkpoint_id,
                object_key: object_key.clone(),
                size_bytes: body.len() as u64,
                sha256: hex::encode(Sha256::digest(&body)),
                at: Some(domain::timestamp(Utc::now())),
            };
            archive
                .put(&object_key, body.into(), "application/gzip")
                .await
                .map_err(|e| Status::unavailable(format!("storing the checkpoint failed: {e}")))?;
            let done = Event::Checkpointed(pb::Checkpointed {
                checkpoint: Some(reference.clone()),
            });
            runtime
                .append(&mut agg, &id, vec![done])
                .await
                .map_err(log_status)?;
            Ok(Response::new(pb::CheckpointInfo {
                sandbox_id: id,
                checkpoint: Some(reference),
            }))
        })
        .await
    }

    async fn get_attestation(
        &self,
        request: Request<pb::GetAttestationRequest>,
    ) -> Result<Response<pb::Attestation>, Status> {
        let caller = Self::caller(&request)?;
        // A signed statement of what the log holds now: this replica's copy of a sandbox
        // another replica runs can be moments behind (a terminated sandbox attested ready).
        self.runtime.view.catch_up().await.map_err(log_status)?;
        let agg = self.sandbox(&caller, &request.get_ref().sandbox_id).await?;
        let started = Instant::now();
        let v = &agg.view;
        let resources = v.resources.unwrap_or_default();
        let policy = egress(v.egress.as_ref())?;
        let rfc3339 = |t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
                .unwrap_or_default()
        };
        let statement = Statement {
            version: 1,
            sandbox_id: v.sandbox_id.clone(),
            tenant: v.tenant.clone(),
            backend: v.backend.clone(),
            node: v.node.clone(),
            template: v.template.clone(),
            template_digest: v.template_digest.clone(),
            limits: attestation::Limits {
                memory_mb: resources.memory_mb,
                pids: resources.pids,
                cpu_millis: resources.cpu_millis,
                disk_mb: resources.disk_mb,
            },
            egress_policy_digest: hex::encode(policy.digest()),
            created_at: rfc3339(&v.created_at),
            issued_at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            version_seen: v.version,
            state: v.state().as_str_name().to_string(),
        };
        let key = &self.runtime.settings.attestation_key;
        let (statement, signature) = attestation::sign(&statement, key);
        metrics::ATTESTATION_SECONDS.observe(started.elapsed().as_secs_f64());
        Ok(Response::new(pb::Attestation {
            statement,
            signature,
            key_id: attestation::key_id(&key.verifying_key()),
            public_key: key.verifying_key().to_bytes().to_vec(),
            algorithm: attestation::ALGORITHM.into(),
        }))
    }

    async fn terminate_sandbox(
        &self,
        request: Request<pb::TerminateSandboxRequest>,
    ) -> Result<Response<pb::Sandbox>, Status> {
        let caller = Self::caller(&request)?;
        let id = request.into_inner().sandbox_id;
        let agg = self.sandbox(&caller, &id).await?;
        if !agg.is_live() {
            // Terminating an ended sandbox changes nothing and is not an error.
            return Ok(Response::new(agg.view));
        }
        let live = self.running(&caller, &id).await?;
        let by = Event::Terminated(pb::Terminated {
            by: caller.subject.clone(),
        });
        let runtime = self.runtime.clone();
        let sandbox =
            to_completion(async move { runtime.end(&id, &live, by).await.map_err(Status::from) })
                .await?;
        Ok(Response::new(sandbox))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_that_could_not_run_is_failed_whatever_else_it_says() {
        let failed = pb::ExecResult {
            error: "bwrap did not start the command".into(),
            ..Default::default()
        };
        assert_eq!(exec_outcome(&failed), "failed");
        let ran = pb::ExecResult {
            exit_code: Some(0),
            ..Default::default()
        };
        assert_eq!(exec_outcome(&ran), "exit_zero");
    }
}
