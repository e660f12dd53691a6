//! The approval request aggregate: its events, how they fold into state, and the decisions
//! that produce them. Commands return the events to append (empty: nothing to do); the
//! gateway appends them with the aggregate's expected last sequence.
use chrono::{DateTime, Utc};
use creto_schemas::oversight::v1::{
    request_event, Action, ApprovalRequest, CreateRequestRequest, Decision, Policy, Priority,
    RequestEvent, Response, State, TimeoutAction,
};

use super::policy;

pub const MAX_PARAMETERS_BYTES: usize = 64 * 1024;
pub const MAX_CONTEXT_BYTES: usize = 16 * 1024;
pub const MAX_REASON_BYTES: usize = 2 * 1024;

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    /// The command is not allowed in the request's state.
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    NotAllowed(String),
}

fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    })
}

pub fn time_of(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let t = t.as_ref()?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

fn event(at: DateTime<Utc>, e: request_event::Event) -> RequestEvent {
    RequestEvent {
        at: ts(at),
        event: Some(e),
    }
}

pub fn state_name(s: State) -> &'static str {
    match s {
        State::Unspecified => "none",
        State::Pending => "pending",
        State::Approved => "approved",
        State::Denied => "denied",
        State::TimedOut => "timed_out",
        State::Escalated => "escalated",
        State::Cancelled => "cancelled",
    }
}

/// One request as folded from its events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Aggregate {
    /// What the API shows.
    pub view: ApprovalRequest,
    /// The policy as it was when the request came.
    pub policy: Policy,
}

impl Aggregate {
    pub fn state(&self) -> State {
        State::try_from(self.view.state).unwrap_or(State::Unspecified)
    }

    pub fn is_open(&self) -> bool {
        self.state() == State::Pending
    }

    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        time_of(&self.view.deadline).filter(|_| self.is_open())
    }

    /// Approvers allowed to answer now: every level up to the current one. Empty: anyone the
    /// authorization lets call Respond, which is so once any of those levels names nobody
    /// (escalating widens who may answer, never narrows it).
    pub fn allowed_approvers(&self) -> Vec<String> {
        let reached = || self.policy.levels.iter().take(self.view.level as usize + 1);
        if reached().any(|l| l.approvers.is_empty()) {
            return Vec::new();
        }
        let mut all: Vec<String> = reached()
            .flat_map(|l| l.approvers.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Folds one event in; returns the state transitions it made (from, to) for metrics.
    pub fn apply(&mut self, e: &RequestEvent, sequence: u64) -> Vec<(State, State)> {
        let mut before = self.state();
        let at = e.at;
        let mut transitions = Vec::new();
        match &e.event {
            Some(request_event::Event::Requested(r)) => {
                self.policy = r.policy.clone().unwrap_or_default();
                let approvers = self
                    .policy
                    .levels
                    .first()
                    .map(|l| l.approvers.clone())
                    .unwrap_or_default();
                self.view = ApprovalRequest {
                    request_id: r.request_id.clone(),
                    agent_id: r.agent_id.clone(),
                    action: r.action.clone(),
                    context: r.context.clone(),
                    priority: r.priority,
                    policy_id: self.policy.policy_id.clone(),
                    state: if r.auto_approved {
                        State::Approved
                    } else {
                        State::Pending
                    } as i32,
                    resolution: Decision::Unspecified as i32,
                    level: 0,
                    approvers,
                    quorum: self.policy.quorum,
                    created_at: at,
                    deadline: r.deadline,
                    decided_at: if r.auto_approved { at } else { None },
                    ..Default::default()
                };
            }
            Some(request_event::Event::Responded(r)) => {
                if let Some(response) = &r.response {
                    self.view.responses.push(response.clone());
                }
                if matches!(
                    State::try_from(r.outcome),
                    Ok(State::Approved | State::Denied)
                ) {
                    self.view.state = r.outcome;
                    self.view.decided_at = at;
                }
            }
            Some(request_event::Event::TimedOut(_) | request_event::Event::Escalated(_))
                if !self.is_open() =>
            {
                // Fired by a replica whose fold missed the decision (one of an older version,
                // during an upgrade, reads no escalation outcome): the decision stands.
            }
            Some(request_event::Event::TimedOut(t)) => {
                self.view.state = State::TimedOut as i32;
                self.view.resolution = t.resolution;
                self.view.decided_at = at;
            }
            Some(request_event::Event::Escalated(x)) => {
                transitions.push((before, State::Escalated));
                if x.outcome == State::Approved as i32 {
                    transitions.push((State::Escalated, State::Approved));
                    self.view.state = x.outcome;
                    self.view.decided_at = at;
                    // Counted above, through Escalated.
                    before = State::Approved;
                } else {
                    transitions.push((State::Escalated, State::Pending));
                }
                self.view.level = x.level;
                self.view.deadline = x.deadline;
                self.view.approvers = self
                    .policy
                    .levels
                    .get(x.level as usize)
                    .map(|l| l.approvers.clone())
                    .unwrap_or_default();
            }
            Some(request_event::Event::Cancelled(c)) => {
                self.view.state = State::Cancelled as i32;
                self.view.cancelled_by = c.by.clone();
                self.view.cancel_reason = c.reason.clone();
                self.view.decided_at = at;
            }
            None => {}
        }
        self.view.version = sequence;
        let after = self.state();
        if after != before {
            transitions.push((before, after));
        }
        transitions
    }
}

/// A new request: validated, matched to its policy, auto-approved when no policy requires a
/// human. Returns the `Requested` event.
pub fn create(
    cmd: &CreateRequestRequest,
    policies: &[Policy],
    now: DateTime<Utc>,
) -> Result<RequestEvent, Refusal> {
    let invalid = |m: String| Refusal::Invalid(m);
    policy::check_id("request_id", &cmd.request_id).map_err(invalid)?;
    policy::check_id("agent_id", &cmd.agent_id).map_err(invalid)?;
    let action = cmd
        .action
        .as_ref()
        .filter(|a| !a.name.is_empty() && a.name.len() <= 200)
        .ok_or_else(|| invalid("action.name is required (at most 200 characters)".into()))?;
    if action.name.contains('*')
        || action
            .name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            "action.name is a name such as \"payments.refund\": no spaces, control characters or '*'"
                .into(),
        ));
    }
    let parameters = if action.parameters_json.trim().is_empty() {
        "{}".to_string()
    } else {
        action.parameters_json.clone()
    };
    if parameters.len() > MAX_PARAMETERS_BYTES {
        return Err(invalid(format!(
            "action.parameters_json is {} bytes; at most {MAX_PARAMETERS_BYTES}",
            parameters.len()
        )));
    }
    match serde_json::from_str::<serde_json::Value>(&parameters) {
        Ok(serde_json::Value::Object(o)) => {
            crate::text::check_object("action.parameters_json", &o).map_err(invalid)?
        }
        Ok(_) => {
            return Err(invalid(
                "action.parameters_json must be a JSON object".into(),
            ))
        }
        Err(e) => return Err(invalid(format!("action.parameters_json is not JSON: {e}"))),
    }
    if cmd.context.len() > MAX_CONTEXT_BYTES {
        return Err(invalid(format!(
            "context is {} bytes; at most {MAX_CONTEXT_BYTES}",
            cmd.context.len()
        )));
    }
    crate::text::check("context", &cmd.context).map_err(invalid)?;
    let priority = match Priority::try_from(cmd.priority) {
        Ok(Priority::Unspecified) => Priority::Normal,
        Ok(p) => p,
        Err(_) => return Err(invalid(format!("unknown priority {}", cmd.priority))),
    };
    let chosen = policy::select(policies, &action.name, &cmd.agent_id).cloned();
    let auto_approved = chosen.as_ref().is_none_or(|p| !p.require_approval);
    let deadline = match &chosen {
        Some(p) if !auto_approved => {
            let first = p.levels.first().ok_or_else(|| {
                invalid(format!(
                    "policy {:?} requires approval but names no level: define it again with PutPolicy",
                    p.policy_id
                ))
            })?;
            let timeout = policy::level_timeout(&first.timeout).map_err(invalid)?;
            ts(now + chrono::Duration::from_std(timeout).unwrap_or_default())
        }
        _ => None,
    };
    Ok(event(
        now,
        request_event::Event::Requested(creto_schemas::oversight::v1::Requested {
            request_id: cmd.request_id.clone(),
            agent_id: cmd.agent_id.clone(),
            action: Some(Action {
                name: action.name.clone(),
                parameters_json: parameters,
            }),
            context: cmd.context.clone(),
            priority: priority as i32,
            policy: chosen,
            auto_approved,
            deadline,
        }),
    ))
}

/// Whether `cmd`, sent again under a request id already taken, asks what `existing` asked: the
/// same agent, action, parameters (as JSON values: spacing and key order aside), context and
/// priority. Anything else under the same id is another request, and the answer of the first
/// must not be taken for it (an approved refund of 10 is not one of 10,000).
pub fn same_ask(existing: &ApprovalRequest, cmd: &CreateRequestRequest) -> bool {
    let parameters = |json: &str| -> Option<serde_json::Value> {
        if json.trim().is_empty() {
            Some(serde_json::Value::Object(Default::default()))
        } else {
            serde_json::from_str(json).ok()
        }
    };
    let priority = |p: i32| match Priority::try_from(p) {
        Ok(Priority::Unspecified) => Priority::Normal as i32,
        _ => p,
    };
    let (Some(was), Some(now)) = (&existing.action, &cmd.action) else {
        return false;
    };
    existing.agent_id == cmd.agent_id
        && was.name == now.name
        && parameters(&was.parameters_json).is_some()
        && parameters(&was.parameters_json) == parameters(&now.parameters_json)
        && existing.context == cmd.context
        && priority(existing.priority) == priority(cmd.priority)
}

/// An approver's answer, and the decision it completes, if any.
pub fn respond(
    agg: &Aggregate,
    approver: &str,
    decision: Decision,
    reason: &str,
    channel: i32,
    now: DateTime<Utc>,
) -> Result<Vec<RequestEvent>, Refusal> {
    if approver.is_empty() || approver.len() > 254 {
        return Err(Refusal::Invalid(
            "approver is required (at most 254 characters)".into(),
        ));
    }
    if decision == Decision::Unspecified {
        return Err(Refusal::Invalid(
            "decision is DECISION_APPROVE or DECISION_DENY".into(),
        ));
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(Refusal::Invalid(format!(
            "reason is at most {MAX_REASON_BYTES} bytes"
        )));
    }
    crate::text::check("approver", approver)
        .and_then(|()| crate::text::check("reason", reason))
        .map_err(Refusal::Invalid)?;
    // Answering twice changes nothing, whatever happened since; an answer is not changed
    // either, and the caller is told so rather than shown success.
    if let Some(earlier) = agg.view.responses.iter().find(|r| r.approver == approver) {
        if earlier.decision != decision as i32 {
            return Err(Refusal::Precondition(format!(
                "{approver:?} already answered request {} ({}); an answer cannot be changed",
                agg.view.request_id,
                if earlier.decision == Decision::Approve as i32 {
                    "approve"
                } else {
                    "deny"
                }
            )));
        }
        return Ok(vec![]);
    }
    // An agent does not approve its own action, whatever roles its token carries.
    if approver == agg.view.agent_id {
        return Err(Refusal::NotAllowed(format!(
            "{approver:?} asked for request {}; it cannot answer it",
            agg.view.request_id
        )));
    }
    if !agg.is_open() {
        return Err(Refusal::Precondition(format!(
            "request {} is {}; it takes no more responses",
            agg.view.request_id,
            state_name(agg.state())
        )));
    }
    // Past the deadline the answer is late even before a timer has recorded the timeout or the
    // escalation: it must not overturn what the deadline decides.
    if let Some(deadline) = agg.deadline().filter(|d| *d <= now) {
        return Err(Refusal::Precondition(format!(
            "request {} passed its deadline at {} (level {}); it takes no more responses at this level",
            agg.view.request_id,
            deadline.to_rfc3339(),
            agg.view.level
        )));
    }
    let allowed = agg.allowed_approvers();
    if !allowed.is_empty() && !allowed.iter().any(|a| a == approver) {
        // The approvers are not listed: whoever is refused need not learn who may answer.
        return Err(Refusal::NotAllowed(format!(
            "{approver:?} is not an approver of request {} at level {}",
            agg.view.request_id, agg.view.level
        )));
    }
    let response = Response {
        approver: approver.to_string(),
        decision: decision as i32,
        reason: reason.to_string(),
        channel,
        at: ts(now),
        level: agg.view.level,
        // Set by the gateway, which knows the caller.
        recorded_by: String::new(),
    };
    let mut all = agg.view.responses.clone();
    all.push(response);
    let count = |d: Decision| all.iter().filter(|r| r.decision == d as i32).count();
    let (approvals, denials) = (count(Decision::Approve), count(Decision::Deny));
    let quorum = agg.policy.quorum.max(1) as usize;
    // A level escalated to decides on its own as well: as many of the names it adds as the
    // quorum asks, or all of them when it names fewer (one finance lead approves alone).
    // Answers given at earlier levels still count towards the quorum.
    let level = agg.view.level as usize;
    let level_names: &[String] = match agg.policy.levels.get(level) {
        Some(l) if level > 0 => &l.approvers,
        _ => &[],
    };
    let level_quorum = quorum.min(level_names.len());
    let level_approvals = approvals_by(&all, level_names);
    // Only an approval approves: a denial never completes a quorum that earlier approvals
    // met (escalation decides that case when it happens, see `on_deadline`).
    let approved = decision == Decision::Approve
        && (approvals >= quorum || (level_quorum > 0 && level_approvals >= level_quorum));
    let denied = if agg.policy.deny_needs_quorum {
        // Denied once approval can no longer reach the quorum (or, with anyone allowed, once
        // denials reach it).
        if allowed.is_empty() {
            denials >= quorum
        } else {
            let yet_to_answer = |names: &[String]| {
                names
                    .iter()
                    .filter(|a| !all.iter().any(|r| &r.approver == *a))
                    .count()
            };
            // What a level's names can still approve on their own: open to anyone, or as many
            // of them as its quorum asks, counting those who approved already.
            let level_can_approve = |names: &[String]| {
                names.is_empty()
                    || approvals_by(&all, names) + yet_to_answer(names) >= quorum.min(names.len())
            };
            // A later level reached by escalation may still approve (unless its names are all
            // among those who denied).
            let later_level_can = agg.policy.on_timeout == TimeoutAction::Escalate as i32
                && agg
                    .policy
                    .levels
                    .iter()
                    .skip(level + 1)
                    .any(|l| level_can_approve(&l.approvers));
            let reachable = approvals + yet_to_answer(&allowed) >= quorum
                || (level_quorum > 0 && level_can_approve(level_names))
                || later_level_can;
            !reachable
        }
    } else {
        denials > 0
    };
    let outcome = if approved {
        State::Approved
    } else if denied {
        State::Denied
    } else {
        State::Pending
    };
    Ok(vec![event(
        now,
        request_event::Event::Responded(creto_schemas::oversight::v1::Responded {
            response: all.pop(),
            outcome: outcome as i32,
        }),
    )])
}

/// How many of `names` approved among `responses`.
fn approvals_by(responses: &[Response], names: &[String]) -> usize {
    responses
        .iter()
        .filter(|r| r.decision == Decision::Approve as i32 && names.contains(&r.approver))
        .count()
}

/// What the deadline does: the policy's default action, or the next escalation level. The
/// next deadline counts from the one that passed, so a late firing (every replica down) does
/// not stretch the schedule.
pub fn on_deadline(agg: &Aggregate, now: DateTime<Utc>) -> Vec<RequestEvent> {
    let Some(deadline) = agg.deadline() else {
        return vec![];
    };
    if deadline > now {
        return vec![];
    }
    let action = TimeoutAction::try_from(agg.policy.on_timeout).unwrap_or(TimeoutAction::Deny);
    let next = agg.view.level as usize + 1;
    let timed_out = |resolution: Decision| {
        vec![event(
            now,
            request_event::Event::TimedOut(creto_schemas::oversight::v1::TimedOut {
                resolution: resolution as i32,
            }),
        )]
    };
    match action {
        TimeoutAction::Approve => timed_out(Decision::Approve),
        TimeoutAction::Escalate if next < agg.policy.levels.len() => {
            let names = &agg.policy.levels[next].approvers;
            let timeout = policy::level_timeout(&agg.policy.levels[next].timeout)
                .unwrap_or(std::time::Duration::from_secs(60));
            // The level decides with the names it adds, and their earlier approvals count: when
            // they already meet its quorum, nobody is left to ask (a second answer from them is
            // refused as already given), so the escalation approves.
            let quorum = (agg.policy.quorum.max(1) as usize).min(names.len());
            let met = quorum > 0 && approvals_by(&agg.view.responses, names) >= quorum;
            vec![event(
                now,
                request_event::Event::Escalated(creto_schemas::oversight::v1::Escalated {
                    level: next as u32,
                    deadline: ts(deadline + chrono::Duration::from_std(timeout).unwrap_or_default()),
                    outcome: if met { State::Approved as i32 } else { 0 },
                }),
            )]
        }
        _ => timed_out(Decision::Deny),
    }
}

pub fn cancel(
    agg: &Aggregate,
    by: &str,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<Vec<RequestEvent>, Refusal> {
    if reason.len() > MAX_REASON_BYTES {
        return Err(Refusal::Invalid(format!(
            "reason is at most {MAX_REASON_BYTES} bytes"
        )));
    }
    crate::text::check("reason", reason).map_err(Refusal::Invalid)?;
    // The caller's token subject, as an approver's name is checked: what the PostgreSQL audit
    // trail cannot store (a NUL) would set the event aside there and leave the request
    // pending in the read model while the gateways have it cancelled.
    if by.is_empty() || by.len() > 254 {
        return Err(Refusal::Invalid(
            "the caller's token subject is 1 to 254 bytes; issue a token with such a subject"
                .into(),
        ));
    }
    crate::text::check("token subject", by).map_err(Refusal::Invalid)?;
    match agg.state() {
        State::Cancelled => Ok(vec![]),
        State::Pending => Ok(vec![event(
            now,
            request_event::Event::Cancelled(creto_schemas::oversight::v1::Cancelled {
                by: by.to_string(),
                reason: reason.to_string(),
            }),
        )]),
        other => Err(Refusal::Precondition(format!(
            "request {} is already {}; only a pending request can be cancelled",
            agg.view.request_id,
            state_name(other)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use creto_schemas::oversight::v1::Level;

    fn level(approvers: &[&str], secs: i64) -> Level {
        Level {
            approvers: approvers.iter().map(|s| s.to_string()).collect(),
            timeout: Some(prost_types::Duration {
                seconds: secs,
                nanos: 0,
            }),
        }
    }

    fn policy(quorum: u32, levels: Vec<Level>, on_timeout: TimeoutAction) -> Policy {
        Policy {
            policy_id: "p".into(),
            action: "payments.*".into(),
            require_approval: true,
            quorum,
            levels,
            on_timeout: on_timeout as i32,
            ..Default::default()
        }
    }

    fn request(p: &Policy, now: DateTime<Utc>) -> Aggregate {
        let cmd = CreateRequestRequest {
            request_id: "r1".into(),
            agent_id: "bot".into(),
            action: Some(Action {
                name: "payments.refund".into(),
                parameters_json: r#"{"amount": 10}"#.into(),
            }),
            context: "refund order 42".into(),
            priority: Priority::High as i32,
        };
        let mut agg = Aggregate::default();
        agg.apply(&create(&cmd, std::slice::from_ref(p), now).unwrap(), 1);
        agg
    }

    fn fold(agg: &mut Aggregate, events: &[RequestEvent]) {
        for e in events {
            let next = agg.view.version + 1;
            agg.apply(e, next);
        }
    }

    #[test]
    fn the_same_id_is_the_same_request_only_for_the_same_ask() {
        let p = policy(1, vec![level(&["ann"], 60)], TimeoutAction::Deny);
        let agg = request(&p, Utc::now());
        let again = || CreateRequestRequest {
            request_id: "r1".into(),
            agent_id: "bot".into(),
            action: Some(Action {
                name: "payments.refund".into(),
                parameters_json: "{ \"amount\" : 10 }".into(),
            }),
            context: "refund order 42".into(),
            priority: Priority::High as i32,
        };
        assert!(same_ask(&agg.view, &again()), "spacing aside, the same ask");
        let mut more = again();
        more.action.as_mut().unwrap().parameters_json = r#"{"amount": 10000}"#.into();
        assert!(!same_ask(&agg.view, &more));
        let mut other_context = again();
        other_context.context = "refund order 43".into();
        assert!(!same_ask(&agg.view, &other_context));
        let mut lower = again();
        lower.priority = Priority::Low as i32;
        assert!(!same_ask(&agg.view, &lower));
        let mut other_agent = again();
        other_agent.agent_id = "other".into();
        assert!(!same_ask(&agg.view, &other_agent));
        let mut bad = again();
        bad.action.as_mut().unwrap().parameters_json = "not json".into();
        assert!(!same_ask(&agg.view, &bad));
    }

    #[test]
    fn two_of_three_approve() {
        let now = Utc::now();
        let p = policy(
            2,
            vec![level(&["ann", "bob", "cy"], 60)],
            TimeoutAction::Deny,
        );
        let mut agg = request(&p, now);
        assert_eq!(agg.state(), State::Pending);
        let e = respond(&agg, "ann", Decision::Approve, "ok", 0, now).unwrap();
        assert_eq!(e.len(), 1);
        fold(&mut agg, &e);
        // Ann again: a no-op; with another decision, refused (an answer is not changed).
        assert!(respond(&agg, "ann", Decision::Approve, "", 0, now)
            .unwrap()
            .is_empty());
        assert!(matches!(
            respond(&agg, "ann", Decision::Deny, "", 0, now),
            Err(Refusal::Precondition(m)) if m.contains("cannot be changed")
        ));
        assert!(matches!(
            respond(&agg, "mallory", Decision::Approve, "", 0, now),
            Err(Refusal::NotAllowed(_))
        ));
        let e = respond(&agg, "bob", Decision::Approve, "fine", 0, now).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Approved);
        assert!(matches!(
            respond(&agg, "cy", Decision::Deny, "", 0, now),
            Err(Refusal::Precondition(_))
        ));
    }

    #[test]
    fn an_agent_does_not_answer_its_own_request() {
        let now = Utc::now();
        // Open to anyone with the approver role: the asking agent is still not anyone.
        let p = policy(1, vec![level(&[], 60)], TimeoutAction::Deny);
        let agg = request(&p, now);
        assert!(matches!(
            respond(&agg, "bot", Decision::Approve, "", 0, now),
            Err(Refusal::NotAllowed(m)) if m.contains("cannot answer")
        ));
        assert_eq!(
            respond(&agg, "ann", Decision::Approve, "", 0, now)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn a_late_answer_does_not_overturn_the_deadline() {
        let now = Utc::now();
        let p = policy(1, vec![level(&["ann"], 60)], TimeoutAction::Deny);
        let agg = request(&p, now);
        // The timer has not recorded the timeout yet: the answer is refused all the same.
        let late = now + chrono::Duration::seconds(61);
        match respond(&agg, "ann", Decision::Approve, "", 0, late) {
            Err(Refusal::Precondition(m)) => assert!(m.contains("deadline"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(on_deadline(&agg, late).len(), 1);
        assert!(respond(&agg, "ann", Decision::Approve, "", 0, now).is_ok());
    }

    #[test]
    fn escalating_past_anyone_keeps_the_deny_quorum_countable() {
        // Several people answer at a level open to anyone, then the request escalates to a
        // level of one named approver: it stays open to anyone (levels add up), and the deny
        // quorum counts denials (guessing from all responses underflowed and panicked).
        let now = Utc::now();
        let mut p = policy(
            3,
            vec![level(&[], 60), level(&["dan"], 60)],
            TimeoutAction::Escalate,
        );
        p.deny_needs_quorum = true;
        let mut agg = request(&p, now);
        for who in ["ann", "bob"] {
            let e = respond(&agg, who, Decision::Approve, "", 0, now).unwrap();
            fold(&mut agg, &e);
        }
        let e = on_deadline(&agg, now + chrono::Duration::seconds(61));
        fold(&mut agg, &e);
        assert_eq!(agg.view.level, 1);
        assert!(agg.allowed_approvers().is_empty(), "still open to anyone");
        let later = now + chrono::Duration::seconds(62);
        let e = respond(&agg, "dan", Decision::Deny, "", 0, later).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Pending, "1 denial of the 3 it needs");
        let e = respond(&agg, "eve", Decision::Approve, "", 0, later).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Approved, "3 approvals");
    }

    #[test]
    fn a_level_escalated_to_decides_with_the_names_it_adds() {
        // 2 of 3, then one finance lead: the lead approves alone (with the quorum counted over
        // every level, the lead's approval left the request pending until it timed out).
        let now = Utc::now();
        let p = policy(
            2,
            vec![level(&["ann", "bob", "cy"], 60), level(&["lead"], 60)],
            TimeoutAction::Escalate,
        );
        let mut agg = request(&p, now);
        let e = on_deadline(&agg, now + chrono::Duration::seconds(61));
        fold(&mut agg, &e);
        let later = now + chrono::Duration::seconds(62);
        let e = respond(&agg, "lead", Decision::Approve, "", 0, later).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Approved);
    }

    #[test]
    fn an_escalation_to_names_that_approved_already_approves() {
        // The lead approved at level 0 (1 of 2); level 1 is the lead alone. A later denial
        // from bob was taken for the level's approval, and the lead could not answer again.
        let now = Utc::now();
        let p = policy(
            2,
            vec![level(&["ann", "bob", "lead"], 60), level(&["lead"], 60)],
            TimeoutAction::Escalate,
        );
        let mut agg = request(&p, now);
        let e = respond(&agg, "lead", Decision::Approve, "", 0, now).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Pending);
        let mut denied = agg.clone();
        let e = on_deadline(&agg, now + chrono::Duration::seconds(61));
        let transitions: Vec<_> = e
            .iter()
            .flat_map(|e| agg.apply(e, agg.view.version + 1))
            .collect();
        assert_eq!(agg.state(), State::Approved);
        assert_eq!(
            transitions,
            vec![
                (State::Pending, State::Escalated),
                (State::Escalated, State::Approved)
            ]
        );
        // A timer fired by a replica that did not see the approval changes nothing.
        let late = event(
            now + chrono::Duration::seconds(121),
            request_event::Event::TimedOut(creto_schemas::oversight::v1::TimedOut {
                resolution: Decision::Deny as i32,
            }),
        );
        let next = agg.view.version + 1;
        assert_eq!(agg.apply(&late, next), vec![]);
        assert_eq!(agg.state(), State::Approved);

        // An escalation recorded before it could decide: a denial still does not approve.
        let mut e = on_deadline(&denied, now + chrono::Duration::seconds(61));
        if let Some(request_event::Event::Escalated(x)) = &mut e[0].event {
            x.outcome = 0;
        }
        fold(&mut denied, &e);
        let later = now + chrono::Duration::seconds(62);
        let e = respond(&denied, "bob", Decision::Deny, "", 0, later).unwrap();
        fold(&mut denied, &e);
        assert_eq!(denied.state(), State::Denied);
    }

    #[test]
    fn deny_needs_quorum_counts_the_levels_still_to_come() {
        let now = Utc::now();
        let mut p = policy(
            2,
            vec![level(&["ann", "bob"], 60), level(&["carol", "dan"], 60)],
            TimeoutAction::Escalate,
        );
        p.deny_needs_quorum = true;
        let mut agg = request(&p, now);
        for who in ["ann", "bob"] {
            let e = respond(&agg, who, Decision::Deny, "", 0, now).unwrap();
            fold(&mut agg, &e);
            assert_eq!(
                agg.state(),
                State::Pending,
                "carol and dan may still approve"
            );
        }
        let e = on_deadline(&agg, now + chrono::Duration::seconds(61));
        fold(&mut agg, &e);
        let later = now + chrono::Duration::seconds(62);
        let e = respond(&agg, "carol", Decision::Approve, "", 0, later).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Pending, "1 of the 2 the level needs");
        let e = respond(&agg, "dan", Decision::Deny, "", 0, later).unwrap();
        fold(&mut agg, &e);
        assert_eq!(
            agg.state(),
            State::Denied,
            "no level left to reach the quorum"
        );

        // A later level whose names have all denied already cannot approve either.
        let mut same = policy(
            1,
            vec![level(&["ann"], 60), level(&["ann"], 60)],
            TimeoutAction::Escalate,
        );
        same.deny_needs_quorum = true;
        let mut agg_same = request(&same, now);
        let e = respond(&agg_same, "ann", Decision::Deny, "", 0, now).unwrap();
        fold(&mut agg_same, &e);
        assert_eq!(agg_same.state(), State::Denied);

        // Without escalation the first level's denials decide.
        p.on_timeout = TimeoutAction::Deny as i32;
        let mut agg = request(&p, now);
        let e = respond(&agg, "ann", Decision::Deny, "", 0, now).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Denied);
    }

    #[test]
    fn escalating_to_a_level_open_to_anyone_opens_the_request() {
        let now = Utc::now();
        let p = policy(
            1,
            vec![level(&["ann"], 60), level(&[], 60)],
            TimeoutAction::Escalate,
        );
        let mut agg = request(&p, now);
        assert!(matches!(
            respond(&agg, "bob", Decision::Approve, "", 0, now),
            Err(Refusal::NotAllowed(_))
        ));
        let e = on_deadline(&agg, now + chrono::Duration::seconds(61));
        fold(&mut agg, &e);
        assert_eq!(agg.view.level, 1);
        let later = now + chrono::Duration::seconds(62);
        let e = respond(&agg, "bob", Decision::Approve, "", 0, later).unwrap();
        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Approved);
    }

    #[test]
    fn one_deny_denies_unless_the_policy_says_otherwise() {
        let now = Utc::now();
        let mut p = policy(
            2,
            vec![level(&["ann", "bob", "cy"], 60)],
            TimeoutAction::Deny,
        );
        let mut agg = request(&p, now);
        let e = respond(&agg, "ann", Decision::Deny, "no", 0, now).unwrap();

        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Denied);

        p.deny_needs_quorum = true;
        let mut agg = request(&p, now);
        let e = respond(&agg, "ann", Decision::Deny, "no", 0, now).unwrap();

        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Pending, "2 approvals still possible");
        let e = respond(&agg, "bob", Decision::Deny, "no", 0, now).unwrap();

        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Denied, "quorum out of reach");
    }

    #[test]
    fn timeouts_follow_the_default_action() {
        let now = Utc::now();
        for (action, state, resolution) in [
            (TimeoutAction::Deny, State::TimedOut, Decision::Deny),
            (TimeoutAction::Approve, State::TimedOut, Decision::Approve),
        ] {
            let p = policy(1, vec![level(&["ann"], 60)], action);
            let mut agg = request(&p, now);
            assert!(on_deadline(&agg, now).is_empty(), "not yet");
            let e = on_deadline(&agg, now + chrono::Duration::seconds(61));

            fold(&mut agg, &e);
            assert_eq!(agg.state(), state);
            assert_eq!(agg.view.resolution, resolution as i32);
        }
    }

    #[test]
    fn escalation_walks_the_levels_then_denies() {
        let now = Utc::now();
        let p = policy(
            1,
            vec![level(&["l1"], 60), level(&["l2"], 120), level(&["l3"], 300)],
            TimeoutAction::Escalate,
        );
        let mut agg = request(&p, now);
        let t1 = now + chrono::Duration::seconds(60);
        let e = on_deadline(&agg, t1 + chrono::Duration::seconds(30));
        fold(&mut agg, &e);
        assert_eq!((agg.state(), agg.view.level), (State::Pending, 1));
        assert_eq!(
            agg.deadline().unwrap().timestamp(),
            (t1 + chrono::Duration::seconds(120)).timestamp(),
            "counted from the missed deadline, not from when it fired"
        );
        assert_eq!(agg.view.approvers, vec!["l2"]);
        // Level 1 may answer; earlier levels still may too.
        assert!(respond(&agg, "l1", Decision::Approve, "", 0, now).is_ok());
        let e = on_deadline(&agg, now + chrono::Duration::days(1));

        fold(&mut agg, &e);
        assert_eq!(agg.view.level, 2);
        let e = on_deadline(&agg, now + chrono::Duration::days(2));

        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::TimedOut);
        assert_eq!(agg.view.resolution, Decision::Deny as i32);
    }

    #[test]
    fn cancel_only_while_pending() {
        let now = Utc::now();
        let p = policy(1, vec![level(&["ann"], 60)], TimeoutAction::Deny);
        let mut agg = request(&p, now);
        assert!(matches!(
            cancel(&agg, "bo\0t", "not needed", now),
            Err(Refusal::Invalid(_))
        ));
        let e = cancel(&agg, "bot", "not needed", now).unwrap();

        fold(&mut agg, &e);
        assert_eq!(agg.state(), State::Cancelled);
        assert!(cancel(&agg, "bot", "", now).unwrap().is_empty());
        assert!(on_deadline(&agg, now + chrono::Duration::days(1)).is_empty());
        let mut agg = request(&p, now);
        let e = respond(&agg, "ann", Decision::Approve, "", 0, now).unwrap();

        fold(&mut agg, &e);
        assert!(matches!(
            cancel(&agg, "bot", "", now),
            Err(Refusal::Precondition(_))
        ));
    }

    #[test]
    fn no_policy_or_an_allow_policy_auto_approves() {
        let now = Utc::now();
        let cmd = CreateRequestRequest {
            request_id: "r2".into(),
            agent_id: "bot".into(),
            action: Some(Action {
                name: "search.web".into(),
                parameters_json: String::new(),
            }),
            ..Default::default()
        };
        let mut agg = Aggregate::default();
        agg.apply(&create(&cmd, &[], now).unwrap(), 1);
        assert_eq!(agg.state(), State::Approved);
        for bad in [r#"[1]"#, "{", r#""x""#] {
            let mut c = cmd.clone();
            c.action.as_mut().unwrap().parameters_json = bad.into();
            assert!(matches!(create(&c, &[], now), Err(Refusal::Invalid(_))));
        }
    }
}
