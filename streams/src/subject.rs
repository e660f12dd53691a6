//! NATS subject matching, so the embedded log routes and filters exactly as JetStream does:
//! tokens separated by `.`, `*` matches one token, `>` (last) matches one or more.

/// Whether `subject` (no wildcards) matches `pattern` (wildcards allowed).
pub fn matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for p in pattern.split('.') {
        match (p, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (p, Some(s)) if p == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn wildcards_match_like_nats() {
        assert!(matches("metering.>", "metering.events.s1"));
        assert!(!matches("metering.>", "metering"));
        assert!(matches("metering.*.s1", "metering.events.s1"));
        assert!(!matches("metering.*", "metering.events.s1"));
        assert!(matches("a.b", "a.b"));
        assert!(!matches("a.b", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(!matches("t1.metering.>", "metering.events.x"));
    }
}
