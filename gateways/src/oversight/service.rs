//! `creto.enablement.oversight.v1.OversightService`: policies, requests, responses, watches.
//! Every command is decided by `creto_domain::oversight` on the folded aggregate and appended
//! with the aggregate's expected last sequence; a conflict means someone else changed the
//! request first, so the view is caught up and the command decided again.
use std::sync::Arc;

use chrono::Utc;
use creto_domain::oversight::{policy, request, Aggregate, Refusal};
use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::oversight_service_server::OversightService;
use creto_schemas::oversight::v1::{Decision, Priority, State};
use creto_streams::headers::{content_types, names};
use creto_streams::{append_id, AppendEvent, EventLog, Headers, LogError};
use prost::Message;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::fold::{OversightView, MAX_WATCHERS};
use super::metrics;
use crate::auth::Identity;
use crate::log_status::log_status;

const MAX_LIST: u32 = 1_000;

pub struct OversightGateway {
    pub log: Arc<dyn EventLog>,
    pub view: Arc<OversightView>,
    /// Ends Watch streams when the product stops (a graceful shutdown waits for them).
    pub stopping: watch::Receiver<bool>,
}

fn is_operator(caller: &Identity) -> bool {
    caller.roles.iter().any(|r| r == "admin" || r == "operator")
}

/// Callers with the `agent` role act only for the agent their token names.
fn check_agent(caller: &Identity, agent_id: &str) -> Result<(), Status> {
    if is_operator(caller) || caller.roles.iter().any(|r| r == "approver") {
        return Ok(());
    }
    if caller.subject != agent_id {
        return Err(Status::permission_denied(format!(
            "this token acts for agent {:?}, not {agent_id:?}",
            caller.subject
        )));
    }
    Ok(())
}

/// Who may ask for approval as `agent_id`: that agent, or an operator. An approver reads
/// every request of its tenant (check_agent) but asks only as itself: asking as another agent
/// and then answering would approve its own action under that agent's name.
fn check_asker(caller: &Identity, agent_id: &str) -> Result<(), Status> {
    if is_operator(caller) || caller.subject == agent_id {
        return Ok(());
    }
    Err(Status::permission_denied(format!(
        "this token asks for approval as {:?}, not {agent_id:?}",
        caller.subject
    )))
}

fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::Invalid(m) => Status::invalid_argument(m),
        Refusal::Precondition(m) => Status::failed_precondition(m),
        Refusal::NotAllowed(m) => Status::permission_denied(m),
    }
}

fn event_type(e: &pb::RequestEvent) -> &'static str {
    match &e.event {
        Some(pb::request_event::Event::Requested(_)) => "oversight.requested",
        Some(pb::request_event::Event::Responded(_)) => "oversight.responded",
        Some(pb::request_event::Event::TimedOut(_)) => "oversight.timed_out",
        Some(pb::request_event::Event::Escalated(_)) => "oversight.escalated",
        Some(pb::request_event::Event::Cancelled(_)) => "oversight.cancelled",
        None => "oversight.unknown",
    }
}

fn channel_name(c: i32) -> &'static str {
    match pb::Channel::try_from(c).unwrap_or(pb::Channel::Unspecified) {
        pb::Channel::Slack => "slack",
        pb::Channel::Email => "email",
        pb::Channel::Webhook => "webhook",
        pb::Channel::Web => "web",
        pb::Channel::Unspecified => "grpc",
    }
}

/// The append of one request event at the position `expected`.
pub fn request_append(
    view: &OversightView,
    tenant: &str,
    request_id: &str,
    expected: u64,
    e: &pb::RequestEvent,
) -> AppendEvent {
    let subject = view.request_subject(tenant, request_id);
    let payload = e.encode_to_vec();
    AppendEvent {
        id: append_id(&subject, expected, &payload),
        subject,
        expected_subject_sequence: Some(expected),
        headers: Headers::new()
            .with(names::CONTENT_TYPE, content_types::PROTOBUF)
            .with(names::EVENT_TYPE, event_type(e))
            .with(names::TENANT, tenant),
        payload: payload.into(),
    }
}

/// Counts the state transitions of `events` appended at `sequences` after `agg`; returns the
/// aggregate after them.
pub fn count_transitions(
    agg: &Aggregate,
    events: &[pb::RequestEvent],
    sequences: &[u64],
) -> Aggregate {
    let mut after = agg.clone();
    for (e, seq) in events.iter().zip(sequences) {
        for (from, to) in after.apply(e, *seq) {
            metrics::TRANSITIONS
                .with_label_values(&[request::state_name(from), request::state_name(to)])
                .inc();
        }
    }
    after
}

/// Appends `events` to the request's subject, each expecting the previous one, counts their
/// transitions and catches the view up. Returns the aggregate after them.
pub async fn append_request_events(
    log: &Arc<dyn EventLog>,
    view: &OversightView,
    tenant: &str,
    agg: &Aggregate,
    events: Vec<pb::RequestEvent>,
) -> Result<Aggregate, LogError> {
    let id = agg_id(agg, &events);
    let mut expected = agg.view.version;
    let mut sequences = Vec::with_capacity(events.len());
    for e in &events {
        expected = log
            .append(request_append(view, tenant, &id, expected, e))
            .await?
            .sequence();
        sequences.push(expected);
    }
    let after = count_transitions(agg, &events, &sequences);
    // Read-your-writes for whoever asks this replica next.
    view.catch_up_to(expected).await?;
    Ok(after)
}

/// The request id of an aggregate, or of the `Requested` event that creates it.
fn agg_id(agg: &Aggregate, events: &[pb::RequestEvent]) -> String {
    if !agg.view.request_id.is_empty() {
        return agg.view.request_id.clone();
    }
    events
        .iter()
        .find_map(|e| match &e.event {
            Some(pb::request_event::Event::Requested(r)) => Some(r.request_id.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

impl OversightGateway {
    /// Records `approver`'s answer (the gRPC method, the approval page and signed links all
    /// come here once they know who answers). The same answer again is a no-op; another answer is refused.
    /// `recorded_by`: who records it (see `Response.recorded_by`).
    #[allow(clippy::too_many_arguments)]
    pub async fn respond_as(
        &self,
        tenant: &str,
        request_id: &str,
        approver: &str,
        decision: Decision,
        reason: &str,
        channel: i32,
        recorded_by: &str,
    ) -> Result<pb::ApprovalRequest, Status> {
        // Stored with the answer: one PostgreSQL cannot store would stall the audit projection.
        creto_domain::text::check("the caller's token subject", recorded_by)
            .map_err(Status::invalid_argument)?;
        let (after, appended) = self
            .decide_and_append(tenant, request_id, |a| {
                let mut events =
                    request::respond(a, approver, decision, reason, channel, Utc::now())?;
                for e in &mut events {
                    if let Some(pb::request_event::Event::Responded(pb::Responded {
                        response: Some(r),
                        ..
                    })) = &mut e.event
                    {
                        r.recorded_by = recorded_by.to_string();
                    }
                }
                Ok(events)
            })
            .await?;
        // Counted when this call recorded the answer (the same answer again records nothing).
        if appended {
            // The runbook's approval rate selects decision="approved".
            let name = if decision == Decision::Approve {
                "approved"
            } else {
                "denied"
            };
            metrics::RESPONSES
                .with_label_values(&[name, channel_name(channel)])
                .inc();
        }
        Ok(after.view)
    }

    /// Appends a `PolicyDefined` for policy `id` (`removed`: DeletePolicy's) after the
    /// subject's last event, again on conflict; `definition` decides on the caught-up fold.
    /// Returns the event's sequence.
    async fn write_policy(
        &self,
        tenant: &str,
        id: &str,
        removed: bool,
        definition: impl Fn() -> Result<pb::Policy, Status>,
    ) -> Result<u64, Status> {
        let event_type = if removed {
            "oversight.policy_removed"
        } else {
            "oversight.policy_defined"
        };
        for _ in 0..5 {
            self.view.catch_up().await.map_err(log_status)?;
            let payload = pb::PolicyDefined {
                policy: Some(definition()?),
                at: Some(creto_streams::envelope::timestamp(Utc::now())),
                removed,
            }
            .encode_to_vec();
            let expected = self.view.policy_version(tenant, id);
            let subject = self.view.policy_subject(tenant, id);
            match self
                .log
                .append(AppendEvent {
                    id: append_id(&subject, expected, &payload),
                    subject,
                    expected_subject_sequence: Some(expected),
                    headers: Headers::new()
                        .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                        .with(names::EVENT_TYPE, event_type)
                        .with(names::TENANT, tenant),
                    payload: payload.into(),
                })
                .await
            {
                Ok(a) => {
                    self.view.catch_up().await.map_err(log_status)?;
                    return Ok(a.sequence());
                }
                Err(LogError::Conflict { .. }) => continue,
                Err(e) => return Err(log_status(e)),
            }
        }
        Err(Status::aborted("the policy kept changing; retry"))
    }

    pub async fn existing(&self, tenant: &str, id: &str) -> Result<Aggregate, Status> {
        policy::check_id("request_id", id).map_err(Status::invalid_argument)?;
        self.view
            .get_fresh(tenant, id)
            .await
            .map_err(log_status)?
            .ok_or_else(|| Status::not_found(format!("no request {id:?} in tenant {tenant:?}")))
    }

    /// Decides `command` on the latest aggregate and appends its events, again on conflict;
    /// the aggregate after, and whether this call appended anything.
    async fn decide_and_append(
        &self,
        tenant: &str,
        id: &str,
        command: impl Fn(&Aggregate) -> Result<Vec<pb::RequestEvent>, Refusal>,
    ) -> Result<(Aggregate, bool), Status> {
        let mut refreshed = false;
        for _ in 0..5 {
            let agg = self.existing(tenant, id).await?;
            let events = match command(&agg) {
                Ok(events) => events,
                // Refused on this replica's copy, which can be moments behind another
                // replica's write (an escalation naming this approver, say): only what the log
                // as it stands refuses is refused, as a final answer.
                Err(Refusal::Precondition(_) | Refusal::NotAllowed(_)) if !refreshed => {
                    refreshed = true;
                    self.view.catch_up().await.map_err(log_status)?;
                    continue;
                }
                Err(r) => return Err(refusal(r)),
            };
            if events.is_empty() {
                return Ok((agg, false));
            }
            match append_request_events(&self.log, &self.view, tenant, &agg, events).await {
                Ok(after) => return Ok((after, true)),
                Err(LogError::Conflict { .. }) => self.view.catch_up().await.map_err(log_status)?,
                Err(e) => return Err(log_status(e)),
            }
        }
        Err(Status::aborted(
            "the request kept changing under this command; retry",
        ))
    }
}

#[tonic::async_trait]
impl OversightService for OversightGateway {
    async fn put_policy(
        &self,
        request: Request<pb::PutPolicyRequest>,
    ) -> Result<Response<pb::PutPolicyResponse>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        if !is_operator(&caller) {
            return Err(Status::permission_denied(
                "policies are defined by admin or operator tokens",
            ));
        }
        let p = request
            .into_inner()
            .policy
            .ok_or_else(|| Status::invalid_argument("policy is required"))?;
        policy::validate(&p).map_err(Status::invalid_argument)?;
        let id = p.policy_id.clone();
        let version = self
            .write_policy(&caller.tenant, &id, false, || Ok(p.clone()))
            .await?;
        Ok(Response::new(pb::PutPolicyResponse {
            policy: Some(p),
            version,
        }))
    }

    async fn delete_policy(
        &self,
        request: Request<pb::DeletePolicyRequest>,
    ) -> Result<Response<pb::DeletePolicyResponse>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        if !is_operator(&caller) {
            return Err(Status::permission_denied(
                "policies are removed by admin or operator tokens",
            ));
        }
        let id = request.into_inner().policy_id;
        policy::check_id("policy_id", &id).map_err(Status::invalid_argument)?;
        let tenant = &caller.tenant;
        let version = self
            .write_policy(tenant, &id, true, || {
                self.view
                    .policies(tenant)
                    .into_iter()
                    .map(|(p, _)| p)
                    .find(|p| p.policy_id == id)
                    .ok_or_else(|| {
                        Status::not_found(format!("no policy {id:?} in tenant {tenant:?}"))
                    })
            })
            .await?;
        Ok(Response::new(pb::DeletePolicyResponse { version }))
    }

    async fn list_policies(
        &self,
        request: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        let tenant = crate::auth::layer::caller(&request)?.tenant.clone();
        self.view.catch_up().await.map_err(log_status)?;
        let mut policies: Vec<pb::Policy> = self
            .view
            .policies(&tenant)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        policies.sort_by(|a, b| a.policy_id.cmp(&b.policy_id));
        Ok(Response::new(pb::ListPoliciesResponse { policies }))
    }

    async fn create_request(
        &self,
        request: Request<pb::CreateRequestRequest>,
    ) -> Result<Response<pb::CreateRequestResponse>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let cmd = request.into_inner();
        check_asker(&caller, &cmd.agent_id)?;
        let tenant = caller.tenant;
        policy::check_id("request_id", &cmd.request_id).map_err(Status::invalid_argument)?;
        // A policy another replica stored before this call is the one that decides: without
        // this, a request could be auto-approved under the policy it had just replaced.
        self.view.catch_up().await.map_err(log_status)?;
        for _ in 0..5 {
            // The append below expects an empty subject, so an id created elsewhere since the
            // catch-up is a conflict, answered on the next turn.
            if let Some(existing) = self.view.get(&tenant, &cmd.request_id) {
                // The same id again: the same request, if it is the same ask.
                if !request::same_ask(&existing.view, &cmd) {
                    return Err(Status::already_exists(format!(
                        "request id {:?} is taken by another request (its agent, action, parameters, context or priority differ); use a new id",
                        cmd.request_id
                    )));
                }
                let auto = existing.view.state == State::Approved as i32
                    && existing.view.responses.is_empty();
                return Ok(Response::new(pb::CreateRequestResponse {
                    request: Some(existing.view),
                    auto_approved: auto,
                }));
            }
            let policies: Vec<pb::Policy> = self
                .view
                .policies(&tenant)
                .into_iter()
                .map(|(p, _)| p)
                .collect();
            let event = request::create(&cmd, &policies, Utc::now()).map_err(refusal)?;
            let auto = matches!(&event.event, Some(pb::request_event::Event::Requested(r)) if r.auto_approved);
            match append_request_events(
                &self.log,
                &self.view,
                &tenant,
                &Aggregate::default(),
                vec![event],
            )
            .await
            {
                Ok(after) => {
                    let policy_id = if after.view.policy_id.is_empty() {
                        "none"
                    } else {
                        after.view.policy_id.as_str()
                    };
                    metrics::REQUESTS
                        .with_label_values(&[&cmd.agent_id, policy_id])
                        .inc();
                    return Ok(Response::new(pb::CreateRequestResponse {
                        request: Some(after.view),
                        auto_approved: auto,
                    }));
                }
                // Created meanwhile (a retry racing itself): answer with it.
                Err(LogError::Conflict { .. }) => self.view.catch_up().await.map_err(log_status)?,
                Err(e) => return Err(log_status(e)),
            }
        }
        Err(Status::aborted("request creation kept racing; retry"))
    }

    async fn get_request(
        &self,
        request: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let agg = self
            .existing(&caller.tenant, &request.get_ref().request_id)
            .await?;
        check_agent(&caller, &agg.view.agent_id)?;
        Ok(Response::new(agg.view))
    }

    async fn list_requests(
        &self,
        request: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let r = request.into_inner();
        let agent = (!r.agent_id.is_empty()).then_some(r.agent_id.as_str());
        // Agents list only their own requests.
        let agent = if is_operator(&caller) || caller.roles.iter().any(|x| x == "approver") {
            agent
        } else {
            check_agent(&caller, agent.unwrap_or(&caller.subject))?;
            Some(caller.subject.as_str())
        };
        let state = match State::try_from(r.state) {
            Ok(State::Unspecified) => None,
            Ok(s) => Some(s),
            Err(_) => return Err(Status::invalid_argument("unknown state")),
        };
        let priority = match Priority::try_from(r.priority) {
            Ok(Priority::Unspecified) => None,
            Ok(p) => Some(p),
            Err(_) => return Err(Status::invalid_argument("unknown priority")),
        };
        let limit = if r.limit == 0 {
            100
        } else {
            r.limit.min(MAX_LIST)
        };
        self.view.catch_up().await.map_err(log_status)?;
        let requests = self
            .view
            .list(&caller.tenant, state, priority, agent, limit as usize);
        Ok(Response::new(pb::ListRequestsResponse { requests }))
    }

    type WatchRequestStream = ReceiverStream<Result<pb::ApprovalRequest, Status>>;

    async fn watch_request(
        &self,
        request: Request<pb::WatchRequestRequest>,
    ) -> Result<Response<Self::WatchRequestStream>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let id = request.into_inner().request_id;
        let found = self.existing(&caller.tenant, &id).await?;
        check_agent(&caller, &found.view.agent_id)?;
        let view = self.view.clone();
        let mut changed = view.watch(&caller.tenant, &id).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "request {id} already has {MAX_WATCHERS} WatchRequest streams on this gateway; \
                 close one (a stream whose client went away closes within seconds)"
            ))
        })?;
        // Read after subscribing: a change folded in between is in it or wakes the loop.
        let first = view.get(&caller.tenant, &id).unwrap_or(found);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut last = first;
            let mut open = tx.send(Ok(last.view.clone())).await.is_ok();
            while open && last.is_open() {
                tokio::select! {
                    _ = changed.changed() => {}
                    _ = tx.closed() => break,
                    _ = stopping.changed() => {
                        let _ = tx.send(Err(Status::unavailable("this gateway is stopping; watch again"))).await;
                        break;
                    }
                }
                if let Some(now) = view.get(&caller.tenant, &id) {
                    if now.view.version != last.view.version {
                        last = now;
                        open = tx.send(Ok(last.view.clone())).await.is_ok();
                    }
                }
            }
            drop(changed);
            view.unwatch(&caller.tenant, &id);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_request(
        &self,
        request: Request<pb::CancelRequestRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let r = request.into_inner();
        let agg = self.existing(&caller.tenant, &r.request_id).await?;
        if !is_operator(&caller) && caller.subject != agg.view.agent_id {
            return Err(Status::permission_denied(
                "only the requesting agent or an operator cancels a request",
            ));
        }
        let by = caller.subject.clone();
        let (after, _) = self
            .decide_and_append(&caller.tenant, &r.request_id, |a| {
                request::cancel(a, &by, &r.reason, Utc::now())
            })
            .await?;
        Ok(Response::new(after.view))
    }

    async fn respond(
        &self,
        request: Request<pb::RespondRequest>,
    ) -> Result<Response<pb::ApprovalRequest>, Status> {
        let caller = crate::auth::layer::caller(&request)?.clone();
        let r = request.into_inner();
        // Approvers answer as themselves; operators may record an answer for someone (the
        // approval page and signed links act as the approver they name).
        let approver = if r.approver.is_empty() {
            caller.subject.clone()
        } else {
            r.approver.clone()
        };
        if !is_operator(&caller) && approver != caller.subject {
            return Err(Status::permission_denied(format!(
                "this token answers as {:?}, not {approver:?}",
                caller.subject
            )));
        }
        let decision = Decision::try_from(r.decision).unwrap_or(Decision::Unspecified);
        // The audit says which channel an answer came by: only an operator (an integration
        // relaying a Slack or email answer) may state it; an approver's own call is gRPC's.
        let channel = if is_operator(&caller) {
            r.channel
        } else {
            pb::Channel::Unspecified as i32
        };
        let view = self
            .respond_as(
                &caller.tenant,
                &r.request_id,
                &approver,
                decision,
                &r.reason,
                channel,
                &caller.subject,
            )
            .await?;
        Ok(Response::new(view))
    }
}
