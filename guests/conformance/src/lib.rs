//! Guest test program: one HTTP route per binding operation, answering JSON, so the runtime's
//! host tests can drive every binding through the real host over real HTTP.
//!
//! Bindings it expects: D1 `DB`, KV `KV`, R2 `BUCKET`, Durable Objects `COUNTERS` (class
//! `Counter`).

use lattice_worker::bindings::exports::lattice::bindings::object_handler::Guest as ObjectGuest;
use lattice_worker::bindings::lattice::bindings::{
    config, crypto, d1, durable_object, kv, log, r2, signals, storage, types,
};
use lattice_worker::http::{self, Request};
use serde_json::{Value as Json, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

struct Worker;

wasip2::http::proxy::export!(Worker);
lattice_worker::bindings::export!(Worker);

type Reply = (u16, Json);

fn err_json(e: &types::Error) -> Reply {
    match e {
        types::Error::Invalid(m) => (400, json!({"error": "invalid", "message": m})),
        types::Error::TooLarge(m) => (413, json!({"error": "too-large", "message": m})),
        types::Error::Unavailable(u) => {
            (503, json!({"error": "unavailable", "retry_after_secs": u.retry_after_secs}))
        }
        types::Error::Fenced => (503, json!({"error": "fenced"})),
        types::Error::UnknownBinding(b) => (500, json!({"error": "unknown-binding", "binding": b})),
    }
}

fn d1_err(e: &d1::D1Error) -> Reply {
    match e {
        d1::D1Error::Sql(m) => (400, json!({"error": "sql", "message": m})),
        d1::D1Error::Batch((i, m)) => (400, json!({"error": "batch", "index": i, "message": m})),
        d1::D1Error::Exec((l, m)) => (400, json!({"error": "exec", "line": l, "message": m})),
        d1::D1Error::Binding(b) => err_json(b),
    }
}

fn to_value(j: &Json) -> d1::Value {
    match j {
        Json::Null => d1::Value::Null,
        Json::Bool(b) => d1::Value::Integer(i64::from(*b)),
        Json::Number(n) => {
            n.as_i64().map_or_else(|| d1::Value::Real(n.as_f64().unwrap_or(0.0)), d1::Value::Integer)
        }
        Json::String(s) => d1::Value::Text(s.clone()),
        Json::Object(o) => match o.get("blob").and_then(Json::as_array) {
            Some(a) => d1::Value::Blob(a.iter().filter_map(|v| v.as_u64().map(|b| b as u8)).collect()),
            None => d1::Value::Null,
        },
        Json::Array(_) => d1::Value::Null,
    }
}

fn from_value(v: &d1::Value) -> Json {
    match v {
        d1::Value::Null => Json::Null,
        d1::Value::Integer(i) => json!(i),
        d1::Value::Real(f) => json!(f),
        d1::Value::Text(s) => json!(s),
        d1::Value::Blob(b) => json!({ "blob": b }),
    }
}

fn result_json(r: &d1::QueryResult) -> Json {
    json!({
        "columns": r.columns,
        "rows": r.rows.iter().map(|row| row.iter().map(from_value).collect::<Vec<_>>()).collect::<Vec<_>>(),
        "meta": {
            "changes": r.meta.changes,
            "last_row_id": r.meta.last_row_id,
            "changed_db": r.meta.changed_db,
            "rows_read": r.meta.rows_read,
            "rows_written": r.meta.rows_written,
        }
    })
}

fn statement(j: &Json) -> d1::Statement {
    d1::Statement {
        sql: j.get("sql").and_then(Json::as_str).unwrap_or_default().to_owned(),
        params: j
            .get("params")
            .and_then(Json::as_array)
            .map(|a| a.iter().map(to_value).collect())
            .unwrap_or_default(),
    }
}

fn body_json(req: &Request) -> Result<Json, Reply> {
    serde_json::from_slice(&req.body)
        .map_err(|e| (400, json!({"error": "bad json", "message": e.to_string()})))
}

fn d1_route(req: &Request) -> Result<Reply, Reply> {
    let db = d1::Database::open("DB").map_err(|e| err_json(&e))?;
    let body = body_json(req)?;
    Ok(match req.path.as_str() {
        "/d1/query" => match db.query(&statement(&body)) {
            Ok(r) => (200, result_json(&r)),
            Err(e) => d1_err(&e),
        },
        "/d1/batch" => {
            let stmts: Vec<d1::Statement> =
                body.as_array().map(|a| a.iter().map(statement).collect()).unwrap_or_default();
            match db.batch(&stmts) {
                Ok(rs) => (200, json!(rs.iter().map(result_json).collect::<Vec<_>>())),
                Err(e) => d1_err(&e),
            }
        }
        "/d1/exec" => match db.exec(body.get("sql").and_then(Json::as_str).unwrap_or_default()) {
            Ok(r) => (200, json!({"count": r.count})),
            Err(e) => d1_err(&e),
        },
        "/d1/first" => {
            let stmt =
                lattice_worker::d1::prepare(body.get("sql").and_then(Json::as_str).unwrap_or_default());
            let column = body.get("column").and_then(Json::as_str).unwrap_or_default();
            match stmt.first_column(&db, column) {
                Ok(v) => (200, json!({ "value": v.as_ref().map(from_value) })),
                Err(e) => d1_err(&e),
            }
        }
        _ => (404, json!({"error": "no route"})),
    })
}

fn kv_route(req: &Request) -> Result<Reply, Reply> {
    let ns = kv::Namespace::open("KV").map_err(|e| err_json(&e))?;
    let key = req.param("key").unwrap_or_default().to_owned();
    let done = |r: Result<Json, types::Error>| match r {
        Ok(j) => (200, j),
        Err(e) => err_json(&e),
    };
    Ok(match (req.method.as_str(), req.path.as_str()) {
        ("PUT", "/kv") => {
            let options = kv::PutOptions {
                expiration: req.param("expiration").and_then(|v| v.parse().ok()),
                expiration_ttl: req.param("ttl").and_then(|v| v.parse().ok()),
                metadata: req.header("x-metadata"),
            };
            done(ns.put(&key, &req.body, &options).map(|()| json!({"ok": true})))
        }
        ("GET", "/kv") => done(ns.get(&key).map(|v| match v {
            Some(v) => json!({"value": String::from_utf8_lossy(&v.value), "metadata": v.metadata}),
            None => Json::Null,
        })),
        ("DELETE", "/kv") => done(ns.delete(&key).map(|()| json!({"ok": true}))),
        ("GET", "/kv/list") => {
            let options = kv::ListOptions {
                prefix: req.param("prefix").map(str::to_owned),
                cursor: req.param("cursor").map(str::to_owned),
                limit: req.param("limit").and_then(|v| v.parse().ok()),
            };
            done(ns.list(&options).map(|l| {
                json!({
                    "keys": l.keys.iter().map(|k| json!({"name": k.name, "expiration": k.expiration, "metadata": k.metadata})).collect::<Vec<_>>(),
                    "list_complete": l.list_complete,
                    "cursor": l.cursor,
                })
            }))
        }
        _ => (404, json!({"error": "no route"})),
    })
}

fn object_json(o: &r2::Object) -> Json {
    json!({
        "key": o.key, "size": o.size, "etag": o.etag, "http_etag": o.http_etag, "version": o.version,
        "uploaded": o.uploaded, "content_type": o.http_metadata.content_type,
        "custom": o.custom_metadata, "range": o.range,
        "sha256": o.checksums.sha256.as_ref().map(|b| b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    })
}

fn conditional(req: &Request) -> Option<r2::Conditional> {
    let c = r2::Conditional {
        etag_matches: req.header("x-if-match"),
        etag_does_not_match: req.header("x-if-none-match"),
        uploaded_before: req.header("x-uploaded-before").and_then(|v| v.parse().ok()),
        uploaded_after: req.header("x-uploaded-after").and_then(|v| v.parse().ok()),
    };
    let any = c.etag_matches.is_some()
        || c.etag_does_not_match.is_some()
        || c.uploaded_before.is_some()
        || c.uploaded_after.is_some();
    any.then_some(c)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

fn r2_route(req: &Request) -> Result<Reply, Reply> {
    let b = r2::Bucket::open("BUCKET").map_err(|e| err_json(&e))?;
    let key = req.param("key").unwrap_or_default().to_owned();
    let done = |r: Result<Json, types::Error>| match r {
        Ok(j) => (200, j),
        Err(e) => err_json(&e),
    };
    Ok(match (req.method.as_str(), req.path.as_str()) {
        ("PUT", "/r2") => {
            let options = r2::PutOptions {
                http_metadata: req.header("content-type").map(|ct| r2::HttpMetadata {
                    content_type: Some(ct),
                    content_language: None,
                    content_disposition: None,
                    content_encoding: None,
                    cache_control: None,
                    cache_expiry: None,
                }),
                custom_metadata: req
                    .header("x-custom")
                    .map(|v| vec![("note".to_owned(), v)])
                    .unwrap_or_default(),
                md5: req.header("x-md5").and_then(|h| hex_bytes(&h)),
                sha256: req.header("x-sha256").and_then(|h| hex_bytes(&h)),
                only_if: conditional(req),
            };
            done(b.put(&key, &req.body, &options).map(|o| match o {
                Some(o) => json!({"written": true, "object": object_json(&o)}),
                None => json!({"written": false}),
            }))
        }
        ("GET", "/r2") => {
            let range = match (req.param("offset"), req.param("length"), req.param("suffix")) {
                (_, _, Some(s)) => s.parse().ok().map(r2::Range::Suffix),
                (Some(o), l, None) => {
                    o.parse().ok().map(|o| r2::Range::Offset((o, l.and_then(|l| l.parse().ok()))))
                }
                _ => None,
            };
            let options = r2::GetOptions { only_if: conditional(req), range };
            done(b.get(&key, &options).map(|r| match r {
                r2::GetResult::NotFound => json!({"found": false}),
                r2::GetResult::PreconditionFailed(o) => {
                    json!({"found": true, "precondition_failed": true, "object": object_json(&o)})
                }
                r2::GetResult::Found((o, body)) => {
                    json!({"found": true, "object": object_json(&o), "body": String::from_utf8_lossy(&body)})
                }
            }))
        }
        ("GET", "/r2/head") => done(b.head(&key).map(|o| o.as_ref().map(object_json).unwrap_or(Json::Null))),
        ("DELETE", "/r2") => done(b.delete(&[key]).map(|()| json!({"ok": true}))),
        ("GET", "/r2/list") => {
            let options = r2::ListOptions {
                prefix: req.param("prefix").map(str::to_owned),
                delimiter: req.param("delimiter").map(str::to_owned),
                cursor: req.param("cursor").map(str::to_owned),
                start_after: req.param("start_after").map(str::to_owned),
                limit: req.param("limit").and_then(|v| v.parse().ok()),
            };
            done(b.list(&options).map(|l| {
                json!({
                    "keys": l.objects.iter().map(|o| o.key.clone()).collect::<Vec<_>>(),
                    "prefixes": l.delimited_prefixes, "truncated": l.truncated, "cursor": l.cursor,
                })
            }))
        }
        ("POST", "/r2/multipart") => {
            // Upload the body in `parts` pieces and complete.
            let parts: usize = req.param("parts").and_then(|v| v.parse().ok()).unwrap_or(2).max(1);
            let none = r2::PutOptions {
                http_metadata: None,
                custom_metadata: vec![],
                md5: None,
                sha256: None,
                only_if: None,
            };
            let r = (|| {
                let id = b.create_multipart_upload(&key, &none)?;
                let size = req.body.len().div_ceil(parts).max(1);
                let mut uploaded = Vec::new();
                for (i, chunk) in req.body.chunks(size).enumerate() {
                    uploaded.push(b.upload_part(&key, &id, (i + 1) as u32, chunk)?);
                }
                b.complete_multipart_upload(&key, &id, &uploaded)
            })();
            done(r.map(|o| object_json(&o)))
        }
        _ => (404, json!({"error": "no route"})),
    })
}

fn do_route(req: &Request) -> Result<Reply, Reply> {
    let ns = durable_object::Namespace::open("COUNTERS").map_err(|e| err_json(&e))?;
    let id = match req.param("id") {
        Some(id) => ns.id_from_string(id).map_err(|e| err_json(&e))?,
        None => ns.id_from_name(req.param("name").unwrap_or("default")),
    };
    let inner = durable_object::Request {
        method: req.method.clone(),
        path: format!(
            "{}?{}",
            req.path.trim_start_matches("/do"),
            req.query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
        ),
        headers: vec![],
        body: req.body.clone(),
    };
    match ns.fetch(&id, &inner) {
        Ok(r) => Ok((r.status, serde_json::from_slice(&r.body).unwrap_or(Json::Null))),
        Err(e) => Err(err_json(&e)),
    }
}

fn route(req: &Request) -> Result<Reply, Reply> {
    let p = req.path.as_str();
    if p.starts_with("/d1/") {
        return d1_route(req);
    }
    if p == "/kv" || p.starts_with("/kv/") {
        return kv_route(req);
    }
    if p == "/r2" || p.starts_with("/r2/") {
        return r2_route(req);
    }
    if p.starts_with("/do/") {
        return do_route(req);
    }
    Ok(match p {
        "/hello" => (200, json!({"hello": "lattice"})),
        "/size" => (200, json!({"bytes": req.body.len()})),
        "/config" => (200, json!({"value": config::get(req.param("name").unwrap_or_default())})),
        "/secret" => match config::secret(req.param("name").unwrap_or_default()) {
            Ok(s) => (200, json!({"length": s.map(|s| s.len())})),
            Err(e) => err_json(&e),
        },
        // Signs the body with a secret the host keeps; the key's public half comes along.
        "/sign" => {
            let key = req.param("key").unwrap_or_default();
            match (crypto::ed25519_public_key(key), crypto::ed25519_sign(key, &req.body)) {
                (Ok(public), Ok(signature)) => {
                    (200, json!({"public_key": hex(&public), "signature": hex(&signature)}))
                }
                (Err(e), _) | (_, Err(e)) => err_json(&e),
            }
        }
        "/signal" => {
            signals::signal(req.param("key").unwrap_or_default());
            (200, json!({"ok": true}))
        }
        "/trap" => panic!("the guest traps on purpose"),
        "/spin" => {
            log::write(log::Level::Info, "spinning forever");
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "/outbound" => {
            let url = req.param("url").unwrap_or_default();
            match outbound(url) {
                Ok(status) => (200, json!({"status": status})),
                Err(e) => (502, json!({"error": e})),
            }
        }
        _ => (404, json!({"error": "no route", "path": p})),
    })
}

fn outbound(url: &str) -> Result<u16, String> {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let (scheme, rest) = url.split_once("://").ok_or("bad url")?;
    let (authority, path) =
        rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let r = OutgoingRequest::new(Fields::new());
    let _ = r.set_scheme(Some(&if scheme == "https" { Scheme::Https } else { Scheme::Http }));
    let _ = r.set_authority(Some(authority));
    let _ = r.set_path_with_query(Some(&path));
    let fut = outgoing_handler::handle(r, None).map_err(|e| format!("{e:?}"))?;
    fut.subscribe().block();
    match fut.get() {
        Some(Ok(Ok(resp))) => Ok(resp.status()),
        Some(Ok(Err(e))) => Err(format!("{e:?}")),
        other => Err(format!("{other:?}")),
    }
}

impl wasip2::exports::http::incoming_handler::Guest for Worker {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let req = match http::read(request) {
            Ok(r) => r,
            Err(e) => {
                http::respond(out, 400, &[], e.as_bytes());
                return;
            }
        };
        // Long poll: park until the key is signalled, then answer how we woke.
        if req.path == "/wait" {
            if let Some(w) = req.header("lattice-wake") {
                // What the parked invocation kept for this one, if anything.
                let note = signals::note().map(|n| String::from_utf8_lossy(&n).into_owned());
                http::respond(
                    out,
                    200,
                    &[("content-type", "application/json")],
                    json!({"woke": w, "note": note}).to_string().as_bytes(),
                );
                return;
            }
            let key = req.param("key").unwrap_or_default().to_owned();
            let timeout = req.param("timeout").and_then(|v| v.parse().ok()).unwrap_or(30_000);
            match req.param("note") {
                Some(note) => signals::park_with_note(&[key], timeout, note.as_bytes()),
                None => signals::park(&[key], timeout),
            }
            drop(out);
            return;
        }
        let (status, body) = route(&req).unwrap_or_else(|e| e);
        // A backend outage: tell the client when to come back.
        let retry_after = body.get("retry_after_secs").and_then(Json::as_u64).map(|s| s.to_string());
        let mut headers = vec![("content-type", "application/json")];
        if let Some(r) = retry_after.as_deref() {
            headers.push(("retry-after", r));
        }
        http::respond(out, status, &headers, body.to_string().as_bytes());
    }
}

/// The `Counter` class: a counter, a claimable pool (like one-time keys) and an alarm.
impl ObjectGuest for Worker {
    fn fetch(_class: String, _id: String, request: durable_object::Request) -> durable_object::Response {
        let (path, query) = request.path.split_once('?').unwrap_or((request.path.as_str(), ""));
        let param = |name: &str| {
            query.split('&').find_map(|kv| kv.strip_prefix(&format!("{name}="))).map(str::to_owned)
        };
        let reply = |status: u16, j: Json| durable_object::Response {
            status,
            headers: vec![],
            body: j.to_string().into_bytes(),
        };
        let fail = |e: types::Error| {
            let (s, j) = err_json(&e);
            reply(s, j)
        };
        let read_u64 = |key: &str| -> Result<u64, types::Error> {
            Ok(storage::get(&[key.to_owned()])?
                .first()
                .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0))
        };
        match path {
            "/increment" => {
                // With `op`, idempotent: a retried operation answers what it answered first.
                let op = param("op").map(|o| format!("op/{o}"));
                let r = (|| {
                    if let Some(op) = &op
                        && let Some((_, v)) = storage::get(std::slice::from_ref(op))?.into_iter().next()
                    {
                        return Ok(String::from_utf8_lossy(&v).parse().unwrap_or(0));
                    }
                    let n = read_u64("count")? + 1;
                    let mut writes = vec![("count".to_owned(), n.to_string().into_bytes())];
                    if let Some(op) = op.clone() {
                        writes.push((op, n.to_string().into_bytes()));
                    }
                    storage::put(&writes)?;
                    Ok(n)
                })();
                match r {
                    Ok(n) => reply(200, json!({"count": n})),
                    Err(e) => fail(e),
                }
            }
            "/d1-increment" => {
                // A D1 wait (PostgreSQL's pg_sleep), then a D1 insert and an increment, in the
                // order asked for: the placement tests pause the owner during the wait.
                let sleep: f64 = param("sleep").and_then(|v| v.parse().ok()).unwrap_or(0.0);
                let d1_first = param("order").as_deref() != Some("storage-first");
                let object = param("object").unwrap_or_default();
                let r = (|| -> Result<u64, (u16, Json)> {
                    let db = d1::Database::open("DB").map_err(|e| err_json(&e))?;
                    let st = |sql: &str, params: Vec<d1::Value>| d1::Statement { sql: sql.into(), params };
                    if sleep > 0.0 {
                        db.query(&st("SELECT pg_sleep(?)", vec![d1::Value::Real(sleep)]))
                            .map_err(|e| d1_err(&e))?;
                    }
                    let n = read_u64("count").map_err(|e| err_json(&e))? + 1;
                    let insert = st(
                        "INSERT INTO fence_log (object, n) VALUES (?, ?)",
                        vec![
                            d1::Value::Text(object.clone()),
                            d1::Value::Integer(i64::try_from(n).unwrap_or(0)),
                        ],
                    );
                    let put = || storage::put(&[("count".to_owned(), n.to_string().into_bytes())]);
                    if d1_first {
                        db.query(&insert).map_err(|e| d1_err(&e))?;
                        put().map_err(|e| err_json(&e))?;
                    } else {
                        put().map_err(|e| err_json(&e))?;
                        db.query(&insert).map_err(|e| d1_err(&e))?;
                    }
                    Ok(n)
                })();
                match r {
                    Ok(n) => reply(200, json!({"count": n})),
                    Err((s, j)) => reply(s, j),
                }
            }
            "/put-unconfirmed" => {
                // An unconfirmed write: the answer does not wait for it to be durable.
                let key = param("key").unwrap_or_else(|| "unconfirmed".into());
                match storage::put_unconfirmed(&[(key.clone(), b"1".to_vec())]) {
                    Ok(()) => reply(200, json!({"put": key})),
                    Err(e) => fail(e),
                }
            }
            "/fill" => {
                let n: u32 = param("n").and_then(|v| v.parse().ok()).unwrap_or(10);
                let entries: Vec<(String, Vec<u8>)> =
                    (0..n).map(|i| (format!("pool/{i:05}"), format!("item-{i}").into_bytes())).collect();
                match storage::put(&entries) {
                    Ok(()) => reply(200, json!({"filled": n})),
                    Err(e) => fail(e),
                }
            }
            "/claim" => {
                let opts = storage::ListOptions {
                    start: None,
                    start_after: None,
                    end: None,
                    prefix: Some("pool/".into()),
                    reverse: false,
                    limit: Some(1),
                };
                let op = param("op").map(|o| format!("claimed/{o}"));
                let r = (|| {
                    if let Some(op) = &op
                        && let Some((_, v)) = storage::get(std::slice::from_ref(op))?.into_iter().next()
                    {
                        return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
                    }
                    let Some((k, v)) = storage::list(&opts)?.into_iter().next() else { return Ok(None) };
                    storage::delete(&[k])?;
                    if let Some(op) = op.clone() {
                        storage::put(&[(op, v.clone())])?;
                    }
                    Ok(Some(String::from_utf8_lossy(&v).into_owned()))
                })();
                match r {
                    Ok(item) => reply(200, json!({"item": item})),
                    Err(e) => fail(e),
                }
            }
            "/state" => {
                let opts = storage::ListOptions {
                    start: None,
                    start_after: None,
                    end: None,
                    prefix: None,
                    reverse: false,
                    limit: None,
                };
                match (storage::list(&opts), storage::get_alarm()) {
                    (Ok(entries), Ok(alarm)) => reply(
                        200,
                        json!({
                            "entries": entries.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect::<std::collections::BTreeMap<_, _>>(),
                            "alarm": alarm,
                        }),
                    ),
                    (Err(e), _) | (_, Err(e)) => fail(e),
                }
            }
            "/alarm" => {
                let at: u64 = param("at").and_then(|v| v.parse().ok()).unwrap_or(0);
                let fail_times: u64 = param("fail").and_then(|v| v.parse().ok()).unwrap_or(0);
                let r = storage::put(&[("alarm_fail_times".to_owned(), fail_times.to_string().into_bytes())])
                    .and_then(|()| storage::set_alarm(at));
                match r {
                    Ok(()) => reply(200, json!({"alarm": at})),
                    Err(e) => fail(e),
                }
            }
            "/txn" => {
                // Writes in a transaction, then commit, roll back, leave it open, or trap.
                let mode = param("mode").unwrap_or_default();
                let key = param("key").unwrap_or_else(|| "txn".into());
                let r = (|| {
                    storage::transaction_begin()?;
                    storage::put(&[(key.clone(), b"staged".to_vec())])?;
                    storage::delete(&["count".to_owned()])?;
                    let seen = storage::get(std::slice::from_ref(&key))?.len();
                    match mode.as_str() {
                        "commit" => storage::transaction_commit()?,
                        "rollback" => storage::transaction_rollback()?,
                        "trap" => panic!("trap inside a transaction"),
                        _ => {}
                    }
                    Ok(seen)
                })();
                match r {
                    Ok(seen) => reply(200, json!({"seen_inside": seen, "mode": mode})),
                    Err(e) => fail(e),
                }
            }
            "/txn-io" => {
                // Other I/O inside a transaction traps the event.
                let _ = storage::transaction_begin();
                let _ = storage::put(&[("io".to_owned(), b"x".to_vec())]);
                let _ = kv::Namespace::open("KV").and_then(|ns| ns.get("anything"));
                reply(200, json!({"unreachable": true}))
            }
            "/secret-then-write" => {
                // A secret read in the middle of an event: part of the environment, not I/O, so
                // the input gate stays closed and concurrent events cannot interleave here.
                let r = (|| {
                    let n = read_u64("count")?;
                    let _ = config::secret("conformance_secret")?;
                    storage::put(&[("count".to_owned(), (n + 1).to_string().into_bytes())])?;
                    Ok(n + 1)
                })();
                match r {
                    Ok(n) => reply(200, json!({"count": n})),
                    Err(e) => fail(e),
                }
            }
            "/kv-then-write" => {
                // Other I/O in the middle of an event (opens the input gate), then a write.
                let r = (|| {
                    let n = read_u64("count")?;
                    let ns = kv::Namespace::open("KV")?;
                    let _ = ns.get("anything")?;
                    storage::put(&[("count".to_owned(), (n + 1).to_string().into_bytes())])?;
                    Ok(n + 1)
                })();
                match r {
                    Ok(n) => reply(200, json!({"count": n})),
                    Err(e) => fail(e),
                }
            }
            _ => reply(404, json!({"error": "no route", "path": path})),
        }
    }

    fn alarm(_class: String, _id: String, retry_count: u32) -> Result<(), String> {
        let fail_times = storage::get(&["alarm_fail_times".to_owned()])
            .ok()
            .and_then(|v| v.first().and_then(|(_, b)| std::str::from_utf8(b).ok()?.parse::<u32>().ok()))
            .unwrap_or(0);
        let fired = storage::get(&["alarm_runs".to_owned()])
            .ok()
            .and_then(|v| v.first().and_then(|(_, b)| std::str::from_utf8(b).ok()?.parse::<u32>().ok()))
            .unwrap_or(0);
        storage::put(&[("alarm_runs".to_owned(), (fired + 1).to_string().into_bytes())])
            .map_err(|e| format!("{e:?}"))?;
        if retry_count < fail_times {
            return Err(format!("failing on purpose (retry {retry_count})"));
        }
        storage::put(&[("alarm_fired".to_owned(), b"yes".to_vec())]).map_err(|e| format!("{e:?}"))
    }
}
