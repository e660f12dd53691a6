//! The cache port's conformance suite, the same test code on both adapters: Redis (REDIS_URL,
//! default 127.0.0.1:6379, keys under a unique prefix) and the in-process cache.
use std::sync::Arc;

use creto_projections::cache::Cache;

mod redis_cache {
    use super::*;
    use creto_projections::cache::RedisCache;

    async fn make() -> (Arc<dyn Cache>, String) {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url).unwrap();
        let conn = client
            .get_connection_manager()
            .await
            .expect("Redis reachable");
        let prefix = format!("t{}:", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        (Arc::new(RedisCache::new(vec![conn])), prefix)
    }

    creto_projections::cache_conformance_suite!(make);

    /// Puts Redis's memory settings back when dropped, even after a failed assertion: a test
    /// warming from the cache would otherwise find an evicting Redis.
    struct Restore {
        url: String,
        settings: Vec<(&'static str, String)>,
    }

    impl Drop for Restore {
        fn drop(&mut self) {
            let mut conn = redis::Client::open(self.url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            for (name, value) in &self.settings {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg(*name)
                    .arg(value)
                    .query(&mut conn)
                    .unwrap();
            }
        }
    }

    /// A Redis that may evict (a memory limit and an evicting policy, as the runbook's
    /// `allkeys-lru`) does not keep what it is given; without a limit, or with `noeviction`, it
    /// does.
    #[tokio::test]
    async fn an_evicting_redis_says_it_may_lose_keys() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection_manager()
            .await
            .unwrap();
        let get = |name: &'static str| {
            let mut conn = conn.clone();
            async move {
                let v: Vec<String> = redis::cmd("CONFIG")
                    .arg("GET")
                    .arg(name)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                (name, v[1].clone())
            }
        };
        let _restore = Restore {
            settings: vec![get("maxmemory").await, get("maxmemory-policy").await],
            url,
        };
        let cache = RedisCache::new(vec![conn.clone()]);
        let set = |name: &'static str, value: &'static str| {
            let mut conn = conn.clone();
            async move {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg(name)
                    .arg(value)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
            }
        };
        set("maxmemory", "2gb").await;
        set("maxmemory-policy", "allkeys-lru").await;
        assert!(!cache.keeps_what_it_is_given().await.unwrap());
        set("maxmemory-policy", "noeviction").await;
        assert!(cache.keeps_what_it_is_given().await.unwrap());
        set("maxmemory", "0").await;
        set("maxmemory-policy", "allkeys-lru").await;
        assert!(cache.keeps_what_it_is_given().await.unwrap());
    }
}

mod memory_cache {
    use super::*;
    use creto_projections::cache::MemoryCache;

    async fn make() -> (Arc<dyn Cache>, String) {
        (Arc::new(MemoryCache::new()), "t:".to_string())
    }

    creto_projections::cache_conformance_suite!(make);
}
