//! Announces new and escalated requests on the policy's channels. A durable consumer of the
//! request subjects hands each event to one replica; each delivery's outcome is an event on
//! `oversight.notifications.<tenant>.<request_id>`, appended before the event is acknowledged,
//! so a crash repeats a notification rather than losing it.
use std::sync::Arc;
use std::time::Duration;

use creto_schemas::oversight::v1 as pb;
use creto_schemas::oversight::v1::Channel;
use creto_streams::headers::{content_types, names};
use creto_streams::{
    AckMode, AppendEvent, Catalog, ConsumerSpec, Delivery, EventLog, Headers, ReplayFrom, OVERSIGHT,
};
use futures::TryStreamExt;
use prost::Message;
use tokio::sync::watch;

use super::fold::OversightView;
use super::notify::{Notification, Notifier};

pub const DURABLE: &str = "oversight-notifier";

/// The channels a request is announced on at its priority (webhook when the policy names none).
fn channels(policy: &pb::Policy, priority: i32) -> Vec<Channel> {
    let named: Vec<Channel> = policy
        .channels
        .get(&priority)
        .map(|l| {
            l.channels
                .iter()
                .filter_map(|c| Channel::try_from(*c).ok())
                .collect()
        })
        .unwrap_or_default();
    if named.is_empty() {
        vec![Channel::Webhook]
    } else {
        named
    }
}

pub async fn run(
    log: Arc<dyn EventLog>,
    catalog: Catalog,
    view: Arc<OversightView>,
    notifier: Arc<Notifier>,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = catalog.stream(OVERSIGHT);
    let spec = ConsumerSpec {
        filter_subject: Some(catalog.subject("oversight.requests.>")),
        ack: AckMode::Each,
        max_deliver: 10,
        // Longer than every channel's retries together (they run at once), so a slow channel
        // does not make another replica announce the request again.
        ack_wait: Duration::from_secs(300),
        // A new notifier announces what comes from now on, not the whole history.
        start: ReplayFrom::Time(chrono::Utc::now()),
        ..ConsumerSpec::new(DURABLE)
    };
    let Some(mut deliverer) = crate::delivery_loop::Deliverer::open(
        log.clone(),
        stream,
        spec,
        "oversight notifier",
        &mut shutdown,
    )
    .await
    else {
        return;
    };
    // Requests are announced side by side: one slow receiver (a webhook taking its whole
    // timeout, a flood of one tenant's requests) must not hold back every other tenant's
    // announcements behind it. Each delivery is acknowledged on its own.
    let mut working = tokio::task::JoinSet::new();
    while let Some(deliveries) = deliverer.next(&mut shutdown).await {
        for d in deliveries {
            while working.len() >= IN_FLIGHT {
                working.join_next().await;
            }
            let (log, catalog) = (log.clone(), catalog.clone());
            let (view, notifier) = (view.clone(), notifier.clone());
            working.spawn(async move { handle(d, &*log, &catalog, &view, &notifier).await });
        }
        while working.try_join_next().is_some() {}
    }
    // At shutdown, what was started finishes (and is acknowledged) first.
    while working.join_next().await.is_some() {}
}

/// Announcements under way at once, per replica.
const IN_FLIGHT: usize = 32;

/// Announces the request of one delivered event, if it asks for that, then acknowledges it;
/// if the outcome could not be recorded, it comes back later.
async fn handle(
    d: Delivery,
    log: &dyn EventLog,
    catalog: &Catalog,
    view: &OversightView,
    notifier: &Notifier,
) {
    let logical = catalog.strip(&d.event.subject).to_string();
    let mut tokens = logical.split('.').skip(2);
    let (Some(tenant), Some(id)) = (tokens.next(), tokens.next()) else {
        let _ = d.ack().await;
        return;
    };
    let level = match pb::RequestEvent::decode(d.event.payload.as_ref()).map(|e| e.event) {
        Ok(Some(pb::request_event::Event::Requested(r))) if !r.auto_approved => 0,
        Ok(Some(pb::request_event::Event::Escalated(x))) => x.level,
        _ => {
            let _ = d.ack().await;
            return;
        }
    };
    match announce(log, view, notifier, tenant, id, level, d.event.sequence).await {
        Ok(()) => {
            let _ = d.ack().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, tenant, request = id, "notification not recorded; will retry");
            let _ = d.nak(Duration::from_secs(5), &e).await;
        }
    }
}

/// One outcome per triggering event and channel.
fn outcome_id(subject: &str, cause: u64, channel: i32) -> String {
    format!("{subject}:{cause}:{channel}")
}

/// The channels with an outcome recorded for the event at `cause`.
async fn recorded_channels(
    log: &dyn EventLog,
    view: &OversightView,
    tenant: &str,
    id: &str,
    cause: u64,
) -> Result<Vec<i32>, String> {
    let subject = view.notification_subject(tenant, id);
    let stream = view.stream();
    // The usual case, a first delivery: nothing recorded after the event, nothing to read.
    if log
        .last_subject_sequence(stream, &subject)
        .await
        .map_err(|e| e.to_string())?
        <= cause
    {
        return Ok(Vec::new());
    }
    // Outcomes of the event at `cause` come after it.
    let events: Vec<_> = log
        .replay(
            stream,
            ReplayFrom::Sequence(cause + 1),
            None,
            Some(&subject),
        )
        .await
        .map_err(|e| e.to_string())?
        .try_collect()
        .await
        .map_err(|e| e.to_string())?;
    let ids: Vec<&str> = events
        .iter()
        .filter_map(|e| e.headers.get(names::EVENT_ID))
        .collect();
    Ok([Channel::Slack, Channel::Email, Channel::Webhook]
        .into_iter()
        .map(|c| c as i32)
        .filter(|c| ids.contains(&outcome_id(&subject, cause, *c).as_str()))
        .collect())
}

/// Sends the request at `level` on each configured channel of its policy and records every
/// outcome. Requests decided meanwhile are not announced.
async fn announce(
    log: &dyn EventLog,
    view: &OversightView,
    notifier: &Notifier,
    tenant: &str,
    id: &str,
    level: u32,
    cause: u64,
) -> Result<(), String> {
    // Folded at least through the event being announced: the view tails the log every few
    // hundred milliseconds, and a copy from before an escalation would still be at the old
    // level, so the escalation would be taken for stale and never announced.
    view.catch_up_to(cause).await.map_err(|e| e.to_string())?;
    let agg = view.get(tenant, id).ok_or("request not in the view yet")?;
    if !agg.is_open() || agg.view.level != level {
        return Ok(());
    }
    let approvers = &agg.view.approvers;
    // One-click links answer as the approver they name, for whoever holds them: with one
    // approver the channel carries that approver's; with several, e-mail carries each
    // approver's own. With anyone allowed, a link answers as "anyone": it can decide alone
    // (quorum 1) but never make a quorum of several people, so none is sent then.
    // Valid until the level's deadline, when that is past the links' usual lifetime.
    let deadline = super::notify::deadline_of(&agg.view);
    let links = match approvers.as_slice() {
        [] if agg.policy.quorum <= 1 => notifier.links_until(tenant, id, "anyone", deadline),
        [one] => notifier.links_until(tenant, id, one, deadline),
        _ => None,
    };
    let notification = Notification {
        tenant: tenant.to_string(),
        request: agg.view.clone(),
        level,
        links,
    };
    // Channels whose outcome for this event is recorded were sent by an earlier delivery of
    // it (one whose other outcomes the log refused, or a crash before its ack).
    let recorded = recorded_channels(log, view, tenant, id, cause).await?;
    let wanted: Vec<Channel> = channels(&agg.policy, agg.view.priority)
        .into_iter()
        .filter(|c| !recorded.contains(&(*c as i32)))
        .collect();
    let senders = notifier.senders_for(&wanted);
    // Channels are delivered at once, so slow ones do not add up past the ack wait.
    let mut outcomes = futures::future::join_all(
        senders
            .iter()
            .map(|sender| notifier.deliver(*sender, &notification)),
    )
    .await;
    // A channel the policy asks for but this deployment has not configured is recorded too:
    // the audit trail says nobody was told, and why.
    for c in wanted {
        if matches!(c, Channel::Slack | Channel::Email | Channel::Webhook)
            && !senders.iter().any(|s| s.channel() == c)
        {
            tracing::warn!(
                tenant,
                request = id,
                channel = super::notify::channel_label(c),
                "policy asks for a channel that is not configured"
            );
            outcomes.push(pb::NotificationDelivered {
                request_id: id.to_string(),
                channel: c as i32,
                level,
                ok: false,
                attempts: 0,
                detail: "channel not configured on this deployment (see OVERSIGHT_* settings)"
                    .into(),
                duration_seconds: 0.0,
            });
        }
    }
    for outcome in outcomes {
        let subject = view.notification_subject(tenant, id);
        let payload = outcome.encode_to_vec();
        log.append(AppendEvent {
            id: outcome_id(&subject, cause, outcome.channel),
            subject,
            expected_subject_sequence: None,
            headers: Headers::new()
                .with(names::CONTENT_TYPE, content_types::PROTOBUF)
                .with(names::EVENT_TYPE, "oversight.notification_delivered")
                .with(names::TENANT, tenant),
            payload: payload.into(),
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}
