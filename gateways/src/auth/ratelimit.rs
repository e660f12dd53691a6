//! Per-tenant rate limits: a token bucket per tenant (governor's GCRA), configured in a TOML
//! file (`ENABLEMENT_RATE_LIMITS`) that is re-read when it changes. A caller over its limit
//! gets `RESOURCE_EXHAUSTED` with how long to wait.
//!
//! ```toml
//! [default]                 # every tenant without its own entry
//! requests_per_second = 200
//! burst = 400
//!
//! [tenants.acme]
//! requests_per_second = 2000
//! burst = 4000
//! ```
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub default: Limit,
    #[serde(default)]
    pub tenants: HashMap<String, Limit>,
}

impl Default for LimitsFile {
    fn default() -> Self {
        LimitsFile {
            default: Limit {
                requests_per_second: 500,
                burst: 1_000,
            },
            tenants: HashMap::new(),
        }
    }
}

fn quota(l: Limit) -> Result<Quota, String> {
    let rate =
        NonZeroU32::new(l.requests_per_second).ok_or("requests_per_second must be at least 1")?;
    let burst = NonZeroU32::new(l.burst.max(1)).expect("max(1)");
    Ok(Quota::per_second(rate).allow_burst(burst))
}

struct Limiters {
    config: LimitsFile,
    default: DefaultKeyedRateLimiter<String>,
    tenants: HashMap<String, DefaultKeyedRateLimiter<String>>,
    modified: Option<SystemTime>,
}

impl Limiters {
    fn build(config: LimitsFile, modified: Option<SystemTime>) -> Result<Limiters, String> {
        let default = RateLimiter::keyed(quota(config.default)?);
        let mut tenants = HashMap::new();
        for (t, l) in &config.tenants {
            tenants.insert(
                t.clone(),
                RateLimiter::keyed(quota(*l).map_err(|e| format!("tenant {t}: {e}"))?),
            );
        }
        Ok(Limiters {
            config,
            default,
            tenants,
            modified,
        })
    }
}

/// Refused: the limit and when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub limit: Limit,
    pub retry_after: Duration,
}

#[derive(Clone)]
pub struct RateLimits {
    path: Option<PathBuf>,
    inner: Arc<RwLock<Limiters>>,
}

fn read(path: &Path) -> Result<LimitsFile, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read rate limits {} ({e})", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("rate limits {} are not valid: {e}", path.display()))
}

impl RateLimits {
    pub fn new(config: LimitsFile) -> Result<Self, String> {
        Ok(RateLimits {
            path: None,
            inner: Arc::new(RwLock::new(Limiters::build(config, None)?)),
        })
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        Ok(RateLimits {
            inner: Arc::new(RwLock::new(Limiters::build(read(path)?, modified)?)),
            path: Some(path.to_path_buf()),
        })
    }

    /// Takes one request from `tenant`'s bucket.
    pub fn check(&self, tenant: &str) -> Result<(), Exceeded> {
        let inner = self.inner.read().unwrap();
        let (limiter, limit) = match inner.tenants.get(tenant) {
            Some(l) => (l, inner.config.tenants[tenant]),
            None => (&inner.default, inner.config.default),
        };
        limiter
            .check_key(&tenant.to_string())
            .map_err(|not_until| Exceeded {
                limit,
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            })
    }

    /// Re-reads the file when it changed. Buckets restart full: a reload never punishes.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let now = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if now == self.inner.read().unwrap().modified {
            return Ok(false);
        }
        let rebuilt = Limiters::build(read(path)?, now)?;
        if rebuilt.config == self.inner.read().unwrap().config {
            self.inner.write().unwrap().modified = now;
            return Ok(false);
        }
        *self.inner.write().unwrap() = rebuilt;
        Ok(true)
    }

    /// Drops the state of tenants idle long enough to be full again (bounded memory).
    pub fn retain_recent(&self) {
        let inner = self.inner.read().unwrap();
        inner.default.retain_recent();
        for l in inner.tenants.values() {
            l.retain_recent();
        }
    }
}

impl super::reload::Reloadable for RateLimits {
    const WHAT: &'static str = "rate limits";
    fn reload_if_changed(&self) -> Result<bool, String> {
        RateLimits::reload_if_changed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_per_tenant_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.toml");
        std::fs::write(
            &path,
            "[default]\nrequests_per_second = 1\nburst = 2\n[tenants.big]\nrequests_per_second = 100\nburst = 50\n",
        )
        .unwrap();
        let limits = RateLimits::load(&path).unwrap();
        assert!(limits.check("a").is_ok());
        assert!(limits.check("a").is_ok());
        let refused = limits.check("a").unwrap_err();
        assert_eq!(refused.limit.burst, 2);
        assert!(
            refused.retry_after > Duration::ZERO && refused.retry_after <= Duration::from_secs(1)
        );
        assert!(
            limits.check("b").is_ok(),
            "another tenant has its own bucket"
        );
        for _ in 0..50 {
            assert!(limits.check("big").is_ok());
        }
        std::fs::write(
            &path,
            "[default]\nrequests_per_second = 1000\nburst = 1000\n",
        )
        .unwrap();
        let f = std::fs::File::options().append(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(2))
            .unwrap();
        assert!(limits.reload_if_changed().unwrap());
        assert!(limits.check("a").is_ok(), "new limits apply at once");
        std::fs::write(&path, "[default]\nrequests_per_second = 0\nburst = 1\n").unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(4))
            .unwrap();
        assert!(limits
            .reload_if_changed()
            .unwrap_err()
            .contains("at least 1"));
    }
}
