//! The pure builders: every rendered object compared with a snapshot in `tests/snapshots/`
//! (`LATTICE_UPDATE_SNAPSHOTS=1 cargo test -p lattice-operator --test builders` rewrites them),
//! the pass-through config checks, and the rendered config file checked by the runtime's own
//! `lattice check-config` (when `LATTICE_BIN` names the binary; CI sets it).

use std::path::{Path, PathBuf};

use lattice_operator::config::render;
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

/// Every object the operator applies for `hs`, as one YAML stream.
fn rendered_objects(hs: &MatrixHomeserver) -> String {
    let rendered = render(&hs.spec).expect("renders");
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
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/snapshots").join(name);
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
    let rendered = render(&hs.spec).expect("renders");
    // The spec raised max_sync_timeout_ms to 90 s.
    assert!(rendered.shutdown_grace_ms > 90_000, "{}", rendered.shutdown_grace_ms);
    let d = r::desired_deployment(&hs, &rendered);
    let grace = d.spec.and_then(|s| s.template.spec).and_then(|p| p.termination_grace_period_seconds);
    assert!(
        grace.is_some_and(|g| g * 1000 > i64::try_from(rendered.shutdown_grace_ms).unwrap_or(0)),
        "{grace:?}"
    );
}

#[test]
fn config_hash_changes_with_the_config() {
    let hs = homeserver(PRODUCTION);
    let a = r::config_hash(&hs, &render(&hs.spec).expect("renders"));
    let mut hs2 = hs.clone();
    hs2.spec.registration = lattice_operator::crd::Registration::Open;
    let b = r::config_hash(&hs2, &render(&hs2.spec).expect("renders"));
    let mut hs3 = hs.clone();
    hs3.spec.replicas = 7;
    let c = r::config_hash(&hs3, &render(&hs3.spec).expect("renders"));
    assert_ne!(a, b, "a config change rolls the pods");
    assert_eq!(a, c, "scaling does not");
}

/// `runtimeConfig` (JSON) → the error the operator reports, or `None` when it renders.
fn check_pass_through(runtime_config: serde_json::Value, expected: Option<&str>) {
    let mut hs = homeserver(EMBEDDED);
    hs.spec.runtime_config = Some(runtime_config.clone());
    match (render(&hs.spec), expected) {
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
    let e = render(&hs.spec).expect_err("no TLS on the pods");
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
    for (name, yaml) in [("production", PRODUCTION), ("embedded", EMBEDDED)] {
        let rendered = render(&homeserver(yaml).spec).expect("renders");
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, &rendered.toml).expect("write");
        let out = std::process::Command::new(&bin)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .expect("run lattice check-config");
        assert!(
            out.status.success(),
            "{name}: lattice check-config refused the rendered config: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            rendered.toml
        );
    }
}
