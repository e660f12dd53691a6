//! Runtime on loopback: the gateway on the real NATS JetStream (`Env::new`, unauthenticated)
//! with the bubblewrap backend. In one run:
//!
//! 0. baseline: bare `bwrap` running `true` in new user, pid, ipc, uts and network namespaces
//!    with the host's /usr read-only, a fresh /proc and /dev (what every exec of the backend
//!    does, without the cgroups, seccomp filter, network namespace setup, egress proxy or
//!    events), BENCH_SPAWNS (50) times.
//! 1. warm claim: BENCH_WARM (30) warm sandboxes are provisioned for the pool first, then
//!    claimed one after another by `CreateSandbox` with the default resources; timed from
//!    before the call to its answer (the sandbox is ready for Exec then). Goal: p95 under 5 ms.
//!    The pool refills in the background meanwhile, as it does in production. Also printed:
//!    claim + the first `Exec` of `true` until its result.
//! 2. cold spawn: BENCH_SPAWNS `CreateSandbox` calls that do not match the pool (other
//!    resources): network namespace, cgroups, layer, egress proxy and three events. Goal: p95
//!    under 100 ms. Also printed: cold create + the first `Exec` of `true`.
//! 3. rebuild rate: `enablement replay runtime --rebuild` over the stream this run wrote (a
//!    few hundred lifecycle events: fixed costs weigh) next to a raw ordered pull consumer;
//!    run twice, the second must leave the same rows.
//!
//! `cargo bench -p creto-replay-tests --bench runtime` (as root, with bubblewrap installed).
use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use creto_replay_tests::Env;
use creto_schemas::runtime::v1 as pb;
use creto_schemas::runtime::v1::runtime_service_client::RuntimeServiceClient;
use creto_streams::RUNTIME;
use tonic::transport::Channel;

type Client = RuntimeServiceClient<Channel>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantiles(mut d: Vec<Duration>) -> (f64, f64, f64) {
    d.sort();
    let at = |q: f64| d[((d.len() as f64 * q).ceil() as usize).clamp(1, d.len()) - 1];
    let ms = |x: Duration| x.as_secs_f64() * 1e3;
    (ms(at(0.5)), ms(at(0.95)), ms(*d.last().unwrap()))
}

fn line(what: &str, d: Vec<Duration>) -> (f64, f64) {
    let n = d.len();
    let (p50, p95, max) = quantiles(d);
    println!("  {what:<44} p50 {p50:>8.2} ms   p95 {p95:>8.2} ms   max {max:>8.2} ms   (n={n})");
    (p50, p95)
}

fn bare_bwrap() -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new("bwrap")
        .args([
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--",
            "true",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("bwrap runs (apt-get install bubblewrap)");
    assert!(status.success(), "bare bwrap failed: {status}");
    started.elapsed()
}

async fn exec_true(c: &mut Client, id: &str) {
    let mut s = c
        .exec(pb::ExecRequest {
            sandbox_id: id.into(),
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = s.message().await.unwrap() {
        if let Some(pb::exec_response::Output::Finished(r)) = m.output {
            assert_eq!(r.exit_code, Some(0), "{r:?}");
            return;
        }
    }
    panic!("exec ended without a result");
}

async fn terminate(c: &mut Client, id: String) {
    c.terminate_sandbox(pb::TerminateSandboxRequest { sandbox_id: id })
        .await
        .unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let spawns = env_usize("BENCH_SPAWNS", 50);
    let warm = env_usize("BENCH_WARM", 30);
    println!("runtime benchmark: bubblewrap backend, NATS JetStream, 2 cores (noisy if anything else runs)");

    let bare: Vec<Duration> = (0..spawns).map(|_| bare_bwrap()).collect();

    let env = Env::new().await;
    let dir = tempfile::Builder::new()
        .prefix("creto-runtime-bench-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (running, url) = env.start_runtime(dir.path(), &format!("base={warm}")).await;
    let mut c = RuntimeServiceClient::connect(url).await.unwrap();
    // Wait for the pool to fill: the refill provisions one sandbox after another.
    let filled = Instant::now();
    let metrics_url = format!("http://{}/metrics", running.metrics_addr);
    loop {
        let text = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let size = text
            .lines()
            .find(|l| l.starts_with("runtime_warmpool_size{backend=\"bwrap\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        if size as usize >= warm {
            break;
        }
        assert!(
            filled.elapsed() < Duration::from_secs(300),
            "the pool never filled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  warm pool of {warm} filled in {:.1} s (background refill)",
        filled.elapsed().as_secs_f64()
    );

    let default = pb::CreateSandboxRequest {
        template: "base".into(),
        ..Default::default()
    };
    let mut claims = Vec::new();
    let mut claims_exec = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..warm {
        let t = Instant::now();
        let sb = c
            .create_sandbox(default.clone())
            .await
            .unwrap()
            .into_inner();
        claims.push(t.elapsed());
        assert!(sb.warm, "the pool ran dry; raise BENCH_WARM");
        exec_true(&mut c, &sb.sandbox_id).await;
        claims_exec.push(t.elapsed());
        ids.push(sb.sandbox_id);
    }
    for id in ids.drain(..) {
        terminate(&mut c, id).await;
    }

    let cold_request = pb::CreateSandboxRequest {
        template: "base".into(),
        resources: Some(pb::Resources {
            memory_mb: 128,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut colds = Vec::new();
    let mut colds_exec = Vec::new();
    for _ in 0..spawns {
        let t = Instant::now();
        let sb = c
            .create_sandbox(cold_request.clone())
            .await
            .unwrap()
            .into_inner();
        colds.push(t.elapsed());
        assert!(!sb.warm);
        exec_true(&mut c, &sb.sandbox_id).await;
        colds_exec.push(t.elapsed());
        terminate(&mut c, sb.sandbox_id).await;
    }

    println!();
    let (bare50, bare95) = line("bare bwrap `true` (baseline)", bare);
    let (_, warm95) = line("warm claim (CreateSandbox)", claims);
    line("warm claim + first Exec `true`", claims_exec);
    let (cold50, cold95) = line("cold spawn (CreateSandbox)", colds);
    let (coldx50, coldx95) = line("cold spawn + first Exec `true`", colds_exec);
    println!();
    println!(
        "  warm claim p95 {warm95:.2} ms (goal < 5 ms): {}",
        if warm95 < 5.0 { "met" } else { "MISSED" }
    );
    println!(
        "  cold spawn p95 {cold95:.2} ms (goal < 100 ms): {}; {:.1}x bare bwrap's p95 ({:.1}x at p50)",
        if cold95 < 100.0 { "met" } else { "MISSED" },
        cold95 / bare95,
        cold50 / bare50
    );
    println!(
        "  cold spawn + exec p50/p95 {coldx50:.2}/{coldx95:.2} ms = {:.1}x/{:.1}x bare bwrap",
        coldx50 / bare50,
        coldx95 / bare95
    );
    running.stop().await;

    // Rebuild rate: every runtime table made again from the stream this run wrote.
    creto_replay_tests::whole_rebuild_rate(&env, RUNTIME).await;
    env.drop().await;
}
