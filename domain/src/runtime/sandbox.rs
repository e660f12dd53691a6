//! The sandbox aggregate: its state folded from its `SandboxEvent`s, and the checks every
//! command makes before the gateway touches the backend or the log.
use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use creto_schemas::runtime::v1::{self as pb, sandbox_event::Event, State};

/// Why a command is refused; the gateway maps each kind to a gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
}

/// Bounds on what a caller may ask for. Defaults fill a zero field of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeLimits {
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_pids: u32,
    pub max_pids: u32,
    pub default_cpu_millis: u32,
    pub max_cpu_millis: u32,
    pub default_disk_mb: u64,
    pub max_disk_mb: u64,
    /// Sandboxes one tenant may have live at once (requested, provisioning or ready), on
    /// every replica together.
    pub max_live_per_tenant: usize,
    /// The memory (MB) the live sandboxes of one replica may ask for together, warm ones
    /// included; None: no bound. Sandboxes' cgroups sit inside the replica's, so past its
    /// memory the kernel kills in the replica, the gateway included.
    pub replica_memory_mb: Option<u64>,
    /// The disk (MB) the live sandboxes of one replica may ask for together, warm ones
    /// included; None: no bound. Their images are sparse: without a bound they can fill the
    /// volume together, whatever each one's own limit.
    pub replica_disk_mb: Option<u64>,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub default_exec_timeout: Duration,
    pub max_env: usize,
    pub max_metadata: usize,
    pub max_value_bytes: usize,
    pub max_argv_bytes: usize,
    pub max_stdin_bytes: usize,
}

impl Default for RuntimeLimits {
    fn default() -> Self {
        RuntimeLimits {
            default_memory_mb: 256,
            max_memory_mb: 8 * 1024,
            default_pids: 128,
            max_pids: 4096,
            default_cpu_millis: 1000,
            max_cpu_millis: 8000,
            default_disk_mb: 1024,
            max_disk_mb: 64 * 1024,
            max_live_per_tenant: 100,
            replica_memory_mb: None,
            replica_disk_mb: None,
            default_timeout: Duration::from_secs(300),
            max_timeout: Duration::from_secs(24 * 3600),
            default_exec_timeout: Duration::from_secs(60),
            max_env: 64,
            max_metadata: 32,
            max_value_bytes: 4096,
            max_argv_bytes: 64 * 1024,
            max_stdin_bytes: 1024 * 1024,
        }
    }
}

/// The resources a request asked for, with the defaults filled in and the bounds checked.
pub fn resources(
    asked: Option<&pb::Resources>,
    limits: &RuntimeLimits,
) -> Result<pb::Resources, Refusal> {
    let asked = asked.cloned().unwrap_or_default();
    let pick = |v: u64, default: u64| if v == 0 { default } else { v };
    let r = pb::Resources {
        memory_mb: pick(asked.memory_mb, limits.default_memory_mb),
        pids: pick(asked.pids.into(), limits.default_pids.into()) as u32,
        cpu_millis: pick(asked.cpu_millis.into(), limits.default_cpu_millis.into()) as u32,
        disk_mb: pick(asked.disk_mb, limits.default_disk_mb),
    };
    let over = |what: &str, v: u64, min: u64, max: u64| {
        (v < min || v > max).then(|| {
            Refusal::Invalid(format!(
                "resources.{what} = {v} is outside {min}..={max}; ask for less or set 0 for the default"
            ))
        })
    };
    if let Some(e) = over("memory_mb", r.memory_mb, 16, limits.max_memory_mb)
        .or_else(|| over("pids", r.pids.into(), 8, limits.max_pids.into()))
        .or_else(|| {
            over(
                "cpu_millis",
                r.cpu_millis.into(),
                10,
                limits.max_cpu_millis.into(),
            )
        })
        .or_else(|| over("disk_mb", r.disk_mb, 16, limits.max_disk_mb))
    {
        return Err(e);
    }
    Ok(r)
}

/// A lifetime or exec timeout: zero means `default`; more than `max` is refused.
pub fn timeout(
    asked: Option<&prost_types::Duration>,
    default: Duration,
    max: Duration,
    what: &str,
) -> Result<Duration, Refusal> {
    let Some(d) = asked else { return Ok(default) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Refusal::Invalid(format!("{what} must not be negative")));
    }
    let d = Duration::new(d.seconds as u64, d.nanos as u32);
    if d.is_zero() {
        return Ok(default);
    }
    if d > max {
        return Err(Refusal::Invalid(format!(
            "{what} {}s is longer than the maximum {}s",
            d.as_secs(),
            max.as_secs()
        )));
    }
    Ok(d)
}

/// Names: letters, digits, `_`, `-` and `.`, 1 to 64 bytes (templates, metadata keys).
pub fn check_name(what: &str, v: &str) -> Result<(), Refusal> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(Refusal::Invalid(format!(
            "{what} {} must be 1-64 letters, digits, '_', '-' or '.'",
            crate::text::shown(v)
        )))
    }
}

/// Environment variables: POSIX-ish names, bounded values, bounded count.
pub fn check_env(env: &BTreeMap<String, String>, limits: &RuntimeLimits) -> Result<(), Refusal> {
    if env.len() > limits.max_env {
        return Err(Refusal::Invalid(format!(
            "{} environment variables; at most {}",
            env.len(),
            limits.max_env
        )));
    }
    for (k, v) in env {
        let name_ok = !k.is_empty()
            && k.len() <= 128
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !name_ok {
            return Err(Refusal::Invalid(format!(
                "environment variable name {k:?} must be letters, digits and '_', not starting with a digit"
            )));
        }
        if v.len() > limits.max_value_bytes || v.contains('\0') {
            return Err(Refusal::Invalid(format!(
                "environment variable {k} is longer than {} bytes or holds a NUL",
                limits.max_value_bytes
            )));
        }
    }
    Ok(())
}

pub fn check_metadata(
    metadata: &BTreeMap<String, String>,
    limits: &RuntimeLimits,
) -> Result<(), Refusal> {
    if metadata.len() > limits.max_metadata {
        return Err(Refusal::Invalid(format!(
            "{} metadata entries; at most {}",
            metadata.len(),
            limits.max_metadata
        )));
    }
    for (k, v) in metadata {
        check_name("metadata key", k)?;
        if v.len() > 256 {
            return Err(Refusal::Invalid(format!(
                "metadata value of {k} is longer than 256 bytes"
            )));
        }
        crate::text::check(&format!("metadata value of {k}"), v).map_err(Refusal::Invalid)?;
    }
    Ok(())
}

/// An Exec's command line: non-empty, bounded, no NUL (it could not reach execve intact).
pub fn check_argv(argv: &[String], limits: &RuntimeLimits) -> Result<(), Refusal> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(Refusal::Invalid(
            "argv is empty; give the program and its arguments, e.g. [\"sh\", \"-c\", \"echo hi\"]"
                .into(),
        ));
    }
    let bytes: usize = argv.iter().map(|a| a.len() + 1).sum();
    if bytes > limits.max_argv_bytes {
        return Err(Refusal::Invalid(format!(
            "argv is {bytes} bytes; at most {}",
            limits.max_argv_bytes
        )));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(Refusal::Invalid("argv holds a NUL byte".into()));
    }
    Ok(())
}

pub fn state_name(s: State) -> &'static str {
    match s {
        State::Unspecified => "unspecified",
        State::Requested => "requested",
        State::Provisioning => "provisioning",
        State::Ready => "ready",
        State::Terminated => "terminated",
        State::Failed => "failed",
        State::Expired => "expired",
    }
}

fn time_of(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn span(d: &Option<prost_types::Duration>) -> chrono::Duration {
    d.as_ref()
        .map(|d| {
            chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(d.nanos.into())
        })
        .unwrap_or_default()
}

/// A sandbox folded from its events. `view` is what Get and List answer.
#[derive(Debug, Clone, Default)]
pub struct Aggregate {
    pub view: pb::Sandbox,
    /// Still in the warm pool: provisioned without a tenant, not claimed yet.
    pub pooled: bool,
    pub request_id: String,
    pub restore_checkpoint_id: String,
    /// The lifetime asked for, counted from Ready (cold) or Claimed (warm).
    timeout: chrono::Duration,
}

impl Aggregate {
    /// An aggregate a read model stored: its view and what the view does not show, so the
    /// next event folds in without a replay.
    pub fn from_parts(
        view: pb::Sandbox,
        pooled: bool,
        request_id: String,
        restore_checkpoint_id: String,
        timeout: chrono::Duration,
    ) -> Self {
        Aggregate {
            view,
            pooled,
            request_id,
            restore_checkpoint_id,
            timeout,
        }
    }

    /// The lifetime asked for (by Requested, or Claimed for a warm sandbox).
    pub fn timeout(&self) -> chrono::Duration {
        self.timeout
    }

    pub fn state(&self) -> State {
        self.view.state()
    }

    /// Requested, provisioning or ready: it holds (or will hold) resources on its node.
    pub fn is_live(&self) -> bool {
        matches!(
            self.state(),
            State::Requested | State::Provisioning | State::Ready
        )
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        time_of(&self.view.expires_at)
    }

    /// Folds one event appended at `sequence`; returns the state change it made, if any.
    pub fn apply(
        &mut self,
        sandbox_id: &str,
        e: &pb::SandboxEvent,
        sequence: u64,
    ) -> Option<(State, State)> {
        let before = self.state();
        let at = time_of(&e.at).unwrap_or_default();
        let v = &mut self.view;
        v.sandbox_id = sandbox_id.to_string();
        v.version = sequence;
        match &e.event {
            Some(Event::Requested(r)) => {
                v.tenant = r.tenant.clone();
                v.template = r.template.clone();
                v.resources = r.resources;
                v.metadata = r.metadata.clone();
                v.egress = r.egress.clone();
                v.env_names = r.env_names.clone();
                v.owner = r.owner.clone();
                v.created_at = e.at;
                v.set_state(State::Requested);
                self.pooled = r.pool;
                self.request_id = r.request_id.clone();
                self.restore_checkpoint_id = r.restore_checkpoint_id.clone();
                self.timeout = span(&r.timeout);
            }
            Some(Event::Provisioning(p)) => {
                v.backend = p.backend.clone();
                v.node = p.node.clone();
                v.template_digest = p.template_digest.clone();
                v.set_state(State::Provisioning);
            }
            Some(Event::Ready(_)) => {
                v.set_state(State::Ready);
                if !self.pooled {
                    v.expires_at = Some(timestamp(at + self.timeout));
                }
            }
            Some(Event::Claimed(c)) => {
                self.pooled = false;
                v.warm = true;
                v.tenant = c.tenant.clone();
                v.metadata = c.metadata.clone();
                v.egress = c.egress.clone();
                v.env_names = c.env_names.clone();
                v.owner = c.owner.clone();
                v.created_at = e.at;
                self.request_id = c.request_id.clone();
                self.timeout = span(&c.timeout);
                v.expires_at = Some(timestamp(at + self.timeout));
            }
            Some(Event::ExecStarted(_)) => v.execs += 1,
            Some(Event::ExecFinished(_)) => {}
            Some(Event::TimeoutChanged(t)) => v.expires_at = t.expires_at,
            Some(Event::EgressPolicyChanged(p)) => v.egress = p.egress.clone(),
            Some(Event::Checkpointed(c)) => v.checkpoints.extend(c.checkpoint.clone()),
            Some(Event::Terminated(_)) => v.set_state(State::Terminated),
            Some(Event::Failed(f)) => {
                v.failure_reason = f.reason.clone();
                v.set_state(State::Failed);
            }
            Some(Event::Expired(_)) => v.set_state(State::Expired),
            None => {}
        }
        let after = self.state();
        (before != after).then_some((before, after))
    }

    /// Exec, Checkpoint, SetTimeout and SetEgressPolicy need a ready sandbox.
    pub fn require_ready(&self) -> Result<(), Refusal> {
        match self.state() {
            State::Ready => Ok(()),
            s => Err(Refusal::Precondition(format!(
                "sandbox {} is {}, not ready",
                self.view.sandbox_id,
                state_name(s)
            ))),
        }
    }
}

pub fn event(at: DateTime<Utc>, e: Event) -> pb::SandboxEvent {
    pb::SandboxEvent {
        at: Some(timestamp(at)),
        event: Some(e),
    }
}

pub fn event_type(e: &pb::SandboxEvent) -> &'static str {
    match &e.event {
        Some(Event::Requested(_)) => "runtime.requested",
        Some(Event::Provisioning(_)) => "runtime.provisioning",
        Some(Event::Ready(_)) => "runtime.ready",
        Some(Event::Claimed(_)) => "runtime.claimed",
        Some(Event::ExecStarted(_)) => "runtime.exec_started",
        Some(Event::ExecFinished(_)) => "runtime.exec_finished",
        Some(Event::TimeoutChanged(_)) => "runtime.timeout_changed",
        Some(Event::EgressPolicyChanged(_)) => "runtime.egress_policy_changed",
        Some(Event::Checkpointed(_)) => "runtime.checkpointed",
        Some(Event::Terminated(_)) => "runtime.terminated",
        Some(Event::Failed(_)) => "runtime.failed",
        Some(Event::Expired(_)) => "runtime.expired",
        None => "runtime.unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(events: &[pb::SandboxEvent]) -> Aggregate {
        let mut agg = Aggregate::default();
        for (i, e) in events.iter().enumerate() {
            agg.apply("sb1", e, i as u64 + 1);
        }
        agg
    }

    fn requested(pool: bool) -> Event {
        Event::Requested(pb::Requested {
            tenant: if pool { String::new() } else { "t1".into() },
            template: "base".into(),
            timeout: Some(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            }),
            pool,
            ..Default::default()
        })
    }

    #[test]
    fn a_cold_sandbox_expires_its_timeout_after_ready() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let agg = fold(&[
            event(t0, requested(false)),
            event(t0, Event::Provisioning(pb::Provisioning::default())),
            event(
                t0 + chrono::Duration::seconds(1),
                Event::Ready(pb::Ready::default()),
            ),
        ]);
        assert_eq!(agg.state(), State::Ready);
        assert_eq!(agg.expires_at(), Some(t0 + chrono::Duration::seconds(61)));
        assert!(agg.require_ready().is_ok());
    }

    #[test]
    fn a_pooled_sandbox_has_no_tenant_or_expiry_until_claimed() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut events = vec![
            event(t0, requested(true)),
            event(t0, Event::Ready(pb::Ready::default())),
        ];
        let agg = fold(&events);
        assert!(agg.pooled && agg.view.tenant.is_empty() && agg.expires_at().is_none());
        events.push(event(
            t0 + chrono::Duration::seconds(10),
            Event::Claimed(pb::Claimed {
                tenant: "t2".into(),
                timeout: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                ..Default::default()
            }),
        ));
        let agg = fold(&events);
        assert!(!agg.pooled && agg.view.warm);
        assert_eq!(agg.view.tenant, "t2");
        assert_eq!(agg.expires_at(), Some(t0 + chrono::Duration::seconds(40)));
    }

    #[test]
    fn terminal_states_refuse_commands() {
        let t0 = Utc::now();
        let agg = fold(&[
            event(t0, requested(false)),
            event(t0, Event::Ready(pb::Ready::default())),
            event(t0, Event::Terminated(pb::Terminated::default())),
        ]);
        let err = agg.require_ready().unwrap_err();
        assert!(err.to_string().contains("terminated"), "{err}");
    }

    #[test]
    fn requests_are_checked_with_messages_that_say_what_to_fix() {
        let limits = RuntimeLimits::default();
        let r = resources(None, &limits).unwrap();
        assert_eq!(
            (r.memory_mb, r.pids, r.cpu_millis, r.disk_mb),
            (256, 128, 1000, 1024)
        );
        let too_big = pb::Resources {
            memory_mb: 1 << 20,
            ..Default::default()
        };
        assert!(resources(Some(&too_big), &limits)
            .unwrap_err()
            .to_string()
            .contains("memory_mb"));
        for disk_mb in [1, 1 << 20] {
            let asked = pb::Resources {
                disk_mb,
                ..Default::default()
            };
            let e = resources(Some(&asked), &limits).unwrap_err().to_string();
            assert!(
                e.contains("resources.disk_mb") && e.contains("16..=65536"),
                "{e}"
            );
        }
        assert!(check_argv(&[], &limits).is_err());
        assert!(check_argv(&["a\0b".into()], &limits).is_err());
        let env = BTreeMap::from([("1BAD".to_string(), "x".to_string())]);
        assert!(check_env(&env, &limits).is_err());
        assert!(check_name("template", "../etc").is_err());
        let long = prost_types::Duration {
            seconds: 10 * 24 * 3600,
            nanos: 0,
        };
        assert!(timeout(
            Some(&long),
            limits.default_timeout,
            limits.max_timeout,
            "timeout"
        )
        .is_err());
    }
}
