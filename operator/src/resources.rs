//! Pure builders: `desired_<object>(&MatrixHomeserver, ...) -> <Object>`, no I/O.
//!
//! Each child carries the MatrixHomeserver as its controller owner (so Kubernetes' garbage
//! collector removes it with the resource) and the common labels. The keys Secret and the data
//! volume claim are the exceptions: they are retained on delete (see `secrets`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule, IngressServiceBackend,
    IngressSpec, IngressTLS, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec, ServiceBackendPort,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource as _, ResourceExt as _};
use sha2::{Digest as _, Sha256};

use crate::config::{
    self, ADMIN_PORT, CONFIG_DIR, DATA_DIR, PEER_PORT, PORT, Rendered, SECRETS_DIR, TLS_DIR,
};
use crate::crd::MatrixHomeserver;
use crate::secrets;

/// Pod template annotation: the hash of everything the pods read at start, so a change rolls
/// them.
pub const CONFIG_HASH_ANNOTATION: &str = "lattice.dev/config-hash";
pub const COMPONENT_FRONT: &str = "front";
pub const COMPONENT_SHARD: &str = "shard";
const CONTAINER: &str = "lattice";

/// Names of the children.
pub fn config_map_name(hs: &MatrixHomeserver) -> String {
    format!("{}-config", hs.name_any())
}
pub fn keys_secret_name(hs: &MatrixHomeserver) -> String {
    format!("{}-keys", hs.name_any())
}
pub fn shards_name(hs: &MatrixHomeserver) -> String {
    format!("{}-shards", hs.name_any())
}
pub fn data_claim_name(hs: &MatrixHomeserver) -> String {
    format!("{}-data", hs.name_any())
}

/// Labels on every child; `component` narrows to the front or shard pods.
pub fn labels(hs: &MatrixHomeserver, component: Option<&str>) -> BTreeMap<String, String> {
    let mut l = selector(hs, component);
    l.insert("app.kubernetes.io/managed-by".into(), "lattice-operator".into());
    l
}

fn selector(hs: &MatrixHomeserver, component: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "lattice".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), hs.name_any()),
    ]);
    if let Some(c) = component {
        l.insert("app.kubernetes.io/component".into(), c.into());
    }
    l
}

fn owner(hs: &MatrixHomeserver) -> Option<Vec<OwnerReference>> {
    hs.controller_owner_ref(&()).map(|o| vec![o])
}

fn meta(hs: &MatrixHomeserver, name: String, component: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: hs.namespace(),
        labels: Some(labels(hs, component)),
        owner_references: owner(hs),
        ..ObjectMeta::default()
    }
}

/// Embedded storage: one pod with a data volume claim.
pub fn is_embedded(hs: &MatrixHomeserver) -> bool {
    hs.spec.database.embedded.is_some() || hs.spec.kv.embedded.is_some() || hs.spec.media.volume.is_some()
}

/// The runtime's config files: the front pods' (`config::CONFIG_FILE`) and, with shard pods,
/// theirs (`config::SHARD_CONFIG_FILE`). Both kinds of pod mount the whole ConfigMap; each runs
/// with its own file.
pub fn desired_config_map(hs: &MatrixHomeserver, rendered: &Rendered) -> ConfigMap {
    ConfigMap {
        metadata: meta(hs, config_map_name(hs), None),
        data: Some(
            rendered.files().into_iter().map(|(name, text)| (name.to_owned(), text.to_owned())).collect(),
        ),
        ..ConfigMap::default()
    }
}

/// The keys Secret as first created: no owner reference (retained on delete).
pub fn desired_keys_secret(
    hs: &MatrixHomeserver,
    data: BTreeMap<String, k8s_openapi::ByteString>,
) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: ObjectMeta {
            name: Some(keys_secret_name(hs)),
            namespace: hs.namespace(),
            labels: Some(labels(hs, None)),
            annotations: Some(BTreeMap::from([(
                "lattice.dev/retention".to_owned(),
                "kept when the MatrixHomeserver is deleted: it unlocks the server's data and identity"
                    .to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The data volume claim of an embedded (single-pod) server; retained on delete.
pub fn desired_data_claim(hs: &MatrixHomeserver) -> Option<PersistentVolumeClaim> {
    if !is_embedded(hs) {
        return None;
    }
    let volume = hs.spec.database.embedded.as_ref().or(hs.spec.media.volume.as_ref());
    let size = volume.map_or_else(|| "1Gi".to_owned(), |v| v.size.clone());
    Some(PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(data_claim_name(hs)),
            namespace: hs.namespace(),
            labels: Some(labels(hs, None)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: volume.and_then(|v| v.storage_class_name.clone()),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(size))])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The hash of what the pods of `component` read at start: their own config file (so a change
/// to the other kind's file does not roll them) and the names of the Secrets and keys they
/// mount (not the secret values: those are never rotated by the operator).
pub fn config_hash(hs: &MatrixHomeserver, rendered: &Rendered, component: &str) -> String {
    let mut h = Sha256::new();
    h.update(rendered.for_component(component).1.as_bytes());
    for e in env(hs) {
        if let Some(r) = e.value_from.and_then(|v| v.secret_key_ref) {
            h.update(format!("\0{}={}/{}", e.name, r.name, r.key).as_bytes());
        }
    }
    if let Some(t) = tls_secret_name(hs) {
        h.update(format!("\0tls={t}").as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// The Secret with `tls.crt` and `tls.key` for the pods, if they serve TLS: the user's, or the
/// one cert-manager fills for `desired_certificate`.
pub fn tls_secret_name(hs: &MatrixHomeserver) -> Option<String> {
    let tls = hs.spec.tls.as_ref()?;
    tls.secret_name.clone().or_else(|| Some(format!("{}-tls", hs.name_any())))
}

/// cert-manager's `Certificate` kind (`cert-manager.io/v1`).
pub fn certificate_resource() -> kube::core::ApiResource {
    kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// A cert-manager Certificate for the pods when `spec.tls.issuerRef` is set: the names clients,
/// federation and the other pods use. The runtime reloads the files when cert-manager renews
/// them.
pub fn desired_certificate(hs: &MatrixHomeserver) -> Option<kube::api::DynamicObject> {
    let issuer = hs.spec.tls.as_ref()?.issuer_ref.as_ref()?;
    let name = hs.name_any();
    let ns = hs.namespace().unwrap_or_default();
    let mut dns = vec![hs.spec.server_name.clone()];
    if let Some(i) = &hs.spec.ingress {
        dns.push(i.host.clone());
    }
    dns.extend([format!("{name}.{ns}.svc"), format!("{name}.{ns}.svc.cluster.local")]);
    if hs.spec.shards > 0 {
        dns.push(format!("*.{}.{ns}.svc", shards_name(hs)));
    }
    dns.dedup();
    let mut obj = kube::api::DynamicObject::new(&format!("{name}-tls"), &certificate_resource());
    obj.metadata = meta(hs, format!("{name}-tls"), None);
    obj.data = serde_json::json!({
        "spec": {
            "secretName": format!("{name}-tls"),
            "dnsNames": dns,
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": {"name": issuer.name, "kind": issuer.kind, "group": "cert-manager.io"},
        }
    });
    Some(obj)
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(hs: &MatrixHomeserver) -> Vec<EnvVar> {
    let mut out = Vec::new();
    if let Some(pg) = &hs.spec.database.postgres {
        out.push(secret_env(config::DATABASE_URL_ENV, &pg.secret_ref.name, &pg.secret_ref.key));
    }
    if let Some(r) = &hs.spec.kv.redis {
        out.push(secret_env(config::REDIS_URL_ENV, &r.secret_ref.name, &r.secret_ref.key));
    }
    if let Some(s3) = &hs.spec.media.s3 {
        out.push(secret_env(config::S3_ACCESS_KEY_ENV, &s3.credentials_secret, "accessKeyId"));
        out.push(secret_env(config::S3_SECRET_KEY_ENV, &s3.credentials_secret, "secretAccessKey"));
    }
    out
}

/// The Secrets (and keys in them) the spec refers to, which the user provides.
pub fn referenced_secrets(hs: &MatrixHomeserver) -> Vec<(String, String, &'static str)> {
    let mut out = Vec::new();
    if let Some(pg) = &hs.spec.database.postgres {
        out.push((pg.secret_ref.name.clone(), pg.secret_ref.key.clone(), "spec.database.postgres.secretRef"));
    }
    if let Some(r) = &hs.spec.kv.redis {
        out.push((r.secret_ref.name.clone(), r.secret_ref.key.clone(), "spec.kv.redis.secretRef"));
    }
    if let Some(s3) = &hs.spec.media.s3 {
        out.push((s3.credentials_secret.clone(), "accessKeyId".into(), "spec.media.s3.credentialsSecret"));
        out.push((
            s3.credentials_secret.clone(),
            "secretAccessKey".into(),
            "spec.media.s3.credentialsSecret",
        ));
    }
    if let Some(name) = hs.spec.tls.as_ref().and_then(|t| t.secret_name.clone()) {
        out.push((name.clone(), "tls.crt".into(), "spec.tls.secretName"));
        out.push((name, "tls.key".into(), "spec.tls.secretName"));
    }
    out
}

fn pod_template(hs: &MatrixHomeserver, rendered: &Rendered, component: &str) -> PodTemplateSpec {
    let (config_file, _) = rendered.for_component(component);
    let mut ports = vec![
        ContainerPort { name: Some("matrix".into()), container_port: i32::from(PORT), ..Default::default() },
        ContainerPort {
            name: Some("admin".into()),
            container_port: i32::from(ADMIN_PORT),
            ..Default::default()
        },
    ];
    if config_file == config::SHARD_CONFIG_FILE {
        // The listener of `[placement] peer_listen`: object calls forwarded by the other pods.
        ports.push(ContainerPort {
            name: Some("peer".into()),
            container_port: i32::from(PEER_PORT),
            ..Default::default()
        });
    }
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource { name: config_map_name(hs), ..Default::default() }),
            ..Default::default()
        },
        Volume {
            name: "keys".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(keys_secret_name(hs)),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "keys".into(),
            mount_path: SECRETS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount { name: "data".into(), mount_path: DATA_DIR.into(), ..Default::default() },
    ];
    if is_embedded(hs) {
        volumes.push(Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: data_claim_name(hs),
                read_only: Some(false),
            }),
            ..Default::default()
        });
    } else {
        // The AOT cache and nothing else: state lives in the services.
        volumes.push(Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
    }
    if let Some(tls) = tls_secret_name(hs) {
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        ..Default::default()
    };
    let container = Container {
        name: CONTAINER.into(),
        image: Some(hs.spec.image.clone()),
        image_pull_policy: hs.spec.image_pull_policy.map(|p| format!("{p:?}")),
        command: Some(vec!["lattice".into()]),
        args: Some(vec!["serve".into(), "--config".into(), format!("{CONFIG_DIR}/{config_file}")]),
        env: Some(env(hs)).filter(|e| !e.is_empty()),
        ports: Some(ports),
        readiness_probe: Some(probe("/readyz")),
        liveness_probe: Some(Probe { failure_threshold: Some(6), ..probe("/healthz") }),
        resources: hs.spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(hs, Some(component))),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_owned(),
                config_hash(hs, rendered, component),
            )])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(hs.name_any()),
            automount_service_account_token: Some(true),
            containers: vec![container],
            volumes: Some(volumes),
            image_pull_secrets: Some(hs.spec.image_pull_secrets.clone()).filter(|s| !s.is_empty()),
            node_selector: Some(hs.spec.node_selector.clone()).filter(|s| !s.is_empty()),
            tolerations: Some(hs.spec.tolerations.clone()).filter(|s| !s.is_empty()),
            termination_grace_period_seconds: Some(rendered.termination_grace_period_seconds()),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                fs_group: Some(65532),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The front pods: stateless, behind the client Service. With shard pods they forward every
/// Durable Object call to the shard's owner; without, each owns every shard itself.
pub fn desired_deployment(hs: &MatrixHomeserver, rendered: &Rendered) -> Deployment {
    Deployment {
        metadata: meta(hs, hs.name_any(), Some(COMPONENT_FRONT)),
        spec: Some(DeploymentSpec {
            replicas: Some(hs.spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector(hs, Some(COMPONENT_FRONT))),
                ..Default::default()
            },
            // One pod owns an embedded volume: the old one stops before the new one starts.
            strategy: is_embedded(hs)
                .then(|| DeploymentStrategy { type_: Some("Recreate".into()), ..Default::default() }),
            template: pod_template(hs, rendered, COMPONENT_FRONT),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Durable Object shard pods, if the spec asks for any: they split the shards among
/// themselves through Leases and serve forwarded object calls on the `peer` port.
pub fn desired_stateful_set(hs: &MatrixHomeserver, rendered: &Rendered) -> Option<StatefulSet> {
    (hs.spec.shards > 0).then(|| StatefulSet {
        metadata: meta(hs, shards_name(hs), Some(COMPONENT_SHARD)),
        spec: Some(StatefulSetSpec {
            replicas: Some(hs.spec.shards),
            service_name: Some(shards_name(hs)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector(hs, Some(COMPONENT_SHARD))),
                ..Default::default()
            },
            template: pod_template(hs, rendered, COMPONENT_SHARD),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn matrix_port() -> ServicePort {
    ServicePort {
        name: Some("matrix".into()),
        port: i32::from(PORT),
        target_port: Some(IntOrString::String("matrix".into())),
        ..Default::default()
    }
}

/// Clients and federation reach the front pods here.
pub fn desired_service(hs: &MatrixHomeserver) -> Service {
    Service {
        metadata: meta(hs, hs.name_any(), Some(COMPONENT_FRONT)),
        spec: Some(ServiceSpec {
            selector: Some(selector(hs, Some(COMPONENT_FRONT))),
            ports: Some(vec![matrix_port()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Stable names for the shard pods (`<name>-shards-N.<name>-shards.<namespace>.svc`), the
/// host of each one's `peer_address`; published before the pods are ready, since a shard
/// pod advertises its address when it takes its first lease.
pub fn desired_shards_service(hs: &MatrixHomeserver) -> Option<Service> {
    (hs.spec.shards > 0).then(|| Service {
        metadata: meta(hs, shards_name(hs), Some(COMPONENT_SHARD)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(hs, Some(COMPONENT_SHARD))),
            ports: Some(vec![
                matrix_port(),
                ServicePort {
                    name: Some("peer".into()),
                    port: i32::from(PEER_PORT),
                    target_port: Some(IntOrString::String("peer".into())),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// At most one front pod (and one shard pod) down at a time for voluntary disruptions.
pub fn desired_pdbs(hs: &MatrixHomeserver) -> Vec<PodDisruptionBudget> {
    let pdb = |name: String, component: &str| PodDisruptionBudget {
        metadata: meta(hs, name, Some(component)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(hs, Some(component))),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = vec![pdb(hs.name_any(), COMPONENT_FRONT)];
    if hs.spec.shards > 0 {
        out.push(pdb(shards_name(hs), COMPONENT_SHARD));
    }
    out
}

/// Inbound: the Matrix port from anywhere (clients, federation, the ingress); with shard pods,
/// the peer port (forwarded object calls) from this server's own pods only, fronts and shards
/// (a pod selector without a namespace selector: this namespace only). Nothing else: the admin
/// port is left to the kubelet's probes, which network policies do not cover. Outbound stays
/// open: federation reaches arbitrary servers.
pub fn desired_network_policy(hs: &MatrixHomeserver) -> NetworkPolicy {
    let mut ingress = vec![NetworkPolicyIngressRule {
        ports: Some(vec![NetworkPolicyPort {
            port: Some(IntOrString::Int(i32::from(PORT))),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        ..Default::default()
    }];
    if hs.spec.shards > 0 {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(LabelSelector {
                    match_labels: Some(selector(hs, None)),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ports: Some(vec![NetworkPolicyPort {
                port: Some(IntOrString::Int(i32::from(PEER_PORT))),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        });
    }
    NetworkPolicy {
        metadata: meta(hs, hs.name_any(), None),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(hs, None)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..Default::default()
        }),
    }
}

pub fn desired_service_account(hs: &MatrixHomeserver) -> ServiceAccount {
    ServiceAccount { metadata: meta(hs, hs.name_any(), None), ..Default::default() }
}

/// The Lease verbs the runtime's Kubernetes lease backend uses (`[placement] leases`), in this
/// namespace: shard pods get, create and replace (`update`) their Leases, every pod lists them
/// to route calls. No watch, patch or delete: the backend never does those.
pub const LEASE_VERBS: [&str; 4] = ["get", "list", "create", "update"];

/// Exactly the Lease operations shard ownership needs, in this namespace.
pub fn desired_role(hs: &MatrixHomeserver) -> Role {
    Role {
        metadata: meta(hs, hs.name_any(), None),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["coordination.k8s.io".into()]),
            resources: Some(vec!["leases".into()]),
            verbs: LEASE_VERBS.map(String::from).to_vec(),
            ..Default::default()
        }]),
    }
}

pub fn desired_role_binding(hs: &MatrixHomeserver) -> RoleBinding {
    RoleBinding {
        metadata: meta(hs, hs.name_any(), None),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: hs.name_any(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: hs.name_any(),
            namespace: hs.namespace(),
            ..Default::default()
        }]),
    }
}

pub fn desired_ingress(hs: &MatrixHomeserver) -> Option<Ingress> {
    let spec = hs.spec.ingress.as_ref()?;
    let mut m = meta(hs, hs.name_any(), None);
    m.annotations = Some(spec.annotations.clone()).filter(|a| !a.is_empty());
    Some(Ingress {
        metadata: m,
        spec: Some(IngressSpec {
            ingress_class_name: spec.class_name.clone(),
            tls: spec.tls_secret_name.as_ref().map(|s| {
                vec![IngressTLS { hosts: Some(vec![spec.host.clone()]), secret_name: Some(s.clone()) }]
            }),
            rules: Some(vec![IngressRule {
                host: Some(spec.host.clone()),
                http: Some(HTTPIngressRuleValue {
                    paths: PUBLIC_PATHS
                        .map(|p| HTTPIngressPath {
                            path: Some(p.into()),
                            path_type: "Prefix".into(),
                            backend: IngressBackend {
                                service: Some(IngressServiceBackend {
                                    name: hs.name_any(),
                                    port: Some(ServiceBackendPort {
                                        name: Some("matrix".into()),
                                        ..Default::default()
                                    }),
                                }),
                                ..Default::default()
                            },
                        })
                        .to_vec(),
                }),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Gateway API's `HTTPRoute` kind (`gateway.networking.k8s.io/v1`).
pub fn http_route_resource() -> kube::core::ApiResource {
    kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
        "httproutes",
    )
}

/// The Matrix paths, routed to the client Service.
const PUBLIC_PATHS: [&str; 3] = ["/_matrix", "/_synapse/client", "/.well-known/matrix"];

/// A Gateway API HTTPRoute when `spec.route` is set.
pub fn desired_http_route(hs: &MatrixHomeserver) -> Option<kube::api::DynamicObject> {
    let route = hs.spec.route.as_ref()?;
    let mut obj = kube::api::DynamicObject::new(&hs.name_any(), &http_route_resource());
    obj.metadata = meta(hs, hs.name_any(), None);
    let matches: Vec<serde_json::Value> = PUBLIC_PATHS
        .iter()
        .map(|p| serde_json::json!({"path": {"type": "PathPrefix", "value": p}}))
        .collect();
    let mut spec = serde_json::json!({
        "parentRefs": route.parent_refs,
        "rules": [{"matches": matches, "backendRefs": [{"name": hs.name_any(), "port": PORT}]}],
    });
    if !route.hostnames.is_empty() {
        spec["hostnames"] = serde_json::json!(route.hostnames);
    }
    obj.data = serde_json::json!({ "spec": spec });
    Some(obj)
}

/// Where clients reach the server: the ingress or route host, the well-known client URL, or
/// the in-cluster Service.
pub fn public_url(hs: &MatrixHomeserver) -> String {
    if let Some(i) = &hs.spec.ingress {
        let scheme = if i.tls_secret_name.is_some() { "https" } else { "http" };
        return format!("{scheme}://{}", i.host);
    }
    if let Some(host) = hs.spec.route.as_ref().and_then(|r| r.hostnames.first()) {
        return format!("https://{host}");
    }
    if let Some(url) = hs.spec.well_known.as_ref().and_then(|w| w.client_base_url.clone()) {
        return url;
    }
    let scheme = if hs.spec.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{}.{}.svc:{PORT}", hs.name_any(), hs.namespace().unwrap_or_default())
}

/// Every key the keys Secret must hold, for the pods' mount to be complete.
pub fn required_keys() -> &'static [&'static str] {
    &secrets::KEYS
}
