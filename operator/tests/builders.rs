//! The pure builders: every rendered object compared with a snapshot in `tests/snapshots/`
//! (`LATTICE_UPDATE_SNAPSHOTS=1 cargo test -p lattice-operator --test builders` rewrites them),
//! the pass-through config checks, shard placement (the front and shard configs, the peer port
//! and who may reach it), and every rendered config file checked by the runtime's own
//! `lattice check-config` (when `LATTICE_BIN` names the binary; CI sets it).

#[path = "common/paths.rs"]
mod paths;
use paths::manifest_dir;

use std::path::PathBuf;

use lattice_operator::config::{CONFIG_FILE, PEER_PORT, SHARD_CONFIG_FILE, lease_set, render};
use lattice_operator::crd::MatrixHomeserver;
use lattice_operator::resources as r;
use serde::Serialize;

fn homeserver(yaml: &str) -> MatrixHomeserver {
    let mut hs: MatrixHomeserver = serde_yaml::from_str(yaml).expect("sample MatrixHomeserver");
    hs.metadata.uid = Some("8d5f7a4e-0000-4000-8000-000000000001".into());
    hs
}

const PRODUCTION: &str = r#"
apiVersion: lattice.dev/v1alpha1
kind: MatrixHomeserver
metadata: {name: matrix, namespace: chat}
spec:
  serverName: example.org
  image: registry.example/lattice:0.1.0
  imagePullPolicy: IfNotPresent
  imagePullSecrets: [{name: regcred}]
  replicas: 3
  shards: 2
  database: {postgres: {secretRef: {name: matrix-db}}}
  kv: {redis: {secretRef: {name: matrix-redis, key: redis-url}}}
  media: {s3: {endpoint: "https://s3.internal:3900", bucket: media, region: garage, credentialsSecret: matrix-s3}}
  tls: {issuerRef: {name: internal-ca, kind: ClusterIssuer}}
  postQuantum: required
  registration: token
  federation: {allow: [friends.org], deny: [spam.example]}
  resources: {requests: {cpu: 500m, memory: 512Mi}}
  nodeSelector: {pool: chat}
  tolerations: [{key: dedicated, operator: Equal, value: chat, effect: NoSchedule}]
  ingress: {host: matrix.example.org, className: nginx, tlsSecretName: matrix-public-tls}
  wellKnown: {clientBaseUrl: "https://matrix.example.org", server: "matrix.example.org:443"}
  runtimeConfig:
    limits: {execution_ms: 5000}
    outbound: {allow_hosts: [friends.org]}
    vars: {max_sync_timeout_ms: 90000, send_per_minute: 30}
"#;

const EMBEDDED: &str = r#"
apiVersion: lattice.dev/v1alpha1
kind: MatrixHomeserver
metadata: {name: small, namespace: default}
spec:
  serverName: small.example
  image: lattice:dev
  database: {embedded: {size: 5Gi}}
  kv: {embedded: {}}
  media: {volume: {}}
"#;

const GATEWAY: &str = r#"
apiVersion: lattice.dev/v1alpha1
kind: MatrixHomeserver
metadata: {name: gw, namespace: chat}
spec:
  serverName: gw.example
  image: lattice:dev
  replicas: 2
  database: {postgres: {secretRef: {name: db}}}
  kv: {redis: {secretRef: {name: redis}}}
  media: {s3: {endpoint: "http://s3:9000", bucket: media, credentialsSecret: s3}}
  tls: {secretName: gw-tls}
  postQuantum: off
  registration: open
  federation: {enabled: false}
  route:
    parentRefs: [{name: public, namespace: gateways, sectionName: https}]
    hostnames: [matrix.gw.example]
"#;

/// Shard pods under a name longer than a lease set may be.
const SHARDED: &str = r#"
apiVersion: lattice.dev/v1alpha1
kind: MatrixHomeserver
metadata: {name: matrix-for-the-whole-company, namespace: team-chat}
spec:
  serverName: company.example
  image: lattice:dev
  replicas: 2
  shards: 3
  database: {postgres: {secretRef: {name: db}}}
  kv: {redis: {secretRef: {name: redis}}}
  media: {s3: {endpoint: "http://s3:9000", bucket: media, credentialsSecret: s3}}
"#;

/// Every object the operator applies for `hs`, as one YAML stream.
fn rendered_objects(hs: &MatrixHomeserver) -> String {
    let rendered = render(hs).expect("renders");
    let mut docs = Vec::new();
    fn push<T: Serialize>(docs: &mut Vec<String>, o: &T) {
        docs.push(serde_yaml::to_string(o).expect("yaml"));
    }
    push(&mut docs, &r::desired_config_map(hs, &rendered));
    push(&mut docs, &r::desired_deployment(hs, &rendered));
    if let Some(s) = r::desired_stateful_set(hs, &rendered) {
        push(&mut docs, &s);
    }
    push(&mut docs, &r::desired_service(hs));
    if let Some(s) = r::desired_shards_service(hs) {
        push(&mut docs, &s);
    }
    for p in r::desired_pdbs(hs) {
        push(&mut docs, &p);
    }
    push(&mut docs, &r::desired_network_policy(hs));
    push(&mut docs, &r::desired_service_account(hs));
    push(&mut docs, &r::desired_role(hs));
    push(&mut docs, &r::desired_role_binding(hs));
    if let Some(i) = r::desired_ingress(hs) {
        push(&mut docs, &i);
    }
    if let Some(route) = r::desired_http_route(hs) {
        push(&mut docs, &route);
    }
    if let Some(c) = r::desired_certificate(hs) {
        push(&mut docs, &c);
    }
    if let Some(c) = r::desired_data_claim(hs) {
        push(&mut docs, &c);
    }
    let keys =
        std::collections::BTreeMap::from([("signing_key".to_owned(), k8s_openapi::ByteString(vec![0; 32]))]);
    push(&mut docs, &r::desired_keys_secret(hs, keys));
    docs.join("---\n")
}

fn check_snapshot(name: &str, actual: &str) {
    let path = manifest_dir().join("tests/snapshots").join(name);
    if std::env::var_os("LATTICE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with LATTICE_UPDATE_SNAPSHOTS=1", path.display()));
    if expected != actual {
        let line = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).map_or(0, |l| l + 1);
        panic!(
            "{} differs from the rendered objects (first at line {line}); if the change is intended, run with LATTICE_UPDATE_SNAPSHOTS=1 and review the diff\n--- rendered:\n{actual}",
            path.display()
        );
    }
}

#[test]
fn production_objects_match_snapshot() {
    check_snapshot("production.yaml", &rendered_objects(&homeserver(PRODUCTION)));
}

#[test]
fn embedded_objects_match_snapshot() {
    check_snapshot("embedded.yaml", &rendered_objects(&homeserver(EMBEDDED)));
}

#[test]
fn gateway_objects_match_snapshot() {
    let hs = homeserver(GATEWAY);
    assert_eq!(r::public_url(&hs), "https://matrix.gw.example");
    check_snapshot("gateway.yaml", &rendered_objects(&hs));
}

#[test]
fn termination_grace_outlasts_the_longest_long_poll() {
    let hs = homeserver(PRODUCTION);
    let rendered = render(&hs).expect("renders");
    // The spec raised max_sync_timeout_ms to 90 s.
    assert!(rendered.shutdown_grace_ms > 90_000, "{}", rendered.shutdown_grace_ms);
    let d = r::desired_deployment(&hs, &rendered);
    let grace = d.spec.and_then(|s| s.template.spec).and_then(|p| p.termination_grace_period_seconds);
    assert!(
        grace.is_some_and(|g| g * 1000 > i64::try_from(rendered.shutdown_grace_ms).unwrap_or(0)),
        "{grace:?}"
    );
}

/// The config hashes of the front and the shard pods' templates, as the workloads carry them.
fn pod_hashes(hs: &MatrixHomeserver) -> (String, Option<String>) {
    let rendered = render(hs).expect("renders");
    let hash = |t: Option<k8s_openapi::api::core::v1::PodTemplateSpec>| {
        t.and_then(|t| t.metadata?.annotations?.get(r::CONFIG_HASH_ANNOTATION).cloned()).expect("hash")
    };
    let front = hash(r::desired_deployment(hs, &rendered).spec.map(|s| s.template));
    let shard = r::desired_stateful_set(hs, &rendered).map(|s| hash(s.spec.map(|s| s.template)));
    (front, shard)
}

#[test]
fn config_hash_changes_with_the_config() {
    let hs = homeserver(PRODUCTION);
    let (front, shard) = pod_hashes(&hs);
    let shard = shard.expect("shard pods");
    assert_ne!(front, shard, "each pod's hash covers its own config");
    let rendered = render(&hs).expect("renders");
    assert_eq!(front, r::config_hash(&hs, &rendered, r::COMPONENT_FRONT));
    assert_eq!(shard, r::config_hash(&hs, &rendered, r::COMPONENT_SHARD));

    let mut changed = hs.clone();
    changed.spec.registration = lattice_operator::crd::Registration::Open;
    let (f, s) = pod_hashes(&changed);
    assert!(f != front && s.as_ref() != Some(&shard), "a config change rolls both");

    let mut scaled = hs.clone();
    scaled.spec.replicas = 7;
    scaled.spec.shards = 5;
    assert_eq!(pod_hashes(&scaled), (front.clone(), Some(shard)), "scaling rolls neither");

    // Shard pods appearing turn the fronts' ownership of every shard into forwarding: they roll.
    let mut unsharded = hs.clone();
    unsharded.spec.shards = 0;
    let (f, s) = pod_hashes(&unsharded);
    assert!(s.is_none());
    assert_ne!(f, front, "adding or dropping the shard pods rolls the fronts");
}

fn toml_file(text: &str) -> toml::Table {
    text.parse().unwrap_or_else(|e| panic!("{e}:\n{text}"))
}

/// `spec.shards > 0`: a front config that forwards and a shard config that owns shards through
/// Leases in the MatrixHomeserver's namespace, each pod running its own file.
#[test]
fn shards_render_front_and_shard_placement() {
    let hs = homeserver(SHARDED);
    let rendered = render(&hs).expect("renders");
    let set = lease_set("matrix-for-the-whole-company");
    let front = toml_file(&rendered.front);
    let shard = toml_file(rendered.shard.as_deref().expect("a shard config"));
    let leases = toml::toml! { backend = "kubernetes"
    namespace = "team-chat" };
    let fp = front["placement"].as_table().expect("[placement] in the front config");
    assert_eq!(fp["role"].as_str(), Some("front"));
    assert_eq!(fp["leases"].as_table(), Some(&leases));
    assert_eq!(fp["lease_set"].as_str(), Some(set.as_str()));
    assert_eq!(fp["peer_secret"].as_str(), Some(lattice_operator::secrets::PEER_SECRET));
    assert!(!fp.contains_key("peer_listen") && !fp.contains_key("peer_address"), "{fp:?}");
    let sp = shard["placement"].as_table().expect("[placement] in the shard config");
    assert_eq!(sp["role"].as_str(), Some("shard"));
    assert_eq!(sp["leases"].as_table(), Some(&leases));
    assert_eq!(sp["lease_set"].as_str(), Some(set.as_str()));
    assert_eq!(sp["peer_secret"].as_str(), Some("peer_secret"));
    assert_eq!(sp["peer_listen"].as_str(), Some("0.0.0.0:8449"));
    assert_eq!(
        sp["peer_address"].as_str(),
        Some("http://{identity}.matrix-for-the-whole-company-shards.team-chat.svc:8449")
    );
    assert!(!sp.contains_key("identity"), "the identity is the pod name, the runtime's default");
    // The peer listener is not the public one.
    assert_eq!(shard["server"]["listen"].as_str(), Some("0.0.0.0:8448"));
    // Apart from [placement], the two files are the same config.
    let (mut f, mut s) = (front.clone(), shard.clone());
    f.remove("placement");
    s.remove("placement");
    assert_eq!(f, s);

    // The pods mount both files (the keys Secret, with `peer_secret`, is the secrets dir) and run
    // their own.
    let cm = r::desired_config_map(&hs, &rendered).data.expect("data");
    assert_eq!(cm.len(), 2);
    assert_eq!(cm[CONFIG_FILE], rendered.front);
    assert_eq!(cm[SHARD_CONFIG_FILE], rendered.shard.clone().expect("shard"));
    assert!(r::required_keys().contains(&"peer_secret"));
    let pod = |t: Option<k8s_openapi::api::core::v1::PodTemplateSpec>| {
        let c = t.and_then(|t| t.spec).expect("pod").containers.remove(0);
        let ports: Vec<(String, i32)> = c
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name.unwrap_or_default(), p.container_port))
            .collect();
        let mounts: Vec<String> =
            c.volume_mounts.unwrap_or_default().into_iter().map(|m| m.mount_path).collect();
        (c.args.unwrap_or_default(), ports, mounts)
    };
    let (args, ports, mounts) = pod(r::desired_deployment(&hs, &rendered).spec.map(|s| s.template));
    assert_eq!(args, ["serve", "--config", "/etc/lattice/config/lattice.toml"]);
    assert!(!ports.iter().any(|(n, _)| n == "peer"), "fronts have no peer port: {ports:?}");
    assert!(mounts.iter().any(|m| m == "/etc/lattice/secrets"));
    let sts = r::desired_stateful_set(&hs, &rendered).expect("StatefulSet");
    let (args, ports, mounts) = pod(sts.spec.map(|s| s.template));
    assert_eq!(args, ["serve", "--config", "/etc/lattice/config/lattice-shard.toml"]);
    assert!(ports.contains(&("peer".into(), i32::from(PEER_PORT))), "{ports:?}");
    assert!(mounts.iter().any(|m| m == "/etc/lattice/secrets"));
    let svc = r::desired_shards_service(&hs).and_then(|s| s.spec).expect("headless Service");
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    assert!(svc.ports.unwrap_or_default().iter().any(|p| p.name.as_deref() == Some("peer")
        && p.port == i32::from(PEER_PORT)
        && p.target_port
            == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("peer".into()))));
}

/// The peer port admits this server's own pods (fronts and shards, this namespace) and nobody
/// else; the Matrix port stays open.
#[test]
fn network_policy_admits_the_peer_port_only_from_own_pods() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let hs = homeserver(SHARDED);
    let rules = r::desired_network_policy(&hs).spec.and_then(|s| s.ingress).expect("ingress rules");
    let port_of = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        rule.ports.as_ref().map(|p| p.iter().map(|p| p.port.clone()).collect::<Vec<_>>())
    };
    assert!(rules.iter().all(|r| port_of(r).is_some()), "every rule names its ports: {rules:?}");
    let peer: Vec<_> = rules
        .iter()
        .filter(|r| port_of(r).is_some_and(|p| p.contains(&Some(IntOrString::Int(8449)))))
        .collect();
    assert_eq!(peer.len(), 1, "{rules:?}");
    let from = peer[0].from.clone().expect("the peer port has a `from`");
    assert_eq!(from.len(), 1);
    assert!(from[0].namespace_selector.is_none() && from[0].ip_block.is_none(), "{from:?}");
    let selector = from[0].pod_selector.clone().and_then(|s| s.match_labels).expect("pod selector");
    assert_eq!(
        selector,
        std::collections::BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "lattice".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), "matrix-for-the-whole-company".to_owned()),
        ]),
        "fronts and shards of this server"
    );
    let open: Vec<_> = rules.iter().filter(|r| r.from.is_none()).collect();
    assert_eq!(open.len(), 1);
    assert_eq!(port_of(open[0]), Some(vec![Some(IntOrString::Int(8448))]));
    // Without shard pods nobody listens on the peer port, and nothing admits it.
    let rules = r::desired_network_policy(&homeserver(GATEWAY)).spec.and_then(|s| s.ingress).expect("rules");
    assert_eq!(rules.len(), 1);
    assert!(rules[0].from.is_none());
}

#[test]
fn no_placement_without_shard_pods() {
    for yaml in [EMBEDDED, GATEWAY] {
        let hs = homeserver(yaml);
        let rendered = render(&hs).expect("renders");
        assert!(rendered.shard.is_none());
        assert!(!toml_file(&rendered.front).contains_key("placement"), "{}", rendered.front);
        let cm = r::desired_config_map(&hs, &rendered).data.expect("data");
        assert_eq!(cm.keys().collect::<Vec<_>>(), [CONFIG_FILE]);
        assert!(r::desired_stateful_set(&hs, &rendered).is_none());
    }
}

#[test]
fn shard_pods_need_shared_storage() {
    let mut hs = homeserver(EMBEDDED);
    hs.spec.shards = 1;
    assert_eq!(render(&hs).expect_err("embedded storage").field, "spec.shards");
}

/// A DNS label of at most 20 characters; one per name; never `<other set>-...`.
#[test]
fn lease_sets_are_short_distinct_labels() {
    let names = [
        "matrix",
        "matrix-m",
        "matrix-do",
        "m",
        "matrix-for-the-whole-company",
        "matrix-for-the-whole-company-2",
        "matrix.example",
        "a-b-c-d-e-f-g-h-i-j-k-l",
        "0123456789012345678901234567890123456789012345678901234567890123456789",
    ];
    let sets: Vec<String> = names.iter().map(|n| lease_set(n)).collect();
    for (name, set) in names.iter().zip(&sets) {
        assert!(set.len() <= 20, "{name}: {set}");
        assert!(
            set.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !set.starts_with('-')
                && !set.ends_with('-'),
            "{name}: {set} is not a DNS label"
        );
        assert_eq!(lease_set(name), *set, "stable");
        for other in &sets {
            assert!(other == set || !other.starts_with(&format!("{set}-")), "{set} lists {other}'s leases");
        }
    }
    let unique: std::collections::BTreeSet<&String> = sets.iter().collect();
    assert_eq!(unique.len(), sets.len(), "{sets:?}");
    // Computed independently (Python: the prefix rule, then sha256 hex[:8]).
    assert_eq!(lease_set("matrix"), "matrix-6e00cd56");
    assert_eq!(lease_set("matrix-for-the-whole-company"), "matrix-for-59fb6870");
    assert_eq!(lease_set("matrix.example"), "matrix-exam-474b9786");
}

/// `runtimeConfig` (JSON) → the error the operator reports, or `None` when it renders.
fn check_pass_through(runtime_config: serde_json::Value, expected: Option<&str>) {
    let mut hs = homeserver(EMBEDDED);
    hs.spec.runtime_config = Some(runtime_config.clone());
    match (render(&hs), expected) {
        (Ok(_), None) => {}
        (Err(e), Some(want)) => assert!(e.to_string().contains(want), "{runtime_config}: {e} lacks {want:?}"),
        (Ok(_), Some(want)) => panic!("{runtime_config}: rendered, expected an error with {want:?}"),
        (Err(e), None) => panic!("{runtime_config}: unexpected error {e}"),
    }
}

#[test]
fn pass_through_config_is_checked() {
    use serde_json::json;
    check_pass_through(json!({"limits": {"execution_ms": 100}}), None);
    check_pass_through(
        json!({"limits": {"execution_msec": 100}}),
        Some(
            "spec.runtimeConfig.limits.execution_msec: unknown key `execution_msec`; did you mean `execution_ms`?",
        ),
    );
    check_pass_through(json!({"limits": {"execution_ms": 0}}), Some("greater than zero"));
    check_pass_through(
        json!({"limits": {"execution_ms": "fast"}}),
        Some("limits.execution_ms: must be a whole number"),
    );
    check_pass_through(json!({"d1": {}}), Some("spec.runtimeConfig.d1: unknown section `d1`"));
    check_pass_through(json!({"server": {"listen": "0.0.0.0:1"}}), Some("managed by the operator"));
    check_pass_through(json!({"server": {"log_format": "xml"}}), Some("\"text\" or \"json\""));
    check_pass_through(json!({"vars": {"server_name": "x"}}), Some("set spec.serverName instead"));
    check_pass_through(json!({"vars": {"default_room_version": "11", "login_per_minute": 5}}), None);
    check_pass_through(json!({"vars": {"x": ["list"]}}), Some("must be a string, number or boolean"));
    check_pass_through(json!({"outbound": {"overrides": {"a.example": "10.0.0.1:8448"}}}), None);
    check_pass_through(json!({"outbound": {"overrides": {"a.example": "nowhere"}}}), Some("must be ip:port"));
    check_pass_through(json!({"outbound": {"alow_private": true}}), Some("did you mean `allow_private`"));
    check_pass_through(json!({"limits": {"shutdown_grace_ms": 1000}}), Some("longest long-poll"));
    check_pass_through(json!("text"), Some("must be an object of sections"));
}

#[test]
fn post_quantum_required_needs_tls() {
    let mut hs = homeserver(EMBEDDED);
    hs.spec.post_quantum = lattice_operator::crd::PostQuantum::Required;
    let e = render(&hs).expect_err("no TLS on the pods");
    assert_eq!(e.field, "spec.postQuantum");
}

/// The runtime binary, when this run has one: `LATTICE_BIN`.
fn lattice_bin() -> Option<PathBuf> {
    std::env::var_os("LATTICE_BIN").map(PathBuf::from).filter(|p| p.exists())
}

#[test]
fn rendered_config_passes_the_runtimes_check() {
    let Some(bin) = lattice_bin() else {
        assert!(
            std::env::var_os("LATTICE_REQUIRE_SERVICES").is_none(),
            "LATTICE_BIN must name the runtime binary under LATTICE_REQUIRE_SERVICES"
        );
        eprintln!("skipped: LATTICE_BIN is not set (the runtime binary checks the rendered config)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut checked = 0;
    for (name, yaml) in
        [("production", PRODUCTION), ("embedded", EMBEDDED), ("gateway", GATEWAY), ("sharded", SHARDED)]
    {
        let rendered = render(&homeserver(yaml)).expect("renders");
        for (file, text) in rendered.files() {
            let path = dir.path().join(format!("{name}-{file}"));
            std::fs::write(&path, text).expect("write");
            let out = std::process::Command::new(&bin)
                .args(["check-config", "--config"])
                .arg(&path)
                .output()
                .expect("run lattice check-config");
            assert!(
                out.status.success(),
                "{name} {file}: lattice check-config refused the rendered config: {}\n{text}",
                String::from_utf8_lossy(&out.stderr),
            );
            checked += 1;
        }
    }
    // production and sharded have shard pods: two files each.
    assert_eq!(checked, 6);
}
