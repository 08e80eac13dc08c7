//! The client side the homeserver benchmarks share: one HTTP/1.1 keep-alive client per user
//! speaking the client-server API, and the exactly-once, in-order check of what senders sent.
#![allow(dead_code, reason = "each benchmark uses a different part of this module")]

use std::time::{Duration, Instant};

use lattice_e2e::enc;
use serde_json::{Value, json};

#[derive(Clone)]
pub struct Http {
    pub base: String,
    pub token: Option<String>,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(base: &str, token: Option<&str>) -> Self {
        let client = reqwest::Client::builder()
            .http1_only()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        Self { base: base.to_owned(), token: token.map(str::to_owned), client }
    }

    /// Registers `local` (open registration, dummy stage); a client signed in as that user.
    pub async fn register(&self, local: &str) -> Result<Self, String> {
        let body =
            json!({"username": local, "password": "bench-password", "auth": {"type": "m.login.dummy"}});
        let v = self.ok(reqwest::Method::POST, "/_matrix/client/v3/register", Some(&body)).await?;
        let token = v["access_token"].as_str().ok_or_else(|| format!("register: {v}"))?;
        Ok(Self::new(&self.base, Some(token)))
    }

    /// Sends a request; the status and JSON body, or what went wrong on the way.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.map_err(|e| format!("{path}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| format!("{path}: reading the body: {e}"))?;
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{path}: not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))?;
        Ok((status, v))
    }

    /// A request that must answer 200.
    pub async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, String> {
        match self.call(method, path, body).await? {
            (200, v) => Ok(v),
            (s, v) => Err(format!("{path}: {s} {v}")),
        }
    }
}

pub fn send_path(room: &str, txn: &str) -> String {
    format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room))
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A sender: its client, its user id and the room it sends to.
#[derive(Clone)]
pub struct Sender {
    pub http: Http,
    pub user: String,
    pub room: String,
}

/// One sent event, as its sender saw it.
pub struct Sent {
    pub event_id: String,
    pub done: Instant,
    pub took: Duration,
}

impl Sender {
    /// Sends event `n` of sender `k` of the load tagged `tag` (body `"{tag} {k} {n}"`, which
    /// [`verify_messages`] reads back; transaction id `{tag}-{k}-{n}`), timing it.
    pub async fn send(&self, tag: &str, k: usize, n: usize) -> Result<Sent, String> {
        let body = json!({"msgtype": "m.text", "body": format!("{tag} {k} {n}")});
        let t = Instant::now();
        let v = self
            .http
            .ok(reqwest::Method::PUT, &send_path(&self.room, &format!("{tag}-{k}-{n}")), Some(&body))
            .await
            .map_err(|e| format!("sender {k}, event {n}: {e}"))?;
        let done = Instant::now();
        let event_id = v["event_id"].as_str().ok_or_else(|| format!("sender {k}: no event_id in {v}"))?;
        Ok(Sent { event_id: event_id.to_owned(), done, took: done - t })
    }
}

/// Reads each room's whole timeline forwards through `/messages`; every event each sender
/// sent must be there exactly once, in the order it was sent, with its event id and sender.
pub async fn verify_messages(senders: &[Sender], sent: &[Vec<Sent>], tag: &str) -> Result<(), String> {
    // One reader per room: the first sender into it.
    let mut rooms: Vec<(&str, &Http)> = Vec::new();
    for s in senders {
        if !rooms.iter().any(|(r, _)| *r == s.room) {
            rooms.push((&s.room, &s.http));
        }
    }
    let mut seen: Vec<Vec<(usize, String, String)>> = vec![Vec::new(); senders.len()];
    for (room, reader) in rooms {
        let mut from: Option<String> = None;
        loop {
            let mut path = format!("/_matrix/client/v3/rooms/{}/messages?dir=f&limit=1000", enc(room));
            if let Some(f) = &from {
                path.push_str(&format!("&from={f}"));
            }
            let v = reader.ok(reqwest::Method::GET, &path, None).await.map_err(|e| format!("verify: {e}"))?;
            let chunk = v["chunk"].as_array().cloned().unwrap_or_default();
            for e in &chunk {
                let body = e["content"]["body"].as_str().unwrap_or_default();
                let mut parts = body.split(' ');
                if e["type"] != "m.room.message" || parts.next() != Some(tag) {
                    continue;
                }
                let i: usize =
                    parts.next().and_then(|x| x.parse().ok()).ok_or(format!("verify: body {body}"))?;
                let n: usize =
                    parts.next().and_then(|x| x.parse().ok()).ok_or(format!("verify: body {body}"))?;
                let id = e["event_id"].as_str().unwrap_or_default().to_owned();
                let who = e["sender"].as_str().unwrap_or_default().to_owned();
                if e["room_id"].as_str().is_some_and(|r| r != room) {
                    return Err(format!("verify: {id} came back in another room"));
                }
                seen.get_mut(i).ok_or(format!("verify: unknown sender {i}"))?.push((n, id, who));
            }
            match v["end"].as_str() {
                Some(end) if !chunk.is_empty() => from = Some(end.to_owned()),
                _ => break,
            }
        }
    }
    for (i, (got, want)) in seen.iter().zip(sent).enumerate() {
        if got.len() != want.len() {
            return Err(format!(
                "verify: sender {i} sent {} events, /messages has {}",
                want.len(),
                got.len()
            ));
        }
        for (k, ((n, id, who), w)) in got.iter().zip(want).enumerate() {
            if *n != k || *id != w.event_id {
                return Err(format!(
                    "verify: sender {i}: position {k} holds event {n} ({id}), expected event {k} ({})",
                    w.event_id
                ));
            }
            if *who != senders[i].user {
                return Err(format!("verify: {id} has sender {who}, expected {}", senders[i].user));
            }
        }
    }
    Ok(())
}

pub async fn create_room(c: &Http) -> Result<String, String> {
    let v = c
        .ok(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&json!({"preset": "public_chat"})))
        .await?;
    v["room_id"].as_str().map(str::to_owned).ok_or_else(|| format!("createRoom: {v}"))
}

pub async fn join(c: &Http, room: &str) -> Result<(), String> {
    c.ok(reqwest::Method::POST, &format!("/_matrix/client/v3/join/{}", enc(room)), Some(&json!({}))).await?;
    Ok(())
}
