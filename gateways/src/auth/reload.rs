//! Files the gateways re-read when they change, without a restart: the token key ring, the
//! authorization policy and the rate limits. A broken file is refused and the previous
//! contents stay in force (and the refusal is logged).
use std::time::Duration;

pub trait Reloadable: Clone + Send + Sync + 'static {
    /// What it is, for the logs.
    const WHAT: &'static str;
    /// Re-reads the file if it changed; `Ok(true)` when new contents took effect.
    fn reload_if_changed(&self) -> Result<bool, String>;
}

/// Checks `item` every `every` until the process ends.
pub fn spawn<R: Reloadable>(item: R, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match item.reload_if_changed() {
                Ok(true) => tracing::info!(what = R::WHAT, "reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(what = R::WHAT, error = %e, "not reloaded; keeping the previous contents")
                }
            }
        }
    });
}
