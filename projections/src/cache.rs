//! The cache port: fast shared state the read path needs in microseconds (quota counters).
//! Redis in production; an in-process map in the embedded default. Both run the conformance
//! suite in [`conformance`].
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionManager;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("cache unavailable: {0}")]
pub struct CacheError(pub String);

/// One write of a [`Cache::write`] batch.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheWrite {
    /// Sets fields of a hash (others are kept), then its time to live.
    Hash {
        key: String,
        fields: Vec<(String, String)>,
        ttl: Option<Duration>,
    },
    Set {
        key: String,
        value: String,
    },
    Delete {
        key: String,
    },
}

#[async_trait]
pub trait Cache: Send + Sync + 'static {
    /// Applies the writes in order, in one round trip.
    async fn write(&self, writes: Vec<CacheWrite>) -> Result<(), CacheError>;
    /// Applies the writes in order, in one atomic step, unless `mark` holds a sequence above
    /// `sequence`; with `advance`, then sets `mark` to `sequence`. Whether it applied them.
    /// Writers of state read at a log position use it so that one that fell behind (a former
    /// leader's last write, delayed) never overwrites what a newer one wrote.
    async fn write_unless_past(
        &self,
        mark: &str,
        sequence: u64,
        writes: Vec<CacheWrite>,
        advance: bool,
    ) -> Result<bool, CacheError>;
    /// Every field of a hash; empty when the key is absent or expired.
    async fn hash(&self, key: &str) -> Result<HashMap<String, String>, CacheError>;
    async fn get(&self, key: &str) -> Result<Option<String>, CacheError>;
    async fn ping(&self) -> Result<(), CacheError>;
    /// Whether the cache keeps what was written until it expires: false where it may evict
    /// keys to make room (Redis with `maxmemory` set and a policy other than `noeviction`), or
    /// where it cannot tell (`CONFIG` refused, as some managed services do). A reader that
    /// takes a missing key for "never written" must know.
    async fn keeps_what_it_is_given(&self) -> Result<bool, CacheError>;
    /// Keys starting with `prefix` (operators' inspection and test cleanup; not a hot path).
    async fn keys(&self, prefix: &str) -> Result<Vec<String>, CacheError>;
}

/// Redis, over a fixed set of multiplexed connections used in turn (`REDIS_POOL_SIZE`): one
/// connection pipelines many requests, several spread a burst over more server threads and
/// sockets without ever opening connections on demand (the runbook's 5.4 incident).
#[derive(Clone)]
pub struct RedisCache {
    connections: std::sync::Arc<Vec<ConnectionManager>>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl RedisCache {
    pub fn new(connections: Vec<ConnectionManager>) -> Self {
        assert!(!connections.is_empty(), "at least one Redis connection");
        RedisCache {
            connections: std::sync::Arc::new(connections),
            next: Default::default(),
        }
    }

    fn conn(&self) -> ConnectionManager {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.connections[i % self.connections.len()].clone()
    }
}

/// [`Cache::write_unless_past`] in Redis: KEYS[1] is the mark, ARGV[1] the sequence, ARGV[2]
/// whether to advance the mark; then one write per further key, its operation and operands in
/// ARGV in turn (`h` n field value... ttl_ms, `s` value, `d`). A script runs atomically.
static UNLESS_PAST: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local at = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local sequence = tonumber(ARGV[1])
if at > sequence then return 0 end
local a = 3
for i = 2, #KEYS do
  local op = ARGV[a]
  if op == 'h' then
    local n = tonumber(ARGV[a + 1])
    if n > 0 then redis.call('HSET', KEYS[i], unpack(ARGV, a + 2, a + 1 + 2 * n)) end
    local ttl = tonumber(ARGV[a + 2 + 2 * n])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
    a = a + 3 + 2 * n
  elseif op == 's' then
    redis.call('SET', KEYS[i], ARGV[a + 1])
    a = a + 2
  else
    redis.call('DEL', KEYS[i])
    a = a + 1
  end
end
if ARGV[2] == '1' then redis.call('SET', KEYS[1], ARGV[1]) end
return 1
",
    )
});

fn redis_error(e: redis::RedisError) -> CacheError {
    CacheError(e.to_string())
}

#[async_trait]
impl Cache for RedisCache {
    async fn write(&self, writes: Vec<CacheWrite>) -> Result<(), CacheError> {
        let mut pipe = redis::pipe();
        for w in writes {
            match w {
                CacheWrite::Hash { key, fields, ttl } => {
                    pipe.hset_multiple(&key, &fields).ignore();
                    if let Some(ttl) = ttl {
                        pipe.pexpire(&key, ttl.as_millis() as i64).ignore();
                    }
                }
                CacheWrite::Set { key, value } => {
                    pipe.set(key, value).ignore();
                }
                CacheWrite::Delete { key } => {
                    pipe.del(key).ignore();
                }
            }
        }
        let mut conn = self.conn();
        pipe.query_async::<()>(&mut conn).await.map_err(redis_error)
    }

    async fn write_unless_past(
        &self,
        mark: &str,
        sequence: u64,
        writes: Vec<CacheWrite>,
        advance: bool,
    ) -> Result<bool, CacheError> {
        let mut script = UNLESS_PAST.prepare_invoke();
        script
            .key(mark)
            .arg(sequence)
            .arg(if advance { 1 } else { 0 });
        for w in writes {
            match w {
                CacheWrite::Hash { key, fields, ttl } => {
                    script.key(key).arg("h").arg(fields.len());
                    for (f, v) in fields {
                        script.arg(f).arg(v);
                    }
                    script.arg(ttl.map_or(0, |t| t.as_millis() as u64));
                }
                CacheWrite::Set { key, value } => {
                    script.key(key).arg("s").arg(value);
                }
                CacheWrite::Delete { key } => {
                    script.key(key).arg("d");
                }
            }
        }
        let mut conn = self.conn();
        let applied: i64 = script.invoke_async(&mut conn).await.map_err(redis_error)?;
        Ok(applied == 1)
    }

    async fn hash(&self, key: &str) -> Result<HashMap<String, String>, CacheError> {
        let mut conn = self.conn();
        redis::cmd("HGETALL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut conn = self.conn();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(redis_error)
    }

    async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(redis_error)
    }

    async fn keeps_what_it_is_given(&self) -> Result<bool, CacheError> {
        let mut conn = self.conn();
        let config = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async::<HashMap<String, String>>(&mut conn)
                    .await
                    .ok()
                    .and_then(|mut m| m.remove(name))
            }
        };
        let (Some(max), Some(policy)) =
            (config("maxmemory").await, config("maxmemory-policy").await)
        else {
            return Ok(false);
        };
        // Connected, for the error a refused CONFIG above could not tell apart.
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(redis_error)?;
        Ok(max == "0" || policy == "noeviction")
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, CacheError> {
        let mut conn = self.conn();
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        // SCAN, not KEYS: it never blocks a production Redis.
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{}*", escape_glob(prefix)))
                .arg("COUNT")
                .arg(1_000)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        keys.sort();
        Ok(keys)
    }
}

fn escape_glob(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

enum Value {
    Text(String),
    Hash(HashMap<String, String>),
}

/// The in-process cache of the embedded default: the same semantics, in one process's memory.
/// Like Redis here, it keeps nothing across restarts; its owners rebuild it from the read
/// models (see `metering::counters`).
#[derive(Default)]
pub struct MemoryCache {
    map: Mutex<HashMap<String, (Value, Option<Instant>)>>,
    /// When expired keys were last removed (see [`MemoryCache::sweep`]).
    swept: Mutex<Option<Instant>>,
}

impl MemoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn live<'a>(
        map: &'a mut HashMap<String, (Value, Option<Instant>)>,
        key: &str,
    ) -> Option<&'a mut Value> {
        if map
            .get(key)
            .is_some_and(|(_, exp)| exp.is_some_and(|e| e <= Instant::now()))
        {
            map.remove(key);
        }
        map.get_mut(key).map(|(v, _)| v)
    }

    /// Removes expired keys, at most once a minute. Redis expires keys by itself; here a key
    /// was only removed when read, and counters of ended periods are never read again: `dev`
    /// grew for as long as it ran.
    fn sweep(&self, map: &mut HashMap<String, (Value, Option<Instant>)>) {
        let mut swept = self.swept.lock().unwrap();
        let now = Instant::now();
        if swept.is_some_and(|at| now.duration_since(at) < Duration::from_secs(60)) {
            return;
        }
        *swept = Some(now);
        map.retain(|_, (_, expires)| expires.is_none_or(|e| e > now));
    }

    /// Applies `writes` in order to the map (its lock held by the caller).
    fn apply(map: &mut HashMap<String, (Value, Option<Instant>)>, writes: Vec<CacheWrite>) {
        for w in writes {
            match w {
                CacheWrite::Hash { key, fields, ttl } => {
                    if !matches!(Self::live(map, &key), Some(Value::Hash(_))) {
                        map.insert(key.clone(), (Value::Hash(HashMap::new()), None));
                    }
                    let entry = map.get_mut(&key).expect("inserted above");
                    if let Value::Hash(h) = &mut entry.0 {
                        h.extend(fields);
                    }
                    if let Some(ttl) = ttl {
                        entry.1 = Some(Instant::now() + ttl);
                    }
                }
                CacheWrite::Set { key, value } => {
                    map.insert(key, (Value::Text(value), None));
                }
                CacheWrite::Delete { key } => {
                    map.remove(&key);
                }
            }
        }
    }
}

#[async_trait]
impl Cache for MemoryCache {
    async fn write(&self, writes: Vec<CacheWrite>) -> Result<(), CacheError> {
        let mut map = self.map.lock().unwrap();
        Self::apply(&mut map, writes);
        self.sweep(&mut map);
        Ok(())
    }

    async fn write_unless_past(
        &self,
        mark: &str,
        sequence: u64,
        writes: Vec<CacheWrite>,
        advance: bool,
    ) -> Result<bool, CacheError> {
        let mut map = self.map.lock().unwrap();
        let at = match Self::live(&mut map, mark) {
            Some(Value::Text(t)) => t.parse::<u64>().unwrap_or(0),
            _ => 0,
        };
        if at > sequence {
            return Ok(false);
        }
        Self::apply(&mut map, writes);
        if advance {
            map.insert(mark.to_string(), (Value::Text(sequence.to_string()), None));
        }
        Ok(true)
    }

    async fn hash(&self, key: &str) -> Result<HashMap<String, String>, CacheError> {
        let mut map = self.map.lock().unwrap();
        Ok(match Self::live(&mut map, key) {
            Some(Value::Hash(h)) => h.clone(),
            _ => HashMap::new(),
        })
    }

    async fn get(&self, key: &str) -> Result<Option<String>, CacheError> {
        let mut map = self.map.lock().unwrap();
        Ok(match Self::live(&mut map, key) {
            Some(Value::Text(t)) => Some(t.clone()),
            _ => None,
        })
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }

    async fn keeps_what_it_is_given(&self) -> Result<bool, CacheError> {
        Ok(true)
    }

    async fn keys(&self, prefix: &str) -> Result<Vec<String>, CacheError> {
        let now = Instant::now();
        let map = self.map.lock().unwrap();
        let mut keys: Vec<String> = map
            .iter()
            .filter(|(k, (_, exp))| k.starts_with(prefix) && exp.is_none_or(|e| e > now))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        Ok(keys)
    }
}

/// The cache port's conformance suite: every adapter runs these, with keys under `prefix`.
pub mod conformance {
    use super::*;

    fn hash(key: &str, fields: &[(&str, &str)], ttl: Option<Duration>) -> CacheWrite {
        CacheWrite::Hash {
            key: key.to_string(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ttl,
        }
    }

    pub async fn hashes_merge_fields_and_read_back(cache: &dyn Cache, prefix: &str) {
        let key = format!("{prefix}quota:s1:t");
        assert!(cache.hash(&key).await.unwrap().is_empty());
        cache
            .write(vec![hash(
                &key,
                &[("count", "1"), ("month", "2026-11")],
                None,
            )])
            .await
            .unwrap();
        cache
            .write(vec![hash(&key, &[("count", "2"), ("tenant", "a")], None)])
            .await
            .unwrap();
        let h = cache.hash(&key).await.unwrap();
        let mut fields: Vec<_> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        fields.sort();
        assert_eq!(
            fields,
            vec![("count", "2"), ("month", "2026-11"), ("tenant", "a")]
        );
        cache.write(vec![CacheWrite::Delete { key }]).await.unwrap();
    }

    pub async fn writes_apply_in_order(cache: &dyn Cache, prefix: &str) {
        let key = format!("{prefix}seq");
        cache
            .write(vec![
                CacheWrite::Set {
                    key: key.clone(),
                    value: "1".into(),
                },
                CacheWrite::Delete { key: key.clone() },
                CacheWrite::Set {
                    key: key.clone(),
                    value: "3".into(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(cache.get(&key).await.unwrap().as_deref(), Some("3"));
        assert_eq!(cache.get(&format!("{prefix}absent")).await.unwrap(), None);
        cache
            .write(vec![CacheWrite::Delete { key: key.clone() }])
            .await
            .unwrap();
        assert_eq!(cache.get(&key).await.unwrap(), None);
    }

    /// A write at an older sequence than the mark's is refused whole; one at the mark's or a
    /// later one applies, and advances the mark when asked.
    pub async fn sequenced_writes_never_go_back(cache: &dyn Cache, prefix: &str) {
        let mark = format!("{prefix}mark");
        let key = format!("{prefix}quota:s2:t");
        let at = |n: &str| vec![hash(&key, &[("count", n), ("month", "m")], None)];
        // No mark yet: anything applies.
        assert!(cache
            .write_unless_past(&mark, 5, at("5"), true)
            .await
            .unwrap());
        assert_eq!(cache.get(&mark).await.unwrap().as_deref(), Some("5"));
        assert!(!cache
            .write_unless_past(&mark, 4, at("4"), true)
            .await
            .unwrap());
        assert!(!cache
            .write_unless_past(&mark, 3, at("3"), false)
            .await
            .unwrap());
        assert_eq!(cache.hash(&key).await.unwrap()["count"], "5");
        assert_eq!(cache.get(&mark).await.unwrap().as_deref(), Some("5"));
        // Not advancing leaves the mark where it was.
        assert!(cache
            .write_unless_past(&mark, 9, at("9"), false)
            .await
            .unwrap());
        assert_eq!(cache.get(&mark).await.unwrap().as_deref(), Some("5"));
        let h = cache.hash(&key).await.unwrap();
        assert_eq!((h["count"].as_str(), h["month"].as_str()), ("9", "m"));
        // Every kind of write, in order, at the mark's own sequence.
        let other = format!("{prefix}other");
        let writes = vec![
            CacheWrite::Set {
                key: other.clone(),
                value: "x".into(),
            },
            CacheWrite::Delete { key: key.clone() },
            hash(&key, &[("count", "10")], Some(Duration::from_secs(60))),
        ];
        assert!(cache
            .write_unless_past(&mark, 5, writes, true)
            .await
            .unwrap());
        assert_eq!(cache.get(&other).await.unwrap().as_deref(), Some("x"));
        let h = cache.hash(&key).await.unwrap();
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["count"], "10");
        for k in [mark, key, other] {
            cache
                .write(vec![CacheWrite::Delete { key: k }])
                .await
                .unwrap();
        }
    }

    pub async fn expired_hashes_disappear(cache: &dyn Cache, prefix: &str) {
        let short = format!("{prefix}short");
        let long = format!("{prefix}long");
        cache
            .write(vec![
                hash(&short, &[("a", "1")], Some(Duration::from_millis(300))),
                hash(&long, &[("a", "1")], Some(Duration::from_secs(60))),
            ])
            .await
            .unwrap();
        assert_eq!(
            cache.keys(prefix).await.unwrap(),
            vec![long.clone(), short.clone()]
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(cache.hash(&short).await.unwrap().is_empty());
        assert_eq!(cache.keys(prefix).await.unwrap(), vec![long.clone()]);
        cache.ping().await.unwrap();
        cache
            .write(vec![CacheWrite::Delete { key: long }])
            .await
            .unwrap();
        assert!(cache.keys(prefix).await.unwrap().is_empty());
    }

    /// Instantiates the suite; `$make` is an async fn returning `(Arc<dyn Cache>, prefix)`.
    #[macro_export]
    macro_rules! cache_conformance_suite {
        ($make:expr) => {
            $crate::cache_conformance_suite!(@tests $make;
                hashes_merge_fields_and_read_back,
                writes_apply_in_order,
                sequenced_writes_never_go_back,
                expired_hashes_disappear);
        };
        (@tests $make:expr; $($name:ident),*) => {
            $(
                #[tokio::test]
                async fn $name() {
                    let (cache, prefix) = $make().await;
                    $crate::cache::conformance::$name(&*cache, &prefix).await;
                }
            )*
        };
    }
}
