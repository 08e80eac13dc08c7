//! `lattice:bindings/r2`: workerd R2 semantics over any [`ObjectBackend`].
//!
//! Conditional requests follow HTTP precedence as R2 does: a matching `etag-matches` makes
//! `uploaded-before` irrelevant, a non-matching `etag-does-not-match` makes `uploaded-after`
//! irrelevant. Multipart uploads keep their put options as part 0 in the backend, so an upload
//! can be completed from any pod.

use std::sync::Arc;

use lattice_backends::{ByteRange, HttpMetadata as BHttp, ObjectBackend, ObjectMeta};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use wasmtime::component::Resource;

use super::generated::lattice::bindings::r2::{
    Checksums, Conditional, GetOptions, GetResult, Host, HostBucket, HttpMetadata, ListOptions, ListResult,
    Object, PutOptions, Range, UploadedPart,
};
use super::{Fail, GuestError, decode_cursor, encode_cursor, finish, guest_error};
use crate::state::{Gate, WorkerState};

/// R2: longest key in bytes.
pub const MAX_KEY_SIZE_BYTES: usize = 1024;
/// R2: most objects one list returns (also the default), and most keys one delete takes.
pub const MAX_LIST_KEYS: u32 = 1000;
pub const MAX_DELETE_KEYS: usize = 1000;
/// R2: part numbers are 1..=10000.
pub const MAX_PART_NUMBER: u32 = 10_000;

pub struct Bucket {
    name: String,
    backend: Arc<dyn ObjectBackend>,
}

fn validate_key(key: &str) -> Result<(), GuestError> {
    if key.is_empty() {
        return Err(GuestError::Invalid("key must not be empty".into()));
    }
    if key.len() > MAX_KEY_SIZE_BYTES {
        return Err(GuestError::Invalid(format!("key longer than {MAX_KEY_SIZE_BYTES} bytes")));
    }
    Ok(())
}

fn http_to_backend(h: Option<HttpMetadata>) -> BHttp {
    let h = h.unwrap_or(HttpMetadata {
        content_type: None,
        content_language: None,
        content_disposition: None,
        content_encoding: None,
        cache_control: None,
        cache_expiry: None,
    });
    BHttp {
        content_type: h.content_type,
        content_language: h.content_language,
        content_disposition: h.content_disposition,
        content_encoding: h.content_encoding,
        cache_control: h.cache_control,
        cache_expiry: h.cache_expiry,
    }
}

pub(crate) fn object(m: ObjectMeta, range: Option<ByteRange>) -> Object {
    Object {
        http_etag: format!("\"{}\"", m.etag),
        key: m.key,
        version: m.version,
        size: m.size,
        etag: m.etag,
        uploaded: m.uploaded,
        http_metadata: HttpMetadata {
            content_type: m.http.content_type,
            content_language: m.http.content_language,
            content_disposition: m.http.content_disposition,
            content_encoding: m.http.content_encoding,
            cache_control: m.http.cache_control,
            cache_expiry: m.http.cache_expiry,
        },
        custom_metadata: m.custom,
        checksums: Checksums { md5: m.md5, sha256: m.sha256 },
        range: range.map(|r| (r.offset, r.length)),
    }
}

fn strip_quotes(s: &str) -> &str {
    s.trim().trim_matches('"')
}

/// Whether `meta` satisfies the conditions.
pub fn condition_holds(c: &Conditional, meta: &ObjectMeta) -> bool {
    let etag_matches = c.etag_matches.as_deref().map(|e| e == "*" || strip_quotes(e) == meta.etag);
    let etag_none = c.etag_does_not_match.as_deref().map(|e| !(e == "*" || strip_quotes(e) == meta.etag));
    if etag_matches == Some(false) || etag_none == Some(false) {
        return false;
    }
    if etag_matches != Some(true)
        && let Some(before) = c.uploaded_before
        && meta.uploaded >= before
    {
        return false;
    }
    if etag_none != Some(true)
        && let Some(after) = c.uploaded_after
        && meta.uploaded <= after
    {
        return false;
    }
    true
}

/// Resolves a requested range against an object's size.
pub fn resolve_range(r: &Range, size: u64) -> Result<ByteRange, GuestError> {
    let unsatisfiable = || GuestError::Invalid("The requested range is not satisfiable".into());
    match *r {
        Range::Offset((offset, length)) => {
            if offset > size || (offset == size && size > 0) {
                return Err(unsatisfiable());
            }
            let max = size - offset;
            Ok(ByteRange { offset, length: length.map_or(max, |l| l.min(max)) })
        }
        Range::Suffix(n) => {
            let n = n.min(size);
            Ok(ByteRange { offset: size - n, length: n })
        }
    }
}

fn new_version() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Options of a multipart upload, kept as its part 0.
#[derive(serde::Serialize, serde::Deserialize)]
struct UploadInfo {
    key: String,
    content_type: Option<String>,
    content_language: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    cache_control: Option<String>,
    cache_expiry: Option<u64>,
    custom: Vec<(String, String)>,
}

impl WorkerState {
    fn r2(&self, b: &Resource<Bucket>) -> wasmtime::Result<(String, Arc<dyn ObjectBackend>)> {
        let b = self.table.get(b)?;
        Ok((b.name.clone(), b.backend.clone()))
    }

    async fn r2_call<T>(
        &mut self,
        bucket: &str,
        backend: &Arc<dyn ObjectBackend>,
        fut: impl Future<Output = Result<T, lattice_backends::BackendError>>,
    ) -> Result<T, Fail> {
        let started = std::time::Instant::now();
        let out = self.waiting(Gate::Open, fut).await?;
        self.shared.metrics.binding_call("r2", backend.name(), started.elapsed(), out.is_err());
        Ok(out.map_err(|e| guest_error(bucket, e))?)
    }
}

impl WorkerState {
    async fn r2_head(&mut self, b: Resource<Bucket>, key: String) -> Result<Option<Object>, Fail> {
        validate_key(&key)?;
        let (name, backend) = self.r2(&b)?;
        let meta = self.r2_call(&name, &backend, backend.head(&name, &key)).await?;
        Ok(meta.map(|m| object(m, None)))
    }

    async fn r2_get(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        options: GetOptions,
    ) -> Result<GetResult, Fail> {
        validate_key(&key)?;
        let (name, backend) = self.r2(&b)?;
        let Some(meta) = self.r2_call(&name, &backend, backend.head(&name, &key)).await? else {
            return Ok(GetResult::NotFound);
        };
        if let Some(c) = &options.only_if
            && !condition_holds(c, &meta)
        {
            return Ok(GetResult::PreconditionFailed(object(meta, None)));
        }
        let range = match &options.range {
            Some(r) => Some(resolve_range(r, meta.size)?),
            None => None,
        };
        let got = self.r2_call(&name, &backend, backend.get(&name, &key, range)).await?;
        Ok(match got {
            // Deleted between head and get.
            None => GetResult::NotFound,
            Some((meta, body)) => GetResult::Found((object(meta, range), body)),
        })
    }

    async fn r2_put(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        body: Vec<u8>,
        options: PutOptions,
    ) -> Result<Option<Object>, Fail> {
        validate_key(&key)?;
        let max = self.shared.config.limits.r2_max_object_bytes;
        if body.len() as u64 > max {
            return Err(GuestError::TooLarge(format!("object larger than {max} bytes")).into());
        }
        let md5 = Md5::digest(&body).to_vec();
        let sha256 = Sha256::digest(&body).to_vec();
        if options.md5.as_ref().is_some_and(|want| *want != md5) {
            return Err(GuestError::Invalid(
                "The MD5 checksum you specified did not match what we received.".into(),
            )
            .into());
        }
        if options.sha256.as_ref().is_some_and(|want| *want != sha256) {
            return Err(GuestError::Invalid(
                "The SHA-256 checksum you specified did not match what we received.".into(),
            )
            .into());
        }
        let (name, backend) = self.r2(&b)?;
        if let Some(c) = &options.only_if {
            let existing = self.r2_call(&name, &backend, backend.head(&name, &key)).await?;
            let holds = match &existing {
                Some(m) => condition_holds(c, m),
                // Only `etag-matches` needs an existing object.
                None => c.etag_matches.is_none(),
            };
            if !holds {
                return Ok(None);
            }
        }
        let meta = ObjectMeta {
            key: key.clone(),
            version: new_version(),
            size: body.len() as u64,
            etag: hex::encode(&md5),
            uploaded: self.shared.clock.now_ms(),
            http: http_to_backend(options.http_metadata),
            custom: options.custom_metadata,
            md5: Some(md5),
            sha256: Some(sha256),
        };
        self.r2_call(&name, &backend, backend.put(&name, &meta, body)).await?;
        Ok(Some(object(meta, None)))
    }

    async fn r2_delete(&mut self, b: Resource<Bucket>, keys: Vec<String>) -> Result<(), Fail> {
        if keys.len() > MAX_DELETE_KEYS {
            return Err(GuestError::Invalid(format!("at most {MAX_DELETE_KEYS} keys per delete")).into());
        }
        for k in &keys {
            validate_key(k)?;
        }
        let (name, backend) = self.r2(&b)?;
        self.r2_call(&name, &backend, backend.delete(&name, &keys)).await
    }

    async fn r2_list(&mut self, b: Resource<Bucket>, options: ListOptions) -> Result<ListResult, Fail> {
        let limit = options.limit.unwrap_or(MAX_LIST_KEYS);
        if limit == 0 || limit > MAX_LIST_KEYS {
            return Err(GuestError::Invalid(format!("limit must be between 1 and {MAX_LIST_KEYS}")).into());
        }
        let from_cursor = match options.cursor.as_deref().map(decode_cursor).transpose() {
            Ok(c) => c,
            Err(e) => return Err(e.into()),
        };
        let start_after = match (from_cursor, options.start_after) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let (name, backend) = self.r2(&b)?;
        let prefix = options.prefix.unwrap_or_default();
        let list = self
            .r2_call(
                &name,
                &backend,
                backend.list(
                    &name,
                    &prefix,
                    options.delimiter.as_deref(),
                    start_after.as_deref(),
                    limit as usize,
                ),
            )
            .await?;
        let cursor = if list.truncated { list.cursor.as_deref().map(encode_cursor) } else { None };
        Ok(ListResult {
            objects: list.objects.into_iter().map(|m| object(m, None)).collect(),
            delimited_prefixes: list.delimited_prefixes,
            truncated: list.truncated,
            cursor,
        })
    }

    async fn r2_create_multipart_upload(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        options: PutOptions,
    ) -> Result<String, Fail> {
        validate_key(&key)?;
        let h = http_to_backend(options.http_metadata);
        let info = UploadInfo {
            key,
            content_type: h.content_type,
            content_language: h.content_language,
            content_disposition: h.content_disposition,
            content_encoding: h.content_encoding,
            cache_control: h.cache_control,
            cache_expiry: h.cache_expiry,
            custom: options.custom_metadata,
        };
        let upload_id = new_version();
        let (name, backend) = self.r2(&b)?;
        let bytes = serde_json::to_vec(&info)?;
        self.r2_call(&name, &backend, backend.put_part(&name, &upload_id, 0, bytes)).await?;
        Ok(upload_id)
    }

    async fn r2_upload_part(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        upload_id: String,
        part_number: u32,
        body: Vec<u8>,
    ) -> Result<UploadedPart, Fail> {
        validate_key(&key)?;
        if part_number == 0 || part_number > MAX_PART_NUMBER {
            return Err(
                GuestError::Invalid(format!("part number must be between 1 and {MAX_PART_NUMBER}")).into()
            );
        }
        let etag = hex::encode(Md5::digest(&body));
        let (name, backend) = self.r2(&b)?;
        self.r2_call(&name, &backend, backend.put_part(&name, &upload_id, part_number, body)).await?;
        Ok(UploadedPart { part_number, etag })
    }

    async fn r2_complete_multipart_upload(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        upload_id: String,
        parts: Vec<UploadedPart>,
    ) -> Result<Object, Fail> {
        validate_key(&key)?;
        if parts.is_empty() {
            return Err(GuestError::Invalid("no parts given".into()).into());
        }
        let mut numbers = vec![0];
        numbers.extend(parts.iter().map(|p| p.part_number));
        let (name, backend) = self.r2(&b)?;
        let Some(mut bodies) =
            self.r2_call(&name, &backend, backend.take_parts(&name, &upload_id, &numbers)).await?
        else {
            return Err(GuestError::Invalid("unknown upload id or missing part".into()).into());
        };
        if bodies.is_empty() {
            return Err(GuestError::Invalid("unknown upload id".into()).into());
        }
        let info: UploadInfo = match serde_json::from_slice(&bodies.remove(0)) {
            Ok(i) => i,
            Err(_) => return Err(GuestError::Invalid("unknown upload id".into()).into()),
        };
        if info.key != key {
            return Err(GuestError::Invalid("upload id belongs to another key".into()).into());
        }
        let mut part_md5s = Vec::new();
        for (p, body) in parts.iter().zip(&bodies) {
            let md5 = Md5::digest(body);
            if hex::encode(md5) != strip_quotes(&p.etag) {
                return Err(GuestError::Invalid(format!("part {} etag does not match", p.part_number)).into());
            }
            part_md5s.extend_from_slice(&md5);
        }
        let body: Vec<u8> = bodies.concat();
        let meta = ObjectMeta {
            key: key.clone(),
            version: new_version(),
            size: body.len() as u64,
            etag: format!("{}-{}", hex::encode(Md5::digest(&part_md5s)), parts.len()),
            uploaded: self.shared.clock.now_ms(),
            http: BHttp {
                content_type: info.content_type,
                content_language: info.content_language,
                content_disposition: info.content_disposition,
                content_encoding: info.content_encoding,
                cache_control: info.cache_control,
                cache_expiry: info.cache_expiry,
            },
            custom: info.custom,
            md5: None,
            sha256: Some(Sha256::digest(&body).to_vec()),
        };
        self.r2_call(&name, &backend, backend.put(&name, &meta, body)).await?;
        self.r2_call(&name, &backend, backend.abort_parts(&name, &upload_id)).await?;
        Ok(object(meta, None))
    }

    async fn r2_abort_multipart_upload(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        upload_id: String,
    ) -> Result<(), Fail> {
        validate_key(&key)?;
        let (name, backend) = self.r2(&b)?;
        self.r2_call(&name, &backend, backend.abort_parts(&name, &upload_id)).await
    }
}

impl HostBucket for WorkerState {
    async fn open(&mut self, binding: String) -> wasmtime::Result<Result<Resource<Bucket>, GuestError>> {
        let Some(backend) = self.shared.r2.get(&binding).cloned() else {
            return Ok(Err(GuestError::UnknownBinding(binding)));
        };
        Ok(Ok(self.table.push(Bucket { name: binding, backend })?))
    }

    async fn head(
        &mut self,
        b: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Object>, GuestError>> {
        finish(self.r2_head(b, key).await)
    }

    async fn get(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        options: GetOptions,
    ) -> wasmtime::Result<Result<GetResult, GuestError>> {
        finish(self.r2_get(b, key, options).await)
    }

    async fn put(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        body: Vec<u8>,
        options: PutOptions,
    ) -> wasmtime::Result<Result<Option<Object>, GuestError>> {
        finish(self.r2_put(b, key, body, options).await)
    }

    async fn delete(
        &mut self,
        b: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.r2_delete(b, keys).await)
    }

    async fn list(
        &mut self,
        b: Resource<Bucket>,
        options: ListOptions,
    ) -> wasmtime::Result<Result<ListResult, GuestError>> {
        finish(self.r2_list(b, options).await)
    }

    async fn create_multipart_upload(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        options: PutOptions,
    ) -> wasmtime::Result<Result<String, GuestError>> {
        finish(self.r2_create_multipart_upload(b, key, options).await)
    }

    async fn upload_part(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        upload_id: String,
        part_number: u32,
        body: Vec<u8>,
    ) -> wasmtime::Result<Result<UploadedPart, GuestError>> {
        finish(self.r2_upload_part(b, key, upload_id, part_number, body).await)
    }

    async fn complete_multipart_upload(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        upload_id: String,
        parts: Vec<UploadedPart>,
    ) -> wasmtime::Result<Result<Object, GuestError>> {
        finish(self.r2_complete_multipart_upload(b, key, upload_id, parts).await)
    }

    async fn abort_multipart_upload(
        &mut self,
        b: Resource<Bucket>,
        key: String,
        upload_id: String,
    ) -> wasmtime::Result<Result<(), GuestError>> {
        finish(self.r2_abort_multipart_upload(b, key, upload_id).await)
    }

    async fn drop(&mut self, rep: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(rep)?;
        Ok(())
    }
}

impl Host for WorkerState {}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(etag: &str, uploaded: u64) -> ObjectMeta {
        ObjectMeta { etag: etag.into(), uploaded, size: 10, ..Default::default() }
    }

    fn cond(m: Option<&str>, n: Option<&str>, before: Option<u64>, after: Option<u64>) -> Conditional {
        Conditional {
            etag_matches: m.map(Into::into),
            etag_does_not_match: n.map(Into::into),
            uploaded_before: before,
            uploaded_after: after,
        }
    }

    #[test]
    fn conditions_follow_http_precedence() {
        let m = meta("abc", 1000);
        let check = |c: Conditional, want: bool| assert_eq!(condition_holds(&c, &m), want, "{c:?}");
        check(cond(Some("abc"), None, None, None), true);
        check(cond(Some("\"abc\""), None, None, None), true);
        check(cond(Some("xyz"), None, None, None), false);
        check(cond(None, Some("abc"), None, None), false);
        check(cond(None, Some("xyz"), None, None), true);
        check(cond(None, None, Some(1000), None), false);
        check(cond(None, None, Some(1001), None), true);
        check(cond(None, None, None, Some(1000)), false);
        check(cond(None, None, None, Some(999)), true);
        // A matching etag makes uploaded-before irrelevant.
        check(cond(Some("abc"), None, Some(10), None), true);
        // A non-matching etag-does-not-match makes uploaded-after irrelevant.
        check(cond(None, Some("xyz"), None, Some(5000)), true);
    }

    #[test]
    fn ranges_resolve_against_size() {
        let r = |range: Range, size| resolve_range(&range, size).ok().map(|b| (b.offset, b.length));
        assert_eq!(r(Range::Offset((2, Some(3))), 10), Some((2, 3)));
        assert_eq!(r(Range::Offset((8, Some(5))), 10), Some((8, 2)));
        assert_eq!(r(Range::Offset((4, None)), 10), Some((4, 6)));
        assert_eq!(r(Range::Suffix(3), 10), Some((7, 3)));
        assert_eq!(r(Range::Suffix(30), 10), Some((0, 10)));
        assert_eq!(r(Range::Offset((11, None)), 10), None);
        assert_eq!(r(Range::Offset((10, None)), 10), None);
    }
}
