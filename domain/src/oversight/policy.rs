//! Approval policies: which actions need a human, who, how many, and what happens on timeout.
use std::time::Duration;

use creto_schemas::oversight::v1::{Policy, TimeoutAction};

/// Longest a level may wait for its approvers.
pub const MAX_LEVEL_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);
pub const MAX_LEVELS: usize = 8;
pub const MAX_APPROVERS: usize = 100;
/// Agents a policy may name: every request it matches carries a copy of the policy, and a
/// request is one message on the log (1 MiB at most, parameters included).
pub const MAX_AGENTS: usize = 1_000;

fn check_token(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {} must be 1 to 64 letters, digits, '_' or '-'",
            crate::text::shown(id)
        ))
    }
}

pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    check_token(what, id)
}

/// A level's timeout as a std duration, or why it is not valid.
pub fn level_timeout(d: &Option<prost_types::Duration>) -> Result<Duration, String> {
    let d = d
        .as_ref()
        .and_then(|d| Duration::try_from(*d).ok())
        .ok_or("every level needs a positive timeout")?;
    if d.is_zero() || d > MAX_LEVEL_TIMEOUT {
        return Err("a level's timeout is between 1 ms and 30 days".into());
    }
    Ok(d)
}

/// Checks a policy as an operator defines it.
pub fn validate(p: &Policy) -> Result<(), String> {
    check_token("policy_id", &p.policy_id)?;
    if p.action.is_empty() || p.action.len() > 200 {
        return Err("action is a name or a pattern ending in '*' (1 to 200 characters)".into());
    }
    // By character, not byte: an action may end in a multi-byte character.
    if p.action.find('*').is_some_and(|i| i + 1 != p.action.len()) {
        return Err("'*' may only end the action pattern (\"payments.*\", \"*\")".into());
    }
    crate::text::check("action", &p.action)?;
    // Action names never hold these (CreateRequest refuses them): a pattern with one would
    // never match, and the actions it was meant to gate would be approved at once.
    if p.action
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("action may not hold spaces or control characters".into());
    }
    if p.agents.len() > MAX_AGENTS {
        return Err(format!(
            "agents: at most {MAX_AGENTS} (a policy for more agents covers them all: leave agents empty)"
        ));
    }
    for a in &p.agents {
        check_token("agent", a)?;
    }
    // Levels and channels are checked whether or not the policy requires approval: every
    // request it matches carries a copy of it, into the read model too.
    if p.levels.len() > MAX_LEVELS {
        return Err(format!("a policy has at most {MAX_LEVELS} levels"));
    }
    if p.require_approval && p.levels.is_empty() {
        return Err(format!(
            "a policy that requires approval has 1 to {MAX_LEVELS} levels"
        ));
    }
    for (i, level) in p.levels.iter().enumerate() {
        level_timeout(&level.timeout).map_err(|e| format!("level {i}: {e}"))?;
        if level.approvers.len() > MAX_APPROVERS
            || level
                .approvers
                .iter()
                .any(|a| a.is_empty() || a.len() > 254 || a.chars().any(char::is_whitespace))
        {
            return Err(format!(
                "level {i}: at most {MAX_APPROVERS} approvers, each 1 to 254 characters without spaces"
            ));
        }
        for (j, a) in level.approvers.iter().enumerate() {
            crate::text::check(&format!("levels[{i}].approvers"), a)?;
            // Quorum is counted against the names: a repeated one made it unreachable (or,
            // with deny_needs_quorum, turned the first approval into a denial).
            if level.approvers[..j].contains(a) {
                return Err(format!("level {i}: approver {a:?} is named twice"));
            }
        }
    }
    for (priority, list) in &p.channels {
        // 0 is no priority: a request without one is normal (2), so such a list never applied.
        if *priority == 0 || creto_schemas::oversight::v1::Priority::try_from(*priority).is_err() {
            return Err(format!(
                "channels: {priority} is not a priority (1 low .. 4 critical)"
            ));
        }
        let repeated = list
            .channels
            .iter()
            .enumerate()
            .any(|(i, c)| list.channels[..i].contains(c));
        if repeated || list.channels.iter().any(|c| !(1..=3).contains(c)) {
            return Err(
                "channels are CHANNEL_SLACK, CHANNEL_EMAIL or CHANNEL_WEBHOOK, each at most once"
                    .into(),
            );
        }
    }
    if !p.require_approval {
        return Ok(());
    }
    if p.quorum == 0 {
        return Err("quorum is at least 1".into());
    }
    let named = p.levels[0].approvers.len();
    if named > 0 && (p.quorum as usize) > named {
        return Err(format!(
            "quorum {} is more than the {named} approvers of level 0: it could never be reached",
            p.quorum
        ));
    }
    if TimeoutAction::try_from(p.on_timeout).unwrap_or(TimeoutAction::Unspecified)
        == TimeoutAction::Unspecified
    {
        return Err("on_timeout is TIMEOUT_ACTION_DENY, _APPROVE or _ESCALATE".into());
    }
    Ok(())
}

/// Whether `p` covers this action of this agent.
pub fn matches(p: &Policy, action: &str, agent: &str) -> bool {
    let action_ok = match p.action.strip_suffix('*') {
        Some(prefix) => action.starts_with(prefix),
        None => p.action == action,
    };
    action_ok && (p.agents.is_empty() || p.agents.iter().any(|a| a == agent))
}

/// The policy that governs an action: the matching one with the highest precedence; among
/// equals the most specific (an exact name over a pattern, a longer pattern over a shorter,
/// one naming agents over one that does not), then the lower policy id, so the choice never
/// depends on order. (The star used to count as a character: `payments.refund*` beat the
/// exact `payments.refund` policy for a refund.)
pub fn select<'a>(policies: &'a [Policy], action: &str, agent: &str) -> Option<&'a Policy> {
    let rank = |p: &Policy| {
        let prefix = p.action.strip_suffix('*');
        (
            p.precedence,
            prefix.is_none(),
            prefix.unwrap_or(&p.action).len(),
            !p.agents.is_empty(),
        )
    };
    policies
        .iter()
        .filter(|p| matches(p, action, agent))
        .max_by(|a, b| {
            rank(a)
                .cmp(&rank(b))
                .then_with(|| b.policy_id.cmp(&a.policy_id))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use creto_schemas::oversight::v1::Level;

    pub fn policy(id: &str, action: &str, quorum: u32, approvers: &[&str]) -> Policy {
        Policy {
            policy_id: id.into(),
            precedence: 0,
            action: action.into(),
            agents: vec![],
            require_approval: true,
            quorum,
            deny_needs_quorum: false,
            levels: vec![Level {
                approvers: approvers.iter().map(|s| s.to_string()).collect(),
                timeout: Some(prost_types::Duration {
                    seconds: 60,
                    nanos: 0,
                }),
            }],
            on_timeout: TimeoutAction::Deny as i32,
            channels: Default::default(),
        }
    }

    #[test]
    fn validation_says_what_to_fix() {
        assert!(validate(&policy("p", "payments.*", 2, &["a", "b"])).is_ok());
        assert!(validate(&policy("p", "pay*ments", 1, &[]))
            .unwrap_err()
            .contains("'*'"));
        assert!(validate(&policy("p", "x", 3, &["a", "b"]))
            .unwrap_err()
            .contains("never be reached"));
        assert!(validate(&policy("p", "x", 0, &[])).is_err());
        assert!(validate(&policy("p.q", "x", 1, &[])).is_err());
        // Multi-byte characters, at the end or before a '*': checked, not a panic.
        assert!(validate(&policy("p", "paiements.é", 1, &[])).is_ok());
        assert!(validate(&policy("p", "paiements.é*", 1, &[])).is_ok());
        assert!(validate(&policy("p", "é*é", 1, &[]))
            .unwrap_err()
            .contains("'*'"));
        let mut crowded = policy("p", "x", 1, &[]);
        crowded.agents = (0..=MAX_AGENTS).map(|i| format!("a{i}")).collect();
        assert!(validate(&crowded).unwrap_err().contains("agents"));
        let mut no_timeout = policy("p", "x", 1, &[]);
        no_timeout.levels[0].timeout = None;
        assert!(validate(&no_timeout).is_err());
        assert!(validate(&policy("p", "x", 3, &["ann", "ann", "bob"]))
            .unwrap_err()
            .contains("\"ann\" is named twice"));
        // A pattern no action name can match would gate nothing.
        assert!(validate(&policy("p", "payments.refund ", 1, &[]))
            .unwrap_err()
            .contains("spaces"));
        // An allow-list policy is copied into every request it matches: checked all the same.
        let mut allow = policy("p", "search.*", 1, &["ann\u{0}"]);
        allow.require_approval = false;
        assert!(validate(&allow).is_err());
        allow.levels.clear();
        allow.quorum = 0;
        assert!(validate(&allow).is_ok(), "no levels or quorum needed");
        // Priority 0 is no priority: no request has it, so its channels would never apply.
        let mut unset = policy("p", "x", 1, &[]);
        let slack = creto_schemas::oversight::v1::ChannelList { channels: vec![1] };
        unset.channels.insert(2, slack.clone());
        assert!(validate(&unset).is_ok());
        unset.channels.insert(0, slack);
        assert!(validate(&unset)
            .unwrap_err()
            .contains("0 is not a priority"));
    }

    #[test]
    fn an_exact_name_beats_a_pattern_of_the_same_length() {
        let exact = policy("exact", "payments.refund", 2, &["a", "b"]);
        let mut status = policy("status", "payments.refund*", 1, &[]);
        status.require_approval = false;
        let both = [status.clone(), exact];
        assert_eq!(
            select(&both, "payments.refund", "bot").unwrap().policy_id,
            "exact"
        );
        assert_eq!(
            select(&both, "payments.refund_status", "bot")
                .unwrap()
                .policy_id,
            "status"
        );
    }

    #[test]
    fn the_most_specific_matching_policy_wins() {
        let any = policy("any", "*", 1, &[]);
        let payments = policy("payments", "payments.*", 1, &[]);
        let mut refunds = policy("refunds", "payments.refund", 1, &[]);
        refunds.agents = vec!["billing-bot".into()];
        let all = [any.clone(), payments.clone(), refunds.clone()];
        let pick = |a: &str, g: &str| select(&all, a, g).map(|p| p.policy_id.clone());
        assert_eq!(
            pick("payments.refund", "billing-bot").as_deref(),
            Some("refunds")
        );
        assert_eq!(
            pick("payments.refund", "other").as_deref(),
            Some("payments")
        );
        assert_eq!(pick("email.send", "other").as_deref(), Some("any"));
        assert_eq!(select(&[payments], "email.send", "x"), None);
        let mut urgent = any;
        urgent.precedence = 10;
        assert_eq!(
            select(&[urgent, refunds], "payments.refund", "billing-bot")
                .unwrap()
                .policy_id,
            "any"
        );
    }
}
