//! Reconcile latency against the real API server (`LATTICE_TEST_KUBECONFIG`):
//! `cargo bench -p lattice-operator --bench reconcile`.
//!
//! For each of `RUNS` MatrixHomeservers (production shape: PostgreSQL, Redis, S3, two front
//! pods, two shard pods, an Ingress) it measures the time from the server-side apply of the
//! resource to its status describing generation 1 — the status is written after every child,
//! so this bounds "apply to all children created" from above — and reports the operator's own
//! reconcile durations from its metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, CustomResourceExt as _};
use lattice_operator::controller::{self, Context};
use lattice_operator::crd::MatrixHomeserver;
use lattice_operator::metrics::Metrics;
use serde_json::json;

const RUNS: usize = 30;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Ok(path) = std::env::var("LATTICE_TEST_KUBECONFIG") else {
        eprintln!(
            "reconcile bench: set LATTICE_TEST_KUBECONFIG (bash scripts/services.sh start DIR; . DIR/env)"
        );
        return Ok(());
    };
    let config =
        kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(&path)?, &KubeConfigOptions::default())
            .await?;
    let client = Client::try_from(config)?;
    let crd = serde_json::to_value(MatrixHomeserver::crd())?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch(
            MatrixHomeserver::crd_name(),
            &PatchParams::apply("lattice-bench").force(),
            &Patch::Apply(&crd),
        )
        .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let ns = format!("op-bench-{}", nanos % 1_000_000_000);
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &namespace).await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    for (name, data) in [
        ("db", json!({"url": "postgres://x@db/x"})),
        ("redis", json!({"url": "redis://redis"})),
        ("s3", json!({"accessKeyId": "a", "secretAccessKey": "b"})),
    ] {
        let s: Secret = serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?;
        secrets.create(&PostParams::default(), &s).await?;
    }

    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(client.clone(), metrics.clone(), Some("bench".into())));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run(ctx, Some(ns.clone()), async move {
        let _ = stopped.await;
    }));
    let api = Api::<MatrixHomeserver>::namespaced(client.clone(), &ns);
    let mut latencies = Vec::new();
    for i in 0..RUNS {
        let name = format!("hs{i}");
        let hs = json!({
            "apiVersion": "lattice.dev/v1alpha1", "kind": "MatrixHomeserver", "metadata": {"name": name},
            "spec": {
                "serverName": format!("{name}.example"), "image": "lattice:bench", "replicas": 2, "shards": 2,
                "database": {"postgres": {"secretRef": {"name": "db"}}},
                "kv": {"redis": {"secretRef": {"name": "redis"}}},
                "media": {"s3": {"endpoint": "http://s3:9000", "bucket": "m", "credentialsSecret": "s3"}},
                "ingress": {"host": format!("{name}.example")}
            }
        });
        let start = Instant::now();
        api.patch(&name, &PatchParams::apply("lattice-bench"), &Patch::Apply(&hs)).await?;
        loop {
            let got = api.get(&name).await?;
            if got.status.and_then(|s| s.observed_generation) == Some(1) {
                break;
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "{name} was not reconciled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(start.elapsed());
    }
    let _ = stop.send(());
    let _ = operator.await;
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    println!(
        "apply -> all children and status ({RUNS} homeservers, 13 children each): median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        ms(p(0.5)),
        ms(p(0.95)),
        ms(p(1.0))
    );
    let text = metrics.render();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or(0.0)
    };
    let (sum, count) = (
        value("lattice_operator_reconcile_duration_seconds_sum"),
        value("lattice_operator_reconcile_duration_seconds_count"),
    );
    println!("reconcile duration: mean {:.1} ms over {count} reconciles", sum / count.max(1.0) * 1000.0);
    Ok(())
}
