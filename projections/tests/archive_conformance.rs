//! The archive port's conformance suite, the same test code on both adapters: S3 (a local
//! S3-compatible server on S3_ENDPOINT, default 127.0.0.1:5000, bucket `enablement-test`,
//! credentials test/test; `.ci/services.sh` starts one) and a local directory. Each test writes
//! under a unique prefix and deletes what it wrote.
use std::sync::Arc;

use creto_projections::archive::Archive;

fn unique_prefix() -> String {
    format!("t{}/", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

mod s3_archive {
    use super::*;
    use creto_projections::archive::{ArchiveError, S3Archive, S3Settings};

    fn settings(bucket: &str) -> S3Settings {
        S3Settings {
            endpoint: Some(
                std::env::var("S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:5000".into()),
            ),
            region: "us-east-1".into(),
            bucket: bucket.into(),
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            force_path_style: true,
        }
    }

    async fn make() -> (Arc<dyn Archive>, String) {
        let archive = S3Archive::new(settings("enablement-test"));
        archive
            .ensure_bucket()
            .await
            .expect("S3 reachable (bash .ci/services.sh starts one)");
        (Arc::new(archive), unique_prefix())
    }

    creto_projections::archive_conformance_suite!(make);

    /// Not part of the suite (a directory has no bucket): a missing bucket is an error that
    /// names it, never an empty archive.
    #[tokio::test]
    async fn a_missing_bucket_is_unavailable_not_empty() {
        let bucket = format!(
            "absent-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let archive = S3Archive::new(settings(&bucket));
        let results = [
            archive.get("a/b").await.map(|_| ()),
            archive.list("a/").await.map(|_| ()),
            archive.put("a/b", "x".into(), "text/plain").await,
        ];
        for result in results {
            match result {
                Err(ArchiveError::Unavailable(m)) => {
                    assert!(m.contains(&format!("s3://{bucket} at ")), "{m}");
                    assert!(m.contains("NoSuchBucket"), "{m}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}

mod local_dir_archive {
    use super::*;
    use bytes::Bytes;
    use creto_projections::archive::{ArchiveError, ArchivedObject, LocalDirArchive};

    /// The adapter with its temporary root, removed when the test drops the archive.
    struct InTempDir {
        archive: LocalDirArchive,
        _root: tempfile::TempDir,
    }

    #[async_trait::async_trait]
    impl Archive for InTempDir {
        async fn put(
            &self,
            key: &str,
            body: Bytes,
            content_type: &str,
        ) -> Result<(), ArchiveError> {
            self.archive.put(key, body, content_type).await
        }
        async fn get(&self, key: &str) -> Result<Option<Bytes>, ArchiveError> {
            self.archive.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<ArchivedObject>, ArchiveError> {
            self.archive.list(prefix).await
        }
        async fn delete(&self, key: &str) -> Result<(), ArchiveError> {
            self.archive.delete(key).await
        }
        fn describe(&self) -> String {
            self.archive.describe()
        }
    }

    async fn make() -> (Arc<dyn Archive>, String) {
        let root = tempfile::Builder::new()
            .prefix("archive-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let archive = InTempDir {
            archive: LocalDirArchive::new(root.path().to_path_buf()),
            _root: root,
        };
        (Arc::new(archive), unique_prefix())
    }

    creto_projections::archive_conformance_suite!(make);
}
