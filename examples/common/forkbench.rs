//! Scenario 5 of the harness: the fork server against re-exec.
//!
//! - start-to-join of an empty function in both start modes and on every
//!   backend, with `Command::new("/bin/true").status()` in the same slices;
//! - 100 children started at once, then joined: the total, and the median
//!   time one `start()` call blocks;
//! - a pool worker SIGKILLed (over a second after its start, so the pool's
//!   crash-loop back-off stays out of it): time until its replacement has
//!   served a job;
//! - resident memory: the application's before and after `init()` forked
//!   the server, and the server's own (RSS, and PSS, which splits the pages
//!   it shares with the application).

use ringipc::{Backend, Pool, Process, StartMode};
use serde::Serialize;
use std::time::{Duration, Instant};

/// One start-to-join row.
#[derive(Serialize, Clone, Debug)]
pub struct StartRow {
    pub contender: String,
    pub runs: usize,
    pub median_us: f64,
    pub p99_us: f64,
    /// Median against /bin/true's median.
    pub vs_bin_true: Option<f64>,
}

/// 100 children at once.
#[derive(Serialize, Clone, Debug)]
pub struct BurstRow {
    pub mode: &'static str,
    pub backend: &'static str,
    pub children: usize,
    /// All started, then all joined.
    pub total_ms: f64,
    /// The median time one `start()` blocked.
    pub start_call_median_us: f64,
}

/// A pool worker's death to its replacement serving a job.
#[derive(Serialize, Clone, Debug)]
pub struct RestartRow {
    pub mode: &'static str,
    pub backend: &'static str,
    pub runs: usize,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// Memory, in KiB.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Memory {
    pub app_rss_before_init_kib: Option<u64>,
    pub app_rss_after_init_kib: Option<u64>,
    pub server_rss_kib: Option<u64>,
    pub server_pss_kib: Option<u64>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Report {
    pub server_pid: Option<u32>,
    pub start: Vec<StartRow>,
    pub burst: Vec<BurstRow>,
    pub pool_restart: Vec<RestartRow>,
    pub memory: Memory,
}

/// The application's RSS before `init()`, read by `main` on its first line.
static RSS_BEFORE_INIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// Reads this process's RSS; call it right before `ringipc::init()` (it
/// allocates nothing that outlives it and touches no hash map).
pub fn note_rss_before_init() {
    let _ = RSS_BEFORE_INIT.set(status_kib("self", "VmRSS:"));
}

fn status_kib(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn pss_kib(pid: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Pss:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn empty(_: ()) {}

fn job(x: u64) -> u64 {
    x + 1
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

#[derive(Clone, Copy)]
enum Who {
    Ringipc(StartMode, Backend),
    BinTrue,
}

impl Who {
    fn name(self) -> String {
        match self {
            Who::Ringipc(m, b) => format!("{}-{}", m.name(), b.name()),
            Who::BinTrue => "/bin/true".into(),
        }
    }
}

fn one_start(rt: &tokio::runtime::Runtime, who: Who) -> Result<Duration, String> {
    let t0 = Instant::now();
    match who {
        Who::Ringipc(mode, b) => rt.block_on(async {
            let mut p = Process::builder(empty)
                .arg(())
                .backend(b)
                .start_mode(mode)
                .start()
                .map_err(|e| e.to_string())?;
            if p.started_by() != mode {
                return Err(format!(
                    "asked for {}, got {}",
                    mode.name(),
                    p.started_by().name()
                ));
            }
            let s = p.join().await.map_err(|e| e.to_string())?;
            if !s.success() {
                return Err(format!("child: {s}"));
            }
            Ok(())
        })?,
        Who::BinTrue => {
            let s = std::process::Command::new("/bin/true")
                .status()
                .map_err(|e| e.to_string())?;
            if !s.success() {
                return Err(format!("/bin/true: {s}"));
            }
        }
    }
    Ok(t0.elapsed())
}

/// Runs the scenario; `cell` is the time per contender and `reps` slices.
pub fn run(backends: &[Backend], cell: Duration, reps: usize) -> Report {
    let mut report = Report {
        server_pid: ringipc::fork_server_pid(),
        ..Report::default()
    };
    let rt = rt();
    let mut whos = vec![Who::BinTrue];
    for &b in backends {
        whos.push(Who::Ringipc(StartMode::Fork, b));
        whos.push(Who::Ringipc(StartMode::Exec, b));
    }
    let mut samples: Vec<Result<Vec<Duration>, String>> = vec![Ok(Vec::new()); whos.len()];
    let slice = cell / reps.max(1) as u32;
    for _ in 0..reps.max(1) {
        for (i, &who) in whos.iter().enumerate() {
            let Ok(done) = &mut samples[i] else { continue };
            let t = Instant::now();
            let mut n = 0;
            while n < 12 || (t.elapsed() < slice && n < 2000) {
                match one_start(&rt, who) {
                    // The first two of each slice warm up.
                    Ok(d) if n >= 2 => done.push(d),
                    Ok(_) => {}
                    Err(e) => {
                        samples[i] = Err(e);
                        break;
                    }
                }
                n += 1;
            }
        }
    }
    let base = samples[0].as_ref().ok().map(|s| median(s.clone()));
    for (who, s) in whos.iter().zip(samples) {
        match s {
            Ok(s) => {
                let m = median(s.clone());
                report.start.push(StartRow {
                    contender: who.name(),
                    runs: s.len(),
                    median_us: us(m),
                    p99_us: us(p99(s)),
                    vs_bin_true: base.map(|b| us(m) / us(b)),
                })
            }
            Err(e) => eprintln!("fork server scenario: {}: {e}", who.name()),
        }
    }

    for &b in backends {
        for mode in [StartMode::Fork, StartMode::Exec] {
            let r: Result<BurstRow, String> = rt.block_on(async {
                let n = 100;
                let t0 = Instant::now();
                let mut calls = Vec::with_capacity(n);
                let mut procs = Vec::with_capacity(n);
                for _ in 0..n {
                    let t = Instant::now();
                    let p = Process::builder(empty)
                        .arg(())
                        .backend(b)
                        .start_mode(mode)
                        .start()
                        .map_err(|e| e.to_string())?;
                    calls.push(t.elapsed());
                    procs.push(p);
                }
                for r in ringipc::join_all(&mut procs).await {
                    r.map_err(|e| e.to_string())?;
                }
                Ok(BurstRow {
                    mode: mode.name(),
                    backend: b.name(),
                    children: n,
                    total_ms: t0.elapsed().as_secs_f64() * 1e3,
                    start_call_median_us: us(median(calls)),
                })
            });
            match r {
                Ok(row) => report.burst.push(row),
                Err(e) => eprintln!("fork server scenario: burst {}: {e}", mode.name()),
            }
        }
    }

    let restarts = if reps > 1 { 3 } else { 1 };
    for &b in backends {
        for mode in [StartMode::Fork, StartMode::Exec] {
            let before = ringipc::default_start_mode();
            ringipc::set_default_start_mode(mode);
            let r = rt.block_on(pool_restart(b, restarts));
            ringipc::set_default_start_mode(before);
            match r {
                Ok(times) => report.pool_restart.push(RestartRow {
                    mode: mode.name(),
                    backend: b.name(),
                    runs: times.len(),
                    median_ms: median(times.clone()).as_secs_f64() * 1e3,
                    max_ms: times
                        .iter()
                        .max()
                        .copied()
                        .unwrap_or_default()
                        .as_secs_f64()
                        * 1e3,
                }),
                Err(e) => eprintln!("fork server scenario: pool restart {}: {e}", mode.name()),
            }
        }
    }

    report.memory = Memory {
        app_rss_before_init_kib: RSS_BEFORE_INIT.get().copied().flatten(),
        app_rss_after_init_kib: AFTER.get().copied().flatten(),
        server_rss_kib: None,
        server_pss_kib: None,
    };
    if let Some(pid) = report.server_pid {
        let pid = pid.to_string();
        report.memory.server_rss_kib = status_kib(&pid, "VmRSS:");
        report.memory.server_pss_kib = pss_kib(&pid);
    }
    report
}

static AFTER: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();

/// Call right after `ringipc::init()`.
pub fn note_rss_after_init_now() {
    let _ = AFTER.set(status_kib("self", "VmRSS:"));
}

/// Kills the only worker `n` times; each time, from the kill until a job
/// has been served by its replacement.
async fn pool_restart(b: Backend, n: usize) -> Result<Vec<Duration>, String> {
    let pool = Pool::builder(job)
        .workers(1)
        .backend(b)
        .pin(false)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    pool.call(1).await.map_err(|e| e.to_string())?;
    let mut times = Vec::with_capacity(n);
    let mut ready = Instant::now();
    for _ in 0..n {
        // The pool backs off before restarting a worker that died within a
        // second of its start (a crash loop): kill only older workers, so
        // the figure is the restart itself.
        tokio::time::sleep(Duration::from_millis(1100).saturating_sub(ready.elapsed())).await;
        let old = pool.stats()[0].pid;
        let t0 = Instant::now();
        // SAFETY: kill on the pool's worker pid, alive and unreaped (it just served a job).
        unsafe { libc::kill(old as i32, libc::SIGKILL) };
        loop {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("no replacement within 10 s".into());
            }
            if pool.call(1).await.is_ok() && pool.stats()[0].pid != old {
                break;
            }
        }
        times.push(t0.elapsed());
        ready = Instant::now();
    }
    let _ = pool.shutdown().await;
    Ok(times)
}

/// Prints scenario 5.
pub fn print(r: &Report) {
    println!();
    println!(
        "5. fork server vs re-exec (fork server pid {})",
        r.server_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "   start-to-join of an empty function (microseconds), same slices as Command::new(\"/bin/true\").status()"
    );
    println!(
        "  {:<17} {:>9} {:>9} {:>12} {:>6}",
        "contender", "median", "p99", "vs /bin/true", "runs"
    );
    for s in &r.start {
        println!(
            "  {:<17} {:>9.0} {:>9.0} {:>12} {:>6}",
            s.contender,
            s.median_us,
            s.p99_us,
            s.vs_bin_true
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
            s.runs
        );
    }
    println!("   100 children started at once, then joined");
    println!(
        "  {:<6} {:<7} {:>10} {:>22}",
        "mode", "backend", "total ms", "start() median us"
    );
    for b in &r.burst {
        println!(
            "  {:<6} {:<7} {:>10.1} {:>22.0}",
            b.mode, b.backend, b.total_ms, b.start_call_median_us
        );
    }
    println!("   pool, one worker SIGKILLed: until its replacement served a job");
    println!(
        "  {:<6} {:<7} {:>10} {:>8} {:>5}",
        "mode", "backend", "median ms", "max ms", "runs"
    );
    for p in &r.pool_restart {
        println!(
            "  {:<6} {:<7} {:>10.2} {:>8.2} {:>5}",
            p.mode, p.backend, p.median_ms, p.max_ms, p.runs
        );
    }
    let kib = |k: Option<u64>| k.map(|k| format!("{k} KiB")).unwrap_or_else(|| "-".into());
    println!(
        "   memory: application RSS before init {}, after init {}; fork server RSS {}, PSS {}",
        kib(r.memory.app_rss_before_init_kib),
        kib(r.memory.app_rss_after_init_kib),
        kib(r.memory.server_rss_kib),
        kib(r.memory.server_pss_kib)
    );
}

/// Each fork row's median against /bin/true's, for the target line.
pub fn fork_ratios(r: &Report) -> Vec<(&str, f64)> {
    r.start
        .iter()
        .filter(|s| s.contender.starts_with("fork-"))
        .filter_map(|s| Some((s.contender.as_str(), s.vs_bin_true?)))
        .collect()
}
