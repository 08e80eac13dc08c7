//! Render and run, for an embedded, a production (PostgreSQL, Redis, S3) and a sharded
//! MatrixHomeserver: the operator reconciles it on the real API server; then the runtime binary
//! (`LATTICE_BIN`) is started locally the way the kubelet would start the front pod (and the
//! shard pod), from what the operator stored: the container's command and arguments, its
//! environment (Secret references resolved), and each volume materialised at a local directory
//! (the ConfigMap's and the keys Secret's files, an empty data directory for the claim; the
//! image's `/opt/lattice` is `LATTICE_GUEST_DIR`, which holds the homeserver component). Two
//! things differ from a pod, both in the way a kubelet's mounts and network namespace would:
//! mount paths in the config file and arguments point at those local directories, and the
//! listeners move to free loopback ports (a shard pod's peer listener too, and its address with
//! it). Then the server must answer `/_matrix/client/versions`, accept the generated admin token
//! through `lattice call`, and create a room (which signs events with the generated signing key
//! and places the room with the generated Durable Object key); a sharded server does it through
//! its front pod, which forwards to the shard pod holding the Leases.

#[path = "common/access.rs"]
mod access;
#[path = "../../tests/src/ports.rs"]
mod ports;
use ports::free_port;

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PodTemplateSpec, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt as _};
use lattice_operator::config::COMPONENT_PATH;
use lattice_operator::controller::{self, Context};
use lattice_operator::crd::{MatrixHomeserver, MatrixHomeserverStatus};
use lattice_operator::metrics::Metrics;
use serde_json::json;

/// The homeserver is AOT-compiled on first start; a debug build of the runtime takes a while.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(30);

struct Inputs {
    kubeconfig: String,
    bin: PathBuf,
    guest_dir: PathBuf,
}

fn inputs() -> Option<Inputs> {
    let kubeconfig = std::env::var("LATTICE_TEST_KUBECONFIG").ok();
    let bin = std::env::var_os("LATTICE_BIN").map(PathBuf::from).filter(|p| p.exists());
    let guest_dir = std::env::var_os("LATTICE_GUEST_DIR")
        .map(PathBuf::from)
        .filter(|d| d.join("lattice_homeserver.wasm").exists());
    match (kubeconfig, bin, guest_dir) {
        (Some(kubeconfig), Some(bin), Some(guest_dir)) => Some(Inputs { kubeconfig, bin, guest_dir }),
        (k, b, g) => {
            let why = format!(
                "needs LATTICE_TEST_KUBECONFIG ({}), LATTICE_BIN ({}) and LATTICE_GUEST_DIR with lattice_homeserver.wasm ({})",
                k.is_some(),
                b.is_some(),
                g.is_some()
            );
            assert!(std::env::var_os("LATTICE_REQUIRE_SERVICES").is_none(), "{why}");
            eprintln!("skipped: {why}");
            None
        }
    }
}

/// One HTTP/1.0 request (so the body is never chunked); returns the status and body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split(' ').nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for<T, Fut: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn embedded_homeserver_serves_from_the_operators_objects() {
    let Some(inputs) = inputs() else { return };
    let spec = json!({
        "serverName": "run.example", "image": "lattice:test",
        "database": {"embedded": {}}, "kv": {"embedded": {}}, "media": {"volume": {}},
        "runtimeConfig": {"vars": {"login_per_minute": 0}}
    });
    render_and_run(&inputs, spec, &[]).await;
}

/// PostgreSQL (a fresh database), Redis and S3 from `scripts/services.sh`, reached through the
/// Secrets the spec names, as environment variables the operator maps them to.
#[tokio::test]
async fn production_homeserver_serves_from_the_operators_objects() {
    let Some(inputs) = inputs() else { return };
    let Some((spec, secrets)) = production("prod.example", 2, 0) else { return };
    render_and_run(&inputs, spec, &secrets).await;
}

/// Shard placement: a front pod and a shard pod, each from its own workload and config file,
/// with Leases in the MatrixHomeserver's namespace taken through the pods' ServiceAccount (a
/// kubeconfig with its token stands in for the pod's mounted token). Rooms and one-time keys
/// (both Durable Objects) are created through the front, which forwards to the shard pod's
/// peer listener; the Leases then name the shard pod.
#[tokio::test]
async fn sharded_homeserver_serves_through_its_shard_pod() {
    let Some(inputs) = inputs() else { return };
    let Some((spec, secrets)) = production("shards.example", 1, 1) else { return };
    let r = reconcile(&inputs, spec, &secrets).await;
    let sts = r.stateful_set.clone().expect("the shard StatefulSet");
    let kubeconfig = r.root.path().join("pods.kubeconfig");
    std::fs::write(&kubeconfig, service_account_kubeconfig(&inputs, &r.client, &r.ns, "matrix").await)
        .expect("write");
    let pod_env = [("KUBECONFIG", kubeconfig.display().to_string())];

    // The shard pod: its stable name (`matrix-shards-0`, the StatefulSet's first pod) as identity,
    // and its peer listener on loopback instead of the headless Service's name.
    let peer = free_port();
    let ns = r.ns.clone();
    let shard_network = move |text: &str| {
        let address = format!("peer_address = \"http://{{identity}}.matrix-shards.{ns}.svc:8449\"");
        assert!(text.contains(&address) && text.contains("peer_listen = \"0.0.0.0:8449\""), "{text}");
        text.replace("peer_listen = \"0.0.0.0:8449\"", &format!("peer_listen = \"127.0.0.1:{peer}\""))
            .replace(&address, &format!("peer_address = \"http://127.0.0.1:{peer}\""))
            .replace("[placement]\n", "[placement]\nidentity = \"matrix-shards-0\"\n")
    };
    let template = sts.spec.expect("spec").template;
    let shard = start_pod(&inputs, &r, &template, "shard", &shard_network, &pod_env).await;
    assert!(shard.config_path.ends_with("/lattice-shard.toml"), "{}", shard.config_path);
    let front_network = |text: &str| {
        assert!(text.contains("role = \"front\"") && !text.contains("peer_listen"), "{text}");
        text.to_owned()
    };
    let template = r.deployment.spec.clone().expect("spec").template;
    let front = start_pod(&inputs, &r, &template, "front", &front_network, &pod_env).await;
    assert!(front.config_path.ends_with("/lattice.toml"), "{}", front.config_path);
    wait_serving(&shard).await;
    exercise(&inputs, &front, &r.status).await;

    // The shards are leased to the shard pod, at its peer address, under this server's set.
    let set = lattice_operator::config::lease_set("matrix");
    let leases = Api::<Lease>::namespaced(r.client.clone(), &r.ns)
        .list(&ListParams::default().labels("lattice.dev/lease=true"))
        .await
        .expect("Leases")
        .items;
    let names: Vec<String> = leases.iter().map(|l| l.metadata.name.clone().unwrap_or_default()).collect();
    assert!(names.iter().all(|n| n.starts_with(&format!("{set}-"))), "{names:?}");
    assert!(names.contains(&format!("{set}-m-matrix-shards-0")), "a member Lease: {names:?}");
    let shards: Vec<&Lease> =
        leases.iter().filter(|l| !l.metadata.name.as_deref().unwrap_or_default().contains("-m-")).collect();
    assert!(!shards.is_empty(), "no shard Leases: {names:?}");
    for l in shards {
        assert_eq!(l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()), Some("matrix-shards-0"));
        assert_eq!(
            l.metadata.annotations.as_ref().and_then(|a| a.get("lattice.dev/peer-address")).cloned(),
            Some(format!("http://127.0.0.1:{peer}"))
        );
    }
    drop((front, shard));
}

type Secrets = Vec<(&'static str, Vec<(&'static str, String)>)>;

/// A spec on PostgreSQL (a fresh database), Redis and S3 from `scripts/services.sh`, and the
/// Secrets it names; `None` (skipped) when the services are not configured.
fn production(server_name: &str, replicas: i32, shards: i32) -> Option<(serde_json::Value, Secrets)> {
    let var = |k: &str| std::env::var(k).ok();
    let (Some(pg), Some(redis), Some(endpoint), Some(region), Some(bucket), Some(access), Some(secret)) = (
        var("LATTICE_TEST_POSTGRES_URL"),
        var("LATTICE_TEST_REDIS_URL"),
        var("LATTICE_TEST_S3_ENDPOINT"),
        var("LATTICE_TEST_S3_REGION"),
        var("LATTICE_TEST_S3_BUCKET"),
        var("LATTICE_TEST_S3_ACCESS_KEY"),
        var("LATTICE_TEST_S3_SECRET_KEY"),
    ) else {
        assert!(
            std::env::var_os("LATTICE_REQUIRE_SERVICES").is_none(),
            "the services' variables are missing"
        );
        eprintln!("skipped: PostgreSQL, Redis and S3 are not configured (scripts/services.sh)");
        return None;
    };
    // A fresh database: the homeserver migrates it from scratch.
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let db = format!("op_run_{}", nanos % 1_000_000_000);
    let created = Command::new("psql")
        .arg(&pg)
        .args(["-v", "ON_ERROR_STOP=1", "-c", &format!("CREATE DATABASE {db}")])
        .output();
    assert!(created.as_ref().is_ok_and(|o| o.status.success()), "psql CREATE DATABASE: {created:?}");
    let (base, _) = pg.rsplit_once('/').expect("a database in the URL");
    let url = format!("{base}/{db}");
    let spec = json!({
        "serverName": server_name, "image": "lattice:test", "replicas": replicas, "shards": shards,
        "database": {"postgres": {"secretRef": {"name": "db"}}},
        "kv": {"redis": {"secretRef": {"name": "redis", "key": "redis-url"}}},
        "media": {"s3": {"endpoint": endpoint, "region": region, "bucket": bucket, "credentialsSecret": "s3"}},
        "runtimeConfig": {"vars": {"login_per_minute": 0}}
    });
    let secrets = vec![
        ("db", vec![("url", url)]),
        ("redis", vec![("redis-url", redis)]),
        ("s3", vec![("accessKeyId", access), ("secretAccessKey", secret)]),
    ];
    Some((spec, secrets))
}

/// The front pod alone: serves, and takes the admin token, a room and one-time keys.
async fn render_and_run(
    inputs: &Inputs,
    spec: serde_json::Value,
    secrets: &[(&'static str, Vec<(&'static str, String)>)],
) {
    let r = reconcile(inputs, spec, secrets).await;
    let template = r.deployment.spec.clone().expect("spec").template;
    let pod = start_pod(inputs, &r, &template, "front", &|text: &str| text.to_owned(), &[]).await;
    exercise(inputs, &pod, &r.status).await;
}

/// What the operator stored for the MatrixHomeserver `matrix` in a fresh namespace.
struct Reconciled {
    client: Client,
    ns: String,
    deployment: Deployment,
    stateful_set: Option<StatefulSet>,
    status: MatrixHomeserverStatus,
    /// The pods' volumes, logs and other files.
    root: tempfile::TempDir,
}

/// The operator reconciles `spec` (with `secrets` created first) in a fresh namespace.
async fn reconcile(
    inputs: &Inputs,
    spec: serde_json::Value,
    secrets: &[(&'static str, Vec<(&'static str, String)>)],
) -> Reconciled {
    let client = Client::try_from(kube_config(inputs).await).expect("client");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    crds.patch(
        MatrixHomeserver::crd_name(),
        &PatchParams::apply("lattice-operator-tests").force(),
        &Patch::Apply(serde_json::to_value(MatrixHomeserver::crd()).expect("crd")),
    )
    .await
    .expect("CRD");
    wait_for("the CRD", || {
        let crds = crds.clone();
        async move {
            let c = crds.get(MatrixHomeserver::crd_name()).await.ok()?;
            c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        }
    })
    .await;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let ns = format!("op-run-{}", nanos % 1_000_000_000);
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");

    for (name, data) in secrets {
        let data: BTreeMap<&str, &String> = data.iter().map(|(k, v)| (*k, v)).collect();
        let secret: Secret =
            serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data})).expect("secret");
        Api::<Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .expect("Secret");
    }

    // The operator renders everything.
    let ctx =
        Arc::new(Context::new(client.clone(), Arc::new(Metrics::default()), Some("render-and-run".into())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run(ctx, Some(ns.clone()), async move {
        let _ = stopped.await;
    }));
    let hs = json!({
        "apiVersion": "lattice.dev/v1alpha1", "kind": "MatrixHomeserver", "metadata": {"name": "matrix"},
        "spec": spec,
    });
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);
    api.patch("matrix", &PatchParams::apply("lattice-operator-tests").force(), &Patch::Apply(&hs))
        .await
        .expect("apply");
    let status = wait_for("the operator to reconcile", || {
        let api = api.clone();
        async move {
            let s = api.get("matrix").await.ok()?.status?;
            (s.observed_generation == Some(1)).then_some(s)
        }
    })
    .await;
    let deployment =
        Api::<Deployment>::namespaced(client.clone(), &ns).get("matrix").await.expect("Deployment");
    let stateful_set = Api::<StatefulSet>::namespaced(client.clone(), &ns)
        .get_opt("matrix-shards")
        .await
        .expect("StatefulSet");
    let _ = stop.send(());
    let _ = tokio::time::timeout(WAIT, operator).await;
    let root = tempfile::tempdir().expect("tempdir");
    Reconciled { client, ns, deployment, stateful_set, status, root }
}

async fn kube_config(inputs: &Inputs) -> kube::Config {
    let kc = Kubeconfig::read_from(&inputs.kubeconfig).expect("kubeconfig");
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.expect("config")
}

/// The test kubeconfig with the token of the ServiceAccount `name` instead of its user: what a
/// pod of that account reaches the API server with.
async fn service_account_kubeconfig(inputs: &Inputs, client: &Client, ns: &str, name: &str) -> String {
    let auth = access::service_account_auth(client, ns, name, 3600).await;
    let mut kc = Kubeconfig::read_from(&inputs.kubeconfig).expect("kubeconfig");
    for named in &mut kc.auth_infos {
        named.auth_info = Some(auth.clone());
    }
    serde_yaml::to_string(&kc).expect("kubeconfig yaml")
}

/// A runtime process started the way the kubelet would start a pod of `template`.
struct Pod {
    _server: Server,
    port: u16,
    config_path: String,
    text: String,
    log: PathBuf,
}

/// Starts the pod of `template` from what the operator stored: its command and arguments, its
/// environment (Secret references resolved, then `extra_env`), and each volume materialised
/// under a directory of its own (`name`). The listeners move to free loopback ports, and
/// `network` rewrites what else a pod's network would differ in.
async fn start_pod(
    inputs: &Inputs,
    r: &Reconciled,
    template: &PodTemplateSpec,
    name: &str,
    network: &dyn Fn(&str) -> String,
    extra_env: &[(&str, String)],
) -> Pod {
    let (client, ns) = (&r.client, &r.ns);
    let pod = template.spec.clone().expect("pod spec");
    let container = pod.containers.first().expect("container").clone();
    let root = r.root.path().join(name);
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for (i, m) in container.volume_mounts.clone().unwrap_or_default().iter().enumerate() {
        let volume = pod.volumes.iter().flatten().find(|v| v.name == m.name).expect("volume of a mount");
        let dir = root.join(format!("volume-{i}-{}", m.name));
        std::fs::create_dir_all(&dir).expect("mkdir");
        if let Some(cm) = &volume.config_map {
            let cm = Api::<ConfigMap>::namespaced(client.clone(), ns).get(&cm.name).await.expect("ConfigMap");
            for (k, v) in cm.data.unwrap_or_default() {
                std::fs::write(dir.join(k), v).expect("write");
            }
        }
        if let Some(s) = &volume.secret {
            let name = s.secret_name.clone().expect("secret name");
            let secret = Api::<Secret>::namespaced(client.clone(), ns).get(&name).await.expect("Secret");
            for (k, v) in secret.data.unwrap_or_default() {
                std::fs::write(dir.join(k), v.0).expect("write");
            }
        }
        mounts.push((m.mount_path.clone(), dir));
    }
    // The image's own files: the component.
    let image_dir = Path::new(COMPONENT_PATH).parent().expect("dir").display().to_string();
    mounts.push((image_dir, inputs.guest_dir.clone()));
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    let map = |text: &str| {
        let mut out = text.to_owned();
        for (from, to) in &mounts {
            out = out.replace(&format!("\"{from}"), &format!("\"{}", to.display()));
            if out.starts_with(from.as_str()) {
                out = out.replacen(from.as_str(), &to.display().to_string(), 1);
            }
        }
        out
    };
    let args: Vec<String> = container.args.clone().unwrap_or_default().iter().map(|a| map(a)).collect();
    let config_path =
        args.iter().skip_while(|a| *a != "--config").nth(1).expect("--config in the args").clone();
    let (port, admin_port) = (free_port(), free_port());
    let text = map(&std::fs::read_to_string(&config_path).expect("the ConfigMap's file"))
        .replace("listen = \"0.0.0.0:8448\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("admin_listen = \"0.0.0.0:9090\"", &format!("admin_listen = \"127.0.0.1:{admin_port}\""));
    assert!(text.contains(&format!("127.0.0.1:{port}")), "the listener moved:\n{text}");
    let text = network(&text);
    std::fs::write(&config_path, &text).expect("write");
    assert_eq!(container.command.as_deref(), Some(&["lattice".to_owned()][..]));
    let mut env = BTreeMap::new();
    for e in container.env.clone().unwrap_or_default() {
        let value = match (e.value, e.value_from.and_then(|v| v.secret_key_ref)) {
            (Some(v), _) => v,
            (None, Some(r)) => {
                let s = Api::<Secret>::namespaced(client.clone(), ns).get(&r.name).await.expect("env Secret");
                String::from_utf8(s.data.unwrap_or_default()[&r.key].0.clone()).expect("utf-8")
            }
            (None, None) => String::new(),
        };
        env.insert(e.name, value);
    }
    for (k, v) in extra_env {
        env.insert((*k).to_owned(), v.clone());
    }
    let log_path = root.join("lattice.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let server = Server(
        Command::new(&inputs.bin)
            .args(&args)
            .envs(&env)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting the runtime"),
    );
    Pod { _server: server, port, config_path, text, log: log_path }
}

/// Waits until the pod answers `/_matrix/client/versions`; returns the answer.
async fn wait_serving(pod: &Pod) -> String {
    let started = Instant::now();
    loop {
        if let Some((200, body)) = http(pod.port, "GET", "/_matrix/client/versions", None, None) {
            return body;
        }
        let log = std::fs::read_to_string(&pod.log).unwrap_or_default();
        assert!(
            started.elapsed() < START_TIMEOUT,
            "the runtime did not serve within {START_TIMEOUT:?}; its log:\n{log}\nconfig:\n{}",
            pod.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One request, repeated while the answer is 503 (no shard owner yet) for up to `WAIT`.
fn http_until_owned(
    pod: &Pod,
    method: &str,
    path: &str,
    body: &serde_json::Value,
    token: &str,
) -> (u16, String) {
    let started = Instant::now();
    loop {
        let answer = http(pod.port, method, path, Some(body), Some(token)).expect(path);
        if answer.0 != 503 || started.elapsed() > WAIT {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pod serves; the generated admin token works through `lattice call`; a room (signed with
/// the generated signing key, placed with the generated object key) and one-time keys (the
/// USERS namespace, placed with its own key) are created.
async fn exercise(inputs: &Inputs, pod: &Pod, hs_status: &MatrixHomeserverStatus) {
    let versions = wait_serving(pod).await;
    assert!(versions.contains("\"versions\""), "{versions}");

    // The generated admin token works through the runtime's own CLI.
    let out = Command::new(&inputs.bin)
        .args([
            "call",
            "--config",
            &pod.config_path,
            "--bearer-secret",
            "admin_token",
            "POST",
            "/_lattice/admin/v1/users",
        ])
        .arg(json!({"username": "alice", "password": "correct horse battery"}).to_string())
        .output()
        .expect("lattice call");
    assert!(
        out.status.success(),
        "lattice call: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A room: signed with the generated signing key, placed with the generated object key.
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "correct horse battery"});
    let (status, body) =
        http(pod.port, "POST", "/_matrix/client/v3/login", Some(&login), None).expect("login");
    assert_eq!(status, 200, "{body}");
    let token = serde_json::from_str::<serde_json::Value>(&body).expect("json")["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    let log = || std::fs::read_to_string(&pod.log).unwrap_or_default();
    let (status, body) =
        http_until_owned(pod, "POST", "/_matrix/client/v3/createRoom", &json!({"name": "ops"}), &token);
    assert_eq!(status, 200, "{body}\n{}", log());
    assert!(body.contains("\"room_id\""), "{body}");
    // One-time keys: kept by the USERS namespace, placed with its own generated key.
    let keys = json!({"one_time_keys": {"signed_curve25519:A": {"key": "k", "signatures": {"@alice:x": {"ed25519:D": "s"}}}}});
    let (status, body) = http_until_owned(pod, "POST", "/_matrix/client/v3/keys/upload", &keys, &token);
    assert_eq!(status, 200, "{body}\n{}", log());
    assert!(body.contains("\"signed_curve25519\":1"), "{body}");
    assert!(hs_status.signing_key_id.as_ref().is_some_and(|k| k.starts_with("ed25519:")));
}
