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
}

mod memory_cache {
    use super::*;
    use creto_projections::cache::MemoryCache;

    async fn make() -> (Arc<dyn Cache>, String) {
        (Arc::new(MemoryCache::new()), "t:".to_string())
    }

    creto_projections::cache_conformance_suite!(make);
}
