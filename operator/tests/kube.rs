//! The operator against a real Kubernetes API server (`scripts/kube.sh`, started by
//! `scripts/services.sh`): the CRD and its CEL rules, the reconciler run in-process, the chart's
//! RBAC, and the chart's rendered output applied with a server-side dry run.
//!
//! Needs `LATTICE_TEST_KUBECONFIG`; without it each test prints why and passes, unless
//! `LATTICE_REQUIRE_SERVICES` is set (CI), where it fails. No scheduler or kubelet runs, so pods
//! stay Pending: the tests assert `Progressing`, not `Ready`. Owner-reference garbage
//! collection needs kube-controller-manager; the clean-up assertion runs only when it is there
//! (and says so when it is skipped).

#[path = "common/paths.rs"]
mod paths;
use paths::manifest_dir;

#[path = "common/access.rs"]
mod access;
#[path = "common/helm.rs"]
mod helm_bin;
#[path = "../../tests/src/ports.rs"]
mod ports;
use ports::free_port;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use helm_bin::helm;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::{Ingress, NetworkPolicy};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};
use kube::{Client, CustomResourceExt as _, Resource, ResourceExt as _};
use lattice_operator::controller::{self, Context, DEGRADED, MANAGER, PROGRESSING};
use lattice_operator::crd::MatrixHomeserver;
use lattice_operator::metrics::Metrics;
use lattice_operator::resources::CONFIG_HASH_ANNOTATION;
use serde_json::json;

/// Longest wait for the operator or the API server to reach a state.
const WAIT: Duration = Duration::from_secs(30);

fn kubeconfig_path() -> Option<String> {
    match std::env::var("LATTICE_TEST_KUBECONFIG") {
        Ok(p) => Some(p),
        Err(_) => {
            assert!(
                std::env::var_os("LATTICE_REQUIRE_SERVICES").is_none(),
                "LATTICE_TEST_KUBECONFIG is not set but LATTICE_REQUIRE_SERVICES is: start the API server with scripts/services.sh"
            );
            eprintln!(
                "skipped: LATTICE_TEST_KUBECONFIG is not set (bash scripts/services.sh start DIR; . DIR/env)"
            );
            None
        }
    }
}

async fn config(auth: Option<AuthInfo>) -> Option<kube::Config> {
    let path = kubeconfig_path()?;
    let kc = Kubeconfig::read_from(&path).expect("reading the test kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("the test kubeconfig");
    if let Some(auth) = auth {
        config.auth_info = auth;
    }
    Some(config)
}

/// The admin client, with the CRD applied and established.
async fn admin() -> Option<Client> {
    // The operator's warnings (a refused apply, a failed Event) in the test's output.
    let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
    let client = Client::try_from(config(None).await?).expect("client");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let crd = serde_json::to_value(MatrixHomeserver::crd()).expect("crd json");
    crds.patch(
        MatrixHomeserver::crd_name(),
        &PatchParams::apply("lattice-operator-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("applying the CRD");
    wait_for("the CRD to be established", || {
        let crds = crds.clone();
        async move {
            crds.get(MatrixHomeserver::crd_name()).await.ok().and_then(|c| {
                c.status?
                    .conditions?
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            })
        }
    })
    .await;
    Some(client)
}

/// A fresh namespace per test (namespaces are never reused: without a controller-manager a
/// deleted one stays Terminating).
async fn namespace(client: &Client, prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let name = format!("{prefix}-{}-{}", nanos % 1_000_000_000, N.fetch_add(1, Ordering::Relaxed));
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("creating the namespace");
    name
}

/// Polls `f` every 50 ms until it returns `Some`, failing after `WAIT` with `what`.
/// Waits for the child `name` of a kind just made servable: any change to the homeserver
/// `matrix` re-runs its reconcile, so it is poked until the child appears.
async fn poke_until_child(
    api: &Api<MatrixHomeserver>,
    children: Api<DynamicObject>,
    name: &str,
) -> DynamicObject {
    wait_for(&format!("the child {name}"), || {
        let (api, children) = (api.clone(), children.clone());
        async move {
            let poke = json!({"metadata": {"annotations": {"test/poke": format!("{:?}", Instant::now())}}});
            let _ = api.patch("matrix", &PatchParams::default(), &Patch::Merge(&poke)).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            children.get_opt(name).await.ok().flatten()
        }
    })
    .await
}

async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < WAIT, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The operator, in-process, reconciling `ns` with `client`'s permissions until dropped.
struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl Operator {
    fn start(client: Client, ns: &str) -> Self {
        let metrics = Arc::new(Metrics::default());
        let ctx = Arc::new(Context::new(client, metrics.clone(), Some("test".into())));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(ctx, Some(ns.to_owned()), async move {
            let _ = rx.await;
        }));
        Self { stop: Some(tx), task: Some(task), metrics }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

async fn secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let string_data: BTreeMap<String, String> =
        data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": string_data}))
        .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("creating a Secret");
}

async fn apply_homeserver(
    client: &Client,
    ns: &str,
    spec: serde_json::Value,
) -> Result<MatrixHomeserver, kube::Error> {
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), ns);
    let obj = json!({"apiVersion": "lattice.dev/v1alpha1", "kind": "MatrixHomeserver", "metadata": {"name": "matrix"}, "spec": spec});
    api.patch("matrix", &PatchParams::apply("lattice-operator-tests").force(), &Patch::Apply(&obj)).await
}

fn production_spec() -> serde_json::Value {
    json!({
        "serverName": "example.org",
        "image": "registry.example/lattice:0.1.0",
        "replicas": 2,
        "shards": 1,
        "database": {"postgres": {"secretRef": {"name": "matrix-db"}}},
        "kv": {"redis": {"secretRef": {"name": "matrix-redis"}}},
        "media": {"s3": {"endpoint": "http://s3.internal:9000", "bucket": "media", "credentialsSecret": "matrix-s3"}},
        "ingress": {"host": "matrix.example.org", "tlsSecretName": "matrix-public-tls"}
    })
}

async fn provide_secrets(client: &Client, ns: &str) {
    secret(client, ns, "matrix-db", &[("url", "postgres://lattice:pw@db/lattice")]).await;
    secret(client, ns, "matrix-redis", &[("url", "redis://redis:6379")]).await;
    secret(client, ns, "matrix-s3", &[("accessKeyId", "a"), ("secretAccessKey", "b")]).await;
}

fn condition<'a>(
    hs: &'a MatrixHomeserver,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    hs.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

/// Waits until the status describes `generation` and `check` holds.
async fn wait_status(
    api: &Api<MatrixHomeserver>,
    generation: i64,
    what: &str,
    check: impl Fn(&MatrixHomeserver) -> bool,
) -> MatrixHomeserver {
    wait_for(what, || async {
        let hs = api.get("matrix").await.ok()?;
        (hs.status.as_ref()?.observed_generation == Some(generation) && check(&hs)).then_some(hs)
    })
    .await
}

fn is(hs: &MatrixHomeserver, type_: &str, status: &str, reason: &str) -> bool {
    condition(hs, type_).is_some_and(|c| c.status == status && c.reason == reason)
}

fn pod_hash(d: &Deployment) -> Option<String> {
    d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(CONFIG_HASH_ANNOTATION).cloned()
}

/// Asserts `obj` is controlled by `hs` (for garbage collection).
fn assert_owned<K: Resource>(obj: &K, hs: &MatrixHomeserver) {
    let refs = obj.meta().owner_references.clone().unwrap_or_default();
    assert!(
        refs.iter().any(|o| Some(&o.uid) == hs.metadata.uid.as_ref()
            && o.controller == Some(true)
            && o.kind == "MatrixHomeserver"),
        "{:?} is not controlled by the MatrixHomeserver: {refs:?}",
        obj.meta().name
    );
}

/// Whether kube-controller-manager runs (owner-reference garbage collection needs it): its
/// service-account controller gives every namespace a `default` ServiceAccount soon after it is
/// created (`scripts/kube.sh` runs it without leader election, so there is no Lease to look at).
async fn controller_manager_runs(client: &Client, ns: &str) -> bool {
    Api::<ServiceAccount>::namespaced(client.clone(), ns).get_opt("default").await.ok().flatten().is_some()
}

/// The whole life of one MatrixHomeserver: children, status, a spec change, a missing Secret,
/// a pass-through typo, dropping the shards, deletion.
#[tokio::test]
async fn reconciles_a_homeserver_through_its_life() {
    let Some(client) = admin().await else { return };
    let ns = namespace(&client, "op-life").await;
    provide_secrets(&client, &ns).await;
    let operator = Operator::start(client.clone(), &ns);
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);

    let created =
        apply_homeserver(&client, &ns, production_spec()).await.expect("applying the MatrixHomeserver");
    let g1 = created.metadata.generation.expect("generation");
    let hs = wait_status(&api, g1, "Progressing with every child applied", |hs| {
        is(hs, PROGRESSING, "True", "RollingOut") && is(hs, DEGRADED, "False", "AsExpected")
    })
    .await;
    let status = hs.status.clone().expect("status");
    assert_eq!(status.url.as_deref(), Some("https://matrix.example.org"));
    assert!(
        condition(&hs, "Ready")
            .is_some_and(|c| c.status == "False" && c.message.contains("0 of 2 front pods ready"))
    );

    // Every child exists and is controlled by the MatrixHomeserver.
    let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
    let d = deployments.get("matrix").await.expect("Deployment");
    assert_owned(&d, &hs);
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(2));
    assert_eq!(
        d.metadata.managed_fields.as_ref().map(|m| m.iter().any(|f| f.manager.as_deref() == Some(MANAGER))),
        Some(true)
    );
    let sts =
        Api::<StatefulSet>::namespaced(client.clone(), &ns).get("matrix-shards").await.expect("StatefulSet");
    assert_owned(&sts, &hs);
    // Shard placement: the fronts forward, the shard pods run their own file with Leases here.
    let args = |t: Option<&k8s_openapi::api::core::v1::PodTemplateSpec>| {
        t.and_then(|t| t.spec.as_ref()).and_then(|p| p.containers[0].args.clone()).unwrap_or_default()
    };
    assert_eq!(args(d.spec.as_ref().map(|s| &s.template))[2], "/etc/lattice/config/lattice.toml");
    assert_eq!(args(sts.spec.as_ref().map(|s| &s.template))[2], "/etc/lattice/config/lattice-shard.toml");
    let files =
        Api::<ConfigMap>::namespaced(client.clone(), &ns).get("matrix-config").await.expect("ConfigMap").data;
    let files = files.expect("config files");
    assert!(files["lattice.toml"].contains("role = \"front\""), "{}", files["lattice.toml"]);
    let shard = &files["lattice-shard.toml"];
    assert!(
        shard.contains("role = \"shard\"") && shard.contains(&format!("namespace = \"{ns}\"")),
        "{shard}"
    );
    assert!(shard.contains(&format!("peer_address = \"http://{{identity}}.matrix-shards.{ns}.svc:8449\"")));
    for name in ["matrix", "matrix-shards"] {
        assert_owned(&Api::<Service>::namespaced(client.clone(), &ns).get(name).await.expect("Service"), &hs);
        assert_owned(
            &Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns).get(name).await.expect("PDB"),
            &hs,
        );
    }
    assert_owned(
        &Api::<ConfigMap>::namespaced(client.clone(), &ns).get("matrix-config").await.expect("ConfigMap"),
        &hs,
    );
    assert_owned(
        &Api::<NetworkPolicy>::namespaced(client.clone(), &ns).get("matrix").await.expect("NetworkPolicy"),
        &hs,
    );
    assert_owned(
        &Api::<ServiceAccount>::namespaced(client.clone(), &ns).get("matrix").await.expect("SA"),
        &hs,
    );
    assert_owned(
        &Api::<RoleBinding>::namespaced(client.clone(), &ns).get("matrix").await.expect("RoleBinding"),
        &hs,
    );
    assert_owned(&Api::<Ingress>::namespaced(client.clone(), &ns).get("matrix").await.expect("Ingress"), &hs);
    let role = Api::<Role>::namespaced(client.clone(), &ns).get("matrix").await.expect("Role");
    assert_owned(&role, &hs);
    let rules = role.rules.unwrap_or_default();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].resources.as_deref(), Some(&["leases".to_owned()][..]));
    assert_eq!(rules[0].verbs, lattice_operator::resources::LEASE_VERBS);

    // The keys: generated, not owned (kept on delete), and the status names the signing key.
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let keys = secrets.get("matrix-keys").await.expect("keys Secret");
    assert!(keys.owner_references().is_empty(), "the keys Secret must outlive the MatrixHomeserver");
    let data = keys.data.clone().expect("keys");
    for k in lattice_operator::secrets::KEYS {
        assert!(data.get(k).is_some_and(|v| !v.0.is_empty()), "key {k} missing");
    }
    assert_eq!(
        status.signing_key_id.as_deref(),
        Some(lattice_operator::secrets::signing_key_id(&data["signing_key"].0).as_str())
    );

    // A config change rolls the pods; scaling does not; the keys never change.
    let hash1 = pod_hash(&d).expect("config hash");
    let mut spec = production_spec();
    spec["registration"] = json!("open");
    let g2 = apply_homeserver(&client, &ns, spec.clone())
        .await
        .expect("update")
        .metadata
        .generation
        .expect("generation");
    assert!(g2 > g1);
    wait_status(&api, g2, "the new generation reconciled", |hs| is(hs, DEGRADED, "False", "AsExpected"))
        .await;
    let d = deployments.get("matrix").await.expect("Deployment");
    let hash2 = pod_hash(&d).expect("config hash");
    assert_ne!(hash1, hash2, "a config change must change the pod template");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns).get("matrix-config").await.expect("ConfigMap");
    assert!(cm.data.as_ref().is_some_and(|d| d["lattice.toml"].contains("registration = \"open\"")));
    spec["replicas"] = json!(3);
    let g3 = apply_homeserver(&client, &ns, spec.clone())
        .await
        .expect("scale")
        .metadata
        .generation
        .expect("generation");
    wait_status(&api, g3, "the scaled generation reconciled", |_| true).await;
    let d = deployments.get("matrix").await.expect("Deployment");
    assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(3));
    assert_eq!(pod_hash(&d), Some(hash2.clone()), "scaling must not roll the pods");
    assert_eq!(
        secrets.get("matrix-keys").await.expect("keys").data,
        Some(data.clone()),
        "keys are never rotated"
    );

    // A referenced Secret goes away: Degraded, naming it and the field; back when it returns.
    secrets.delete("matrix-db", &DeleteParams::default()).await.expect("deleting the db Secret");
    let hs = wait_status(&api, g3, "Degraded after the db Secret was deleted", |hs| {
        is(hs, DEGRADED, "True", "SecretMissing")
    })
    .await;
    let message = &condition(&hs, DEGRADED).expect("Degraded").message;
    assert!(
        message.contains(&format!("Secret {ns}/matrix-db"))
            && message.contains("spec.database.postgres.secretRef")
            && message.contains("`url`"),
        "{message}"
    );
    secret(&client, &ns, "matrix-db", &[("url", "postgres://lattice:pw@db/lattice")]).await;
    wait_status(&api, g3, "recovered after the Secret came back", |hs| {
        is(hs, DEGRADED, "False", "AsExpected")
    })
    .await;

    // A typo in the pass-through config: Degraded with the key, the pods left alone.
    spec["runtimeConfig"] = json!({"limits": {"execution_msec": 100}});
    let g4 = apply_homeserver(&client, &ns, spec.clone())
        .await
        .expect("typo")
        .metadata
        .generation
        .expect("generation");
    let hs =
        wait_status(&api, g4, "Degraded for the typo", |hs| is(hs, DEGRADED, "True", "InvalidSpec")).await;
    let message = &condition(&hs, DEGRADED).expect("Degraded").message;
    assert!(
        message.contains("spec.runtimeConfig.limits.execution_msec")
            && message.contains("did you mean `execution_ms`"),
        "{message}"
    );
    assert_eq!(
        pod_hash(&deployments.get("matrix").await.expect("Deployment")),
        Some(hash2),
        "an invalid spec must not roll the pods"
    );

    // Dropping the shards and the ingress removes their children.
    spec["runtimeConfig"] = json!({"limits": {"execution_ms": 100}});
    spec["shards"] = json!(0);
    spec.as_object_mut().expect("spec").remove("ingress");
    let g5 = apply_homeserver(&client, &ns, spec)
        .await
        .expect("no shards")
        .metadata
        .generation
        .expect("generation");
    wait_status(&api, g5, "reconciled without shards", |hs| is(hs, DEGRADED, "False", "AsExpected")).await;
    // One file again, without [placement]: each front owns every shard, as before shard pods.
    let files = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("matrix-config")
        .await
        .expect("ConfigMap")
        .data
        .expect("config files");
    assert_eq!(files.keys().collect::<Vec<_>>(), ["lattice.toml"]);
    assert!(!files["lattice.toml"].contains("[placement"), "{}", files["lattice.toml"]);
    wait_for("the StatefulSet and Ingress to go", || {
        let (c, ns) = (client.clone(), ns.clone());
        async move {
            let sts = Api::<StatefulSet>::namespaced(c.clone(), &ns).get_opt("matrix-shards").await.ok()?;
            let ing = Api::<Ingress>::namespaced(c, &ns).get_opt("matrix").await.ok()?;
            (sts.is_none_or(|s| s.metadata.deletion_timestamp.is_some())
                && ing.is_none_or(|i| i.metadata.deletion_timestamp.is_some()))
            .then_some(())
        }
    })
    .await;
    assert!(operator.metrics.reconciles() >= 5);

    // What the operator did, as Kubernetes Events on the MatrixHomeserver.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("matrix"))
        .filter_map(|e| e.reason)
        .collect();
    for want in ["KeysGenerated", "SecretMissing", "InvalidSpec"] {
        assert!(reasons.iter().any(|r| r == want), "no {want} Event in {reasons:?}");
    }

    // Deletion: children go by owner reference (kube-controller-manager's garbage collector);
    // the keys stay.
    operator.stop().await;
    api.delete("matrix", &DeleteParams::foreground()).await.expect("deleting the MatrixHomeserver");
    if controller_manager_runs(&client, &ns).await {
        wait_for("the children to be garbage-collected", || {
            let deployments = deployments.clone();
            async move { deployments.get_opt("matrix").await.ok()?.is_none().then_some(()) }
        })
        .await;
    } else {
        eprintln!(
            "clean-up assertion skipped: no kube-controller-manager runs, so owner references do not cascade"
        );
    }
    assert!(secrets.get_opt("matrix-keys").await.expect("get").is_some(), "the keys Secret is kept");
}

/// The CRD's CEL rules refuse what the operator could not run.
#[tokio::test]
async fn cel_rules_refuse_invalid_specs() {
    let Some(client) = admin().await else { return };
    let ns = namespace(&client, "op-cel").await;
    let embedded = json!({
        "serverName": "small.example", "image": "lattice:dev", "replicas": 2,
        "database": {"embedded": {}}, "kv": {"embedded": {}}, "media": {"volume": {}}
    });
    let e = apply_homeserver(&client, &ns, embedded.clone()).await.expect_err("two pods on embedded storage");
    assert!(e.to_string().contains("embedded database, KV or media volume need exactly one pod"), "{e}");

    let both = json!({
        "serverName": "small.example", "image": "lattice:dev",
        "database": {"embedded": {}, "postgres": {"secretRef": {"name": "x"}}}, "kv": {"embedded": {}}, "media": {"volume": {}}
    });
    let e = apply_homeserver(&client, &ns, both).await.expect_err("two database backends");
    assert!(e.to_string().contains("set exactly one of database.postgres or database.embedded"), "{e}");

    let mut one = embedded;
    one["replicas"] = json!(1);
    apply_homeserver(&client, &ns, one.clone()).await.expect("one pod on embedded storage is fine");
    one["serverName"] = json!("other.example");
    let e = apply_homeserver(&client, &ns, one).await.expect_err("serverName changed");
    assert!(e.to_string().contains("serverName is immutable"), "{e}");
}

/// `helm template` of the chart in `ns` with extra `--set` values, as documents.
fn helm_template(helm: &str, ns: &str, sets: &[&str]) -> Vec<serde_json::Value> {
    let chart = manifest_dir().join("../charts/lattice-operator");
    let mut cmd = std::process::Command::new(helm);
    cmd.args(["template", "lattice"]).arg(&chart).args(["--namespace", ns]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("running helm template");
    assert!(out.status.success(), "helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|d| {
            let v: serde_json::Value = serde::Deserialize::deserialize(d).ok()?;
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// The pods' ServiceAccount, with the Role and binding the operator applies, can do with Leases
/// exactly what the runtime's Kubernetes lease backend does (`runtime/backends/src/kube_lease.rs`:
/// create, get, replace, list by label) and no more.
#[tokio::test]
async fn pods_service_account_can_use_leases_and_no_more() {
    let Some(admin) = admin().await else { return };
    let ns = namespace(&admin, "op-leases").await;
    provide_secrets(&admin, &ns).await;
    let operator = Operator::start(admin.clone(), &ns);
    let created = apply_homeserver(&admin, &ns, production_spec()).await.expect("apply");
    let api = Api::<MatrixHomeserver>::namespaced(admin.clone(), &ns);
    wait_status(&api, created.metadata.generation.expect("generation"), "reconciled", |hs| {
        is(hs, PROGRESSING, "True", "RollingOut")
    })
    .await;
    operator.stop().await;
    let auth = access::service_account_auth(&admin, &ns, "matrix", 600).await;
    let pods = Client::try_from(config(Some(auth)).await.expect("config")).expect("client");
    let leases = Api::<Lease>::namespaced(pods.clone(), &ns);

    // What the backend does: create, read, replace with the resourceVersion read, list by label.
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "probe-m-pod", "labels": {"lattice.dev/lease": "true"}},
        "spec": {"holderIdentity": "pod", "leaseDurationSeconds": 10}
    }))
    .expect("lease");
    leases.create(&PostParams::default(), &lease).await.expect("create a Lease");
    let mut lease = leases.get("probe-m-pod").await.expect("get a Lease");
    lease.spec.as_mut().expect("spec").holder_identity = Some("other".into());
    leases.replace("probe-m-pod", &PostParams::default(), &lease).await.expect("replace a Lease");
    let listed = leases
        .list(&kube::api::ListParams::default().labels("lattice.dev/lease=true"))
        .await
        .expect("list Leases");
    assert_eq!(listed.items.len(), 1);

    // And no more: the backend never patches, deletes or watches.
    let forbidden = |r: Result<_, kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    assert!(forbidden(leases.delete("probe-m-pod", &DeleteParams::default()).await.map(|_| ())));
    let merge = json!({"spec": {"holderIdentity": "x"}});
    assert!(forbidden(
        leases.patch("probe-m-pod", &PatchParams::default(), &Patch::Merge(&merge)).await.map(|_| ())
    ));
    for (group, resource, verb) in [
        ("coordination.k8s.io", "leases", "watch"),
        ("coordination.k8s.io", "leases", "deletecollection"),
        ("", "secrets", "get"),
        ("", "configmaps", "get"),
        ("", "pods", "list"),
    ] {
        assert!(
            !access::allowed(&pods, &ns, group, resource, verb).await,
            "the pods may {verb} {group}/{resource}"
        );
    }
}

/// The operator run with a token of a ServiceAccount bound by the chart's RBAC: it suffices for
/// a whole reconcile, and it does not reach what the operator never touches.
#[tokio::test]
async fn chart_rbac_suffices_and_is_not_wider() {
    let Some(admin) = admin().await else { return };
    let Some(helm) = helm() else { return };
    let ops = namespace(&admin, "op-rbac").await;
    let ns = namespace(&admin, "op-rbac-hs").await;
    // The chart's ServiceAccount, ClusterRole and binding, applied for real.
    let discovery = Discovery::new(admin.clone()).run().await.expect("discovery");
    for doc in helm_template(&helm, &ops, &[]) {
        let kind = doc["kind"].as_str().unwrap_or_default();
        if ["ServiceAccount", "ClusterRole", "ClusterRoleBinding"].contains(&kind) {
            apply_dynamic(&admin, &discovery, &ops, &doc, false).await.expect("applying the chart's RBAC");
        }
    }
    let auth = access::service_account_auth(&admin, &ops, "lattice-lattice-operator", 600).await;
    let client = Client::try_from(config(Some(auth)).await.expect("config")).expect("client");

    // Sufficient: a full reconcile with every child kind, the keys and the status.
    provide_secrets(&admin, &ns).await;
    let operator = Operator::start(client.clone(), &ns);
    let created = apply_homeserver(&admin, &ns, production_spec()).await.expect("apply");
    let api = Api::<MatrixHomeserver>::namespaced(admin.clone(), &ns);
    wait_status(
        &api,
        created.metadata.generation.expect("generation"),
        "reconciled with the chart's RBAC",
        |hs| is(hs, PROGRESSING, "True", "RollingOut"),
    )
    .await;
    let text = operator.metrics.render();
    assert!(
        text.contains("lattice_operator_reconcile_errors_total 0"),
        "reconciles failed with the chart's RBAC:
{text}"
    );
    operator.stop().await;

    // Not wider: a sample of what it must not do.
    for (group, resource, verb) in [
        ("", "pods", "create"),
        ("", "pods", "get"),
        ("", "secrets", "delete"),
        ("", "secrets", "update"),
        ("", "namespaces", "delete"),
        ("apps", "deployments", "delete"),
        ("lattice.dev", "matrixhomeservers", "delete"),
        ("lattice.dev", "matrixhomeservers", "patch"),
        ("rbac.authorization.k8s.io", "clusterroles", "create"),
        ("rbac.authorization.k8s.io", "roles", "delete"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "create"),
    ] {
        assert!(
            !access::allowed(&client, &ns, group, resource, verb).await,
            "the operator may {verb} {group}/{resource}; it never needs to"
        );
    }
}

/// Applies one rendered document (server-side; `dry_run` asks the API server to validate and
/// admit it without storing it).
async fn apply_dynamic(
    client: &Client,
    discovery: &Discovery,
    ns: &str,
    doc: &serde_json::Value,
    dry_run: bool,
) -> Result<(), kube::Error> {
    let (group, version) = match doc["apiVersion"].as_str().unwrap_or_default().split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (String::new(), doc["apiVersion"].as_str().unwrap_or_default().to_owned()),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap_or_default());
    let (ar, caps) =
        discovery.resolve_gvk(&gvk).unwrap_or_else(|| panic!("the API server does not serve {gvk:?}"));
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => {
            Api::namespaced_with(client.clone(), doc["metadata"]["namespace"].as_str().unwrap_or(ns), &ar)
        }
        Scope::Cluster => Api::all_with(client.clone(), &ar),
    };
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let mut pp = PatchParams::apply("lattice-chart-test").force();
    if dry_run {
        pp = pp.dry_run();
    }
    api.patch(name, &pp, &Patch::Apply(doc)).await.map(|_| ())
}

/// The chart, rendered with every option set, is accepted by the API server (server-side dry
/// run of every document: schema, CEL rules, RBAC validation, admission).
#[tokio::test]
async fn chart_renders_and_passes_a_server_side_dry_run() {
    let Some(client) = admin().await else { return };
    let Some(helm) = helm() else { return };
    let ns = namespace(&client, "op-chart").await;
    let docs = helm_template(
        &helm,
        &ns,
        &[
            "image.registry=mirror.internal:5000",
            "imagePullSecrets[0].name=regcred",
            "nodeSelector.pool=system",
            "tolerations[0].key=dedicated",
            "tolerations[0].operator=Exists",
            "replicaCount=2",
            "sample.enabled=true",
        ],
    );
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for want in [
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "MatrixHomeserver",
    ] {
        assert!(kinds.contains(&want), "the chart renders no {want}: {kinds:?}");
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").expect("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "mirror.internal:5000/lattice/operator:0.1.0");
    assert_eq!(pod["imagePullSecrets"][0]["name"], "regcred");
    assert_eq!(pod["nodeSelector"]["pool"], "system");
    assert_eq!(pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"], true);
    let crd = docs.iter().find(|d| d["kind"] == "CustomResourceDefinition").expect("CRD");
    assert_eq!(crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");

    let discovery = Discovery::new(client.clone()).run().await.expect("discovery");
    for doc in &docs {
        apply_dynamic(&client, &discovery, &ns, doc, true).await.unwrap_or_else(|e| {
            panic!("the API server refused {} {}: {e}", doc["kind"], doc["metadata"]["name"])
        });
    }
    // Nothing was stored.
    assert!(
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .get_opt("lattice-lattice-operator")
            .await
            .expect("get")
            .is_none()
    );
}

/// `spec.tls.issuerRef`: Degraded while cert-manager is missing; a Certificate once its CRD is
/// served (cert-manager itself does not run here: the CRD is reduced to its kind and an open
/// schema, enough to see what the operator asks cert-manager for).
#[tokio::test]
async fn issuer_ref_asks_cert_manager_for_a_certificate() {
    let Some(client) = admin().await else { return };
    let ns = namespace(&client, "op-cert").await;
    provide_secrets(&client, &ns).await;
    let operator = Operator::start(client.clone(), &ns);
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);
    let mut spec = production_spec();
    spec["tls"] = json!({"issuerRef": {"name": "internal-ca", "kind": "ClusterIssuer"}});
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let served = crds.get_opt("certificates.cert-manager.io").await.expect("get CRD").is_some();
    let g = apply_homeserver(&client, &ns, spec.clone())
        .await
        .expect("apply")
        .metadata
        .generation
        .expect("generation");
    if !served {
        let hs = wait_status(&api, g, "Degraded without cert-manager", |hs| {
            is(hs, DEGRADED, "True", "CertManagerMissing")
        })
        .await;
        assert!(condition(&hs, DEGRADED).is_some_and(|c| c.message.contains("install cert-manager")));
    }
    serve_reduced_crd(&client, "cert-manager.io", "Certificate", "certificates").await;
    let certs = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &ns,
        &lattice_operator::resources::certificate_resource(),
    );
    let cert = poke_until_child(&api, certs.clone(), "matrix-tls").await;
    let hs = api.get("matrix").await.expect("get");
    assert_owned(&cert, &hs);
    assert_eq!(cert.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(cert.data["spec"]["secretName"], "matrix-tls");
    assert!(cert.data["spec"]["dnsNames"].as_array().is_some_and(|d| d.contains(&json!("example.org"))));
    let d = Api::<Deployment>::namespaced(client.clone(), &ns).get("matrix").await.expect("Deployment");
    let volumes = d.spec.and_then(|s| s.template.spec).and_then(|p| p.volumes).unwrap_or_default();
    assert!(
        volumes
            .iter()
            .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("matrix-tls"))
    );
    // Back to a user-provided Secret: the Certificate goes.
    secret(&client, &ns, "own-tls", &[("tls.crt", "x"), ("tls.key", "y")]).await;
    spec["tls"] = json!({"secretName": "own-tls"});
    let g =
        apply_homeserver(&client, &ns, spec).await.expect("apply").metadata.generation.expect("generation");
    wait_status(&api, g, "reconciled with its own Secret", |hs| is(hs, DEGRADED, "False", "AsExpected"))
        .await;
    assert!(
        certs
            .get_opt("matrix-tls")
            .await
            .expect("get")
            .is_none_or(|c| c.metadata.deletion_timestamp.is_some())
    );
    operator.stop().await;
}

/// Two replicas: one leads; the other takes over only once the leader stops renewing and its
/// Lease expires; the old leader then learns it lost.
#[tokio::test]
async fn leader_election_hands_over_only_after_expiry() {
    use lattice_operator::leader::{LeaderElection, LeaderError};
    let Some(client) = admin().await else { return };
    let ns = namespace(&client, "op-leader").await;
    let leases = Api::<Lease>::namespaced(client.clone(), &ns);
    let lease_for = Duration::from_secs(2);
    let a = LeaderElection::new(leases.clone(), "leader", "a").with_duration(lease_for);
    let b = LeaderElection::new(leases.clone(), "leader", "b").with_duration(lease_for);
    assert!(a.try_acquire().await.expect("a"), "a takes the free Lease");
    assert!(!b.try_acquire().await.expect("b"), "b must not take a held Lease");
    assert!(a.try_acquire().await.expect("a renews"), "a renews its own Lease");
    // a stops renewing; b gets the Lease only after it expired.
    let stopped = Instant::now();
    b.acquire().await.expect("b takes over");
    assert!(
        stopped.elapsed() >= lease_for,
        "b took the Lease {:?} after a's last renewal",
        stopped.elapsed()
    );
    let lease = leases.get("leader").await.expect("Lease").spec.expect("spec");
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));
    match tokio::time::timeout(WAIT, a.hold()).await.expect("a learns") {
        LeaderError::Lost { holder, .. } => assert_eq!(holder, "b"),
        e @ LeaderError::Api { .. } => panic!("{e}"),
    }
}

/// The binary as the chart runs it: `lattice-operator run` with leader election, reconciling
/// one namespace, with JSON logs, `/metrics`, `/healthz` and `/readyz`, stopping on SIGTERM.
#[tokio::test]
async fn the_binary_leads_reconciles_and_serves_metrics() {
    let Some(client) = admin().await else { return };
    let Some(kubeconfig) = kubeconfig_path() else { return };
    let ns = namespace(&client, "op-bin").await;
    provide_secrets(&client, &ns).await;
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("operator.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_lattice-operator"))
        .arg("run")
        .env("KUBECONFIG", &kubeconfig)
        .env("LATTICE_OPERATOR_NAMESPACE", &ns)
        .env("LATTICE_OPERATOR_WATCH_NAMESPACE", &ns)
        .env("LATTICE_OPERATOR_METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("POD_NAME", "operator-0")
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("starting lattice-operator");
    let get = |path: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await.ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        Some(out)
    };
    wait_for("/readyz to say it leads", || async {
        get("/readyz").await.filter(|r| r.starts_with("HTTP/1.0 200"))
    })
    .await;
    let lease = Api::<Lease>::namespaced(client.clone(), &ns)
        .get("lattice-operator-leader")
        .await
        .expect("the leader Lease");
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("operator-0"));

    let g = apply_homeserver(&client, &ns, production_spec())
        .await
        .expect("apply")
        .metadata
        .generation
        .expect("generation");
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);
    wait_status(&api, g, "the binary to reconcile", |hs| is(hs, PROGRESSING, "True", "RollingOut")).await;
    // The status is patched inside the reconcile and the counter moves when it returns, so the
    // counter may lag the status by a moment.
    let reconciled = |m: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix("lattice_operator_reconciles_total "))
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n >= 1)
    };
    let metrics = wait_for("/metrics to count a reconcile", || async {
        get("/metrics").await.filter(|m| reconciled(m))
    })
    .await;
    assert!(metrics.contains("lattice_operator_reconcile_duration_seconds_count"), "{metrics}");

    let term =
        std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(term.success());
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(start.elapsed() < WAIT, "lattice-operator did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}");
    let logs = std::fs::read_to_string(&log_path).expect("log");
    let line = logs.lines().find(|l| l.contains("became leader")).expect("a leader log line");
    let json: serde_json::Value = serde_json::from_str(line).expect("structured (JSON) logs");
    assert_eq!(json["fields"]["identity"], "operator-0");
}

/// Serves a kind of another project with a reduced CRD (its kind and an open schema): enough
/// to see what the operator asks of it, without running that project.
async fn serve_reduced_crd(client: &Client, group: &str, kind: &str, plural: &str) {
    let name = format!("{plural}.{group}");
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        // Groups under k8s.io need this annotation; the real Gateway API CRDs carry it.
        "metadata": {"name": name, "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/1538"}},
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase()},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    });
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(&name, &PatchParams::apply("lattice-operator-tests").force(), &Patch::Apply(&crd))
        .await
        .expect("a reduced CRD");
}

/// `spec.route`: Degraded while the Gateway API is missing; then an HTTPRoute to the client
/// Service, attached to the named Gateway; the status URL is its host name.
#[tokio::test]
async fn route_asks_the_gateway_api_for_an_http_route() {
    let Some(client) = admin().await else { return };
    let ns = namespace(&client, "op-route").await;
    provide_secrets(&client, &ns).await;
    let operator = Operator::start(client.clone(), &ns);
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);
    let mut spec = production_spec();
    spec.as_object_mut().expect("spec").remove("ingress");
    spec["route"] = json!({"parentRefs": [{"name": "public", "namespace": "gateways"}], "hostnames": ["chat.example.org"]});
    let served = Api::<CustomResourceDefinition>::all(client.clone())
        .get_opt("httproutes.gateway.networking.k8s.io")
        .await
        .expect("get CRD")
        .is_some();
    let g = apply_homeserver(&client, &ns, spec.clone())
        .await
        .expect("apply")
        .metadata
        .generation
        .expect("generation");
    if !served {
        wait_status(&api, g, "Degraded without the Gateway API", |hs| {
            is(hs, DEGRADED, "True", "GatewayApiMissing")
        })
        .await;
    }
    serve_reduced_crd(&client, "gateway.networking.k8s.io", "HTTPRoute", "httproutes").await;
    let route = poke_until_child(
        &api,
        Api::namespaced_with(client.clone(), &ns, &lattice_operator::resources::http_route_resource()),
        "matrix",
    )
    .await;
    let hs =
        wait_status(&api, g, "reconciled with the route", |hs| is(hs, DEGRADED, "False", "AsExpected")).await;
    assert_owned(&route, &hs);
    assert_eq!(route.data["spec"]["parentRefs"][0]["name"], "public");
    assert_eq!(route.data["spec"]["rules"][0]["backendRefs"][0], json!({"name": "matrix", "port": 8448}));
    assert_eq!(hs.status.and_then(|s| s.url).as_deref(), Some("https://chat.example.org"));
    // Both an Ingress and a route: refused by the CRD.
    spec["ingress"] = json!({"host": "x.example"});
    let e = apply_homeserver(&client, &ns, spec).await.expect_err("ingress and route");
    assert!(e.to_string().contains("not both"), "{e}");
    operator.stop().await;
}

/// A rollout the Deployment controller gives up on (here: its progress deadline, shortened by
/// another field manager, passes while the pods stay Pending without a scheduler) becomes
/// `Degraded` with the Deployment's own message. Needs kube-controller-manager.
#[tokio::test]
async fn a_stuck_rollout_is_degraded() {
    let Some(client) = admin().await else { return };
    let ns = namespace(&client, "op-stuck").await;
    provide_secrets(&client, &ns).await;
    let operator = Operator::start(client.clone(), &ns);
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);
    let g = apply_homeserver(&client, &ns, production_spec())
        .await
        .expect("apply")
        .metadata
        .generation
        .expect("generation");
    wait_status(&api, g, "children applied", |hs| is(hs, PROGRESSING, "True", "RollingOut")).await;
    if !controller_manager_runs(&client, &ns).await {
        eprintln!("skipped: no kube-controller-manager runs, so no Deployment reports progress");
        operator.stop().await;
        return;
    }
    // A field the operator does not set, owned by another manager: the operator's apply keeps it.
    let deadline = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "matrix"}, "spec": {"progressDeadlineSeconds": 1}});
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch("matrix", &PatchParams::apply("impatient-admin"), &Patch::Apply(&deadline))
        .await
        .expect("shortening the progress deadline");
    let hs =
        wait_status(&api, g, "Degraded for the stuck rollout", |hs| is(hs, DEGRADED, "True", "RolloutStuck"))
            .await;
    let message = &condition(&hs, DEGRADED).expect("Degraded").message;
    assert!(
        message.contains("Deployment matrix") && message.contains("ProgressDeadlineExceeded"),
        "{message}"
    );
    assert!(is(&hs, PROGRESSING, "False", "RolloutStuck"));
    operator.stop().await;
}
