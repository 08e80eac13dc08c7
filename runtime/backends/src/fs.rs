//! R2 on a local directory: [`FsObjects`].
//!
//! Layout under the root directory:
//! - `index.sqlite`: one row per object (bucket, key, metadata as JSON, blob name), ordered by
//!   key bytes. Listing, prefixes and cursors come from this index.
//! - `blobs/<2 hex>/<32 hex>`: bodies, named by a random id drawn per write. A key never becomes
//!   a path, so no key can escape the directory or collide with another.
//! - `uploads/<sha256(bucket, upload id)>/<part number>`: multipart parts until take or abort.
//!
//! Every file is written to a temporary name in its final directory, fsynced, renamed, and the
//! directory fsynced. A put writes its blob first and then switches the index row to it in one
//! SQLite transaction, so a crash leaves either the old or the new object, plus at worst an
//! orphan blob; the replaced blob is deleted after the switch.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sqlite::{SqliteDb, prefix_end, unavailable};
use crate::{BackendError, ByteRange, HttpMetadata, ObjectBackend, ObjectList, ObjectMeta};

const BACKEND: &str = "fs";

/// Index rows read per query while building a list page.
const LIST_BATCH: usize = 256;

const INDEX_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL,
    key BLOB NOT NULL,
    blob TEXT NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
";

/// R2 on a local directory (see the module docs for the layout).
#[derive(Debug, Clone)]
pub struct FsObjects {
    root: PathBuf,
    index: SqliteDb,
}

/// What the index keeps of an [`ObjectMeta`], as JSON.
#[derive(Serialize, Deserialize)]
struct StoredMeta {
    version: String,
    size: u64,
    etag: String,
    uploaded: u64,
    content_type: Option<String>,
    content_language: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    cache_control: Option<String>,
    cache_expiry: Option<u64>,
    custom: Vec<(String, String)>,
    md5: Option<String>,
    sha256: Option<String>,
}

impl StoredMeta {
    fn from_meta(m: &ObjectMeta) -> Self {
        Self {
            version: m.version.clone(),
            size: m.size,
            etag: m.etag.clone(),
            uploaded: m.uploaded,
            content_type: m.http.content_type.clone(),
            content_language: m.http.content_language.clone(),
            content_disposition: m.http.content_disposition.clone(),
            content_encoding: m.http.content_encoding.clone(),
            cache_control: m.http.cache_control.clone(),
            cache_expiry: m.http.cache_expiry,
            custom: m.custom.clone(),
            md5: m.md5.as_ref().map(hex::encode),
            sha256: m.sha256.as_ref().map(hex::encode),
        }
    }

    fn into_meta(self, key: String) -> ObjectMeta {
        ObjectMeta {
            key,
            version: self.version,
            size: self.size,
            etag: self.etag,
            uploaded: self.uploaded,
            http: HttpMetadata {
                content_type: self.content_type,
                content_language: self.content_language,
                content_disposition: self.content_disposition,
                content_encoding: self.content_encoding,
                cache_control: self.cache_control,
                cache_expiry: self.cache_expiry,
            },
            custom: self.custom,
            md5: self.md5.and_then(|h| hex::decode(h).ok()),
            sha256: self.sha256.and_then(|h| hex::decode(h).ok()),
        }
    }
}

fn io_err(e: io::Error) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

fn json_err(e: serde_json::Error) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

/// Writes `data` to `path` atomically: temporary file in the same directory, fsync, rename,
/// fsync of the directory.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("path has no parent"))?;
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}", hex::encode(rand::random::<[u8; 12]>())));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Blob names are generated here, never taken from a request: 32 lowercase hex digits.
fn is_blob_name(name: &str) -> bool {
    name.len() == 32 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

impl FsObjects {
    pub async fn open(root: impl AsRef<Path>) -> Result<Self, BackendError> {
        let root = root.as_ref().to_path_buf();
        let dirs = root.clone();
        tokio::task::spawn_blocking(move || {
            fs::create_dir_all(dirs.join("blobs"))?;
            fs::create_dir_all(dirs.join("uploads"))
        })
        .await
        .map_err(|e| BackendError::unavailable(BACKEND, e))?
        .map_err(io_err)?;
        let index = SqliteDb::open(BACKEND, root.join("index.sqlite"), INDEX_SCHEMA).await?;
        Ok(Self { root, index })
    }

    fn blob_path(root: &Path, blob: &str) -> Option<PathBuf> {
        is_blob_name(blob).then(|| root.join("blobs").join(&blob[..2]).join(blob))
    }

    fn upload_dir(&self, bucket: &str, upload_id: &str) -> PathBuf {
        let mut h = Sha256::new();
        h.update(bucket.as_bytes());
        h.update([0]);
        h.update(upload_id.as_bytes());
        self.root.join("uploads").join(hex::encode(h.finalize()))
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        tokio::task::spawn_blocking(f).await.map_err(|e| BackendError::unavailable(BACKEND, e))?
    }

    async fn lookup(&self, bucket: &str, key: &str) -> Result<Option<(String, ObjectMeta)>, BackendError> {
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        self.index
            .call(move |conn| {
                let row: Option<(String, String)> = conn
                    .query_row(
                        "SELECT blob, meta FROM objects WHERE bucket=?1 AND key=?2",
                        params![bucket, key.as_bytes()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()
                    .map_err(unavailable(BACKEND))?;
                match row {
                    None => Ok(None),
                    Some((blob, meta)) => {
                        let meta: StoredMeta = serde_json::from_str(&meta).map_err(json_err)?;
                        Ok(Some((blob, meta.into_meta(key))))
                    }
                }
            })
            .await
    }
}

/// One step of a delimited listing: an object or a common prefix.
enum Item {
    Object(Box<ObjectMeta>),
    Prefix(String),
}

#[async_trait]
impl ObjectBackend for FsObjects {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, BackendError> {
        Ok(self.lookup(bucket, key).await?.map(|(_, meta)| meta))
    }

    async fn get(
        &self,
        bucket: &str,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<(ObjectMeta, Vec<u8>)>, BackendError> {
        let Some((blob, meta)) = self.lookup(bucket, key).await? else {
            return Ok(None);
        };
        let Some(path) = Self::blob_path(&self.root, &blob) else {
            return Err(BackendError::unavailable(BACKEND, format!("corrupt blob name {blob:?}")));
        };
        Self::blocking(move || {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                // Replaced between the index read and the open: the object moved on.
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_err(e)),
            };
            let body = match range {
                None => {
                    let mut body = Vec::with_capacity(usize::try_from(meta.size).unwrap_or(0));
                    f.read_to_end(&mut body).map_err(io_err)?;
                    body
                }
                Some(r) => {
                    f.seek(SeekFrom::Start(r.offset)).map_err(io_err)?;
                    let mut body = Vec::with_capacity(usize::try_from(r.length).unwrap_or(0));
                    f.take(r.length).read_to_end(&mut body).map_err(io_err)?;
                    body
                }
            };
            Ok(Some((meta, body)))
        })
        .await
    }

    async fn put(&self, bucket: &str, meta: &ObjectMeta, body: Vec<u8>) -> Result<(), BackendError> {
        let blob = hex::encode(rand::random::<[u8; 16]>());
        let root = self.root.clone();
        let Some(path) = Self::blob_path(&root, &blob) else {
            return Err(BackendError::unavailable(BACKEND, "generated an invalid blob name"));
        };
        Self::blocking(move || write_atomic(&path, &body).map_err(io_err)).await?;

        let stored = serde_json::to_string(&StoredMeta::from_meta(meta)).map_err(json_err)?;
        let (bucket, key, new_blob) = (bucket.to_owned(), meta.key.clone(), blob.clone());
        let switched = self
            .index
            .call(move |conn| {
                let tx = conn.transaction().map_err(unavailable(BACKEND))?;
                let old: Option<String> = tx
                    .query_row(
                        "SELECT blob FROM objects WHERE bucket=?1 AND key=?2",
                        params![bucket, key.as_bytes()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(unavailable(BACKEND))?;
                tx.execute(
                    "INSERT OR REPLACE INTO objects (bucket, key, blob, meta) VALUES (?1, ?2, ?3, ?4)",
                    params![bucket, key.as_bytes(), new_blob, stored],
                )
                .map_err(unavailable(BACKEND))?;
                tx.commit().map_err(unavailable(BACKEND))?;
                Ok(old)
            })
            .await;
        let old = match switched {
            Ok(old) => old,
            Err(e) => {
                let root = self.root.clone();
                let _ = Self::blocking(move || {
                    if let Some(p) = Self::blob_path(&root, &blob) {
                        let _ = remove_if_exists(&p);
                    }
                    Ok(())
                })
                .await;
                return Err(e);
            }
        };
        if let Some(old) = old {
            let root = self.root.clone();
            Self::blocking(move || match Self::blob_path(&root, &old) {
                Some(p) => remove_if_exists(&p).map_err(io_err),
                None => Ok(()),
            })
            .await?;
        }
        Ok(())
    }

    async fn delete(&self, bucket: &str, keys: &[String]) -> Result<(), BackendError> {
        let (bucket, keys) = (bucket.to_owned(), keys.to_vec());
        let blobs = self
            .index
            .call(move |conn| {
                let tx = conn.transaction().map_err(unavailable(BACKEND))?;
                let mut blobs = Vec::new();
                for key in &keys {
                    let blob: Option<String> = tx
                        .query_row(
                            "DELETE FROM objects WHERE bucket=?1 AND key=?2 RETURNING blob",
                            params![bucket, key.as_bytes()],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(unavailable(BACKEND))?;
                    blobs.extend(blob);
                }
                tx.commit().map_err(unavailable(BACKEND))?;
                Ok(blobs)
            })
            .await?;
        let root = self.root.clone();
        Self::blocking(move || {
            for blob in blobs {
                if let Some(p) = Self::blob_path(&root, &blob) {
                    remove_if_exists(&p).map_err(io_err)?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ObjectList, BackendError> {
        let bucket = bucket.to_owned();
        let prefix = prefix.to_owned();
        let delimiter = delimiter.filter(|d| !d.is_empty()).map(str::to_owned);
        let start_after = start_after.map(str::to_owned);
        self.index
            .call(move |conn| {
                let upper = prefix_end(prefix.as_bytes());
                // Lower bound: (key, inclusive).
                let mut lower: (Vec<u8>, bool) = match &start_after {
                    Some(s) if s.as_bytes() >= prefix.as_bytes() => (s.as_bytes().to_vec(), false),
                    _ => (prefix.as_bytes().to_vec(), true),
                };
                let mut items: Vec<Item> = Vec::new();
                let mut truncated = false;
                'scan: loop {
                    let sql = format!(
                        "SELECT key, meta FROM objects WHERE bucket=?1 AND key {} ?2
                         AND (?3 IS NULL OR key < ?3) ORDER BY key LIMIT {LIST_BATCH}",
                        if lower.1 { ">=" } else { ">" }
                    );
                    let mut stmt = conn.prepare_cached(&sql).map_err(unavailable(BACKEND))?;
                    let rows = stmt
                        .query_map(params![bucket, lower.0, upper], |r| {
                            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?))
                        })
                        .map_err(unavailable(BACKEND))?
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(unavailable(BACKEND))?;
                    if rows.is_empty() {
                        break;
                    }
                    let batch_len = rows.len();
                    for (key, meta) in rows {
                        let key = String::from_utf8_lossy(&key).into_owned();
                        lower = (key.as_bytes().to_vec(), false);
                        let common = delimiter.as_ref().and_then(|d| {
                            let rest = key.get(prefix.len()..)?;
                            rest.find(d.as_str()).map(|i| key[..prefix.len() + i + d.len()].to_owned())
                        });
                        let item = match common {
                            Some(cp) => {
                                // Skip the rest of this prefix's keys in one jump.
                                if let Some(end) = prefix_end(cp.as_bytes()) {
                                    lower = (end, true);
                                }
                                if start_after.as_deref().is_some_and(|s| cp.as_str() <= s) {
                                    continue;
                                }
                                Item::Prefix(cp)
                            }
                            None => {
                                let meta: StoredMeta = serde_json::from_str(&meta).map_err(json_err)?;
                                Item::Object(Box::new(meta.into_meta(key)))
                            }
                        };
                        if items.len() == limit {
                            truncated = true;
                            break 'scan;
                        }
                        items.push(item);
                        if matches!(items.last(), Some(Item::Prefix(_))) {
                            // The jump above changed the bound: query again from there.
                            continue 'scan;
                        }
                    }
                    if batch_len < LIST_BATCH {
                        break;
                    }
                }
                let mut list = ObjectList { truncated, ..ObjectList::default() };
                let mut last = None;
                for item in items {
                    match item {
                        Item::Object(m) => {
                            last = Some(m.key.clone());
                            list.objects.push(*m);
                        }
                        Item::Prefix(p) => {
                            last = Some(p.clone());
                            list.delimited_prefixes.push(p);
                        }
                    }
                }
                if truncated {
                    list.cursor = last;
                }
                Ok(list)
            })
            .await
    }

    async fn put_part(
        &self,
        bucket: &str,
        upload_id: &str,
        part_number: u32,
        body: Vec<u8>,
    ) -> Result<(), BackendError> {
        let path = self.upload_dir(bucket, upload_id).join(part_number.to_string());
        Self::blocking(move || write_atomic(&path, &body).map_err(io_err)).await
    }

    async fn take_parts(
        &self,
        bucket: &str,
        upload_id: &str,
        part_numbers: &[u32],
    ) -> Result<Option<Vec<Vec<u8>>>, BackendError> {
        let dir = self.upload_dir(bucket, upload_id);
        let part_numbers = part_numbers.to_vec();
        Self::blocking(move || {
            let mut parts = Vec::with_capacity(part_numbers.len());
            for n in part_numbers {
                match fs::read(dir.join(n.to_string())) {
                    Ok(body) => parts.push(body),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(io_err(e)),
                }
            }
            match fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(e)),
                _ => {}
            }
            Ok(Some(parts))
        })
        .await
    }

    async fn abort_parts(&self, bucket: &str, upload_id: &str) -> Result<(), BackendError> {
        let dir = self.upload_dir(bucket, upload_id);
        Self::blocking(move || match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(e)),
            _ => Ok(()),
        })
        .await
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let root = self.root.clone();
        Self::blocking(move || fs::metadata(root.join("blobs")).map(drop).map_err(io_err)).await
    }
}
