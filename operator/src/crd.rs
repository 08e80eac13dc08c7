//! The `MatrixHomeserver` custom resource, `lattice.dev/v1alpha1`.
//!
//! The Rust types are the source of the CRD: `lattice-operator crdgen` writes them to
//! `crds/matrixhomeservers.yaml` and into the chart, and a test fails when either is stale.
//! Rules the API server can check (immutability, embedded storage only on one pod, exactly one
//! backend per binding) are CEL rules in the schema, so a bad spec is refused at `kubectl apply`;
//! what needs more than the spec (a referenced Secret, the pass-through runtime config) is
//! checked by the reconciler and reported as `Degraded`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{LocalObjectReference, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use serde::{Deserialize, Serialize};

/// The API group of every Lattice resource.
pub const GROUP: &str = "lattice.dev";

/// A Matrix homeserver: the Lattice runtime serving the homeserver component, its front pods
/// and its Durable Object shard pods, with their config, keys, Services and policies.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[allow(clippy::duplicated_attributes, reason = "each printcolumn(...) repeats `type_ = \"string\"`")]
#[kube(
    group = "lattice.dev",
    version = "v1alpha1",
    kind = "MatrixHomeserver",
    plural = "matrixhomeservers",
    shortname = "mxhs",
    category = "lattice",
    namespaced,
    status = "MatrixHomeserverStatus",
    derive = "PartialEq",
    doc = "A Matrix homeserver run by the Lattice runtime",
    printcolumn(name = "Server", type_ = "string", json_path = ".spec.serverName"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new(
        "!(has(self.database.embedded) || has(self.kv.embedded) || has(self.media.volume)) || (self.replicas == 1 && self.shards == 0)"
    )
    .message("embedded database, KV or media volume need exactly one pod: set replicas: 1 and shards: 0, or use postgres, redis and s3")
    .reason(Reason::FieldValueForbidden)
)]
#[x_kube(
    validation = Rule::new("!(has(self.ingress) && has(self.route))")
        .message("choose an Ingress (spec.ingress) or a Gateway API route (spec.route), not both")
        .reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct MatrixHomeserverSpec {
    /// The Matrix server name (the part after the colon in user ids). Immutable: every user id,
    /// room and signature carries it.
    #[x_kube(validation = Rule::new("self == oldSelf").message("serverName is immutable: every user id, room and signature carries it; create a new MatrixHomeserver instead"))]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: String,

    /// The runtime image with the homeserver component, e.g. `registry.example/lattice:0.1.0`.
    #[schemars(length(min = 1))]
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// Stateless front pods (clients and federation).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Durable Object shard pods (a StatefulSet, needs `database.postgres`): they split the
    /// shards among themselves through Leases, and the front pods forward every object call to
    /// the owner. 0: no shard pods, every front pod owns every shard itself, so run one
    /// (`replicas: 1`).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub shards: i32,

    pub database: Database,
    pub kv: Kv,
    pub media: Media,

    /// TLS on the pods. Absent: the pods serve plain HTTP and TLS ends at the ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(default)]
    pub post_quantum: PostQuantum,
    #[serde(default)]
    pub registration: Registration,
    #[serde(default)]
    pub federation: Federation,

    /// Requests and limits of the runtime container (front and shard pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// An Ingress for clients and federation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// A Gateway API HTTPRoute for clients and federation (instead of an Ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteSpec>,
    /// `/.well-known/matrix` delegation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub well_known: Option<WellKnown>,

    /// Extra runtime settings, merged into the rendered config file: `limits`, `outbound`,
    /// `server.log_format` and homeserver `vars`. Checked by the operator first: an unknown or
    /// operator-managed key sets `Degraded` and leaves the running pods alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub runtime_config: Option<serde_json::Value>,
}

fn default_replicas() -> i32 {
    1
}

fn preserve_unknown_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, schemars::JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The D1 (SQL) binding's backend: exactly one of `postgres` or `embedded`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema, Default)]
#[x_kube(validation = Rule::new("has(self.postgres) != has(self.embedded)").message("set exactly one of database.postgres or database.embedded"))]
#[serde(rename_all = "camelCase")]
pub struct Database {
    /// PostgreSQL; the connection URL (with its password) is in a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<SecretUrl>,
    /// SQLite on the pod's data volume (one pod only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<Volume>,
}

/// The KV binding's backend: exactly one of `redis` or `embedded`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema, Default)]
#[x_kube(validation = Rule::new("has(self.redis) != has(self.embedded)").message("set exactly one of kv.redis or kv.embedded"))]
#[serde(rename_all = "camelCase")]
pub struct Kv {
    /// Redis; the URL (with its password) is in a Secret. Also carries long-poll wake-ups
    /// between pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<SecretUrl>,
    /// SQLite on the pod's data volume (one pod only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedded: Option<Embedded>,
}

/// A URL kept in a Secret.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretUrl {
    pub secret_ref: SecretKeyRef,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// A Secret in the MatrixHomeserver's namespace.
    #[schemars(length(min = 1))]
    pub name: String,
    /// The key in it.
    #[serde(default = "default_url_key")]
    pub key: String,
}

fn default_url_key() -> String {
    "url".into()
}

/// Marker for an embedded backend (it shares the pod's data volume).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, schemars::JsonSchema)]
pub struct Embedded {}

/// A PersistentVolumeClaim the operator creates for the single pod.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Volume {
    /// e.g. `10Gi`.
    #[serde(default = "default_volume_size")]
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_volume_size() -> String {
    "10Gi".into()
}

/// The R2 (media) binding's backend: exactly one of `s3` or `volume`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema, Default)]
#[x_kube(validation = Rule::new("has(self.s3) != has(self.volume)").message("set exactly one of media.s3 or media.volume"))]
#[serde(rename_all = "camelCase")]
pub struct Media {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3>,
    /// Files on the pod's data volume (one pod only; its size is the database volume's when
    /// both are embedded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<Volume>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3 {
    /// `https://host:port` or `http://host:port`.
    #[schemars(length(min = 1))]
    pub endpoint: String,
    #[schemars(length(min = 1))]
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// A Secret with the keys `accessKeyId` and `secretAccessKey`.
    #[schemars(length(min = 1))]
    pub credentials_secret: String,
    /// Path-style addressing (most self-hosted stores need it).
    #[serde(default = "default_true")]
    pub path_style: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

/// TLS on the pods: a Secret of type `kubernetes.io/tls`, or a cert-manager issuer that fills it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("has(self.secretName) != has(self.issuerRef)").message("set exactly one of tls.secretName or tls.issuerRef"))]
#[serde(rename_all = "camelCase")]
pub struct Tls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_ref: Option<IssuerRef>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    pub name: String,
    /// `Issuer` or `ClusterIssuer`.
    #[serde(default = "default_issuer_kind")]
    pub kind: String,
}

fn default_issuer_kind() -> String {
    "Issuer".into()
}

/// The TLS key exchange offered to clients.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PostQuantum {
    /// X25519MLKEM768 preferred, classical groups accepted.
    #[default]
    Preferred,
    /// X25519MLKEM768 only: classical-only clients fail the handshake.
    Required,
    /// Classical groups only.
    Off,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    #[default]
    Disabled,
    /// With a registration token.
    Token,
    Open,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Federation {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Server names allowed to federate; empty: all (less `deny`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl Default for Federation {
    fn default() -> Self {
        Self { enabled: true, allow: Vec::new(), deny: Vec::new() }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IngressSpec {
    /// The public host name, e.g. `matrix.example.org`.
    #[schemars(length(min = 1))]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// A `kubernetes.io/tls` Secret for the host; absent: no TLS at the ingress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A Gateway API `HTTPRoute` attached to existing Gateways.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// The Gateways (and listeners) to attach to.
    #[schemars(length(min = 1))]
    pub parent_refs: Vec<ParentRef>,
    /// The public host names, e.g. `matrix.example.org`; the first is the status URL.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WellKnown {
    /// `https://host[:port]` clients use (`/.well-known/matrix/client`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_base_url: Option<String>,
    /// `host[:port]` other servers use (`/.well-known/matrix/server`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// What the operator saw and did, in the `conditions` model (`Ready`, `Progressing`,
/// `Degraded`).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatrixHomeserverStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where clients reach the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub ready_shards: i32,
    /// The server's signing key id (`ed25519:...`), derived from the generated key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_id: Option<String>,
}

/// The CRD as YAML, as `crds/` and the chart hold it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&MatrixHomeserver::crd())?;
    Ok(format!("# Generated by `cargo run -p lattice-operator -- crdgen`; do not edit.\n---\n{body}"))
}
