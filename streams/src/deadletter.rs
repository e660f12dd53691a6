//! Dead letters: events that could not be applied, parked with the reason, the original
//! stream, subject and sequence, and the original payload and headers, so they can be listed
//! and re-driven after a fix.
use futures::TryStreamExt;

use crate::headers::{names, Headers};
use crate::log::{AppendEvent, EventLog, LogError, ReplayFrom, StoredEvent};
use crate::{Catalog, DEADLETTERS};

/// The most a letter may weigh, headers and payload: the dead-letter stream takes a message of
/// up to 1 MiB (the catalog's limit, and NATS's default maximum payload), less room for the
/// headers the log adds on the way (the message id, a trace context).
pub const LETTER_LIMIT: usize = 1024 * 1024 - 8 * 1024;

/// Builds the dead-letter append for `event`. Its id is derived from the original stream and
/// sequence, so dead-lettering the same event twice (after a crash) stores it once.
///
/// An event near the log's own limit would make a letter past it, one the log refuses: and a
/// projector that cannot park a poison event retries it for ever, stopping its product. Such a
/// letter keeps the reason and the original's place but not its payload, nor its headers
/// other than short `Creto-` ones (`Creto-DL-Omitted` says how many payload bytes it left);
/// [`DeadLetter::redrive_from`] reads the original back from its stream.
pub fn letter(
    event: &StoredEvent,
    subject: &str,
    reason: &str,
    detail: &str,
    deliveries: u32,
) -> AppendEvent {
    let mut headers = Headers::new();
    for (k, v) in event.headers.iter() {
        // JetStream control headers must not be replayed onto the dead-letter stream.
        if !k.starts_with("Nats-") && !k.starts_with("Creto-DL-") {
            headers.insert(k, v);
        }
    }
    headers.insert(names::DL_REASON, reason);
    headers.insert(names::DL_DETAIL, truncate(detail, 1024));
    headers.insert(names::DL_STREAM, &event.stream);
    headers.insert(names::DL_SUBJECT, &event.subject);
    headers.insert(names::DL_SEQUENCE, event.sequence.to_string());
    headers.insert(names::DL_DELIVERIES, deliveries.to_string());
    let mut payload = event.payload.clone();
    if weight(&headers) + payload.len() > LETTER_LIMIT {
        let mut kept = Headers::new();
        for (k, v) in headers.iter() {
            if k.starts_with("Creto-") && v.len() <= 1024 {
                kept.insert(k, v);
            }
        }
        kept.insert(names::DL_OMITTED, payload.len().to_string());
        headers = kept;
        payload = Default::default();
    }
    AppendEvent {
        subject: subject.to_string(),
        id: format!("dl:{}:{}", event.stream, event.sequence),
        expected_subject_sequence: None,
        headers,
        payload,
    }
}

/// What headers weigh in a message (name, value and separators), as the log counts them.
fn weight(headers: &Headers) -> usize {
    headers.iter().map(|(k, v)| k.len() + v.len() + 4).sum()
}

/// A dead letter as read back from the dead-letter stream.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub sequence: u64,
    pub reason: String,
    pub detail: String,
    pub original_stream: String,
    pub original_subject: String,
    pub original_sequence: u64,
    pub deliveries: u32,
    /// Payload bytes the letter could not keep (see [`letter`]): the original's are in its
    /// stream, for as long as the stream holds it.
    pub omitted: Option<usize>,
    pub event: StoredEvent,
}

impl DeadLetter {
    pub fn parse(event: StoredEvent) -> Option<DeadLetter> {
        let h = &event.headers;
        Some(DeadLetter {
            sequence: event.sequence,
            reason: h.get(names::DL_REASON)?.to_string(),
            detail: h.get(names::DL_DETAIL).unwrap_or_default().to_string(),
            original_stream: h.get(names::DL_STREAM)?.to_string(),
            original_subject: h.get(names::DL_SUBJECT)?.to_string(),
            original_sequence: h.get(names::DL_SEQUENCE)?.parse().ok()?,
            deliveries: h
                .get(names::DL_DELIVERIES)
                .and_then(|d| d.parse().ok())
                .unwrap_or(0),
            omitted: h.get(names::DL_OMITTED).and_then(|n| n.parse().ok()),
            event,
        })
    }

    /// [`Self::redrive`], the original read back from its stream when the letter could not
    /// keep it; `None` when the stream no longer holds it (removed, or past its retention).
    pub async fn redrive_from(&self, log: &dyn EventLog) -> Result<Option<AppendEvent>, LogError> {
        if self.omitted.is_none() {
            return Ok(Some(self.redrive()));
        }
        let original = match log.get(&self.original_stream, self.original_sequence).await {
            Ok(original) => original,
            Err(LogError::UnknownStream(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(original
            .filter(|o| o.subject == self.original_subject)
            .map(|o| {
                DeadLetter {
                    event: o,
                    omitted: None,
                    ..self.clone()
                }
                .redrive()
            }))
    }

    /// The append that sends the original event back to its subject. It gets a fresh id:
    /// the original's may still be inside the duplicate window.
    pub fn redrive(&self) -> AppendEvent {
        let mut headers = Headers::new();
        for (k, v) in self.event.headers.iter() {
            if !k.starts_with("Creto-DL-") && !k.starts_with("Nats-") {
                headers.insert(k, v);
            }
        }
        AppendEvent {
            subject: self.original_subject.clone(),
            id: format!("redrive:{}:{}", self.original_stream, self.sequence),
            expected_subject_sequence: None,
            headers,
            payload: self.event.payload.clone(),
        }
    }
}

/// Dead letters after sequence `after` of the dead-letter stream, oldest first: up to `limit`
/// of those `keep` accepts, parked from the stream whose dead-letter `subject` is given
/// ([`Catalog::deadletter_subject`]), or from every stream.
pub async fn list(
    log: &dyn EventLog,
    catalog: &Catalog,
    subject: Option<&str>,
    after: u64,
    limit: usize,
    keep: impl Fn(&DeadLetter) -> bool,
) -> Result<Vec<DeadLetter>, LogError> {
    Ok(page(log, catalog, subject, after, limit, usize::MAX, keep)
        .await?
        .0)
}

/// As [`list`], reading at most `max_read` dead letters (those `keep` refuses included), and
/// the sequence reached: where the next page starts.
pub async fn page(
    log: &dyn EventLog,
    catalog: &Catalog,
    subject: Option<&str>,
    after: u64,
    limit: usize,
    max_read: usize,
    keep: impl Fn(&DeadLetter) -> bool,
) -> Result<(Vec<DeadLetter>, u64), LogError> {
    let mut events = log
        .replay(
            &catalog.stream(DEADLETTERS),
            ReplayFrom::Sequence(after + 1),
            None,
            subject,
        )
        .await?;
    let mut out = Vec::new();
    let (mut read, mut reached) = (0, after);
    while out.len() < limit && read < max_read {
        match events.try_next().await? {
            Some(e) => {
                read += 1;
                reached = e.sequence;
                out.extend(DeadLetter::parse(e).filter(&keep));
            }
            None => break,
        }
    }
    Ok((out, reached))
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
