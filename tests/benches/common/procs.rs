//! Processes' memory and CPU from `/proc`, and the services' processes `scripts/services.sh`
//! started, for the homeserver benchmarks.
#![allow(dead_code, reason = "each benchmark uses a different part of this module")]

pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Resets the process's `VmHWM` to its current RSS (Linux ≥ 4.0).
pub fn reset_hwm(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

pub fn pss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines().find_map(|l| l.strip_prefix("Pss:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `(ppid, utime + stime in ticks)` from /proc/<pid>/stat.
pub fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

pub fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| proc_stat(*pid).is_some_and(|(ppid, _)| ppid == parent))
        .collect()
}

/// The services' processes, from the state directory `scripts/services.sh` wrote.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServicePids {
    pub postmaster: Option<u32>,
    pub redis: Option<u32>,
    s3: Option<u32>,
}

impl ServicePids {
    pub fn find() -> Self {
        let Ok(state) = std::env::var("LATTICE_TEST_SERVICES_STATE") else { return Self::default() };
        let state = std::path::PathBuf::from(state);
        let first_line = |p: std::path::PathBuf| -> Option<u32> {
            std::fs::read_to_string(p).ok()?.lines().next()?.trim().parse().ok()
        };
        let postmaster = std::fs::read_to_string(state.join("postgres/home"))
            .ok()
            .and_then(|home| first_line(std::path::Path::new(home.trim()).join("data/postmaster.pid")));
        Self {
            postmaster,
            redis: first_line(state.join("redis/redis.pid")),
            s3: first_line(state.join("s3/s3s-fs.pid")),
        }
    }

    pub fn postgres_pids(&self) -> Vec<u32> {
        self.postmaster.map(|p| std::iter::once(p).chain(children(p)).collect()).unwrap_or_default()
    }

    /// PostgreSQL PSS (summed over its processes: shared buffers counted once), Redis and
    /// s3s-fs RSS, in KiB.
    pub fn memory_kb(&self) -> [Option<u64>; 3] {
        let pg = self.postmaster.map(|_| self.postgres_pids().into_iter().filter_map(pss_kb).sum());
        [
            pg,
            self.redis.and_then(|p| proc_status_kb(p, "VmRSS")),
            self.s3.and_then(|p| proc_status_kb(p, "VmRSS")),
        ]
    }

    pub fn postgres_ticks(&self) -> u64 {
        self.postgres_pids().into_iter().filter_map(|p| proc_stat(p).map(|(_, t)| t)).sum()
    }
}

pub fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub fn fmt_mb(kb: Option<u64>) -> String {
    kb.map_or_else(|| "n/a".to_owned(), |k| format!("{:.1} MB", mb(k)))
}
