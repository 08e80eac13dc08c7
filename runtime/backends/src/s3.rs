//! R2 on any S3 API: [`S3Objects`].
//!
//! Requests are presigned with `rusty-s3` (SigV4 in the query string, every `x-amz-*` header
//! signed) and sent with hyper-util's pooled client over HTTP/1.1. `http://` endpoints go in
//! the clear (a store next to the runtime); `https://` endpoints use the rustls client
//! configuration the caller passes in [`S3Config::tls`] (the runtime passes its own: system
//! roots plus the binding's extra CAs, PQ key exchange preferred).
//!
//! Layout in the configured S3 bucket:
//! - `<r2 bucket>/<key>`: objects. One S3 bucket can back several R2 bindings; an R2 bucket name
//!   must not contain `/` nor start with `.`.
//! - `.lattice-multipart/<r2 bucket>/<hex(upload id)>/<part>`: multipart parts, deleted by
//!   `take_parts` and `abort_parts`.
//!
//! Metadata: the HTTP fields travel as the standard headers (`Content-Type`, ...); a value that
//! is not a visible-ASCII header value is kept percent-encoded in `x-amz-meta-lattice-h-<field>`
//! instead. Our fields are `x-amz-meta-lattice-{version,etag,size,uploaded,md5,sha256,
//! cache-expiry}`; custom metadata is one percent-encoded JSON array in
//! `x-amz-meta-lattice-custom`, because S3 lower-cases header names and restricts their
//! characters, while R2 custom metadata names are arbitrary and case-sensitive.
//!
//! `list` is `ListObjectsV2` then one `HEAD` per object for its metadata (N+1 requests, sent
//! [`HEAD_CONCURRENCY`] at a time): S3 listings carry no metadata.
//!
//! Every request has a deadline ([`REQUEST_TIMEOUT`] by default; connecting,
//! [`CONNECT_TIMEOUT`]).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rusty_s3::actions::ListObjectsV2;
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use url::Url;

use crate::{BackendError, ByteRange, HttpMetadata, ObjectBackend, ObjectList, ObjectMeta};

const BACKEND: &str = "s3";

/// Deadline for establishing a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline for one request, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a presigned URL stays valid; it is used at once.
const PRESIGN_FOR: Duration = Duration::from_secs(300);
/// HEAD requests in flight at once while listing.
pub const HEAD_CONCURRENCY: usize = 8;
/// Where multipart parts live.
const MULTIPART_PREFIX: &str = ".lattice-multipart/";
const META: &str = "x-amz-meta-lattice-";

/// Where and how to reach the S3 store.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// `http://host:port` or `https://host:port`, with an optional path prefix.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    /// `http://endpoint/bucket/key` instead of `http://bucket.endpoint/key`.
    pub path_style: bool,
    /// TLS client configuration for an `https://` endpoint; required for one.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

#[derive(Clone)]
pub struct S3Objects {
    bucket: Bucket,
    credentials: Credentials,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request_timeout: Duration,
}

impl std::fmt::Debug for S3Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Objects").field("bucket", &self.bucket.name()).finish_non_exhaustive()
    }
}

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

/// Percent-encodes everything but unreserved characters.
fn pct_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn pct_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn is_plain_header_value(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b)) && s.trim() == s
}

/// The HTTP fields: (standard header, field name in our meta header).
const HTTP_FIELDS: [(&str, &str); 5] = [
    ("content-type", "content-type"),
    ("content-language", "content-language"),
    ("content-disposition", "content-disposition"),
    ("content-encoding", "content-encoding"),
    ("cache-control", "cache-control"),
];

fn http_field(http: &HttpMetadata, i: usize) -> &Option<String> {
    match i {
        0 => &http.content_type,
        1 => &http.content_language,
        2 => &http.content_disposition,
        3 => &http.content_encoding,
        _ => &http.cache_control,
    }
}

fn http_field_mut(http: &mut HttpMetadata, i: usize) -> &mut Option<String> {
    match i {
        0 => &mut http.content_type,
        1 => &mut http.content_language,
        2 => &mut http.content_disposition,
        3 => &mut http.content_encoding,
        _ => &mut http.cache_control,
    }
}

/// Header names and values.
type Headers = Vec<(String, String)>;

/// Headers for a put: (signed `x-amz-meta-*` headers, unsigned standard headers).
fn meta_headers(meta: &ObjectMeta) -> Result<(Headers, Headers), BackendError> {
    let mut amz = vec![
        (format!("{META}version"), pct_encode(&meta.version)),
        (format!("{META}etag"), pct_encode(&meta.etag)),
        (format!("{META}size"), meta.size.to_string()),
        (format!("{META}uploaded"), meta.uploaded.to_string()),
    ];
    if let Some(md5) = &meta.md5 {
        amz.push((format!("{META}md5"), hex::encode(md5)));
    }
    if let Some(sha) = &meta.sha256 {
        amz.push((format!("{META}sha256"), hex::encode(sha)));
    }
    if let Some(exp) = meta.http.cache_expiry {
        amz.push((format!("{META}cache-expiry"), exp.to_string()));
    }
    if !meta.custom.is_empty() {
        let json = serde_json::to_string(&meta.custom).map_err(unavailable)?;
        amz.push((format!("{META}custom"), pct_encode(&json)));
    }
    let mut standard = Vec::new();
    for (i, (header, field)) in HTTP_FIELDS.iter().enumerate() {
        if let Some(v) = http_field(&meta.http, i) {
            if is_plain_header_value(v) && !v.is_empty() {
                standard.push(((*header).to_owned(), v.clone()));
            } else {
                amz.push((format!("{META}h-{field}"), pct_encode(v)));
            }
        }
    }
    Ok((amz, standard))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Rebuilds an [`ObjectMeta`] from a HEAD or GET response. Objects written by other tools
/// (without our headers) get what S3 tells: its ETag as etag and version, its length.
fn meta_from_headers(key: &str, h: &HeaderMap) -> ObjectMeta {
    let ours = |name: &str| header_str(h, &format!("{META}{name}"));
    let s3_etag = header_str(h, "etag").map(|e| e.trim_matches('"').to_owned()).unwrap_or_default();
    let total_size = header_str(h, "content-range")
        .and_then(|r| r.rsplit('/').next())
        .and_then(|n| n.parse().ok())
        .or_else(|| header_str(h, "content-length").and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let mut http = HttpMetadata::default();
    for (i, (header, field)) in HTTP_FIELDS.iter().enumerate() {
        let v = ours(&format!("h-{field}"))
            .and_then(pct_decode)
            .or_else(|| header_str(h, header).map(str::to_owned));
        *http_field_mut(&mut http, i) = v;
    }
    http.cache_expiry = ours("cache-expiry").and_then(|v| v.parse().ok());
    let custom = ours("custom")
        .and_then(pct_decode)
        .and_then(|j| serde_json::from_str::<Vec<(String, String)>>(&j).ok())
        .unwrap_or_default();
    ObjectMeta {
        key: key.to_owned(),
        version: ours("version").and_then(pct_decode).unwrap_or_else(|| s3_etag.clone()),
        size: ours("size").and_then(|v| v.parse().ok()).unwrap_or(total_size),
        etag: ours("etag").and_then(pct_decode).unwrap_or(s3_etag),
        uploaded: ours("uploaded").and_then(|v| v.parse().ok()).unwrap_or(0),
        http,
        custom,
        md5: ours("md5").and_then(|v| hex::decode(v).ok()),
        sha256: ours("sha256").and_then(|v| hex::decode(v).ok()),
    }
}

struct Response {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

fn failure(what: &str, r: &Response) -> BackendError {
    let body = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
    unavailable(format!("{what}: HTTP {}: {body}", r.status))
}

impl S3Objects {
    pub fn new(config: &S3Config) -> Result<Self, BackendError> {
        let endpoint: Url = config.endpoint.parse().map_err(unavailable)?;
        let tls = match (endpoint.scheme(), &config.tls) {
            ("http", _) => None,
            ("https", Some(tls)) => {
                // The connector sets ALPN itself (http/1.1 only: this client does not speak
                // h2) and refuses a configuration that already has some.
                let mut tls = (**tls).clone();
                tls.alpn_protocols.clear();
                Some(tls)
            }
            ("https", None) => {
                return Err(unavailable(format!(
                    "S3 endpoint {endpoint}: https:// needs a TLS client configuration"
                )));
            }
            (other, _) => {
                return Err(unavailable(format!(
                    "S3 endpoint {endpoint}: scheme {other}:// is not http or https"
                )));
            }
        };
        let style = if config.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket = Bucket::new(endpoint, style, config.bucket.clone(), config.region.clone())
            .map_err(|e| unavailable(format!("S3 bucket: {e:?}")))?;
        let credentials = Credentials::new(config.access_key.clone(), config.secret_key.clone());
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let connector = match tls {
            Some(tls) => HttpsConnectorBuilder::new().with_tls_config(tls).https_only(),
            // No TLS configuration: `https_or_http` with an empty root store is never used
            // for https, because the scheme check above refused it.
            None => HttpsConnectorBuilder::new()
                .with_tls_config(
                    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                        rustls::crypto::aws_lc_rs::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .map_err(unavailable)?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth(),
                )
                .https_or_http(),
        }
        .enable_http1()
        .wrap_connector(connector);
        let client =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector);
        Ok(Self { bucket, credentials, client, request_timeout: REQUEST_TIMEOUT })
    }

    /// Overrides [`REQUEST_TIMEOUT`].
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    fn object_key(bucket: &str, key: &str) -> Result<String, BackendError> {
        if bucket.is_empty() || bucket.contains('/') || bucket.starts_with('.') {
            return Err(unavailable(format!("invalid R2 bucket name {bucket:?} for S3")));
        }
        Ok(format!("{bucket}/{key}"))
    }

    fn upload_prefix(bucket: &str, upload_id: &str) -> String {
        format!("{MULTIPART_PREFIX}{bucket}/{}/", hex::encode(upload_id.as_bytes()))
    }

    async fn send(
        &self,
        method: Method,
        url: Url,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Result<Response, BackendError> {
        let mut req = http::Request::builder().method(method.clone()).uri(url.as_str());
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(unavailable)?;
            let value = HeaderValue::from_str(v).map_err(unavailable)?;
            req = req.header(name, value);
        }
        if matches!(method, Method::PUT | Method::POST) {
            req = req.header(http::header::CONTENT_LENGTH, body.len());
        }
        let req = req.body(Full::new(body)).map_err(unavailable)?;
        let work = async {
            let resp = self.client.request(req).await.map_err(unavailable)?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(unavailable)?.to_bytes();
            Ok(Response { status: parts.status, headers: parts.headers, body })
        };
        match tokio::time::timeout(self.request_timeout, work).await {
            Ok(r) => r,
            Err(elapsed) => Err(unavailable(elapsed)),
        }
    }

    async fn head_raw(&self, object: &str) -> Result<Option<HeaderMap>, BackendError> {
        let url = self.bucket.head_object(Some(&self.credentials), object).sign(PRESIGN_FOR);
        let r = self.send(Method::HEAD, url, &[], Bytes::new()).await?;
        match r.status {
            s if s.is_success() => Ok(Some(r.headers)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(failure("HEAD", &r)),
        }
    }

    async fn get_raw(
        &self,
        object: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<(HeaderMap, Bytes)>, BackendError> {
        let url = self.bucket.get_object(Some(&self.credentials), object).sign(PRESIGN_FOR);
        let mut headers = Vec::new();
        if let Some(r) = range {
            let last = r.offset + r.length - 1;
            headers.push(("range".to_owned(), format!("bytes={}-{last}", r.offset)));
        }
        let r = self.send(Method::GET, url, &headers, Bytes::new()).await?;
        match r.status {
            s if s.is_success() => Ok(Some((r.headers, r.body))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(failure("GET", &r)),
        }
    }

    async fn put_raw(
        &self,
        object: &str,
        amz: &[(String, String)],
        standard: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<(), BackendError> {
        let mut action = self.bucket.put_object(Some(&self.credentials), object);
        for (k, v) in amz {
            action.headers_mut().insert(k.clone(), v.clone());
        }
        let url = action.sign(PRESIGN_FOR);
        let mut headers: Vec<(String, String)> = amz.to_vec();
        headers.extend_from_slice(standard);
        let r = self.send(Method::PUT, url, &headers, Bytes::from(body)).await?;
        if r.status.is_success() { Ok(()) } else { Err(failure("PUT", &r)) }
    }

    async fn delete_raw(&self, object: &str) -> Result<(), BackendError> {
        let url = self.bucket.delete_object(Some(&self.credentials), object).sign(PRESIGN_FOR);
        let r = self.send(Method::DELETE, url, &[], Bytes::new()).await?;
        if r.status.is_success() || r.status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(failure("DELETE", &r))
        }
    }

    /// One page of `ListObjectsV2`: (objects, common prefixes, continuation token), with full
    /// S3 keys.
    async fn list_page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        token: Option<&str>,
        max_keys: usize,
    ) -> Result<(Vec<String>, Vec<String>, Option<String>), BackendError> {
        let mut action = ListObjectsV2::new(&self.bucket, Some(&self.credentials));
        // Raw keys in the XML: some servers echo `encoding-type=url` without encoding, and
        // decoding then would corrupt keys holding `+` or `%`.
        action.query_mut().remove("encoding-type");
        if !prefix.is_empty() {
            action.with_prefix(prefix);
        }
        if let Some(d) = delimiter {
            action.with_delimiter(d);
        }
        if let Some(s) = start_after {
            action.with_start_after(s);
        }
        if let Some(t) = token {
            action.with_continuation_token(t);
        }
        action.with_max_keys(max_keys);
        let url = action.sign(PRESIGN_FOR);
        let r = self.send(Method::GET, url, &[], Bytes::new()).await?;
        if !r.status.is_success() {
            return Err(failure("ListObjectsV2", &r));
        }
        let text = std::str::from_utf8(&r.body).map_err(unavailable)?;
        let parsed = ListObjectsV2::parse_response(text)
            .map_err(|e| unavailable(format!("ListObjectsV2 response: {e}")))?;
        Ok((
            parsed.contents.into_iter().map(|c| c.key).collect(),
            parsed.common_prefixes.into_iter().map(|p| p.prefix).collect(),
            parsed.next_continuation_token,
        ))
    }

    /// Every key under `prefix` (for multipart clean-up).
    async fn keys_under(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let (objects, _, next) = self.list_page(prefix, None, None, token.as_deref(), 1000).await?;
            keys.extend(objects);
            match next {
                Some(t) => token = Some(t),
                None => return Ok(keys),
            }
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

#[async_trait]
impl ObjectBackend for S3Objects {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectMeta>, BackendError> {
        let object = Self::object_key(bucket, key)?;
        Ok(self.head_raw(&object).await?.map(|h| meta_from_headers(key, &h)))
    }

    async fn get(
        &self,
        bucket: &str,
        key: &str,
        range: Option<ByteRange>,
    ) -> Result<Option<(ObjectMeta, Vec<u8>)>, BackendError> {
        let object = Self::object_key(bucket, key)?;
        if range.is_some_and(|r| r.length == 0) {
            // An empty range has no `Range` header form.
            return Ok(self.head_raw(&object).await?.map(|h| (meta_from_headers(key, &h), Vec::new())));
        }
        Ok(self.get_raw(&object, range).await?.map(|(h, body)| (meta_from_headers(key, &h), body.to_vec())))
    }

    async fn put(&self, bucket: &str, meta: &ObjectMeta, body: Vec<u8>) -> Result<(), BackendError> {
        let object = Self::object_key(bucket, &meta.key)?;
        let (amz, standard) = meta_headers(meta)?;
        self.put_raw(&object, &amz, &standard, body).await
    }

    async fn delete(&self, bucket: &str, keys: &[String]) -> Result<(), BackendError> {
        for key in keys {
            let object = Self::object_key(bucket, key)?;
            self.delete_raw(&object).await?;
        }
        Ok(())
    }

    async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ObjectList, BackendError> {
        let base = Self::object_key(bucket, "")?;
        let full_prefix = format!("{base}{prefix}");
        let delimiter = delimiter.filter(|d| !d.is_empty());
        let full_start = start_after.map(|s| format!("{base}{s}"));
        // Gather up to `limit + 1` items (objects and prefixes, merged in key order) to know
        // whether the listing is truncated.
        enum Item {
            Object(String),
            Prefix(String),
        }
        let mut items: Vec<Item> = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let want = (limit + 1 - items.len()).clamp(1, 1000);
            let (objects, prefixes, next) = self
                .list_page(&full_prefix, delimiter, full_start.as_deref(), token.as_deref(), want)
                .await?;
            let strip = |k: String| k.strip_prefix(&base).map(str::to_owned);
            let mut objects = objects.into_iter().filter_map(strip).peekable();
            let mut prefixes = prefixes
                .into_iter()
                .filter_map(strip)
                // A cursor that is a prefix: S3 servers may roll later keys up into it again.
                .filter(|p| start_after.is_none_or(|s| p.as_str() > s))
                .peekable();
            loop {
                let take_object = match (objects.peek(), prefixes.peek()) {
                    (Some(o), Some(p)) => o < p,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => break,
                };
                let item = if take_object {
                    objects.next().map(Item::Object)
                } else {
                    prefixes.next().map(Item::Prefix)
                };
                items.extend(item);
            }
            match next {
                Some(t) if items.len() <= limit => token = Some(t),
                _ => break,
            }
        }
        let truncated = items.len() > limit;
        items.truncate(limit);

        let mut list = ObjectList { truncated, ..ObjectList::default() };
        let mut object_keys = Vec::new();
        let mut last = None;
        for item in items {
            match item {
                Item::Object(k) => {
                    last = Some(k.clone());
                    object_keys.push(k);
                }
                Item::Prefix(p) => {
                    last = Some(p.clone());
                    list.delimited_prefixes.push(p);
                }
            }
        }
        // N+1: one HEAD per object, a few at a time, results kept in key order.
        let base = base.as_str();
        for chunk in object_keys.chunks(HEAD_CONCURRENCY) {
            let heads = futures::future::join_all(chunk.iter().map(|k| async move {
                let object = format!("{base}{k}");
                self.head_raw(&object).await.map(|h| h.map(|h| meta_from_headers(k, &h)))
            }))
            .await;
            for head in heads {
                // Deleted between the listing and the HEAD: leave it out.
                if let Some(meta) = head? {
                    list.objects.push(meta);
                }
            }
        }
        if truncated {
            list.cursor = last;
        }
        Ok(list)
    }

    async fn put_part(
        &self,
        bucket: &str,
        upload_id: &str,
        part_number: u32,
        body: Vec<u8>,
    ) -> Result<(), BackendError> {
        Self::object_key(bucket, "")?;
        let object = format!("{}{part_number:05}", Self::upload_prefix(bucket, upload_id));
        let amz = vec![(format!("{META}uploaded"), now_ms().to_string())];
        self.put_raw(&object, &amz, &[], body).await
    }

    async fn take_parts(
        &self,
        bucket: &str,
        upload_id: &str,
        part_numbers: &[u32],
    ) -> Result<Option<Vec<Vec<u8>>>, BackendError> {
        Self::object_key(bucket, "")?;
        let prefix = Self::upload_prefix(bucket, upload_id);
        let mut parts = Vec::with_capacity(part_numbers.len());
        for n in part_numbers {
            match self.get_raw(&format!("{prefix}{n:05}"), None).await? {
                Some((_, body)) => parts.push(body.to_vec()),
                None => return Ok(None),
            }
        }
        for key in self.keys_under(&prefix).await? {
            self.delete_raw(&key).await?;
        }
        Ok(Some(parts))
    }

    async fn abort_parts(&self, bucket: &str, upload_id: &str) -> Result<(), BackendError> {
        Self::object_key(bucket, "")?;
        for key in self.keys_under(&Self::upload_prefix(bucket, upload_id)).await? {
            self.delete_raw(&key).await?;
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let url = self.bucket.head_bucket(Some(&self.credentials)).sign(PRESIGN_FOR);
        let r = self.send(Method::HEAD, url, &[], Bytes::new()).await?;
        if r.status.is_success() { Ok(()) } else { Err(failure("HEAD bucket", &r)) }
    }
}

#[cfg(test)]
mod tests {
    use super::{pct_decode, pct_encode};

    #[test]
    fn percent_round_trip() {
        for s in ["", "plain", "a b+c%d", "ünïcödé ✓", "[\"k\",\"v\"]"] {
            assert_eq!(pct_decode(&pct_encode(s)).as_deref(), Some(s));
        }
    }
}
