//! Containment tests of the Linux isolation backend (bubblewrap), through the backend traits.
//!
//! They need root and bubblewrap (`.ci/services.sh` installs bubblewrap, iptables and
//! nftables); without them they fail with a message saying so (they never skip). Every test has
//! its own backend (own root directory and instance name) and its own sandbox ids, so they run
//! in parallel in one process.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use creto_domain::runtime::egress::EgressPolicy;
use creto_gateways::runtime::backend::bwrap::BwrapBackend;
use creto_gateways::runtime::backend::{
    BackendConfig, BackendError, EgressAttempt, ExecChunk, ExecOutcome, ExecRequest,
    IsolationBackend, ResourceLimits, Sandbox, SandboxSpec,
};
use tokio::sync::mpsc;

struct Env {
    backend: Arc<dyn IsolationBackend>,
    bwrap: Arc<BwrapBackend>,
    instance: String,
    root: tempfile::TempDir,
}

/// A backend of its own for one test, with the platform's deny list but for loopback: the
/// tests' host services listen on 127.0.0.2. Fails (does not skip) when the machine cannot
/// run it.
fn env(instance: &str) -> Env {
    env_denying(
        instance,
        creto_gateways::runtime::backend::default_egress_deny_except(&["127.0.0.0/8"]),
    )
}

fn env_denying(instance: &str, egress_deny: EgressPolicy) -> Env {
    env_with(
        instance,
        BackendConfig {
            egress_deny,
            ..BackendConfig::default()
        },
    )
}

/// A backend of its own on `config` (its root and instance set here).
fn env_with(instance: &str, config: BackendConfig) -> Env {
    // SAFETY: plain getter.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the containment tests need root (network namespaces, cgroups); run them as root"
    );
    let root = tempfile::Builder::new()
        .prefix("creto-runtime-test-")
        .tempdir()
        .unwrap();
    // Made unique per run (instance names are at most 12 of [a-z0-9]): what a failed run left
    // on the host (a namespace, a mount) must not fail every later run.
    let instance = {
        use rand::Rng;
        let mut rng = rand::rng();
        let suffix: String = (instance.len()..12)
            .map(|_| char::from_digit(rng.random_range(0..36), 36).unwrap())
            .collect();
        format!("{instance}{suffix}")
    };
    let config = BackendConfig {
        root: root.path().to_path_buf(),
        instance: instance.clone(),
        ..config
    };
    let bwrap = match BwrapBackend::new(config) {
        Ok(b) => Arc::new(b),
        Err(e) => panic!(
            "the bwrap backend cannot run here: {e} (install bubblewrap, nftables or iptables, \
             and run as root with cgroups mounted)"
        ),
    };
    Env {
        backend: bwrap.clone(),
        bwrap,
        instance,
        root,
    }
}

impl Env {
    fn spec(&self, id: &str) -> SandboxSpec {
        SandboxSpec {
            id: id.to_string(),
            template: self.backend.template("base").expect("base template"),
            limits: ResourceLimits::default(),
            env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
            egress: EgressPolicy::default(),
            restore: None,
        }
    }

    async fn sandbox(
        &self,
        id: &str,
    ) -> (Arc<dyn Sandbox>, mpsc::UnboundedReceiver<EgressAttempt>) {
        self.sandbox_with(self.spec(id)).await
    }

    async fn sandbox_with(
        &self,
        spec: SandboxSpec,
    ) -> (Arc<dyn Sandbox>, mpsc::UnboundedReceiver<EgressAttempt>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sb = self.backend.prepare(spec, tx).await.expect("prepare");
        (sb, rx)
    }
}

struct Ran {
    outcome: ExecOutcome,
    stdout: String,
    stderr: String,
}

async fn run_req(sb: &Arc<dyn Sandbox>, req: ExecRequest) -> Ran {
    let (tx, mut rx) = mpsc::channel(64);
    let collect = tokio::spawn(async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(c) = rx.recv().await {
            match c {
                ExecChunk::Stdout(b) => out.extend_from_slice(&b),
                ExecChunk::Stderr(b) => err.extend_from_slice(&b),
            }
        }
        (out, err)
    });
    let outcome = sb.exec(req, tx).await.expect("exec");
    let (out, err) = collect.await.unwrap();
    Ran {
        outcome,
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
    }
}

async fn sh(sb: &Arc<dyn Sandbox>, script: &str) -> Ran {
    let mut req = ExecRequest::new(["/bin/sh", "-c", script]);
    req.timeout = Duration::from_secs(30);
    run_req(sb, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_a_command_as_an_unprivileged_user_with_its_own_environment() {
    let e = env("tenv");
    let (sb, _) = e.sandbox("env-1").await;
    let mut req = ExecRequest::new(["/bin/sh", "-c", "id -u; id -g; echo $GREETING $EXTRA; echo $HOME; pwd; hostname; env | wc -l; cat /proc/self/status | grep -E '^(NoNewPrivs|Seccomp|CapEff)'; ls /proc/self/fd | tr '\\n' ' '; echo; exit 3"]);
    req.env.insert("EXTRA".into(), "there".into());
    let r = run_req(&sb, req).await;
    assert_eq!(r.outcome.exit_code, Some(3), "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        &lines[..6],
        [
            "1000",
            "1000",
            "hi there",
            "/home/sandbox",
            "/home/sandbox",
            "sandbox"
        ],
        "{}",
        r.stdout
    );
    // Only the variables we set: the host environment (CARGO_*, PATH of the host...) is gone.
    let count: usize = lines[6].trim().parse().unwrap();
    assert!(count <= 12, "{count} variables: {}", r.stdout);
    assert!(r.stdout.contains("NoNewPrivs:\t1"), "{}", r.stdout);
    assert!(r.stdout.contains("Seccomp:\t2"), "{}", r.stdout);
    assert!(
        r.stdout.contains("CapEff:\t0000000000000000"),
        "{}",
        r.stdout
    );
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_read_host_files_outside_its_view() {
    let e = env("tview");
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "host-secret-4711").unwrap();
    let root_secret = PathBuf::from("/root/.creto-containment-secret");
    std::fs::write(&root_secret, "root-secret-4711").unwrap();
    let (sb, _) = e.sandbox("view-1").await;
    let r = sh(
        &sb,
        &format!(
            "cat {} ; cat {} ; ls /root /work /var /run /srv /opt; cat /etc/shadow; \
             ls {}; echo end",
            secret.display(),
            root_secret.display(),
            e.root.path().display()
        ),
    )
    .await;
    let _ = std::fs::remove_file(&root_secret);
    assert!(r.stdout.contains("end"), "{}", r.stderr);
    assert!(
        !r.stdout.contains("4711"),
        "a host secret leaked: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains("No such file or directory"),
        "{}",
        r.stderr
    );
    // The runtime's own root (other sandboxes' layers) is not visible either.
    assert!(!r.stdout.contains("sandboxes"), "{}", r.stdout);
    // The host's /usr is there, read-only.
    let r = sh(
        &sb,
        "ls /usr/bin/python3 && touch /usr/x; touch /etc/x; touch /x; echo end",
    )
    .await;
    assert!(r.stdout.contains("/usr/bin/python3"), "{}", r.stderr);
    assert_eq!(
        r.stderr.matches("Read-only file system").count(),
        3,
        "{}",
        r.stderr
    );
    assert!(!Path::new("/usr/x").exists());
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_shows_only_the_sandbox_processes() {
    let e = env("tproc");
    let (sb, _) = e.sandbox("proc-1").await;
    let r = sh(&sb, "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; tr '\\0' ' ' < /proc/1/cmdline; echo").await;
    let mut lines = r.stdout.lines();
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    // bwrap's pid 1, the shell, ls, grep, sort, tr: nothing of the host's.
    assert!(pids.len() <= 8 && pids.iter().all(|&p| p < 20), "{pids:?}");
    assert!(pids.contains(&1), "{pids:?}");
    // bwrap's pid 1 shows its arguments came from a file descriptor: no host paths in sight.
    let cmdline = lines.next().unwrap();
    assert!(cmdline.contains("bwrap --args"), "{cmdline}");
    assert!(
        !cmdline.contains(&e.root.path().display().to_string()),
        "{cmdline}"
    );
    sb.terminate().await.unwrap();
}

/// The proxy connects from the host's network namespace: a policy allowing the host's own
/// addresses (or the metadata service, or the cluster's) must not reach them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platform_deny_list_holds_whatever_the_policy_allows() {
    let e = env_denying(
        "tdenied",
        creto_gateways::runtime::backend::default_egress_deny(),
    );
    let host_service = greeter("host-only");
    let (sb, mut attempts) = e.sandbox("denied-1").await;
    sb.set_egress(
        EgressPolicy::parse(&[
            format!("{}:{}", host_service.ip(), host_service.port()),
            "0.0.0.0/0".to_string(),
        ])
        .unwrap(),
    );
    let got = connect(&sb, host_service).await;
    assert!(got.starts_with("ERR:"), "{got}");
    let a = attempts.recv().await.unwrap();
    assert_eq!(
        (a.destination, a.allowed, a.rule.as_deref()),
        (host_service, false, Some("platform deny 127.0.0.0/8"))
    );
    sb.terminate().await.unwrap();
}

/// A host listener on 127.0.0.2 that greets every connection.
fn greeter(greeting: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(greeting.as_bytes());
        }
    });
    addr
}

const CONNECT: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
try:
    s = socket.create_connection((host, port), timeout=5)
    data = s.recv(100)
    print("GOT:" + data.decode() if data else "ERR:closed")
except Exception as e:
    print("ERR:" + type(e).__name__)
"#;

const ESCAPES: &str = r#"
import socket
for target in [('10.255.255.1', 80), ('127.0.0.1', 15001)]:
    try:
        s = socket.create_connection(target, timeout=3)
        d = s.recv(10)
        print('TCP', target, 'closed' if not d else 'DATA')
    except Exception as e:
        print('TCP', target, 'ERR', type(e).__name__)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b'x', ('8.8.8.8', 53))
    print('UDP sent')
except OSError as e:
    print('UDP ERR', e.errno)
try:
    print('DNS', socket.getaddrinfo('blocked.example.com', 80))
except socket.gaierror as e:
    print('DNS ERR')
try:
    socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    print('VSOCK opened')
except OSError as e:
    print('VSOCK ERR', e.errno)
"#;

async fn connect(sb: &Arc<dyn Sandbox>, addr: SocketAddr) -> String {
    let mut req = ExecRequest::new([
        "python3".to_string(),
        "-c".into(),
        CONNECT.into(),
        addr.ip().to_string(),
        addr.port().to_string(),
    ]);
    req.timeout = Duration::from_secs(20);
    let r = run_req(sb, req).await;
    assert_eq!(r.outcome.exit_code, Some(0), "{}", r.stderr);
    r.stdout.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_is_denied_by_default_and_allowed_when_the_policy_says_so() {
    let e = env("tegress");
    let allowed = greeter("hello-from-host");
    let other = greeter("other-service");
    let (sb, mut attempts) = e.sandbox("egress-1").await;

    // Denied: the connection is reset before any byte of the host service arrives.
    let got = connect(&sb, allowed).await;
    assert!(got.starts_with("ERR:"), "{got}");
    let a = attempts.recv().await.unwrap();
    assert_eq!(
        (
            a.sandbox_id.as_str(),
            a.destination,
            a.allowed,
            a.rule.as_deref()
        ),
        ("egress-1", allowed, false, None)
    );

    // Allowed once the policy names it (while the sandbox runs).
    let rule = format!("{}:{}", allowed.ip(), allowed.port());
    sb.set_egress(EgressPolicy::parse(std::slice::from_ref(&rule)).unwrap());
    assert_eq!(sb.egress().to_strings(), vec![rule.clone()]);
    assert_eq!(connect(&sb, allowed).await, "GOT:hello-from-host");
    let a = attempts.recv().await.unwrap();
    assert_eq!(
        (a.destination, a.allowed, a.rule),
        (allowed, true, Some(rule))
    );

    // Another destination stays unreachable.
    let got = connect(&sb, other).await;
    assert!(got.starts_with("ERR:"), "{got}");
    let a = attempts.recv().await.unwrap();
    assert_eq!((a.destination, a.allowed), (other, false));

    // Nor can it get out another way: UDP, a raw address on another network, the proxy itself,
    // or a name the policy does not allow.
    let mut req = ExecRequest::new(["python3", "-c", ESCAPES]);
    req.timeout = Duration::from_secs(30);
    let r = run_req(&sb, req).await;
    assert!(
        !r.stdout.contains("DATA") && !r.stdout.contains("UDP sent"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("UDP ERR"), "{} {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("DNS ERR"), "{} {}", r.stdout, r.stderr);
    // vsock, not network-namespaced, is refused by the filter (EPERM), whatever the host has.
    assert!(
        r.stdout.contains("VSOCK ERR 1\n"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    let mut denied = Vec::new();
    while let Ok(a) = attempts.try_recv() {
        assert!(!a.allowed, "{a:?}");
        denied.push(a.destination.to_string());
    }
    assert!(
        denied.contains(&"10.255.255.1:80".to_string()),
        "{denied:?}"
    );
    assert!(
        denied.contains(&"127.0.0.1:15001".to_string()),
        "{denied:?}"
    );

    // Taking the permission away again closes the door for the next connection.
    sb.set_egress(EgressPolicy::default());
    assert!(connect(&sb, allowed).await.starts_with("ERR:"));
    sb.terminate().await.unwrap();
}

const DNS_QUERY: &str = r#"
import socket, struct, sys
for name in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    labels = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.'))
    s.sendto(struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0) + labels + b'\0' + struct.pack('>HH', 1, 1), ('127.0.0.1', 53))
    r = s.recv(512)
    answers = struct.unpack('>H', r[6:8])[0]
    print(name, 'rcode', r[3] & 15, 'answers', answers, socket.inet_ntoa(r[-4:]) if answers else '-')
"#;

/// Allowed names are answered with the host's resolution (pypi.org: a package registry, which
/// the test command needs reachable anyway); others get NXDOMAIN; an allowed name that is
/// cluster-internal (single label, `.localhost`) is never resolved, so it fails (SERVFAIL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_dns_answers_only_names_the_policy_allows() {
    let e = env("tdns");
    let mut spec = e.spec("dns-1");
    let rules = ["pypi.org:443".to_string(), "localhost:80".to_string()];
    spec.egress = EgressPolicy::parse(&rules).unwrap();
    let (sb, _) = e.sandbox_with(spec).await;
    let mut req = ExecRequest::new([
        "python3",
        "-c",
        DNS_QUERY,
        "pypi.org",
        "localhost",
        "blocked.example.com",
    ]);
    req.timeout = Duration::from_secs(20);
    let r = run_req(&sb, req).await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{} {}", r.stdout, r.stderr);
    let host: Vec<String> = std::net::ToSocketAddrs::to_socket_addrs(&("pypi.org.", 0))
        .expect("the host resolves pypi.org")
        .map(|a| a.ip().to_string())
        .collect();
    let answered = lines[0].strip_prefix("pypi.org rcode 0 answers ");
    let ip = answered.and_then(|a| a.split(' ').nth(1)).unwrap_or("-");
    assert!(host.iter().any(|h| h == ip), "{} vs {host:?}", lines[0]);
    assert_eq!(lines[1], "localhost rcode 2 answers 0 -");
    assert_eq!(lines[2], "blocked.example.com rcode 3 answers 0 -");
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_the_pids_limit() {
    let e = env("tfork");
    let mut spec = e.spec("fork-1");
    spec.limits.pids = 32;
    let (sb, _) = e.sandbox_with(spec).await;
    let started = Instant::now();
    // The shell must not fork once the bomb runs: bash retries a refused fork with a doubling
    // back-off (1 + 2 + 4 + 8 s) and then gives the script up, so whether it printed depended
    // on who won the pids race. It forks once, for the subshell that starts the bomb, before
    // any bomb process exists (calling the bomb itself would fork both sides of `:|:`, the
    // second while the first already multiplies), then waits with builtins only.
    let mut req = ExecRequest::new([
        "/bin/bash",
        "-c",
        "( :(){ :|:& };: ) & SECONDS=0; while ((SECONDS < 3)); do true; done; echo survived",
    ]);
    req.timeout = Duration::from_secs(20);
    let r = run_req(&sb, req).await;
    assert!(r.outcome.pids_limited, "{:?} {}", r.outcome, r.stderr);
    assert!(!r.outcome.timed_out);
    assert_eq!(r.stdout, "survived\n", "{:?} {}", r.outcome, r.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        r.stderr.contains("Resource temporarily unavailable"),
        "{}",
        r.stderr
    );
    // Nothing of the bomb outlives the exec, and the host still forks.
    let after = sh(&sb, "ls /proc | grep -cE '^[0-9]+$'").await;
    let n: u32 = after.stdout.trim().parse().unwrap();
    assert!(n <= 6, "{n} processes left");
    assert!(std::process::Command::new("true")
        .status()
        .unwrap()
        .success());
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_killed_at_its_limit() {
    let e = env("tmem");
    let mut spec = e.spec("mem-1");
    spec.limits.memory_bytes = 64 << 20;
    let (sb, _) = e.sandbox_with(spec).await;
    let mut req = ExecRequest::new([
        "python3",
        "-c",
        "b = b'x' * (500 * 1024 * 1024); print('allocated', len(b))",
    ]);
    req.timeout = Duration::from_secs(30);
    let r = run_req(&sb, req).await;
    assert!(r.outcome.oom_killed, "{:?} {}", r.outcome, r.stderr);
    assert_eq!(r.outcome.signal, Some(libc::SIGKILL), "{:?}", r.outcome);
    assert!(!r.stdout.contains("allocated"));
    // The sandbox is still usable afterwards, and a later exec is not blamed.
    let ok = sh(&sb, "echo fine").await;
    assert_eq!((ok.stdout.trim(), ok.outcome.oom_killed), ("fine", false));
    sb.terminate().await.unwrap();
}

/// Whether something is mounted on `dir`.
fn mounted(dir: &Path) -> bool {
    let dir = dir.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filler_stops_at_the_disk_limit() {
    let e = env("tdisk");
    let mut spec = e.spec("disk-1");
    spec.limits.disk_bytes = 64 << 20;
    let (sb, _) = e.sandbox_with(spec).await;
    // 200 MiB into a 64 MiB disk, through /home/sandbox, then more through /tmp: both are on
    // the sandbox's disk, and neither reaches the host's.
    let r = sh(
        &sb,
        "dd if=/dev/zero of=/home/sandbox/fill bs=1M count=200; \
         dd if=/dev/zero of=/tmp/more bs=1M count=10 || echo tmp refused",
    )
    .await;
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert!(r.stdout.contains("tmp refused"), "{}", r.stdout);
    assert!(r.outcome.disk_full, "{:?}", r.outcome);
    let image = e.root.path().join("disks/disk-1.img");
    let held = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&image).unwrap()) * 512;
    assert!(
        held < 70 << 20,
        "the host holds {held} bytes for a 64 MiB disk"
    );
    // Freed space is usable again, and a later exec is not blamed.
    let r = sh(
        &sb,
        "rm /home/sandbox/fill && echo ok > /tmp/ok && cat /tmp/ok",
    )
    .await;
    assert_eq!((r.stdout.as_str(), r.outcome.disk_full), ("ok\n", false));
    sb.terminate().await.unwrap();
    assert!(!image.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_past_its_timeout_is_killed() {
    let e = env("ttime");
    let (sb, _) = e.sandbox("time-1").await;
    let started = Instant::now();
    let mut req = ExecRequest::new(["/bin/sh", "-c", "sleep 30 & sleep 30"]);
    req.timeout = Duration::from_secs(1);
    let r = run_req(&sb, req).await;
    let took = started.elapsed();
    assert!(r.outcome.timed_out, "{:?}", r.outcome);
    assert_eq!(r.outcome.exit_code, None);
    assert_eq!(r.outcome.signal, Some(libc::SIGKILL));
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // Both sleeps are gone.
    let ps = sh(&sb, "ls /proc | grep -cE '^[0-9]+$'").await;
    assert!(
        ps.stdout.trim().parse::<u32>().unwrap() <= 6,
        "{}",
        ps.stdout
    );
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_stream_before_the_end() {
    let e = env("tstream");
    let (sb, _) = e.sandbox("stream-1").await;
    let (tx, mut rx) = mpsc::channel(64);
    let mut req = ExecRequest::new([
        "/bin/sh",
        "-c",
        "echo out-1; echo err-1 >&2; sleep 1.5; echo out-2; cat",
    ]);
    req.stdin = b"from-stdin\n".to_vec();
    let sb2 = sb.clone();
    let exec = tokio::spawn(async move { sb2.exec(req, tx).await });
    let (mut saw_out, mut saw_err) = (false, false);
    while !(saw_out && saw_err) {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ExecChunk::Stdout(b) => saw_out |= String::from_utf8_lossy(&b).contains("out-1"),
            ExecChunk::Stderr(b) => saw_err |= String::from_utf8_lossy(&b).contains("err-1"),
        }
    }
    assert!(
        !exec.is_finished(),
        "both streams arrived while the command still ran"
    );
    let mut rest = Vec::new();
    while let Some(ExecChunk::Stdout(b)) = rx.recv().await {
        rest.extend_from_slice(&b);
    }
    assert_eq!(String::from_utf8_lossy(&rest), "out-2\nfrom-stdin\n");
    let outcome = exec.await.unwrap().unwrap();
    assert_eq!(outcome.exit_code, Some(0));
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_and_restore_keep_the_writable_layer_and_never_touch_the_template() {
    let e = env("tckpt");
    let (a, _) = e.sandbox("ckpt-a").await;
    let w = sh(
        &a,
        "mkdir -p proj && echo 'print(42)' > proj/main.py && ln -s proj/main.py link && \
         echo scratch > /tmp/t && echo ok",
    )
    .await;
    assert_eq!(w.stdout.trim(), "ok", "{}", w.stderr);
    let archive = a.checkpoint().await.unwrap();
    assert!(!archive.is_empty());

    // A sandbox from the same template without the archive starts empty.
    let (fresh, _) = e.sandbox("ckpt-fresh").await;
    let f = sh(&fresh, "ls -A /home/sandbox | wc -l; ls /tmp | wc -l").await;
    assert_eq!(f.stdout, "0\n0\n", "{}", f.stderr);

    let mut spec = e.spec("ckpt-b");
    spec.restore = Some(archive.into());
    let (b, _) = e.sandbox_with(spec).await;
    let r = sh(
        &b,
        "python3 link; cat /tmp/t; ls -ln proj/main.py | awk '{print $3}'",
    )
    .await;
    assert_eq!(r.stdout, "42\nscratch\n1000\n", "{}", r.stderr);
    for sb in [a, fresh, b] {
        sb.terminate().await.unwrap();
    }
    let refused = {
        let mut spec = e.spec("ckpt-bad");
        spec.restore = Some(bytes::Bytes::from_static(b"not a checkpoint"));
        let (tx, _rx) = mpsc::unbounded_channel();
        e.backend
            .prepare(spec, tx)
            .await
            .err()
            .expect("a bad archive is refused")
    };
    assert!(matches!(refused, BackendError::Checkpoint(_)), "{refused}");
    assert!(!e.root.path().join("sandboxes/ckpt-bad").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_directories_nested_without_end_is_refused() {
    let e = env("tdeep");
    let (sb, _) = e.sandbox("deep-1").await;
    // 20,000 directories, each in the last: the host walks the layer to archive it, so the
    // nesting is the sandbox's to choose, not the walker's stack.
    let w = sh(
        &sb,
        "python3 -c \"import os\nfor _ in range(20000):\n    os.mkdir('d'); os.chdir('d')\nprint('deep')\"",
    )
    .await;
    assert_eq!(w.stdout, "deep\n", "{}", w.stderr);
    let e2 = sb.checkpoint().await.unwrap_err();
    assert!(
        matches!(&e2, BackendError::Checkpoint(m) if m.contains("nests directories deeper than")),
        "{e2}"
    );
    // The sandbox is fine, and a shallower layer checkpoints.
    let r = sh(&sb, "rm -rf d && mkdir -p a/b/c && echo ok").await;
    assert_eq!(r.stdout, "ok\n", "{}", r.stderr);
    assert!(!sb.checkpoint().await.unwrap().is_empty());
    // Shallow enough, but a path longer than a restore can unpack (100 names of 40 bytes).
    let w = sh(
        &sb,
        "python3 -c \"import os\nfor _ in range(100):\n    os.mkdir('x' * 40); os.chdir('x' * 40)\nprint('long')\"",
    )
    .await;
    assert_eq!(w.stdout, "long\n", "{}", w.stderr);
    let e3 = sb.checkpoint().await.unwrap_err();
    assert!(
        matches!(&e3, BackendError::Checkpoint(m) if m.contains("longer than 3072 bytes")),
        "{e3}"
    );
    sb.terminate().await.unwrap();
}

/// This process's resident set and its peak since the last [`reset_peak`], in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |key: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line[key.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap()
            * 1024
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_streams_files_instead_of_holding_them_whole() {
    let e = env("tbigck");
    let (sb, _) = e.sandbox("big-1").await;
    let r = sh(&sb, "head -c 96M /dev/urandom > noise && echo ok").await;
    assert_eq!(r.stdout, "ok\n", "{}", r.stderr);
    reset_peak();
    let (before, _) = memory();
    let archive = sb.checkpoint().await.unwrap();
    let (_, peak) = memory();
    // Noise does not compress: the archive is about the file's size. Reading the file whole
    // before archiving it held it twice (≈ 2 × 96 MiB more); streamed, about once.
    assert!(archive.len() > 95 << 20, "{}", archive.len());
    let grew = peak.saturating_sub(before);
    eprintln!(
        "checkpoint of 96 MiB of noise: archive {} MiB, memory peak +{} MiB",
        archive.len() >> 20,
        grew >> 20
    );
    assert!(
        grew < archive.len() as u64 * 3 / 2,
        "the checkpoint of a 96 MiB file took {} MiB more memory",
        grew >> 20
    );
    // And the archive restores to the same bytes.
    let digest = sh(&sb, "sha256sum noise").await.stdout;
    let mut spec = e.spec("big-2");
    spec.restore = Some(archive.into());
    let (restored, _) = e.sandbox_with(spec).await;
    assert_eq!(sh(&restored, "sha256sum noise").await.stdout, digest);
    for s in [sb, restored] {
        s.terminate().await.unwrap();
    }
}

fn cgroup_dirs(instance: &str, id: &str) -> Vec<PathBuf> {
    ["memory", "pids", "cpu"]
        .iter()
        .map(|c| PathBuf::from(format!("/sys/fs/cgroup/{c}/creto/{instance}/{id}")))
        .chain([PathBuf::from(format!(
            "/sys/fs/cgroup/creto/{instance}/{id}"
        ))])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_removes_namespace_cgroups_and_layer() {
    let e = env("tterm");
    assert_eq!(e.bwrap.cgroup_version(), 1, "this machine mounts cgroup v1");
    let mut spec = e.spec("term-1");
    spec.limits = ResourceLimits {
        memory_bytes: 100 << 20,
        pids: 50,
        cpu_millis: 500,
        disk_bytes: 64 << 20,
    };
    let (sb, _) = e.sandbox_with(spec).await;
    let netns = PathBuf::from(format!("/run/netns/creto-{}-term-1", e.instance));
    let layer = e.root.path().join("sandboxes/term-1");
    let image = e.root.path().join("disks/term-1.img");
    assert!(netns.exists() && layer.exists() && image.exists());
    assert!(mounted(&layer));
    let cg = cgroup_dirs(&e.instance, "term-1");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    assert_eq!(
        read(&cg[0].join("memory.limit_in_bytes")),
        (100u64 << 20).to_string()
    );
    assert_eq!(read(&cg[1].join("pids.max")), "50");
    assert_eq!(read(&cg[2].join("cpu.cfs_quota_us")), "50000");
    // A background process is running in another exec while we terminate.
    let sb2 = sb.clone();
    let long = tokio::spawn(async move {
        let mut req = ExecRequest::new(["sleep", "60"]);
        req.timeout = Duration::from_secs(60);
        sb2.exec(req, mpsc::channel(1).0).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    sb.terminate().await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), long)
        .await
        .unwrap()
        .unwrap();
    assert!(ended
        .map(|o| o.signal == Some(libc::SIGKILL))
        .unwrap_or(true));
    assert!(!netns.exists(), "{netns:?}");
    assert!(!layer.exists() && !image.exists(), "{layer:?}");
    assert!(!mounted(&layer));
    for d in &cg {
        assert!(!d.exists(), "{d:?}");
    }
    sb.terminate().await.unwrap(); // idempotent
    let err = sb
        .exec(ExecRequest::new(["true"]), mpsc::channel(1).0)
        .await
        .unwrap_err();
    assert!(matches!(err, BackendError::Terminated(_)), "{err}");
    // The id is free again.
    let (again, _) = e.sandbox("term-1").await;
    again.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_a_crashed_process_are_cleaned() {
    let e = env("torphan");
    let (live, _) = e.sandbox("live-1").await;
    // What a crashed process would leave: a named namespace, cgroups, a layer.
    let status = std::process::Command::new("ip")
        .args(["netns", "add", &format!("creto-{}-dead-1", e.instance)])
        .status()
        .unwrap();
    assert!(status.success());
    for d in cgroup_dirs(&e.instance, "dead-1").iter().take(3) {
        std::fs::create_dir_all(d).unwrap();
    }
    // Its layer: a disk image, still mounted.
    let (layer, image) = (
        e.root.path().join("sandboxes/dead-1"),
        e.root.path().join("disks/dead-1.img"),
    );
    std::fs::create_dir_all(&layer).unwrap();
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    for cmd in [
        vec!["mkfs.ext4", "-q", "-F", image.to_str().unwrap()],
        vec![
            "mount",
            "-o",
            "loop",
            image.to_str().unwrap(),
            layer.to_str().unwrap(),
        ],
    ] {
        let status = std::process::Command::new(cmd[0])
            .args(&cmd[1..])
            .status()
            .unwrap();
        assert!(status.success(), "{cmd:?}");
    }
    std::fs::create_dir_all(layer.join("home")).unwrap();
    assert!(mounted(&layer));
    assert_eq!(e.backend.cleanup_orphans().await.unwrap(), 1);
    assert!(!mounted(&layer) && !image.exists());
    assert!(!Path::new(&format!("/run/netns/creto-{}-dead-1", e.instance)).exists());
    assert!(cgroup_dirs(&e.instance, "dead-1")
        .iter()
        .all(|d| !d.exists()));
    assert!(!e.root.path().join("sandboxes/dead-1").exists());
    // The live sandbox is untouched.
    assert_eq!(sh(&live, "echo alive").await.stdout, "alive\n");
    assert_eq!(e.backend.cleanup_orphans().await.unwrap(), 0);
    live.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seccomp_denies_namespaces_and_mounts() {
    let e = env("tsecc");
    let (sb, _) = e.sandbox("secc-1").await;
    let r = sh(
        &sb,
        "unshare -U true; echo unshare=$?; python3 - <<'EOF'\n\
import ctypes, os\n\
libc = ctypes.CDLL(None, use_errno=True)\n\
r = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n\
print('mount', r, os.strerror(ctypes.get_errno()))\n\
r = libc.syscall(321, 0, 0, 0)  # bpf on x86_64 (280 on aarch64)\n\
print('bpf', r, os.strerror(ctypes.get_errno()))\n\
EOF",
    )
    .await;
    assert!(
        r.stderr.contains("unshare failed: Operation not permitted"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("unshare=1"), "{}", r.stdout);
    assert!(
        r.stdout.contains("mount -1 Operation not permitted"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    if cfg!(target_arch = "x86_64") {
        assert!(
            r.stdout.contains("bpf -1 Operation not permitted"),
            "{}",
            r.stdout
        );
    }
    // Threads still work (clone without namespace flags; clone3 falls back to clone).
    let t = sh(&sb, "python3 -c 'import threading; t = threading.Thread(target=print, args=(\"thread\",)); t.start(); t.join()'").await;
    assert_eq!(t.stdout, "thread\n", "{}", t.stderr);
    sb.terminate().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_checked_and_unique() {
    let e = env("tids");
    let (tx, _rx) = mpsc::unbounded_channel();
    let err = e
        .backend
        .prepare(e.spec("Bad_Id"), tx.clone())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, BackendError::InvalidSpec(_)), "{err}");
    let (sb, _) = e.sandbox("dup-1").await;
    let err = e.backend.prepare(e.spec("dup-1"), tx).await.err().unwrap();
    assert!(matches!(err, BackendError::AlreadyExists(_)), "{err}");
    sb.terminate().await.unwrap();
}

/// Cold spawn: prepare plus a first `true`, against bare bwrap running `true`. Prints the
/// figures; the bound is loose (shared 2-core CI machines), the goal is p95 < 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_spawn_timings() {
    let e = env("tcold");
    let n = 20;
    let (mut prep, mut exec, mut total, mut bare) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let t0 = Instant::now();
        let (sb, _) = e.sandbox(&format!("cold-{i}")).await;
        let t1 = Instant::now();
        let r = run_req(&sb, ExecRequest::new(["true"])).await;
        let t2 = Instant::now();
        assert_eq!(r.outcome.exit_code, Some(0), "{}", r.stderr);
        prep.push(t1 - t0);
        exec.push(t2 - t1);
        total.push(t2 - t0);
        sb.terminate().await.unwrap();
        let t3 = Instant::now();
        let ok = std::process::Command::new(e.bwrap.bwrap_path())
            .args([
                "--unshare-user",
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--symlink",
                "usr/bin",
                "/bin",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "true",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
        bare.push(t3.elapsed());
    }
    fn pct(v: &mut [Duration], p: f64) -> f64 {
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1000.0
    }
    for (name, v) in [
        ("prepare", &mut prep),
        ("first exec (true)", &mut exec),
        ("cold spawn (prepare + exec)", &mut total),
        ("bare bwrap true", &mut bare),
    ] {
        println!(
            "{name:>28}: p50 {:6.1} ms  p95 {:6.1} ms",
            pct(v, 0.5),
            pct(v, 0.95)
        );
    }
    assert!(pct(&mut total, 0.95) < 1000.0);
}

#[test]
fn a_missing_bwrap_is_reported_clearly() {
    let root = tempfile::tempdir().unwrap();
    let err = BwrapBackend::new(BackendConfig {
        root: root.path().into(),
        instance: "tmissing".into(),
        bwrap_path: "/nonexistent/bwrap".into(),
        ..BackendConfig::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("install bubblewrap"), "{err}");
}

/// A host service that answers and keeps every connection open.
fn holder() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in l.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"hi");
            held.push(c);
        }
    });
    addr
}

const OPEN_THREE: &str = r#"
import socket, sys
held = []
for i in range(3):
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        d = s.recv(10)
        held.append(s)
        print(i, d.decode() if d else 'closed')
    except Exception as e:
        print(i, 'ERR', type(e).__name__)
"#;

/// The proxy's connections take the gateway's descriptors: every sandbox's together are
/// bounded (`max_proxied_connections`, by default an eighth of the descriptor limit); past it
/// a connection is reset, and the gateway keeps descriptors for everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxied_connections_are_bounded_across_the_replica() {
    let e = env_with(
        "tproxcap",
        BackendConfig {
            egress_deny: creto_gateways::runtime::backend::default_egress_deny_except(&[
                "127.0.0.0/8",
            ]),
            max_proxied_connections: Some(2),
            ..BackendConfig::default()
        },
    );
    let service = holder();
    let (sb, mut attempts) = e.sandbox("proxcap-1").await;
    let rule = format!("{}:{}", service.ip(), service.port());
    sb.set_egress(EgressPolicy::parse(std::slice::from_ref(&rule)).unwrap());
    let mut req = ExecRequest::new([
        "python3".to_string(),
        "-c".into(),
        OPEN_THREE.into(),
        service.ip().to_string(),
        service.port().to_string(),
    ]);
    req.timeout = Duration::from_secs(30);
    let r = run_req(&sb, req).await;
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines[..2], ["0 hi", "1 hi"], "{} {}", r.stdout, r.stderr);
    assert!(
        lines[2] == "2 closed" || lines[2].starts_with("2 ERR"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    // The refused third connection is a decision on record, with why.
    let mut refused = Vec::new();
    while let Ok(a) = attempts.try_recv() {
        if !a.allowed {
            refused.push(a.rule.unwrap_or_default());
        }
    }
    assert!(
        refused
            .iter()
            .any(|r| r.contains("proxied connections are all in use")),
        "{refused:?}"
    );
    sb.terminate().await.unwrap();
}
