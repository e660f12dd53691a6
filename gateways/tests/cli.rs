//! The `enablement` binary as an operator meets it: help, errors that name the failing URL
//! and what to do, exit codes, never a panic or a backtrace.
use std::process::Command;

fn enablement(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_enablement"))
        .args(args)
        .env_remove("NATS_URL")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("ENABLEMENT_AUTH")
        .env_remove("ENABLEMENT_AUTH_KEYS")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// URLs may carry passwords: `--help` names their variables, never their values.
#[test]
fn help_never_prints_a_url_from_the_environment() {
    for args in [&["--help"][..], &["replay", "--help"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_enablement"))
            .args(args)
            .env("DATABASE_URL", "postgres://u:s3cret-pg@h/db")
            .env("NATS_URL", "nats://u:s3cret-nats@h:4222")
            .env("REDIS_URL", "redis://:s3cret-redis@h:6379")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("DATABASE_URL"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}

#[test]
fn help_lists_every_subcommand() {
    let (code, out, _) = enablement(&["--help"]);
    assert_eq!(code, 0);
    for sub in [
        "dev",
        "serve",
        "project",
        "migrate",
        "streams",
        "deadletters",
        "replay",
    ] {
        assert!(out.contains(sub), "{sub} missing from --help:\n{out}");
    }
}

#[test]
fn unreachable_services_name_the_url_and_exit_3() {
    let cases: [(&[&str], &str, &str); 3] = [
        (
            &["--nats-url", "nats://127.0.0.1:1", "streams", "info"],
            "nats://127.0.0.1:1",
            "NATS_URL",
        ),
        (
            &[
                "--database-url",
                "postgres://postgres@127.0.0.1:1/x",
                "migrate",
            ],
            "127.0.0.1:1",
            "DATABASE_URL",
        ),
        (
            &[
                "--redis-url",
                "redis://127.0.0.1:1",
                "--database-url",
                // Redis is checked before PostgreSQL: no database is touched.
                "postgres://postgres@127.0.0.1:1/never",
                "--auth",
                "none",
                "serve",
            ],
            "redis://127.0.0.1:1",
            "REDIS_URL",
        ),
    ];
    for (args, url, hint) in cases {
        let (code, _, err) = enablement(args);
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(err.contains(url) && err.contains(hint), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("stack backtrace"),
            "{err}"
        );
    }
    // Credentials in the URL are not shown.
    let (code, _, err) = enablement(&[
        "--nats-url",
        "nats://alice:s3cret@127.0.0.1:1",
        "streams",
        "info",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("nats://***@127.0.0.1:1") && !err.contains("s3cret"),
        "{err}"
    );
}

#[test]
fn a_bad_config_file_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("enablement-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "nats_url = 42\n").unwrap();
    let (code, _, err) = enablement(&["--config", path.to_str().unwrap(), "streams", "info"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("nats_url"),
        "{err}"
    );
    for (setting, says) in [
        ("late_window_hours = -1\n", "late_window_hours = -1"),
        (
            "messaging_max_ttl_hours = 0\n",
            "messaging_max_ttl_hours = 0",
        ),
    ] {
        std::fs::write(&path, setting).unwrap();
        let (code, _, err) = enablement(&["--config", path.to_str().unwrap(), "streams", "info"]);
        assert_eq!(code, 2, "{setting}: {err}");
        assert!(err.contains(says), "{err}");
    }
    let (code, _, err) = enablement(&["--config", "/nonexistent/enablement.toml", "migrate"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn replay_without_a_mode_says_what_to_do() {
    let (code, _, err) = enablement(&["replay", "metering"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--rebuild") && err.contains("--dry-run"),
        "{err}"
    );
}

#[test]
fn messaging_has_nothing_to_replay_or_backfill_and_says_why() {
    for args in [
        &["replay", "messaging", "--dry-run"][..],
        &["backfill", "messaging", "--file", "/dev/null"],
        &["project", "--product", "messaging"],
    ] {
        let (code, _, err) = enablement(args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.contains("messaging"), "{args:?}: {err}");
    }
}

#[test]
fn serving_without_authentication_configured_is_refused_with_the_fix() {
    let (code, _, err) = enablement(&["serve"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("ENABLEMENT_AUTH_KEYS") && err.contains("enablement token keygen"),
        "{err}"
    );
}

#[test]
fn tokens_are_minted_from_a_key_ring() {
    let dir = tempfile::tempdir().unwrap();
    let (code, key, _) = enablement(&["token", "keygen", "--kid", "k1"]);
    assert_eq!(code, 0);
    let ring = dir.path().join("keys.toml");
    std::fs::write(&ring, key).unwrap();
    let ring = ring.to_str().unwrap();
    let (code, token, err) = enablement(&[
        "--auth-keys",
        ring,
        "token",
        "issue",
        "--tenant",
        "acme",
        "--subject",
        "ci",
        "--roles",
        "producer,reader",
        "--ttl",
        "15m",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");
    let (code, _, err) = enablement(&[
        "--auth-keys",
        ring,
        "token",
        "issue",
        "--tenant",
        "no spaces",
        "--subject",
        "x",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not a valid name"), "{err}");
    let (code, _, err) = enablement(&["token", "issue", "--tenant", "a", "--subject", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("ENABLEMENT_AUTH_KEYS"), "{err}");
}

#[test]
fn a_missing_archive_setting_is_a_configuration_error() {
    let backfill = |bucket: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_enablement"));
        cmd.args(["backfill", "metering", "--s3-prefix", "backfills/"])
            // Nowhere: the objects' staging file is made only after the settings are checked.
            .env("TMPDIR", "/nonexistent/tmp");
        match bucket {
            Some(b) => cmd.env("S3_BUCKET", b),
            None => cmd.env_remove("S3_BUCKET"),
        };
        let out = cmd.output().expect("binary runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    // Exit 2, as the README says of configuration errors.
    let (code, err) = backfill(None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("S3_BUCKET"), "{err}");
    let (code, err) = backfill(Some("backfills"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("TMPDIR"), "{err}");
}

/// A certificate or key that does not load stops the start (exit 2) instead of leaving a
/// process that passes health checks with nothing on its gRPC port.
#[test]
fn a_tls_key_that_does_not_load_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("enablement-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_enablement"))
        .args(["serve"])
        .env("ENABLEMENT_AUTH", "none")
        .env("ENABLEMENT_TLS_CERT", &cert)
        .env("ENABLEMENT_TLS_KEY", &key)
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("ENABLEMENT_TLS_CERT"), "{err}");
}
