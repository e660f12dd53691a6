//! Subscription ids as hash-map keys, stored in the map's bucket itself.
use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};

/// Longest id kept inline: room for a prefix and a ULID or a Stripe-style id.
const INLINE: usize = 30;

/// A subscription id. Up to 30 bytes it lives inline (32 bytes in all), so a lookup that
/// compares keys reads the bucket it already loaded instead of chasing a pointer to the heap:
/// with a million subscriptions that pointer is a cache miss, a quarter of a check's time.
/// Longer ids are boxed. Hashes and compares as the `str` it holds, so the map is queried
/// with a plain `&str`.
#[derive(Clone)]
pub(super) enum SubscriptionKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<str>),
}

impl SubscriptionKey {
    pub(super) fn new(id: &str) -> SubscriptionKey {
        if id.len() > INLINE {
            return SubscriptionKey::Boxed(id.into());
        }
        let mut bytes = [0; INLINE];
        bytes[..id.len()].copy_from_slice(id.as_bytes());
        SubscriptionKey::Inline {
            len: id.len() as u8,
            bytes,
        }
    }

    pub(super) fn as_str(&self) -> &str {
        match self {
            // Checking a few bytes of UTF-8 costs less than a line of `unsafe` would save.
            SubscriptionKey::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).expect("copied whole from a str")
            }
            SubscriptionKey::Boxed(id) => id,
        }
    }
}

impl Borrow<str> for SubscriptionKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// As `str` hashes, which `Borrow<str>` requires.
impl Hash for SubscriptionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state)
    }
}

impl PartialEq for SubscriptionKey {
    fn eq(&self, other: &SubscriptionKey) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SubscriptionKey {}

impl fmt::Debug for SubscriptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn short_and_long_ids_are_found_by_str() {
        let short = "sub_0123456789abcdef";
        let edge = "x".repeat(INLINE);
        let long = "sub_0b9c8f3e-6a4d-4a43-9a5e-2f1d7c3b8e01";
        let map: HashMap<SubscriptionKey, usize> = [short, edge.as_str(), long]
            .iter()
            .enumerate()
            .map(|(i, id)| (SubscriptionKey::new(id), i))
            .collect();
        assert_eq!(map.get(short), Some(&0));
        assert_eq!(map.get(edge.as_str()), Some(&1));
        assert_eq!(map.get(long), Some(&2));
        assert_eq!(map.get("sub_0123456789abcde"), None);
        assert!(matches!(
            SubscriptionKey::new(&edge),
            SubscriptionKey::Inline { .. }
        ));
        assert!(matches!(
            SubscriptionKey::new(long),
            SubscriptionKey::Boxed(_)
        ));
        assert_eq!(std::mem::size_of::<SubscriptionKey>(), 32);
    }
}
