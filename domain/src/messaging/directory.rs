//! The agent key directory's rules: what a registration or a revocation does, and a key's
//! status at a given time. The gateway folds the `messaging.keys.*` events through these.
use std::collections::HashMap;

use chrono::{DateTime, Utc};
use creto_schemas::messaging::v1::{key_event, KeyPurpose, KeyStatus};

use super::envelope::time_of;

/// One registered key as the directory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub agent_id: String,
    pub key_id: String,
    pub purpose: KeyPurpose,
    pub public_key: Vec<u8>,
    pub registered_at: DateTime<Utc>,
    /// End of the rotation overlap, once a newer key replaced this one.
    pub valid_until: Option<DateTime<Utc>>,
    pub revoked: Option<(DateTime<Utc>, String)>,
    /// The signing key that vouched for this one, and its signature ([`super::keys::verify_endorsement`]).
    pub endorsed_by: Option<String>,
    pub endorsement: Vec<u8>,
}

impl KeyRecord {
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        match (&self.revoked, self.valid_until) {
            (Some(_), _) => KeyStatus::Revoked,
            (None, Some(until)) if until <= now => KeyStatus::Retired,
            (None, Some(_)) => KeyStatus::Rotating,
            (None, None) => KeyStatus::Active,
        }
    }

    /// Valid for new messages: active, or rotating out but still inside the overlap.
    pub fn usable(&self, now: DateTime<Utc>) -> bool {
        matches!(self.status(now), KeyStatus::Active | KeyStatus::Rotating)
    }
}

/// One agent's keys, in registration order, and the log position of its last key event (the
/// expected sequence for the next one).
#[derive(Debug, Clone, Default)]
pub struct AgentKeys {
    pub keys: Vec<KeyRecord>,
    pub last_sequence: u64,
}

impl AgentKeys {
    pub fn get(&self, key_id: &str) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }

    /// Keys of `purpose` usable at `now`, newest first.
    pub fn usable(&self, purpose: KeyPurpose, now: DateTime<Utc>) -> Vec<&KeyRecord> {
        self.keys
            .iter()
            .rev()
            .filter(|k| k.purpose == purpose && k.usable(now))
            .collect()
    }

    /// The keys a new registration of `purpose` puts into rotation: the ones not yet replaced
    /// or revoked.
    pub fn replaced_by_new(&self, purpose: KeyPurpose) -> Vec<String> {
        self.keys
            .iter()
            .filter(|k| k.purpose == purpose && k.valid_until.is_none() && k.revoked.is_none())
            .map(|k| k.key_id.clone())
            .collect()
    }

    /// Folds one event in. Events come from the log, already validated when appended; an
    /// event that names an unknown key changes nothing.
    pub fn apply(&mut self, event: &key_event::Event, sequence: u64) {
        self.last_sequence = sequence;
        match event {
            key_event::Event::Registered(r) => {
                let until = time_of(&r.replaced_valid_until);
                for k in self.keys.iter_mut() {
                    if r.replaces.contains(&k.key_id) && k.valid_until.is_none() {
                        k.valid_until = until;
                    }
                }
                if let Some(k) = self.keys.iter_mut().find(|k| k.key_id == r.key_id) {
                    // The same key again with an endorsement: one registered before
                    // endorsements existed, endorsed now (checked when appended).
                    if k.endorsed_by.is_none()
                        && !r.endorsed_by.is_empty()
                        && k.public_key == r.public_key
                    {
                        k.endorsed_by = Some(r.endorsed_by.clone());
                        k.endorsement = r.endorsement.clone();
                    }
                } else {
                    self.keys.push(KeyRecord {
                        agent_id: r.agent_id.clone(),
                        key_id: r.key_id.clone(),
                        purpose: KeyPurpose::try_from(r.purpose).unwrap_or(KeyPurpose::Unspecified),
                        public_key: r.public_key.clone(),
                        registered_at: time_of(&r.registered_at).unwrap_or_default(),
                        valid_until: None,
                        revoked: None,
                        endorsed_by: (!r.endorsed_by.is_empty()).then(|| r.endorsed_by.clone()),
                        endorsement: r.endorsement.clone(),
                    });
                }
            }
            key_event::Event::Revoked(r) => {
                if let Some(k) = self.keys.iter_mut().find(|k| k.key_id == r.key_id) {
                    if k.revoked.is_none() {
                        k.revoked =
                            Some((time_of(&r.revoked_at).unwrap_or_default(), r.reason.clone()));
                    }
                }
            }
        }
    }
}

/// Every tenant's agents' keys: (tenant, agent id) → keys.
pub type Directory = HashMap<(String, String), AgentKeys>;

#[cfg(test)]
mod tests {
    use super::*;
    use creto_schemas::messaging::v1::{KeyRegistered, KeyRevoked};

    fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: 0,
        })
    }

    fn registered(id: &str, replaces: &[&str], until: Option<DateTime<Utc>>) -> key_event::Event {
        key_event::Event::Registered(KeyRegistered {
            agent_id: "b".into(),
            key_id: id.into(),
            purpose: KeyPurpose::Encryption as i32,
            public_key: vec![1; 32],
            registered_at: ts(Utc::now()),
            replaces: replaces.iter().map(|s| s.to_string()).collect(),
            replaced_valid_until: until.and_then(ts),
            ..Default::default()
        })
    }

    #[test]
    fn rotation_overlap_then_retirement_then_revocation() {
        let now = Utc::now();
        let mut keys = AgentKeys::default();
        keys.apply(&registered("e1", &[], None), 1);
        assert_eq!(keys.usable(KeyPurpose::Encryption, now).len(), 1);
        assert_eq!(keys.replaced_by_new(KeyPurpose::Encryption), vec!["e1"]);

        let until = now + chrono::Duration::hours(1);
        keys.apply(&registered("e2", &["e1"], Some(until)), 2);
        assert_eq!(keys.get("e1").unwrap().status(now), KeyStatus::Rotating);
        let usable: Vec<_> = keys
            .usable(KeyPurpose::Encryption, now)
            .iter()
            .map(|k| k.key_id.clone())
            .collect();
        assert_eq!(
            usable,
            vec!["e2", "e1"],
            "newest first, both in the overlap"
        );
        let later = until + chrono::Duration::seconds(1);
        assert_eq!(keys.get("e1").unwrap().status(later), KeyStatus::Retired);
        assert_eq!(keys.usable(KeyPurpose::Encryption, later).len(), 1);
        assert!(keys.replaced_by_new(KeyPurpose::Encryption) == vec!["e2"]);

        keys.apply(
            &key_event::Event::Revoked(KeyRevoked {
                agent_id: "b".into(),
                key_id: "e2".into(),
                reason: "leaked".into(),
                revoked_at: ts(now),
            }),
            3,
        );
        assert_eq!(keys.get("e2").unwrap().status(now), KeyStatus::Revoked);
        assert!(keys.usable(KeyPurpose::Encryption, now).len() == 1);
        assert_eq!(keys.last_sequence, 3);
    }
}
