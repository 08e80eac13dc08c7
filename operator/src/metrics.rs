//! The operator's Prometheus metrics, in the text exposition format: reconciles, failures and
//! reconcile durations. Small enough not to need a metrics crate.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Histogram bucket upper bounds, in seconds.
const BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    failures: AtomicU64,
    durations: Mutex<Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Metrics {
    /// One reconcile ran (whatever its outcome) and took `took`.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.durations.lock() {
            let s = took.as_secs_f64();
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.count += 1;
            h.sum += s;
        }
    }

    /// One reconcile returned an error.
    pub fn reconcile_failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }

    /// The exposition text for `GET /metrics`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP lattice_operator_reconciles_total Reconciles run.");
        let _ = writeln!(out, "# TYPE lattice_operator_reconciles_total counter");
        let _ = writeln!(out, "lattice_operator_reconciles_total {}", self.reconciles());
        let _ = writeln!(
            out,
            "# HELP lattice_operator_reconcile_errors_total Reconciles that failed and were retried."
        );
        let _ = writeln!(out, "# TYPE lattice_operator_reconcile_errors_total counter");
        let _ = writeln!(
            out,
            "lattice_operator_reconcile_errors_total {}",
            self.failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP lattice_operator_reconcile_duration_seconds Time one reconcile took.");
        let _ = writeln!(out, "# TYPE lattice_operator_reconcile_duration_seconds histogram");
        if let Ok(h) = self.durations.lock() {
            for (b, c) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(out, "lattice_operator_reconcile_duration_seconds_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(
                out,
                "lattice_operator_reconcile_duration_seconds_bucket{{le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "lattice_operator_reconcile_duration_seconds_sum {}", h.sum);
            let _ = writeln!(out, "lattice_operator_reconcile_duration_seconds_count {}", h.count);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.reconciled(Duration::from_millis(20));
        m.reconciled(Duration::from_millis(300));
        m.reconcile_failed();
        let text = m.render();
        for line in [
            "lattice_operator_reconciles_total 2",
            "lattice_operator_reconcile_errors_total 1",
            "lattice_operator_reconcile_duration_seconds_bucket{le=\"0.025\"} 1",
            "lattice_operator_reconcile_duration_seconds_bucket{le=\"0.5\"} 2",
            "lattice_operator_reconcile_duration_seconds_bucket{le=\"+Inf\"} 2",
            "lattice_operator_reconcile_duration_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
