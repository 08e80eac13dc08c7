//! Prometheus text metrics, kept in a few atomic counters and fixed-bucket histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets in seconds.
const BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Default)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}", self.counts[i]);
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", self.count);
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braced} {}", self.count);
    }
}

/// Calls, errors and latency of one label set.
type Series = (u64, u64, Histogram);

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    request_latency: Mutex<Histogram>,
    instantiate: Mutex<Histogram>,
    pub parked: AtomicI64,
    pub parked_total: AtomicU64,
    pub rejected_body_too_large: AtomicU64,
    pub guest_traps: AtomicU64,
    pub guest_deadline: AtomicU64,
    /// D1 writes of a Durable Object event refused for a stale shard epoch.
    pub fenced_d1_writes: AtomicU64,
    /// (binding, backend) -> (calls, errors, latency)
    bindings: Mutex<BTreeMap<(&'static str, &'static str), Series>>,
    /// Inbound TLS handshakes by negotiated key-exchange group.
    tls_groups: Mutex<BTreeMap<String, u64>>,
    /// namespace -> (events, errors, latency)
    objects: Mutex<BTreeMap<String, Series>>,
}

impl Metrics {
    pub fn request(&self, status: u16, d: Duration) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry(status).or_default() += 1;
        }
        if let Ok(mut h) = self.request_latency.lock() {
            h.observe(d);
        }
    }

    pub fn instantiated(&self, d: Duration) {
        if let Ok(mut h) = self.instantiate.lock() {
            h.observe(d);
        }
    }

    pub fn tls_handshake(&self, group: &str) {
        if let Ok(mut m) = self.tls_groups.lock() {
            *m.entry(group.to_owned()).or_default() += 1;
        }
    }

    pub fn binding_call(&self, binding: &'static str, backend: &'static str, d: Duration, failed: bool) {
        if let Ok(mut m) = self.bindings.lock() {
            let e = m.entry((binding, backend)).or_default();
            e.0 += 1;
            if failed {
                e.1 += 1;
            }
            e.2.observe(d);
        }
    }

    pub fn object_event(&self, namespace: &str, d: Duration, failed: bool) {
        if let Ok(mut m) = self.objects.lock() {
            let e = m.entry(namespace.to_owned()).or_default();
            e.0 += 1;
            if failed {
                e.1 += 1;
            }
            e.2.observe(d);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# TYPE lattice_http_requests_total counter\n");
        if let Ok(r) = self.requests.lock() {
            for (status, n) in r.iter() {
                let _ = writeln!(out, "lattice_http_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        out.push_str("# TYPE lattice_http_request_duration_seconds histogram\n");
        if let Ok(h) = self.request_latency.lock() {
            h.render(&mut out, "lattice_http_request_duration_seconds", "");
        }
        out.push_str("# TYPE lattice_instantiate_duration_seconds histogram\n");
        if let Ok(h) = self.instantiate.lock() {
            h.render(&mut out, "lattice_instantiate_duration_seconds", "");
        }
        let _ = writeln!(
            out,
            "# TYPE lattice_parked_requests gauge\nlattice_parked_requests {}",
            self.parked.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE lattice_parked_requests_total counter\nlattice_parked_requests_total {}",
            self.parked_total.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE lattice_body_too_large_total counter\nlattice_body_too_large_total {}",
            self.rejected_body_too_large.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE lattice_guest_traps_total counter\nlattice_guest_traps_total {}",
            self.guest_traps.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE lattice_guest_deadline_total counter\nlattice_guest_deadline_total {}",
            self.guest_deadline.load(Ordering::Relaxed)
        );
        out.push_str("# TYPE lattice_tls_handshakes_total counter\n");
        if let Ok(m) = self.tls_groups.lock() {
            for (group, n) in m.iter() {
                let _ = writeln!(out, "lattice_tls_handshakes_total{{group=\"{group}\"}} {n}");
            }
        }
        out.push_str("# TYPE lattice_binding_calls_total counter\n# TYPE lattice_binding_errors_total counter\n# TYPE lattice_binding_call_duration_seconds histogram\n");
        if let Ok(m) = self.bindings.lock() {
            for ((binding, backend), (calls, errors, h)) in m.iter() {
                let labels = format!("binding=\"{binding}\",backend=\"{backend}\"");
                let _ = writeln!(out, "lattice_binding_calls_total{{{labels}}} {calls}");
                let _ = writeln!(out, "lattice_binding_errors_total{{{labels}}} {errors}");
                h.render(&mut out, "lattice_binding_call_duration_seconds", &labels);
            }
        }
        out.push_str("# TYPE lattice_object_events_total counter\n# TYPE lattice_object_event_errors_total counter\n# TYPE lattice_object_event_duration_seconds histogram\n");
        if let Ok(m) = self.objects.lock() {
            for (ns, (events, errors, h)) in m.iter() {
                let labels = format!("namespace=\"{ns}\"");
                let _ = writeln!(out, "lattice_object_events_total{{{labels}}} {events}");
                let _ = writeln!(out, "lattice_object_event_errors_total{{{labels}}} {errors}");
                h.render(&mut out, "lattice_object_event_duration_seconds", &labels);
            }
        }
        out
    }
}
