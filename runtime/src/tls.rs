//! TLS 1.3 with rustls and aws-lc-rs: X25519MLKEM768 offered and preferred by default,
//! `required` refuses classical-only peers. Certificates are reloaded when their files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::PostQuantum;

/// The crypto provider for a post-quantum policy.
pub fn provider(pq: PostQuantum) -> CryptoProvider {
    let mut p = aws_lc_rs::default_provider();
    match pq {
        // The default list leads with X25519MLKEM768 (`prefer-post-quantum`).
        PostQuantum::Preferred => {}
        PostQuantum::Required => p.kx_groups = vec![aws_lc_rs::kx_group::X25519MLKEM768],
        PostQuantum::Off => {
            p.kx_groups = vec![
                aws_lc_rs::kx_group::X25519,
                aws_lc_rs::kx_group::SECP256R1,
                aws_lc_rs::kx_group::SECP384R1,
            ];
        }
    }
    p
}

fn load_certified_key(cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading certificate {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificate {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in {}", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let signing = aws_lc_rs::sign::any_supported_type(&key).context("unsupported private key type")?;
    Ok(CertifiedKey::new(certs, signing))
}

/// Serves the current certificate; [`CertReloader::watch`] swaps it when the files change.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: RwLock<Option<(SystemTime, SystemTime)>>,
}

fn stamps(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl CertReloader {
    pub fn new(cert: PathBuf, key: PathBuf) -> anyhow::Result<Arc<Self>> {
        let ck = load_certified_key(&cert, &key)?;
        let stamp = stamps(&cert, &key);
        Ok(Arc::new(Self { cert, key, current: RwLock::new(Arc::new(ck)), stamp: RwLock::new(stamp) }))
    }

    /// Reloads when the files' modification times changed; keeps the old pair on error.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.cert, &self.key);
        if now.is_none() || now == *self.stamp.read().unwrap_or_else(|p| p.into_inner()) {
            return false;
        }
        match load_certified_key(&self.cert, &self.key) {
            Ok(ck) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = now;
                tracing::info!(cert = %self.cert.display(), "reloaded TLS certificate");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "new TLS certificate files are unusable; keeping the old ones");
                false
            }
        }
    }

    pub fn watch(self: Arc<Self>, every: Duration) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                self.reload_if_changed();
            }
        });
    }
}

impl ResolvesServerCert for CertReloader {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

pub fn server_config(pq: PostQuantum, certs: Arc<CertReloader>) -> anyhow::Result<rustls::ServerConfig> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider(pq)))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with this provider")?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Client config for outbound requests: system roots plus `extra_ca`.
pub fn client_config(pq: PostQuantum, extra_ca: &[PathBuf]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    for path in extra_ca {
        for cert in
            CertificateDer::pem_file_iter(path).with_context(|| format!("reading CA {}", path.display()))?
        {
            roots
                .add(cert.with_context(|| format!("parsing CA {}", path.display()))?)
                .with_context(|| format!("adding CA {}", path.display()))?;
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider(pq)))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions with this provider")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
