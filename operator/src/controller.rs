//! The reconciler: `reconcile` brings a namespace's children in line with one MatrixHomeserver,
//! `error_policy` decides when a failed reconcile is retried, `run` wires them to the watches.
//!
//! Every child is written with server-side apply under one field manager (`MANAGER`), so fields
//! that others own (an HPA's replicas, a mutating webhook's additions) are left alone and
//! fields the operator dropped are removed. A spec the operator cannot honour (a pass-through
//! typo, a missing Secret) is reported as `Degraded` with what to change, and the running
//! children are left as they were: no crash loop, no half-applied config.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt as _};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{self, SpecError};
use crate::crd::{MatrixHomeserver, MatrixHomeserverStatus};
use crate::metrics::Metrics;
use crate::resources as r;
use crate::secrets;

/// The one field manager of everything the operator writes.
pub const MANAGER: &str = "lattice-operator";
/// Re-check a healthy server this often (drift in children the operator does not watch).
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check a server waiting on something outside the operator (a Secret, pods) this often.
const WAIT_RECHECK: Duration = Duration::from_secs(30);
/// First retry after a failed reconcile; doubled per consecutive failure up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// A reconcile that failed for a reason outside the spec (the API server, permissions): retried
/// by `error_policy` with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the MatrixHomeserver {0} has no namespace")]
    NoNamespace(String),
    #[error("applying {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {kind} {name}: {source}")]
    Delete {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the keys Secret {name}: {source}")]
    Keys {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of {name}: {source}")]
    Status {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("serializing {what}: {source}")]
    Serialize {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for the backoff.
    failures: Mutex<HashMap<ObjectRef<MatrixHomeserver>, u32>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance });
        Self { client, recorder, metrics, failures: Mutex::new(HashMap::new()) }
    }

    fn reset_failures(&self, hs: &MatrixHomeserver) {
        if let Ok(mut f) = self.failures.lock() {
            f.remove(&ObjectRef::from_obj(hs));
        }
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Runs the controller until `shutdown` resolves, over every namespace or only `namespace`.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = ctx.client.clone();
    let ns = namespace.as_deref();
    let wc = watcher::Config::default();
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=lattice-operator");
    let controller = Controller::new(api::<MatrixHomeserver>(&client, ns), wc.clone());
    let store = controller.store();
    // A referenced Secret appearing or going away re-runs the servers that name it. Metadata
    // only: the operator never caches Secret contents.
    let secrets = api::<PartialObjectMeta<Secret>>(&client, ns);
    controller
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<StatefulSet>(&client, ns), owned)
        .watches(secrets, wc, move |secret| {
            let ns = secret.namespace();
            let name = secret.name_any();
            store
                .state()
                .into_iter()
                .filter(|hs| {
                    hs.namespace() == ns
                        && (r::referenced_secrets(hs).iter().any(|(s, _, _)| *s == name)
                            || r::keys_secret_name(hs) == name)
                })
                .map(|hs| ObjectRef::from_obj(&*hs))
                .collect::<Vec<_>>()
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
}

/// Retries with exponential backoff per object, from `FIRST_BACKOFF` to `MAX_BACKOFF`.
pub fn error_policy(hs: Arc<MatrixHomeserver>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed();
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(ObjectRef::from_obj(&*hs)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay =
        FIRST_BACKOFF.saturating_mul(2u32.saturating_pow(n.saturating_sub(1).min(16))).min(MAX_BACKOFF);
    tracing::warn!(name = %hs.name_any(), namespace = ?hs.namespace(), error = %error, failures = n, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Brings the children of one MatrixHomeserver in line with its spec and writes its status.
pub async fn reconcile(hs: Arc<MatrixHomeserver>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&hs, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.reset_failures(&hs);
    }
    result
}

async fn reconcile_inner(hs: &MatrixHomeserver, ctx: &Context) -> Result<Action, Error> {
    let name = hs.name_any();
    let ns = hs.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let client = &ctx.client;
    tracing::info!(%name, %ns, generation = ?hs.metadata.generation, "reconciling");

    // 1. What the spec asks for must be renderable and its Secrets must exist.
    let rendered = match config::render(hs) {
        Ok(r) => r,
        Err(e) => return degraded(hs, ctx, "InvalidSpec", &invalid_spec_message(&e)).await,
    };
    if let Some(message) = missing_secret(hs, client, &ns).await? {
        return degraded(hs, ctx, "SecretMissing", &message).await;
    }

    // 2. The keys: generated once, kept.
    let signing_key_id = ensure_keys(hs, ctx, &ns).await?;

    // 3. The children, server-side applied; independent ones concurrently (a reconcile is a
    //    dozen round trips to the API server).
    let cert_name = format!("{name}-tls");
    let (cert_kind, route_kind) = (r::certificate_resource(), r::http_route_resource());
    let (cert, route) = tokio::try_join!(
        apply_foreign(hs, client, &ns, &cert_kind, &cert_name, r::desired_certificate(hs)),
        apply_foreign(hs, client, &ns, &route_kind, &name, r::desired_http_route(hs)),
    )?;
    if cert.is_some() {
        let message = "spec.tls.issuerRef needs cert-manager (certificates.cert-manager.io is not served): install cert-manager, or give a Secret in spec.tls.secretName";
        return degraded(hs, ctx, "CertManagerMissing", message).await;
    }
    if route.is_some() {
        let message = "spec.route needs the Gateway API (httproutes.gateway.networking.k8s.io is not served): install it, or use spec.ingress";
        return degraded(hs, ctx, "GatewayApiMissing", message).await;
    }
    let shards_name = r::shards_name(hs);
    let rbac = async {
        apply(client, &ns, &r::desired_service_account(hs)).await?;
        // A RoleBinding is checked against its Role (escalation prevention): Role first.
        apply(client, &ns, &r::desired_role(hs)).await?;
        apply(client, &ns, &r::desired_role_binding(hs)).await
    };
    let claim = async {
        match r::desired_data_claim(hs) {
            Some(claim) => ensure_created(client, &ns, &claim).await,
            None => Ok(()),
        }
    };
    let ns_ref = ns.as_str();
    let pdbs = futures::future::try_join_all(
        r::desired_pdbs(hs).into_iter().map(|pdb| async move { apply(client, ns_ref, &pdb).await }),
    );
    let shards = async {
        match r::desired_stateful_set(hs, &rendered) {
            Some(s) => {
                if let Some(svc) = r::desired_shards_service(hs) {
                    apply(client, &ns, &svc).await?;
                }
                Ok(Some(apply(client, &ns, &s).await?))
            }
            None => {
                delete_owned::<StatefulSet>(client, &ns, &shards_name, hs).await?;
                delete_owned::<Service>(client, &ns, &shards_name, hs).await?;
                delete_owned::<PodDisruptionBudget>(client, &ns, &shards_name, hs).await?;
                Ok::<_, Error>(None)
            }
        }
    };
    let ingress = async {
        match r::desired_ingress(hs) {
            Some(i) => apply(client, &ns, &i).await.map(|_| ()),
            None => delete_owned::<Ingress>(client, &ns, &name, hs).await,
        }
    };
    let (service, policy, deployment) =
        (r::desired_service(hs), r::desired_network_policy(hs), r::desired_deployment(hs, &rendered));
    // The config files before the pods that read them: a pod that a new config hash starts (or
    // the first shard pod) finds its file there.
    apply(client, &ns, &r::desired_config_map(hs, &rendered)).await?;
    let (_, _, _, _, _, deployment, stateful_set, _) = tokio::try_join!(
        rbac,
        claim,
        apply(client, &ns, &service),
        apply(client, &ns, &policy),
        pdbs,
        apply(client, &ns, &deployment),
        shards,
        ingress,
    )?;

    // 4. Status from what the workloads report.
    let ready_replicas = deployment.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0);
    let updated = deployment.status.as_ref().and_then(|s| s.updated_replicas).unwrap_or(0);
    let ready_shards =
        stateful_set.as_ref().and_then(|s| s.status.as_ref()).and_then(|s| s.ready_replicas).unwrap_or(0);
    let (want_replicas, want_shards) = (hs.spec.replicas, hs.spec.shards);
    let all_ready = ready_replicas >= want_replicas && ready_shards >= want_shards && want_replicas > 0;
    let pods = format!(
        "{ready_replicas} of {want_replicas} front pods ready ({updated} updated), {ready_shards} of {want_shards} shard pods ready"
    );
    let selector = format!("app.kubernetes.io/instance={name}");
    let stuck = rollout_problem(&deployment)
        .map(|p| format!("{p}; kubectl describe pods -n {ns} -l {selector}, and kubectl get events -n {ns}"));
    let conditions = [
        if all_ready {
            cond(READY, true, "AllPodsReady", &pods)
        } else if want_replicas == 0 {
            cond(READY, false, "ScaledToZero", "spec.replicas is 0: no pod serves clients")
        } else {
            cond(
                READY,
                false,
                "PodsNotReady",
                &format!(
                    "{pods}; pods that stay Pending usually lack a node, an image or a volume: kubectl describe pods -n {ns} -l {selector}"
                ),
            )
        },
        if all_ready {
            cond(PROGRESSING, false, "RolledOut", "every child is applied and every pod is ready")
        } else if stuck.is_some() {
            cond(
                PROGRESSING,
                false,
                "RolloutStuck",
                "the front pods stopped progressing: see the Degraded condition",
            )
        } else {
            cond(PROGRESSING, true, "RollingOut", &format!("children applied; waiting for pods: {pods}"))
        },
        match &stuck {
            Some(message) => cond(DEGRADED, true, "RolloutStuck", message),
            None => {
                cond(DEGRADED, false, "AsExpected", "the spec is valid and every referenced Secret exists")
            }
        },
    ];
    if let Some(message) = &stuck {
        let was = hs.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED));
        if was.is_none_or(|c| c.reason != "RolloutStuck") {
            publish(ctx, hs, EventType::Warning, "RolloutStuck", "Rollout", message).await;
        }
    }
    let status = MatrixHomeserverStatus {
        conditions: merge_conditions(hs, conditions.to_vec()),
        observed_generation: hs.metadata.generation,
        url: Some(r::public_url(hs)),
        ready_replicas,
        ready_shards,
        signing_key_id: Some(signing_key_id),
    };
    write_status(hs, ctx, status).await?;
    Ok(Action::requeue(if all_ready { RESYNC } else { WAIT_RECHECK }))
}

/// What the Deployment controller reports as stuck for the current template (a progress
/// deadline passed, or pods cannot be created), once it has observed that template.
fn rollout_problem(d: &Deployment) -> Option<String> {
    let status = d.status.as_ref()?;
    if status.observed_generation < d.metadata.generation {
        return None;
    }
    let conditions = status.conditions.as_deref().unwrap_or_default();
    conditions
        .iter()
        .find(|c| {
            (c.type_ == "ReplicaFailure" && c.status == "True")
                || (c.type_ == "Progressing" && c.status == "False")
        })
        .map(|c| {
            format!(
                "Deployment {}: {} ({})",
                d.metadata.name.as_deref().unwrap_or_default(),
                c.message.as_deref().unwrap_or("no message"),
                c.reason.as_deref().unwrap_or("no reason")
            )
        })
}

fn invalid_spec_message(e: &SpecError) -> String {
    format!("{e}; the running pods keep their previous config until the spec is fixed")
}

/// The first referenced Secret (or key) that is missing, as a message that says what to create.
async fn missing_secret(hs: &MatrixHomeserver, client: &Client, ns: &str) -> Result<Option<String>, Error> {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let mut seen: BTreeMap<String, Option<Secret>> = BTreeMap::new();
    for (secret, key, field) in r::referenced_secrets(hs) {
        if !seen.contains_key(&secret) {
            let got = api
                .get_opt(&secret)
                .await
                .map_err(|source| Error::Read { what: format!("Secret {ns}/{secret}"), source })?;
            seen.insert(secret.clone(), got);
        }
        match seen.get(&secret).and_then(Option::as_ref) {
            None => {
                return Ok(Some(format!(
                    "Secret {ns}/{secret} (named by {field}) does not exist: create it with the key `{key}`"
                )));
            }
            Some(s) => {
                let has = s.data.as_ref().is_some_and(|d| d.contains_key(&key))
                    || s.string_data.as_ref().is_some_and(|d| d.contains_key(&key));
                if !has {
                    return Ok(Some(format!(
                        "Secret {ns}/{secret} (named by {field}) has no key `{key}`: add it"
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Creates the keys Secret on first sight, adds keys a newer operator introduced, never changes
/// a key that exists. Returns the signing key id.
async fn ensure_keys(hs: &MatrixHomeserver, ctx: &Context, ns: &str) -> Result<String, Error> {
    let name = r::keys_secret_name(hs);
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let keys_err = |source| Error::Keys { name: name.clone(), source };
    let existing = api.get_opt(&name).await.map_err(keys_err)?;
    let secret = match existing {
        None => {
            let fresh = secrets::missing_keys(&BTreeMap::new());
            match api
                .create(
                    &PostParams { field_manager: Some(MANAGER.into()), ..Default::default() },
                    &r::desired_keys_secret(hs, fresh),
                )
                .await
            {
                Ok(s) => {
                    publish(ctx, hs, EventType::Normal, "KeysGenerated", "Generate", &format!("generated the keys Secret {name}; it is kept when the MatrixHomeserver is deleted")).await;
                    s
                }
                // Another reconcile won the race: use its keys.
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(&name).await.map_err(keys_err)?,
                Err(e) => return Err(keys_err(e)),
            }
        }
        Some(s) => {
            let missing = secrets::missing_keys(s.data.as_ref().unwrap_or(&BTreeMap::new()));
            if missing.is_empty() {
                s
            } else {
                // A merge patch adds only the new keys; an apply would claim (and could drop)
                // the existing ones.
                let patch = serde_json::json!({ "data": missing });
                let added: Vec<&String> = missing.keys().collect();
                let s = api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(keys_err)?;
                publish(
                    ctx,
                    hs,
                    EventType::Normal,
                    "KeysAdded",
                    "Generate",
                    &format!("added {added:?} to the keys Secret {name}"),
                )
                .await;
                s
            }
        }
    };
    let seed = secret
        .data
        .as_ref()
        .and_then(|d| d.get(secrets::SIGNING_KEY))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    Ok(secrets::signing_key_id(&seed))
}

/// Applies a child of a kind from another project (cert-manager's Certificate, Gateway API's
/// HTTPRoute), or deletes the one a previous spec asked for. `Ok(Some(()))` when the kind is
/// not served: that project is not installed.
async fn apply_foreign(
    hs: &MatrixHomeserver,
    client: &Client,
    ns: &str,
    ar: &kube::core::ApiResource,
    name: &str,
    desired: Option<DynamicObject>,
) -> Result<Option<()>, Error> {
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar);
    let what = format!("{} {name}", ar.kind);
    match desired {
        Some(obj) => {
            let mut value = serde_json::to_value(&obj)
                .map_err(|source| Error::Serialize { what: what.clone(), source })?;
            value["apiVersion"] = ar.api_version.clone().into();
            value["kind"] = ar.kind.clone().into();
            match api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&value)).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(Some(())),
                Err(source) => Err(Error::Apply { kind: ar.kind.clone(), name: name.into(), source }),
            }
        }
        None => {
            let existing = match api.get_opt(name).await {
                Ok(e) => e,
                // The kind is not served: there is nothing to delete.
                Err(kube::Error::Api(e)) if e.code == 404 => None,
                Err(source) => return Err(Error::Read { what, source }),
            };
            let uid = hs.metadata.uid.as_deref();
            if existing.is_some_and(|c| c.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid)) {
                match api.delete(name, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => {
                        return Err(Error::Delete { kind: ar.kind.clone(), name: name.into(), source });
                    }
                }
            }
            Ok(None)
        }
    }
}

/// Server-side apply under `MANAGER`, forcing ownership of the fields it sets.
pub async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::namespaced(client.clone(), ns);
    let mut value = serde_json::to_value(obj)
        .map_err(|source| Error::Serialize { what: format!("{} {name}", K::kind(&())), source })?;
    // k8s-openapi omits apiVersion and kind when serializing; apply needs them.
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&value))
        .await
        .map_err(|source| Error::Apply { kind: K::kind(&()).into_owned(), name, source })
}

/// Creates `obj` unless it exists (claims: their spec is immutable once bound).
async fn ensure_created<K>(client: &Client, ns: &str, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::namespaced(client.clone(), ns);
    match api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(source) => Err(Error::Apply { kind: K::kind(&()).into_owned(), name, source }),
    }
}

/// Deletes a child the spec no longer asks for, if this MatrixHomeserver owns it.
async fn delete_owned<K>(client: &Client, ns: &str, name: &str, hs: &MatrixHomeserver) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let Some(existing) = api
        .get_opt(name)
        .await
        .map_err(|source| Error::Read { what: format!("{} {name}", K::kind(&())), source })?
    else {
        return Ok(());
    };
    let uid = hs.metadata.uid.as_deref();
    if !existing.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete { kind: K::kind(&()).into_owned(), name: name.into(), source }),
    }
}

fn cond(type_: &str, status: bool, reason: &str, message: &str) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
        observed_generation: None,
    }
}

/// Keeps `lastTransitionTime` of conditions whose status did not change, and stamps each with
/// the generation it describes.
fn merge_conditions(hs: &MatrixHomeserver, new: Vec<Condition>) -> Vec<Condition> {
    let old = hs.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    new.into_iter()
        .map(|mut c| {
            if let Some(o) = old.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
                c.last_transition_time = o.last_transition_time.clone();
            }
            c.observed_generation = hs.metadata.generation;
            c
        })
        .collect()
}

/// Reports a spec the operator cannot honour; the children stay as they were.
async fn degraded(
    hs: &MatrixHomeserver,
    ctx: &Context,
    reason: &str,
    message: &str,
) -> Result<Action, Error> {
    tracing::warn!(name = %hs.name_any(), namespace = ?hs.namespace(), reason, message, "degraded");
    let was = hs
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == DEGRADED))
        .map(|c| (c.status.clone(), c.message.clone()));
    if was != Some(("True".into(), message.into())) {
        publish(ctx, hs, EventType::Warning, reason, "Validate", message).await;
    }
    let old = hs.status.clone().unwrap_or_default();
    // Ready still describes the pods, which keep serving with their previous config.
    let ready = old.conditions.iter().find(|c| c.type_ == READY).cloned().unwrap_or_else(|| {
        cond(READY, false, reason, "nothing is deployed until the Degraded condition is resolved")
    });
    let conditions = vec![
        ready,
        cond(PROGRESSING, false, reason, "waiting for the spec or its Secrets to be fixed"),
        cond(DEGRADED, true, reason, message),
    ];
    let status = MatrixHomeserverStatus {
        conditions: merge_conditions(hs, conditions),
        observed_generation: hs.metadata.generation,
        ..old
    };
    write_status(hs, ctx, status).await?;
    Ok(Action::requeue(WAIT_RECHECK))
}

async fn write_status(
    hs: &MatrixHomeserver,
    ctx: &Context,
    status: MatrixHomeserverStatus,
) -> Result<(), Error> {
    let name = hs.name_any();
    let ns = hs.namespace().ok_or_else(|| Error::NoNamespace(name.clone()))?;
    let api = Api::<MatrixHomeserver>::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": MatrixHomeserver::api_version(&()),
        "kind": MatrixHomeserver::kind(&()),
        "status": status,
    });
    api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|source| Error::Status { name, source })?;
    Ok(())
}

/// Kubernetes Events are best effort: a failure to record one is logged, not retried.
async fn publish(
    ctx: &Context,
    hs: &MatrixHomeserver,
    type_: EventType,
    reason: &str,
    action: &str,
    note: &str,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.into()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &hs.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not record an Event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn homeserver(name: &str) -> Arc<MatrixHomeserver> {
        let mut hs: MatrixHomeserver = serde_json::from_value(serde_json::json!({
            "apiVersion": "lattice.dev/v1alpha1", "kind": "MatrixHomeserver",
            "metadata": {"name": name, "namespace": "n"},
            "spec": {"serverName": "a.example", "image": "i", "database": {"embedded": {}}, "kv": {"embedded": {}}, "media": {"volume": {}}}
        }))
        .expect("sample");
        hs.metadata.uid = Some(name.into());
        Arc::new(hs)
    }

    #[tokio::test]
    async fn error_policy_backs_off_per_object_and_resets() {
        // A client that is never used: error_policy does no I/O.
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let ctx = Arc::new(Context::new(client, Arc::new(Metrics::default()), None));
        let err = Error::NoNamespace("x".into());
        let (a, b) = (homeserver("a"), homeserver("b"));
        let delays: Vec<Action> = (0..4).map(|_| error_policy(a.clone(), &err, ctx.clone())).collect();
        let secs = |s| Action::requeue(Duration::from_secs(s));
        assert_eq!(delays, [secs(1), secs(2), secs(4), secs(8)]);
        assert_eq!(error_policy(b.clone(), &err, ctx.clone()), secs(1), "another object has its own count");
        for _ in 0..20 {
            error_policy(a.clone(), &err, ctx.clone());
        }
        assert_eq!(error_policy(a.clone(), &err, ctx.clone()), Action::requeue(MAX_BACKOFF));
        ctx.reset_failures(&a);
        assert_eq!(error_policy(a, &err, ctx.clone()), secs(1), "a success resets the backoff");
        assert!(ctx.metrics.render().contains("lattice_operator_reconcile_errors_total 27"));
    }
}
