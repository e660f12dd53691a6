//! The archive port: where audit exports and backups go. S3 in production; a local directory in
//! the embedded default. Both run the conformance suite in [`conformance`].
//!
//! Keys are relative, `/`-separated paths (`audit/2026/11/export-0001.jsonl`), checked by
//! [`validate_key`] before either adapter touches storage, so a key one accepts the other
//! accepts too. Listing is by plain string prefix, as in S3: `exports` also lists
//! `exports-old/…`; say `exports/` for the "directory".
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ArchiveError {
    /// The key (or list prefix) breaks the key rules; the message says what to change.
    #[error("invalid archive key {0}")]
    InvalidKey(String),
    /// The store could not be reached or refused the operation; the message names it.
    #[error("archive unavailable: {0}")]
    Unavailable(String),
}

/// One object of a [`Archive::list`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedObject {
    pub key: String,
    /// In bytes.
    pub size: u64,
}

#[async_trait]
pub trait Archive: Send + Sync + 'static {
    /// Stores `body` at `key`, replacing any object there. Readers see the old object or the
    /// new one, never part of one.
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), ArchiveError>;
    /// The object at `key`; `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError>;
    /// Every object whose key starts with `prefix` (`""` for all), sorted by key (byte order).
    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedObject>, ArchiveError>;
    /// Removes the object at `key`; removing an absent one is not an error.
    async fn delete(&self, key: &str) -> Result<(), ArchiveError>;
    /// Where the objects go, for logs and messages: `s3://bucket at http://…`, `dir /path`.
    fn describe(&self) -> String;
}

/// Longest key, in bytes (S3's limit).
pub const MAX_KEY_BYTES: usize = 1024;

/// Checks a key against the rules both adapters share: non-empty, at most [`MAX_KEY_BYTES`]
/// bytes, `/`-separated segments with no empty, `.` or `..` segment, no leading `/`, no NUL
/// and no backslash.
pub fn validate_key(key: &str) -> Result<(), ArchiveError> {
    check("key", key, false).map_err(ArchiveError::InvalidKey)
}

/// Checks a [`Archive::list`] prefix: empty (everything), or a key's beginning, whose last
/// segment may be partial or empty (`audit/2026/1`, `audit/`).
pub fn validate_prefix(prefix: &str) -> Result<(), ArchiveError> {
    check("prefix", prefix, true).map_err(ArchiveError::InvalidKey)
}

fn check(what: &str, s: &str, partial_tail: bool) -> Result<(), String> {
    let shown = || {
        let mut cut: String = s.chars().take(80).collect();
        if cut.len() < s.len() {
            cut.push('…');
        }
        format!("{cut:?}")
    };
    let fail = |why: &str| Err(format!("{}: the {what} {why}", shown()));
    if s.is_empty() {
        return if partial_tail {
            Ok(())
        } else {
            fail("is empty: name the object, e.g. \"audit/2026/11/export.jsonl\"")
        };
    }
    if s.len() > MAX_KEY_BYTES {
        return fail(&format!(
            "is {} bytes long: shorten it to at most {MAX_KEY_BYTES}",
            s.len()
        ));
    }
    if s.contains('\0') {
        return fail("contains a NUL byte: remove it");
    }
    if s.contains('\\') {
        return fail("contains a backslash: separate segments with '/'");
    }
    if s.starts_with('/') {
        return fail("starts with '/': keys are relative, drop the leading '/'");
    }
    let segments: Vec<&str> = s.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        if partial_tail && i == segments.len() - 1 {
            break;
        }
        match *segment {
            "" if i == segments.len() - 1 => {
                return fail("ends with '/': name the object after the last '/'")
            }
            "" => return fail("has an empty segment ('//'): use a single '/'"),
            "." | ".." => {
                return fail(&format!(
                    "has a '{segment}' segment: name the object directly, without '.' or '..'"
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

/// A local directory: the object with key `a/b/c` is the file `root/a/b/c`.
///
/// Writes go to a temporary file in the object's directory, are fsynced and then renamed over
/// the object (and the directory fsynced), so a crash leaves the old object or the new one.
/// Temporary names contain a backslash, which no key may, so [`Archive::list`] never shows
/// one, even one a crash left behind. Content types are not stored. Unlike S3, a directory
/// cannot hold an object `a/b` and objects under `a/b/` at once: the second `put` fails with
/// [`ArchiveError::InvalidKey`] saying so.
#[derive(Debug, Clone)]
pub struct LocalDirArchive {
    root: PathBuf,
}

impl LocalDirArchive {
    /// The directory is created on the first `put`; until then the archive reads as empty.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        let mut path = self.root.clone();
        path.extend(key.split('/'));
        path
    }

    fn unavailable(&self, op: &str, key: &str, e: impl fmt::Display) -> ArchiveError {
        ArchiveError::Unavailable(format!("dir {}: {op} {key:?}: {e}", self.root.display()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &str,
        key: &str,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> Result<T, ArchiveError> {
        match tokio::task::spawn_blocking(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(op, key, e)),
            Err(e) => Err(self.unavailable(op, key, e)),
        }
    }
}

/// "Not there" for a path: missing, or a directory where a file would be, or the other way.
fn absent(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory
    )
}

fn temp_name(file_name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        ".{file_name}\\partial.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_synced(path: &Path, body: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let written = file.write_all(body).and_then(|()| file.sync_all());
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

enum PutOutcome {
    Stored,
    /// A file where a directory is needed, or a directory where the object would go.
    Conflict,
}

/// Whether a file stands where `dir`, or a directory between it and the root, would go.
fn file_in_the_way(root: &Path, dir: &Path) -> bool {
    dir.ancestors()
        .take_while(|d| *d != root && d.starts_with(root))
        .any(|d| std::fs::symlink_metadata(d).is_ok_and(|m| !m.is_dir()))
}

fn put_file(root: &Path, path: &Path, body: &[u8]) -> io::Result<PutOutcome> {
    let dir = path.parent().expect("an object path has a parent");
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("an object path ends in a UTF-8 name");
    // A concurrent delete may prune a directory this put has just made (it was empty): then
    // NotFound, and another try.
    let mut attempts = 0;
    let temp = loop {
        attempts += 1;
        let temp = dir.join(temp_name(name));
        match std::fs::create_dir_all(dir).and_then(|()| write_synced(&temp, body)) {
            Ok(()) => break temp,
            Err(_) if file_in_the_way(root, dir) => return Ok(PutOutcome::Conflict),
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 4 => {}
            Err(e) => return Err(e),
        }
    };
    if let Err(e) = std::fs::rename(&temp, path) {
        let _ = std::fs::remove_file(&temp);
        return if path.is_dir() {
            Ok(PutOutcome::Conflict)
        } else {
            Err(e)
        };
    }
    std::fs::File::open(dir)?.sync_all()?;
    Ok(PutOutcome::Stored)
}

fn list_files(root: &Path, prefix: &str) -> io::Result<Vec<ArchivedObject>> {
    // Start in the deepest directory the prefix names whole, then filter by the string prefix.
    let start_key = prefix.rsplit_once('/').map_or("", |(dirs, _)| dirs);
    let mut start = root.to_path_buf();
    if !start_key.is_empty() {
        start.extend(start_key.split('/'));
    }
    let mut objects = Vec::new();
    let mut pending = vec![(start, start_key.to_string())];
    while let Some((dir, dir_key)) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if absent(&e) => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let key = if dir_key.is_empty() {
                name
            } else {
                format!("{dir_key}/{name}")
            };
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) if absent(&e) => continue,
                Err(e) => return Err(e),
            };
            if file_type.is_dir() {
                if format!("{key}/").starts_with(prefix) {
                    pending.push((entry.path(), key));
                }
            } else if file_type.is_file() && key.starts_with(prefix) && validate_key(&key).is_ok() {
                match entry.metadata() {
                    Ok(meta) => objects.push(ArchivedObject {
                        key,
                        size: meta.len(),
                    }),
                    Err(e) if absent(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
    objects.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(objects)
}

/// Removes the directories a delete left empty, up to (not including) the root, so that a
/// later object may take the name of one of them, as in S3.
fn prune_empty_dirs(root: &Path, mut dir: &Path) {
    while dir != root && dir.starts_with(root) {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
        match dir.parent() {
            Some(parent) => dir = parent,
            None => break,
        }
    }
}

#[async_trait]
impl Archive for LocalDirArchive {
    async fn put(&self, key: &str, body: Bytes, _content_type: &str) -> Result<(), ArchiveError> {
        validate_key(key)?;
        let root = self.root.clone();
        let path = self.path(key);
        match self
            .blocking("put", key, move || put_file(&root, &path, &body))
            .await?
        {
            PutOutcome::Stored => Ok(()),
            PutOutcome::Conflict => Err(ArchiveError::InvalidKey(format!(
                "{key:?}: in dir {} an object is at a prefix of this key, or objects are under \
                 it (a directory cannot hold both \"a/b\" and \"a/b/c\"): choose another key",
                self.root.display()
            ))),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        validate_key(key)?;
        let path = self.path(key);
        self.blocking("get", key, move || match std::fs::read(&path) {
            Ok(body) => Ok(Some(Bytes::from(body))),
            Err(e) if absent(&e) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedObject>, ArchiveError> {
        validate_prefix(prefix)?;
        let root = self.root.clone();
        let owned = prefix.to_string();
        self.blocking("list", prefix, move || list_files(&root, &owned))
            .await
    }

    async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        validate_key(key)?;
        let root = self.root.clone();
        let path = self.path(key);
        self.blocking("delete", key, move || {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if absent(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
            if let Some(dir) = path.parent() {
                prune_empty_dirs(&root, dir);
            }
            Ok(())
        })
        .await
    }

    fn describe(&self) -> String {
        format!("dir {}", self.root.display())
    }
}

/// Where the S3 adapter connects. [`S3Settings::from_env`] reads the usual variables.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Settings {
    /// `None` for AWS itself; `http://127.0.0.1:5000` for a local S3-compatible server.
    pub endpoint: Option<String>,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// `https://endpoint/bucket/key` rather than `https://bucket.endpoint/key`; most
    /// S3-compatible servers need it.
    pub force_path_style: bool,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("force_path_style", &self.force_path_style)
            .finish()
    }
}

impl S3Settings {
    /// `S3_BUCKET` (`None` when unset or empty: no S3 archive), `S3_ENDPOINT`, `S3_REGION`
    /// (default `us-east-1`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `S3_FORCE_PATH_STYLE` (`true`/`false`, `1`/`0`; default true when an endpoint is set).
    pub fn from_env() -> Option<S3Settings> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Option<S3Settings> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let bucket = var("S3_BUCKET")?;
        let endpoint = var("S3_ENDPOINT");
        let force_path_style = match var("S3_FORCE_PATH_STYLE") {
            None => endpoint.is_some(),
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    tracing::warn!(
                        value = %v,
                        "S3_FORCE_PATH_STYLE is not true or false; using the default"
                    );
                    endpoint.is_some()
                }
            },
        };
        Some(S3Settings {
            region: var("S3_REGION").unwrap_or_else(|| "us-east-1".to_string()),
            bucket,
            access_key_id: var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
            force_path_style,
            endpoint,
        })
    }
}

/// An SDK error in one line: the service's code and message (`NoSuchBucket: The specified
/// bucket does not exist`) when it answered, else the chain of causes (`dispatch failure: io
/// error: … Connection refused`).
fn sdk_error<E, R>(e: SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    if let Some(code) = e.code() {
        return match e.message() {
            Some(message) => format!("{code}: {message}"),
            None => code.to_string(),
        };
    }
    error_chain(&e)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// S3 or an S3-compatible server, one bucket, with static credentials.
#[derive(Clone)]
pub struct S3Archive {
    client: aws_sdk_s3::Client,
    settings: S3Settings,
}

impl fmt::Debug for S3Archive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("S3Archive").field(&self.describe()).finish()
    }
}

impl S3Archive {
    /// Builds the client; nothing is sent until the first call.
    pub fn new(settings: S3Settings) -> Self {
        use aws_smithy_http_client::tls;
        // rustls on ring, the TLS stack the rest of the workspace uses; plain http works too.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut config = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(settings.region.clone()))
            .credentials_provider(Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.clone(),
                None,
                None,
                "S3Settings",
            ))
            .force_path_style(settings.force_path_style)
            // Without these only connecting is bounded: a call on a half-open connection or
            // to a stuck server waits for ever, the exporter with it, and nothing counts a
            // failure (no alert fires). A timed-out attempt is retried like any failure.
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(std::time::Duration::from_secs(5))
                    .operation_attempt_timeout(std::time::Duration::from_secs(60))
                    .operation_timeout(std::time::Duration::from_secs(180))
                    .build(),
            );
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint.clone());
        }
        Self {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            settings,
        }
    }

    pub fn bucket(&self) -> &str {
        &self.settings.bucket
    }

    fn unavailable(&self, op: &str, key: &str, why: String) -> ArchiveError {
        ArchiveError::Unavailable(format!("{}: {op} {key:?}: {why}", self.describe()))
    }

    /// Creates the bucket when it does not exist (in the settings' region).
    pub async fn ensure_bucket(&self) -> Result<(), ArchiveError> {
        let bucket = &self.settings.bucket;
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_not_found()) => {}
            Err(e) => return Err(self.unavailable("head bucket", bucket, sdk_error(e))),
        }
        let mut create = self.client.create_bucket().bucket(bucket);
        if self.settings.region != "us-east-1" {
            use aws_sdk_s3::types::{BucketLocationConstraint, CreateBucketConfiguration};
            create = create.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(
                        self.settings.region.as_str(),
                    ))
                    .build(),
            );
        }
        match create.send().await {
            Ok(_) => Ok(()),
            // Created meanwhile by another process of ours.
            Err(e)
                if e.as_service_error()
                    .is_some_and(|e| e.is_bucket_already_owned_by_you()) =>
            {
                Ok(())
            }
            Err(e) => Err(self.unavailable("create bucket", bucket, sdk_error(e))),
        }
    }
}

#[async_trait]
impl Archive for S3Archive {
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), ArchiveError> {
        validate_key(key)?;
        self.client
            .put_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable("put", key, sdk_error(e)))
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
        validate_key(key)?;
        let response = self
            .client
            .get_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await;
        let output = match response {
            Ok(output) => output,
            // Only NoSuchKey: a missing bucket (also a 404) is an error, not an empty archive.
            Err(e) if e.as_service_error().is_some_and(|e| e.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.unavailable("get", key, sdk_error(e))),
        };
        let body = output
            .body
            .collect()
            .await
            .map_err(|e| self.unavailable("get", key, error_chain(&e)))?;
        Ok(Some(body.into_bytes()))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ArchivedObject>, ArchiveError> {
        validate_prefix(prefix)?;
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.settings.bucket)
            .set_prefix((!prefix.is_empty()).then(|| prefix.to_string()))
            .into_paginator()
            .send();
        let mut objects = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.unavailable("list", prefix, sdk_error(e)))?;
            for object in page.contents() {
                // Keys this port would refuse (written by other tools) are left out, as the
                // local directory leaves out its temporary files.
                let Some(key) = object.key().filter(|k| validate_key(k).is_ok()) else {
                    continue;
                };
                objects.push(ArchivedObject {
                    key: key.to_string(),
                    size: object.size().unwrap_or(0).max(0) as u64,
                });
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
        validate_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.settings.bucket)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| self.unavailable("delete", key, sdk_error(e)))
    }

    fn describe(&self) -> String {
        match &self.settings.endpoint {
            Some(endpoint) => format!("s3://{} at {endpoint}", self.settings.bucket),
            None => format!("s3://{} in {}", self.settings.bucket, self.settings.region),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_rules() {
        for ok in [
            "a",
            "audit/2026/11/export.jsonl",
            ".hidden/x",
            "a/..b/c.",
            "ü/€",
        ] {
            assert_eq!(validate_key(ok), Ok(()), "{ok}");
        }
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        for (bad, says) in [
            ("", "is empty"),
            ("/abs", "drop the leading '/'"),
            ("a//b", "use a single '/'"),
            ("a/", "ends with '/'"),
            ("../x", "without '.' or '..'"),
            ("a/./b", "without '.' or '..'"),
            ("a\\b", "backslash"),
            ("a\0b", "NUL"),
            (long.as_str(), "at most 1024"),
        ] {
            match validate_key(bad) {
                Err(ArchiveError::InvalidKey(m)) => assert!(m.contains(says), "{bad:?}: {m}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(validate_key(&"k".repeat(MAX_KEY_BYTES)), Ok(()));
    }

    #[test]
    fn prefixes_may_end_partial_or_with_a_slash() {
        for ok in ["", "a", "a/", "a/b/2026-1", "a/."] {
            assert_eq!(validate_prefix(ok), Ok(()), "{ok}");
        }
        for bad in ["/", "/a", "a//", "../", "a/../b", "a\\"] {
            assert!(
                matches!(validate_prefix(bad), Err(ArchiveError::InvalidKey(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn settings_come_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(S3Settings::from_lookup(env(&[])), None);
        assert_eq!(S3Settings::from_lookup(env(&[("S3_BUCKET", "")])), None);
        let local = S3Settings::from_lookup(env(&[
            ("S3_BUCKET", "b"),
            ("S3_ENDPOINT", "http://127.0.0.1:5000"),
            ("AWS_ACCESS_KEY_ID", "id"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ]))
        .unwrap();
        assert_eq!(
            local,
            S3Settings {
                endpoint: Some("http://127.0.0.1:5000".into()),
                region: "us-east-1".into(),
                bucket: "b".into(),
                access_key_id: "id".into(),
                secret_access_key: "secret".into(),
                force_path_style: true,
            }
        );
        assert!(!format!("{local:?}").contains("secret\""));
        let aws = S3Settings::from_lookup(env(&[
            ("S3_BUCKET", "b"),
            ("S3_REGION", "eu-west-1"),
            ("S3_FORCE_PATH_STYLE", "false"),
        ]))
        .unwrap();
        assert_eq!(
            (aws.endpoint, aws.region.as_str(), aws.force_path_style),
            (None, "eu-west-1", false)
        );
        let archive = S3Archive::new(local);
        assert_eq!(archive.describe(), "s3://b at http://127.0.0.1:5000");
    }

    #[tokio::test]
    async fn local_dir_hides_partial_writes_and_reports_conflicts() {
        let root = tempfile::tempdir().unwrap();
        let archive = LocalDirArchive::new(root.path().join("objects"));
        assert_eq!(archive.list("").await.unwrap(), vec![]);
        assert_eq!(archive.get("a/b").await.unwrap(), None);
        archive
            .put("a/b", Bytes::from_static(b"12"), "text/plain")
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(root.path().join("objects/a/b")).unwrap(),
            b"12"
        );
        // What a crash in the middle of a put leaves behind: never listed, never read.
        let dir = root.path().join("objects/a");
        std::fs::write(dir.join(temp_name("b")), b"half").unwrap();
        std::fs::write(dir.join(temp_name("c")), b"half").unwrap();
        assert_eq!(
            archive.list("").await.unwrap(),
            vec![ArchivedObject {
                key: "a/b".into(),
                size: 2
            }]
        );
        assert_eq!(archive.get("a/c").await.unwrap(), None);
        // A directory cannot hold both "a/b" and "a/b/c".
        for key in ["a/b/c", "a"] {
            match archive
                .put(key, Bytes::from_static(b"x"), "text/plain")
                .await
            {
                Err(ArchiveError::InvalidKey(m)) => {
                    assert!(m.contains("choose another key"), "{m}")
                }
                other => panic!("{key}: {other:?}"),
            }
        }
        assert_eq!(
            archive.describe(),
            format!("dir {}/objects", root.path().display())
        );
        // Only the temporary files are left: no other file was made on the way.
        archive.delete("a/b").await.unwrap();
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().all(|n| n.contains("\\partial.")), "{left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn local_dir_puts_survive_concurrent_deletes_pruning_their_directory() {
        let root = tempfile::tempdir().unwrap();
        let archive = std::sync::Arc::new(LocalDirArchive::new(root.path().to_path_buf()));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let archive = archive.clone();
                tokio::spawn(async move {
                    let key = format!("shared/dir/k{i}");
                    for round in 0..50u32 {
                        let body = Bytes::from(round.to_le_bytes().to_vec());
                        archive.put(&key, body.clone(), "").await.unwrap();
                        assert_eq!(archive.get(&key).await.unwrap(), Some(body));
                        archive.delete(&key).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(archive.list("").await.unwrap(), vec![]);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }
}

/// The archive port's conformance suite: every adapter runs these, with keys under `prefix`
/// (which ends with `/`), removing what they wrote.
pub mod conformance {
    use super::*;

    fn refused(result: Result<impl fmt::Debug, ArchiveError>, what: &str) {
        match result {
            Err(ArchiveError::InvalidKey(message)) => assert!(!message.is_empty()),
            other => panic!("{what}: expected InvalidKey, got {other:?}"),
        }
    }

    async fn clean_up(archive: &dyn Archive, prefix: &str) {
        for object in archive.list(prefix).await.unwrap() {
            archive.delete(&object.key).await.unwrap();
        }
        assert_eq!(archive.list(prefix).await.unwrap(), vec![]);
    }

    fn object(key: String, size: usize) -> ArchivedObject {
        ArchivedObject {
            key,
            size: size as u64,
        }
    }

    pub async fn binary_bodies_round_trip(archive: &dyn Archive, prefix: &str) {
        assert!(!archive.describe().is_empty());
        // Every byte value, NUL first, and bytes that are not UTF-8.
        let small: Bytes = (0..=255u8).chain([0, 0xff, 0xfe, 0]).collect();
        // 5 MiB that does not repeat on any short period.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let large: Bytes = (0..5 * 1024 * 1024)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let small_key = format!("{prefix}bin/small.bin");
        let large_key = format!("{prefix}bin/large.bin");
        let empty_key = format!("{prefix}bin/empty");
        archive
            .put(&small_key, small.clone(), "application/octet-stream")
            .await
            .unwrap();
        archive
            .put(&large_key, large.clone(), "application/octet-stream")
            .await
            .unwrap();
        archive
            .put(&empty_key, Bytes::new(), "text/plain")
            .await
            .unwrap();
        assert_eq!(archive.get(&small_key).await.unwrap(), Some(small.clone()));
        let got = archive
            .get(&large_key)
            .await
            .unwrap()
            .expect("large object");
        assert_eq!(got.len(), large.len());
        assert!(got == large, "the 5 MiB body came back different");
        assert_eq!(archive.get(&empty_key).await.unwrap(), Some(Bytes::new()));
        assert_eq!(
            archive.list(prefix).await.unwrap(),
            vec![
                object(empty_key, 0),
                object(large_key, large.len()),
                object(small_key, small.len()),
            ]
        );
        clean_up(archive, prefix).await;
    }

    pub async fn put_replaces_the_object(archive: &dyn Archive, prefix: &str) {
        let key = format!("{prefix}report.json");
        archive
            .put(
                &key,
                Bytes::from_static(b"{\"v\":1,\"long\":true}"),
                "application/json",
            )
            .await
            .unwrap();
        archive
            .put(&key, Bytes::from_static(b"{\"v\":2}"), "application/json")
            .await
            .unwrap();
        assert_eq!(
            archive.get(&key).await.unwrap().as_deref(),
            Some(&b"{\"v\":2}"[..])
        );
        assert_eq!(archive.list(prefix).await.unwrap(), vec![object(key, 7)]);
        clean_up(archive, prefix).await;
    }

    pub async fn list_is_by_prefix_sorted_with_sizes(archive: &dyn Archive, prefix: &str) {
        let put = |key: &str, body: &'static str| {
            let key = format!("{prefix}{key}");
            async move {
                archive
                    .put(&key, Bytes::from_static(body.as_bytes()), "text/plain")
                    .await
                    .unwrap();
            }
        };
        // Written out of order; a sibling prefix, a deeper level and a root-level object.
        put("exports/2026/11/b.jsonl", "bb").await;
        put("exports/2026/12/c.jsonl", "ccc").await;
        put("exports/2026/11/a.jsonl", "a").await;
        put("exports/2027/d/e/f.jsonl", "ffff").await;
        put("exports-old/2026/11/a.jsonl", "old").await;
        put("exportsx", "x").await;
        let key = |k: &str| format!("{prefix}{k}");
        let listed = |p: String| async move { archive.list(&p).await.unwrap() };

        assert_eq!(
            listed(key("exports/")).await,
            vec![
                object(key("exports/2026/11/a.jsonl"), 1),
                object(key("exports/2026/11/b.jsonl"), 2),
                object(key("exports/2026/12/c.jsonl"), 3),
                object(key("exports/2027/d/e/f.jsonl"), 4),
            ]
        );
        assert_eq!(
            listed(key("exports/2026/11/")).await,
            vec![
                object(key("exports/2026/11/a.jsonl"), 1),
                object(key("exports/2026/11/b.jsonl"), 2),
            ]
        );
        // A partial last segment is a string prefix, as in S3.
        assert_eq!(
            listed(key("exports/2026/1")).await,
            vec![
                object(key("exports/2026/11/a.jsonl"), 1),
                object(key("exports/2026/11/b.jsonl"), 2),
                object(key("exports/2026/12/c.jsonl"), 3),
            ]
        );
        assert_eq!(
            listed(key("exports/2026/11/b")).await,
            vec![object(key("exports/2026/11/b.jsonl"), 2)]
        );
        let everything: Vec<String> = listed(prefix.to_string())
            .await
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            everything,
            vec![
                key("exports-old/2026/11/a.jsonl"),
                key("exports/2026/11/a.jsonl"),
                key("exports/2026/11/b.jsonl"),
                key("exports/2026/12/c.jsonl"),
                key("exports/2027/d/e/f.jsonl"),
                key("exportsx"),
            ]
        );
        assert_eq!(listed(key("exports")).await.len(), 6);
        assert_eq!(listed(key("exports/2028/")).await, vec![]);
        assert_eq!(listed(key("nothing")).await, vec![]);
        clean_up(archive, prefix).await;
    }

    pub async fn missing_objects_read_as_none(archive: &dyn Archive, prefix: &str) {
        assert_eq!(archive.get(&format!("{prefix}absent")).await.unwrap(), None);
        archive
            .put(
                &format!("{prefix}dir/obj"),
                Bytes::from_static(b"x"),
                "text/plain",
            )
            .await
            .unwrap();
        // Neither a "directory" nor a key below an object is an object.
        assert_eq!(archive.get(&format!("{prefix}dir")).await.unwrap(), None);
        assert_eq!(
            archive
                .get(&format!("{prefix}dir/obj/below"))
                .await
                .unwrap(),
            None
        );
        assert_eq!(archive.get(&format!("{prefix}dir/ob")).await.unwrap(), None);
        clean_up(archive, prefix).await;
    }

    pub async fn delete_removes_and_tolerates_absent(archive: &dyn Archive, prefix: &str) {
        let key = format!("{prefix}a/b/c.json");
        let kept = format!("{prefix}a/kept.json");
        archive
            .put(&key, Bytes::from_static(b"{}"), "application/json")
            .await
            .unwrap();
        archive
            .put(&kept, Bytes::from_static(b"[]"), "application/json")
            .await
            .unwrap();
        archive.delete(&key).await.unwrap();
        assert_eq!(archive.get(&key).await.unwrap(), None);
        assert_eq!(
            archive.list(prefix).await.unwrap(),
            vec![object(kept.clone(), 2)]
        );
        archive.delete(&key).await.unwrap();
        archive.delete(&format!("{prefix}never/was")).await.unwrap();
        // Once "a/b/c.json" is gone, "a/b" may name an object, as in S3.
        let former_dir = format!("{prefix}a/b");
        archive
            .put(&former_dir, Bytes::from_static(b"now a file"), "text/plain")
            .await
            .unwrap();
        assert_eq!(
            archive.get(&former_dir).await.unwrap().as_deref(),
            Some(&b"now a file"[..])
        );
        archive.delete(&former_dir).await.unwrap();
        archive.delete(&kept).await.unwrap();
        assert_eq!(archive.list(prefix).await.unwrap(), vec![]);
    }

    pub async fn invalid_keys_are_refused(archive: &dyn Archive, prefix: &str) {
        let long = format!("{prefix}{}", "k".repeat(MAX_KEY_BYTES));
        let prefixed = [
            format!("{prefix}../x"),
            format!("{prefix}a//b"),
            format!("{prefix}a/./b"),
            format!("{prefix}a/"),
            format!("{prefix}a\\b"),
            format!("{prefix}a\0b"),
            long,
        ];
        let bare = ["../x", "a//b", "", "/abs", "..", "."];
        for key in prefixed.iter().map(String::as_str).chain(bare) {
            refused(
                archive
                    .put(key, Bytes::from_static(b"x"), "text/plain")
                    .await,
                &format!("put {key:?}"),
            );
            refused(archive.get(key).await, &format!("get {key:?}"));
            refused(archive.delete(key).await, &format!("delete {key:?}"));
        }
        for bad_prefix in ["/abs", "../", "a//"] {
            refused(
                archive.list(bad_prefix).await,
                &format!("list {bad_prefix:?}"),
            );
        }
        match archive.get("/abs").await {
            Err(ArchiveError::InvalidKey(m)) => assert!(m.contains("leading '/'"), "{m}"),
            other => panic!("{other:?}"),
        }
        // Nothing was written.
        assert_eq!(archive.list(prefix).await.unwrap(), vec![]);
    }

    /// Instantiates the suite; `$make` is an async fn returning `(Arc<dyn Archive>, prefix)`,
    /// a prefix no other test uses, ending with `/`.
    #[macro_export]
    macro_rules! archive_conformance_suite {
        ($make:expr) => {
            $crate::archive_conformance_suite!(@tests $make;
                binary_bodies_round_trip,
                put_replaces_the_object,
                list_is_by_prefix_sorted_with_sizes,
                missing_objects_read_as_none,
                delete_removes_and_tolerates_absent,
                invalid_keys_are_refused);
        };
        (@tests $make:expr; $($name:ident),*) => {
            $(
                #[tokio::test]
                async fn $name() {
                    let (archive, prefix) = $make().await;
                    $crate::archive::conformance::$name(&*archive, &prefix).await;
                }
            )*
        };
    }
}
