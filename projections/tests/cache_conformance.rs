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

    /// A Redis that may evict (a memory limit and an evicting policy, as the runbook's
    /// `allkeys-lru`) does not keep what it is given; without a limit, or with `noeviction`, it
    /// does. The settings are put back as they were.
    #[tokio::test]
    async fn an_evicting_redis_says_it_may_lose_keys() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let mut conn = redis::Client::open(url)
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
                v[1].clone()
            }
        };
        let (max, policy) = (get("maxmemory").await, get("maxmemory-policy").await);
        let cache = RedisCache::new(vec![conn.clone()]);
        let set = |name: &'static str, value: String| {
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
        set("maxmemory", "2gb".into()).await;
        set("maxmemory-policy", "allkeys-lru".into()).await;
        let evicting = cache.keeps_what_it_is_given().await.unwrap();
        set("maxmemory-policy", "noeviction".into()).await;
        let noeviction = cache.keeps_what_it_is_given().await.unwrap();
        set("maxmemory", "0".into()).await;
        set("maxmemory-policy", "allkeys-lru".into()).await;
        let unlimited = cache.keeps_what_it_is_given().await.unwrap();
        set("maxmemory", max).await;
        set("maxmemory-policy", policy).await;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
        assert_eq!((evicting, noeviction, unlimited), (false, true, true));
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
