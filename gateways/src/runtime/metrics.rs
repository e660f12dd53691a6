//! Runtime's metrics, with the runbook's names (section 7). The gauges count this replica's
//! sandboxes (the ones it runs), so a `sum` over replicas is the fleet.
use std::sync::LazyLock;

use prometheus::{
    register_histogram, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
    Histogram, HistogramVec, IntCounterVec, IntGaugeVec,
};

pub static SPAWNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "runtime_sandbox_spawns_total",
        "Sandboxes provisioned (cold, or for the warm pool), by backend and status (success, failure)",
        &["backend", "status"]
    )
    .unwrap()
});
pub static SPAWN_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "runtime_sandbox_spawn_duration_seconds",
        "From CreateSandbox to a ready sandbox: pool_type cold (provisioned) or warm (claimed)",
        &["backend", "pool_type"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
    )
    .unwrap()
});
pub static ACTIVE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "runtime_sandbox_active",
        "Sandboxes of tenants live on this replica (requested, provisioning or ready)",
        &["backend"]
    )
    .unwrap()
});
pub static POOL_SIZE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "runtime_warmpool_size",
        "Warm sandboxes ready to be claimed on this replica",
        &["backend"]
    )
    .unwrap()
});
pub static CLAIMS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "runtime_warmpool_claims_total",
        "CreateSandbox calls served by claiming a warm sandbox",
        &["backend"]
    )
    .unwrap()
});
pub static EGRESS_CHECKS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "runtime_egress_checks_total",
        "Connection attempts out of sandboxes, by decision (allow, deny)",
        &["decision"]
    )
    .unwrap()
});
pub static ATTESTATION_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "runtime_attestation_generation_duration_seconds",
        "Time to build and sign an attestation statement",
        vec![0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01]
    )
    .unwrap()
});
pub static EXECS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "runtime_execs_total",
        "Exec calls finished, by outcome (exit_zero, exit_nonzero, signal, timeout, oom, pids_limit, disk_full)",
        &["outcome"]
    )
    .unwrap()
});

pub fn register() {
    LazyLock::force(&SPAWNS);
    LazyLock::force(&SPAWN_SECONDS);
    LazyLock::force(&ACTIVE);
    LazyLock::force(&POOL_SIZE);
    LazyLock::force(&CLAIMS);
    LazyLock::force(&EGRESS_CHECKS);
    LazyLock::force(&ATTESTATION_SECONDS);
    LazyLock::force(&EXECS);
}
