//! The client's own replay refusal: what it opened and acknowledged, per sender, so a message
//! the server hands out again is told from the redelivery of one not acknowledged yet.
use std::collections::{BTreeMap, HashMap};

/// What a client opened, to tell a replay (a message handed out again by whoever runs the
/// server) from the redelivery of one not acknowledged yet. Per sender: nothing at or below the
/// newest sequence an acknowledgement covered opens again, and a sequence opened and not yet
/// acknowledged opens again only as the same message. A message that never opened (its
/// sender's key could not be looked up, say) may still come after a later one.
#[derive(Default)]
pub struct Seen {
    acked: HashMap<String, u64>,
    /// Opened and not acknowledged yet: per sender, sequence → message id.
    pending: HashMap<String, BTreeMap<u64, String>>,
    /// Their cursors → (sender, sequence) of each message opened at it (the server picks
    /// cursors), to apply acknowledgements (which go by cursor).
    cursors: BTreeMap<u64, Vec<(String, u64)>>,
}

/// Opened messages remembered until acknowledged.
const MAX_UNACKNOWLEDGED: usize = 100_000;

impl Seen {
    pub fn check(&self, sender: &str, sequence: u64, id: &str) -> Result<(), String> {
        if let Some(acked) = self.acked.get(sender).filter(|a| sequence <= **a) {
            return Err(format!(
                "message {id} from {sender} has sequence {sequence}, and this client acknowledged {sender}'s messages through sequence {acked}: a replayed message"
            ));
        }
        match self.pending.get(sender).and_then(|p| p.get(&sequence)) {
            Some(known) if known != id => Err(format!(
                "message {id} from {sender} reuses sequence {sequence} of message {known}: a replayed message"
            )),
            _ => Ok(()),
        }
    }

    pub fn opened(&mut self, cursor: u64, sender: &str, sequence: u64, id: &str) {
        self.pending
            .entry(sender.to_string())
            .or_default()
            .insert(sequence, id.to_string());
        self.cursors
            .entry(cursor)
            .or_default()
            .push((sender.to_string(), sequence));
        // A client that never acknowledges (or does so through `rpc()`) would grow this
        // without end: the oldest are then taken as acknowledged.
        if self.cursors.len() > MAX_UNACKNOWLEDGED {
            if let Some((&oldest, _)) = self.cursors.first_key_value() {
                self.acked_through(oldest);
            }
        }
    }

    pub fn acked_through(&mut self, cursor: u64) {
        let later = self.cursors.split_off(&(cursor.saturating_add(1)));
        let covered = std::mem::replace(&mut self.cursors, later);
        for (sender, sequence) in covered.into_values().flatten() {
            let acked = self.acked.entry(sender.clone()).or_default();
            *acked = (*acked).max(sequence);
            if let Some(pending) = self.pending.get_mut(&sender) {
                *pending = pending.split_off(&acked.saturating_add(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Seen;

    #[test]
    fn replays_are_told_from_redeliveries() {
        let mut seen = Seen::default();
        for (cursor, sequence, id) in [(10, 5, "m5"), (11, 7, "m7")] {
            assert!(seen.check("alice", sequence, id).is_ok());
            seen.opened(cursor, "alice", sequence, id);
        }
        // Not acknowledged yet: both may come again as they were, nothing else may.
        assert!(seen.check("alice", 5, "m5").is_ok());
        assert!(seen.check("alice", 7, "m7").is_ok());
        assert!(seen.check("alice", 7, "other").is_err());
        // One that did not open the first time (m6) may still come after a later one.
        assert!(seen.check("alice", 6, "m6").is_ok());
        assert!(seen.check("alice", 8, "m8").is_ok());
        assert!(seen.check("bob", 1, "b1").is_ok(), "pairs are apart");
        // Acknowledged through m5's cursor: m5 never again, m7 still may.
        seen.acked_through(10);
        assert!(seen.check("alice", 5, "m5").is_err());
        assert!(seen.check("alice", 7, "m7").is_ok());
        seen.acked_through(11);
        assert!(seen.check("alice", 7, "m7").is_err());
        assert!(seen.check("alice", 8, "m8").is_ok());
        // Two messages handed out under one cursor (the server picks cursors): an ack through
        // it covers both.
        seen.opened(12, "alice", 8, "m8");
        seen.opened(12, "bob", 3, "b3");
        seen.acked_through(12);
        assert!(seen.check("alice", 8, "m8").is_err());
        assert!(seen.check("bob", 3, "b3").is_err());
        // The largest sequence a sender can use does not overflow the floor.
        seen.opened(13, "carol", u64::MAX, "last");
        seen.acked_through(13);
        assert!(seen.check("carol", u64::MAX, "last").is_err());
    }
}
