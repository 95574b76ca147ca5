//! Where finished export files are kept: the local data directory, or an S3-compatible bucket.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{Attribute, Attributes, ObjectStore};
use tokio::io::{AsyncRead, AsyncWriteExt};

use crate::config::{S3Serve, StorageConfig, StorageKind};
use crate::export::model::FilePart;

/// Part size of multipart uploads: memory per upload stays at about this much.
const UPLOAD_PART_BYTES: usize = 8 * 1024 * 1024;

/// Errors of the object store.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The bucket could not be set up from config.
    #[error("object storage setup: {0}")]
    Setup(String),
    /// A request to the bucket failed.
    #[error("object storage: {0}")]
    Remote(#[from] object_store::Error),
    /// Uploading a file failed (reading it, or sending it to the bucket).
    #[error("uploading {name}: {source}")]
    Upload {
        name: String,
        source: std::io::Error,
    },
}

/// The configured storage.
pub enum Storage {
    /// Files stay in the data directory.
    Local,
    /// Files are uploaded to a bucket when their job completes.
    S3(Bucket),
}

/// An S3-compatible bucket and how its files reach clients.
pub struct Bucket {
    store: Arc<AmazonS3>,
    prefix: String,
    serve: S3Serve,
    presign_expiry: Duration,
}

/// A file's body, streamed from wherever it is kept.
pub type FileReader = Box<dyn AsyncRead + Send + Unpin>;

impl Storage {
    /// Builds the storage; S3 credentials come from the standard `AWS_*` environment variables.
    pub fn from_config(cfg: &StorageConfig) -> Result<Self, StorageError> {
        let StorageKind::S3 = cfg.kind else {
            return Ok(Storage::Local);
        };
        let s3 = cfg.s3.as_ref().ok_or_else(|| {
            StorageError::Setup("storage.kind = \"s3\" needs a [storage.s3] table".into())
        })?;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&s3.bucket)
            .with_region(&s3.region)
            // Path-style requests work with every S3-compatible server, virtual hosts need DNS.
            .with_virtual_hosted_style_request(false);
        if let Some(endpoint) = &s3.endpoint {
            builder = builder
                .with_endpoint(endpoint.as_str().trim_end_matches('/'))
                .with_allow_http(endpoint.scheme() == "http");
        }
        let store = builder
            .build()
            .map_err(|e| StorageError::Setup(e.to_string()))?;
        Ok(Storage::S3(Bucket {
            store: Arc::new(store),
            prefix: s3.prefix.clone(),
            serve: s3.serve,
            presign_expiry: Duration::from_secs(s3.presign_expiry_secs),
        }))
    }

    /// The bucket, when files go to one.
    pub fn bucket(&self) -> Option<&Bucket> {
        match self {
            Storage::Local => None,
            Storage::S3(b) => Some(b),
        }
    }
}

impl Bucket {
    fn key(&self, job_id: &str, name: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{job_id}/{name}", self.prefix))
    }

    /// Whether clients fetch files from the bucket directly (presigned URLs).
    pub fn presigned(&self) -> bool {
        self.serve == S3Serve::Presigned
    }

    /// Uploads the job's files from `dir`, streaming each through a multipart upload, with the
    /// content type and encoding a presigned download should carry.
    pub async fn upload(
        &self,
        job_id: &str,
        dir: &Path,
        files: &[FilePart],
    ) -> Result<(), StorageError> {
        for part in files {
            let name = &part.name;
            let failed = |source| StorageError::Upload {
                name: name.clone(),
                source,
            };
            let file = tokio::fs::File::open(dir.join(name))
                .await
                .map_err(failed)?;
            // A presigned download reaches the client as stored, and many clients read only the
            // first of a series of gzip members (the previous release's files): store one stream.
            let mut file: FileReader = if part.gzip && part.stream.is_none() {
                crate::files::rejoin_members(Box::new(file))
            } else {
                Box::new(file)
            };
            let mut attributes = Attributes::new();
            attributes.insert(Attribute::ContentType, "application/fhir+ndjson".into());
            if part.gzip {
                attributes.insert(Attribute::ContentEncoding, "gzip".into());
            }
            let mut writer = BufWriter::with_capacity(
                self.store.clone(),
                self.key(job_id, name),
                UPLOAD_PART_BYTES,
            )
            .with_attributes(attributes);
            if let Err(e) = tokio::io::copy(&mut file, &mut writer).await {
                writer.abort().await?;
                return Err(failed(e));
            }
            writer.shutdown().await.map_err(failed)?;
        }
        Ok(())
    }

    /// Streams one stored file.
    pub async fn open(&self, job_id: &str, name: &str) -> Result<(FileReader, u64), StorageError> {
        let result = self.store.get(&self.key(job_id, name)).await?;
        let size = result.meta.size;
        let stream = result.into_stream().map_err(std::io::Error::other);
        Ok((Box::new(tokio_util::io::StreamReader::new(stream)), size))
    }

    /// A presigned GET URL of a file, valid for the configured time but never past `remaining`.
    pub async fn presigned_url(
        &self,
        job_id: &str,
        name: &str,
        remaining: Duration,
    ) -> Result<String, StorageError> {
        let expiry = self
            .presign_expiry
            .min(remaining)
            .max(Duration::from_secs(1));
        let url = self
            .store
            .signed_url(hyper::Method::GET, &self.key(job_id, name), expiry)
            .await?;
        Ok(url.to_string())
    }

    /// Deletes every object of a job (also those of an upload a crash interrupted).
    pub async fn delete_job(&self, job_id: &str) -> Result<(), StorageError> {
        let prefix = ObjectPath::from(format!("{}{job_id}", self.prefix));
        let keys: Vec<ObjectPath> = self
            .store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        for key in keys {
            self.store.delete(&key).await?;
        }
        Ok(())
    }
}
