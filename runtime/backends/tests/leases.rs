//! The lease contract (`LeaseBackend`), run against every lease backend: PostgreSQL rows and
//! Kubernetes `coordination.k8s.io/v1` Leases on the API server `scripts/kube.sh` starts.
//! Skipped when a service's variable is unset; `LATTICE_REQUIRE_SERVICES=1` fails instead.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::time::Duration;

use lattice_backends::BackendError;
use lattice_backends::kube_lease::KubeLeases;
use lattice_backends::lease::{LeaseBackend, PostgresLeases};

fn service_env(var: &str) -> Option<String> {
    if let Some(v) = std::env::var(var).ok().filter(|s| !s.is_empty()) {
        return Some(v);
    }
    assert!(
        std::env::var("LATTICE_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "LATTICE_REQUIRE_SERVICES=1 but {var} is unset (source the env file of scripts/services.sh)"
    );
    eprintln!("skipped: {var} unset");
    None
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(rand::random::<[u8; 4]>()))
}

/// Acquire, conflict, re-entry, renew, release, expiry and prefix isolation.
pub async fn lease_contract(b: &dyn LeaseBackend) {
    let set = unique("t");
    let name = |n: &str| format!("{set}-{n}");
    let (a, bb, c) = (name("a"), name("b"), name("c"));
    let long = Duration::from_secs(30);

    assert!(b.acquire(&a, "h1", "http://h1:1", long).await.unwrap(), "a free lease is taken");
    assert!(!b.acquire(&a, "h2", "http://h2:1", long).await.unwrap(), "a held lease is not taken");
    assert!(b.acquire(&a, "h1", "http://h1:2", long).await.unwrap(), "the holder takes it again");
    let listed = b.list(&format!("{set}-")).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].name.as_str(), listed[0].holder.as_str()), (a.as_str(), "h1"));
    assert_eq!(listed[0].address, "http://h1:2", "re-acquiring updates the address");
    assert!(listed[0].held());

    // Renew only what one holds.
    assert_eq!(b.renew(&[a.clone(), bb.clone()], "h1", long).await.unwrap(), vec![a.clone()]);
    assert!(b.renew(std::slice::from_ref(&a), "h2", long).await.unwrap().is_empty());
    assert!(b.renew(&[], "h1", long).await.unwrap().is_empty());

    // Release: only by the holder; then anyone may take it at once.
    b.release(std::slice::from_ref(&a), "h2").await.unwrap();
    assert!(!b.acquire(&a, "h2", "http://h2:1", long).await.unwrap(), "a non-holder cannot release");
    b.release(std::slice::from_ref(&a), "h1").await.unwrap();
    let after = b.list(&format!("{set}-")).await.unwrap();
    assert!(after.iter().all(|l| !l.held()), "released: {after:?}");
    assert!(b.acquire(&a, "h2", "http://h2:1", long).await.unwrap(), "a released lease is free");
    assert!(b.renew(std::slice::from_ref(&a), "h1", long).await.unwrap().is_empty(), "h1 lost it");

    // Expiry: an expired lease is neither renewed nor kept from another holder.
    assert!(b.acquire(&c, "h1", "http://h1:1", Duration::from_secs(1)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let expired = b.list(&format!("{set}-")).await.unwrap();
    let lc = expired.iter().find(|l| l.name == c).unwrap();
    assert!(!lc.live, "expired: {lc:?}");
    assert!(b.renew(std::slice::from_ref(&c), "h1", long).await.unwrap().is_empty(), "expired is lost");
    assert!(b.acquire(&c, "h2", "http://h2:1", long).await.unwrap(), "an expired lease is taken over");

    // Prefix isolation: another set's leases are not listed.
    let other = unique("u");
    assert!(b.acquire(&format!("{other}-a"), "h1", "x", long).await.unwrap());
    let mine = b.list(&format!("{set}-")).await.unwrap();
    assert!(mine.iter().all(|l| l.name.starts_with(&format!("{set}-"))), "{mine:?}");
    assert_eq!(b.list(&format!("{other}-")).await.unwrap().len(), 1);
}

#[tokio::test]
async fn postgres_leases() {
    let Some(url) = service_env("LATTICE_TEST_POSTGRES_URL") else { return };
    lease_contract(&PostgresLeases::new(&url).unwrap()).await;
}

#[tokio::test]
async fn kube_leases() {
    let Some(kubeconfig) = service_env("LATTICE_TEST_KUBECONFIG") else { return };
    let b = KubeLeases::new("default", Some(std::path::Path::new(&kubeconfig))).await.unwrap();
    assert_eq!(b.name(), "kubernetes");
    lease_contract(&b).await;

    // A namespace that does not exist is a misconfiguration, not a lease someone else holds.
    let missing = KubeLeases::new("lattice-missing", Some(std::path::Path::new(&kubeconfig))).await.unwrap();
    let err = missing.acquire("l-a", "h1", "x", Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
}

/// An API server that is down, or that accepts connections and never answers, is
/// `Unavailable` within the call timeout rather than an error of another kind or a hang.
#[tokio::test]
async fn kube_leases_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    for server in [closed, hung.local_addr().unwrap()] {
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: c, cluster: {{server: 'https://{server}', insecure-skip-tls-verify: true}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n"
            ),
        )
        .unwrap();
        let b = KubeLeases::new("default", Some(&path)).await.unwrap();
        let started = std::time::Instant::now();
        let err = b.acquire("l-a", "h1", "x", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable { backend: "kubernetes", .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(8), "{server}: {:?}", started.elapsed());
        let err =
            b.renew(&["l-a".to_owned(), "l-b".to_owned()], "h1", Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, BackendError::Unavailable { .. }), "{err:?}");
    }
}

/// Pods racing for one Lease (free, then released): exactly one wins each time, by the
/// resourceVersion check (or the create's AlreadyExists).
#[tokio::test]
async fn kube_leases_race() {
    let Some(kubeconfig) = service_env("LATTICE_TEST_KUBECONFIG") else { return };
    let b = KubeLeases::new("default", Some(std::path::Path::new(&kubeconfig))).await.unwrap();
    let name = format!("{}-race", unique("r"));
    let holders: Vec<String> = (0..8).map(|i| format!("h{i}")).collect();
    for round in 0..2 {
        let won = futures::future::join_all(
            holders.iter().map(|h| b.acquire(&name, h, "x", Duration::from_secs(30))),
        )
        .await;
        let winners: Vec<&String> =
            holders.iter().zip(&won).filter(|(_, w)| *w.as_ref().unwrap()).map(|(h, _)| h).collect();
        assert_eq!(winners.len(), 1, "round {round}: {won:?}");
        let listed = b.list(&name).await.unwrap();
        assert_eq!(listed[0].holder, *winners[0], "round {round}");
        b.release(std::slice::from_ref(&name), winners[0]).await.unwrap();
    }
}
