//! The one place that declares every stream of the platform.
//!
//! A `Catalog` may carry a namespace: tests and side-by-side environments get their own stream
//! names (`T42_METERING`) and subjects (`t42.metering.>`) so a developer's data is never touched.
use std::time::Duration;

/// Product streams plus the dead letters. Names are the JetStream stream names without namespace.
pub const METERING: &str = "METERING";
pub const OVERSIGHT: &str = "OVERSIGHT";
pub const RUNTIME: &str = "RUNTIME";
pub const MESSAGING: &str = "MESSAGING";
pub const DEADLETTERS: &str = "DEADLETTERS";

/// What a stream should look like. Compared field by field with the live config by
/// `streams init`, so every field here is one the operator can reason about.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    pub description: String,
    /// Zero means keep forever: the log is the source of truth and DR is a replay.
    pub max_age: Duration,
    /// -1 means unlimited; production overlays set a byte budget per stream.
    pub max_bytes: i64,
    pub max_message_size: i32,
    /// How long JetStream remembers `Nats-Msg-Id`s. Projectors also drop ids they already
    /// applied, so a duplicate arriving after the window is still counted once.
    pub duplicate_window: Duration,
    /// 1 on a single server; 3 in the production manifests (`ops/nats`).
    pub replicas: usize,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    namespace: Option<String>,
    replicas: usize,
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog {
            namespace: None,
            replicas: 1,
        }
    }
}

impl Catalog {
    /// A catalog whose stream names and subjects are prefixed, e.g. for tests.
    pub fn namespaced(namespace: &str) -> Self {
        let ns = namespace.trim().to_ascii_lowercase();
        Catalog {
            namespace: (!ns.is_empty()).then_some(ns),
            replicas: 1,
        }
    }

    /// The catalog a stream name belongs to (`T42_METERING` → namespace `t42`).
    pub fn of_stream(stream_name: &str) -> Self {
        match stream_name.rsplit_once('_') {
            Some((ns, _)) => Catalog::namespaced(ns),
            None => Catalog::default(),
        }
    }

    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas.max(1);
        self
    }

    /// Replicas of each stream (`ENABLEMENT_STREAM_REPLICAS`).
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// Stream name for a logical stream (`METERING` → `T42_METERING`).
    pub fn stream(&self, logical: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{}_{logical}", ns.to_ascii_uppercase()),
            None => logical.to_string(),
        }
    }

    /// Subject for a logical subject (`metering.events.sub_1` → `t42.metering.events.sub_1`).
    pub fn subject(&self, logical: &str) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}.{logical}"),
            None => logical.to_string(),
        }
    }

    /// The logical subject, without namespace, of a subject read from the log.
    pub fn strip<'a>(&self, subject: &'a str) -> &'a str {
        match &self.namespace {
            Some(ns) => subject
                .strip_prefix(ns.as_str())
                .and_then(|s| s.strip_prefix('.'))
                .unwrap_or(subject),
            None => subject,
        }
    }

    /// Subject a dead letter from `stream` (a full stream name) is written to.
    pub fn deadletter_subject(&self, logical_stream: &str) -> String {
        self.subject(&format!(
            "deadletter.{}",
            logical_stream.to_ascii_lowercase()
        ))
    }

    /// Subject a dead letter from the stream named `stream_name` (namespaced, e.g.
    /// `T42_METERING`) is written to: `t42.deadletter.metering`.
    pub fn deadletter_subject_of_stream(&self, stream_name: &str) -> String {
        let logical = match &self.namespace {
            Some(ns) => stream_name
                .strip_prefix(&format!("{}_", ns.to_ascii_uppercase()))
                .unwrap_or(stream_name),
            None => stream_name,
        };
        self.deadletter_subject(logical)
    }

    /// The subject `audit restore` writes its marker to in the stream named `stream_name`
    /// (`<prefix>._restored`, payload: the last restored sequence). Producers' credentials only
    /// allow their own event subjects, so the marker is trusted like meter definitions are.
    pub fn restore_marker_subject(&self, stream_name: &str) -> Option<String> {
        let spec = self.specs().into_iter().find(|s| s.name == stream_name)?;
        restore_marker_of(&spec.subjects)
    }

    /// Every stream of the platform.
    pub fn specs(&self) -> Vec<StreamSpec> {
        const DAY: u64 = 24 * 3600;
        let product = |logical: &str, prefix: &str, description: &str| StreamSpec {
            name: self.stream(logical),
            subjects: vec![self.subject(&format!("{prefix}.>"))],
            description: description.to_string(),
            max_age: Duration::ZERO,
            max_bytes: -1,
            max_message_size: 1024 * 1024,
            duplicate_window: Duration::from_secs(10 * 60),
            replicas: self.replicas,
        };
        vec![
            product(
                METERING,
                "metering",
                "Metering: usage events, meters, quotas, plans, invoices",
            ),
            product(
                OVERSIGHT,
                "oversight",
                "Oversight: approval requests, policies, decisions",
            ),
            product(RUNTIME, "runtime", "Runtime: sandbox lifecycle"),
            product(
                MESSAGING,
                "messaging",
                "Messaging: agent keys, sealed envelopes, deliveries",
            ),
            StreamSpec {
                max_age: Duration::from_secs(30 * DAY),
                ..product(
                    DEADLETTERS,
                    "deadletter",
                    "Events that could not be applied, with the reason",
                )
            },
        ]
    }

    /// The spec of one logical stream.
    pub fn spec(&self, logical: &str) -> Option<StreamSpec> {
        let name = self.stream(logical);
        self.specs().into_iter().find(|s| s.name == name)
    }

    /// Logical stream that owns a logical subject, by its first token.
    pub fn stream_for_subject(&self, subject: &str) -> Option<String> {
        let first = self.strip(subject).split('.').next()?;
        let logical = match first {
            "metering" => METERING,
            "oversight" => OVERSIGHT,
            "runtime" => RUNTIME,
            "messaging" => MESSAGING,
            "deadletter" => DEADLETTERS,
            _ => return None,
        };
        Some(self.stream(logical))
    }
}

/// The restore marker subject of a stream with these subjects (the first with `>` →
/// `_restored`).
pub fn restore_marker_of(subjects: &[String]) -> Option<String> {
    subjects
        .first()?
        .strip_suffix('>')
        .map(|prefix| format!("{prefix}_restored"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_prefixes_names_and_subjects() {
        let c = Catalog::namespaced("t42");
        assert_eq!(c.stream(METERING), "T42_METERING");
        assert_eq!(c.subject("metering.events.s1"), "t42.metering.events.s1");
        assert_eq!(c.strip("t42.metering.events.s1"), "metering.events.s1");
        assert_eq!(
            c.stream_for_subject("t42.metering.events.s1").unwrap(),
            "T42_METERING"
        );
        let specs = c.specs();
        assert_eq!(specs.len(), 5);
        assert!(specs.iter().all(|s| s.name.starts_with("T42_")));
        assert_eq!(
            Catalog::of_stream("T42_METERING").restore_marker_subject("T42_METERING"),
            Some("t42.metering._restored".to_string())
        );
        assert_eq!(
            Catalog::of_stream("DEADLETTERS").restore_marker_subject("DEADLETTERS"),
            Some("deadletter._restored".to_string())
        );
    }

    #[test]
    fn default_catalog_has_plain_names() {
        let c = Catalog::default();
        assert_eq!(
            c.spec(DEADLETTERS).unwrap().subjects,
            vec!["deadletter.>".to_string()]
        );
        assert_eq!(c.deadletter_subject("METERING"), "deadletter.metering");
    }
}
