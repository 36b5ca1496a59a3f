//! The benchmark harness: ringipc against what a Rust user would pick
//! instead, side by side in one run, on this machine.
//!
//! ```text
//! cargo run --release --example harness                 # under a minute on 2 cores
//! cargo run --release --example harness -- --quick      # a few seconds, noisier
//! cargo run --release --example harness -- --sizes 64,4K,1M --backend uring --no-pin
//! ```
//!
//! It prints the machine, then one table per scenario, then the issue's
//! targets with MET or MISS; it writes every number to `harness.json` and a
//! throughput plot to `harness.svg`. Every figure printed is measured in the
//! run that prints it.
//!
//! Scenarios:
//! 1. one-way throughput for each message size (messages/s and MB/s);
//!    1b. one-way bandwidth at 64 KiB, 1 MiB and 4 MiB with every receiver
//!    reading every byte (a checksum), ringipc's arena on and off (also
//!    alone: `--arena`);
//!    1c. 64 B one-way in ringipc's raw-bytes mode (no rkyv);
//! 2. ping-pong round-trip latency (p50, p99, p99.9) for 64 B and 64 KiB;
//! 3. child start-to-join: a ringipc child running an empty function
//!    against `std::process::Command` running `/bin/true`, with two rows
//!    between them that show where the time goes: exec'ing this binary
//!    with nothing to do, and the same through std's fork path, which any
//!    `pre_exec` hook selects (ringipc avoids it with `posix_spawn`);
//! 4. pool job throughput for a tiny job and a CPU-bound job calibrated to
//!    about a millisecond here, with one worker and one worker per core, and
//!    jobs returning 1 MiB with the result pipe's arena on and off.
//!
//! Scenarios 1 and 2 run every contender's two sides on two OS threads (the
//! shape of a parent and a child, without process start-up); the measuring
//! functions are in `examples/common/measure.rs`, shared with the
//! `throughput` example. Every other scenario has its own module under
//! `examples/common/` (`child_start.rs` for 3, `pool_jobs.rs` for 4, ...),
//! and the plot is drawn by `plot.rs`. This file is the driver: the
//! command line, the order the scenarios run in, the report written to
//! JSON, the tables and the targets.

#[path = "common/arena_bench.rs"]
mod arena_bench;
#[path = "common/busy.rs"]
mod busy;
#[path = "common/bytes_mode.rs"]
mod bytes_mode;
#[path = "common/child_start.rs"]
mod child_start;
#[path = "common/fanout.rs"]
mod fanout;
#[path = "common/measure.rs"]
#[allow(
    dead_code,
    reason = "shared with the throughput example, which uses the rest"
)]
mod measure;
#[path = "common/plot.rs"]
mod plot;
#[path = "common/pool_big.rs"]
mod pool_big;
#[path = "common/pool_jobs.rs"]
mod pool_jobs;

#[path = "common/forkbench.rs"]
mod forkbench;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use measure::{Contender, CpuSnapshot, Latency, Settings, Throughput};
use ringipc::Backend;
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Ping-pong message sizes.
const PING_SIZES: [usize; 2] = [64, 64 << 10];
/// Above this share of the machine used by other processes, a scenario's
/// figures are flagged.
const NOISY: f64 = 0.05;

// ---------------------------------------------------------------------------
// Command line

/// ringipc's benchmark harness: ringipc against the alternatives, side by side.
#[derive(Parser, Debug)]
#[command(name = "harness")]
struct Args {
    /// A few seconds in all: shorter cells, one run each (noisier).
    #[arg(long)]
    quick: bool,
    /// Only the arena table: one-way bandwidth with every byte read (checksum).
    #[arg(long)]
    arena: bool,
    /// Turn ringipc's shared-memory arena off (every message over the pipe).
    #[arg(long)]
    no_arena: bool,
    /// Seconds of measurement per cell (one contender at one size) [default: 0.5, or 0.06 with --quick].
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// One-way message sizes, comma-separated; K and M suffixes are KiB and MiB.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "64,1K,4K,64K,1M,4M")]
    sizes: Vec<usize>,
    /// Which ringipc backends to measure.
    #[arg(long, value_enum, default_value_t = BackendArg::Both)]
    backend: BackendArg,
    /// Where to write every number, as JSON.
    #[arg(long, value_name = "FILE", default_value = "harness.json")]
    json: PathBuf,
    /// Where to write the throughput plot (SVG).
    #[arg(long, value_name = "FILE", default_value = "harness.svg")]
    plot: PathBuf,
    /// Pin the two sides (sender/parent, receiver/child) to these cores
    /// [default: the first two cores this process may use].
    #[arg(long, value_name = "A,B", value_parser = parse_pin, conflicts_with = "no_pin")]
    pin: Option<[usize; 2]>,
    /// Do not pin anything (pool workers included).
    #[arg(long)]
    no_pin: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum BackendArg {
    Uring,
    Epoll,
    Both,
}

impl BackendArg {
    fn backends(self) -> Vec<Backend> {
        match self {
            BackendArg::Uring => vec![Backend::Uring],
            BackendArg::Epoll => vec![Backend::Epoll],
            BackendArg::Both => vec![Backend::Uring, Backend::Epoll],
        }
    }
}

/// `64`, `1K`, `4k`, `1M`, `4MiB`: K is 1024 and M is 1024².
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        _ => (t, 1),
    };
    match num.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n * mult),
        _ => Err(format!(
            "{s:?} is not a message size (examples: 64, 4K, 1M)"
        )),
    }
}

fn parse_pin(s: &str) -> Result<[usize; 2], String> {
    let cores: Vec<usize> = s
        .split(',')
        .map(|c| c.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("{s:?}: expected two core numbers, like 0,1"))?;
    match cores[..] {
        [a, b] => Ok([a, b]),
        _ => Err(format!("{s:?}: expected two core numbers, like 0,1")),
    }
}

// ---------------------------------------------------------------------------
// The report: plain data, serialized as it is to the JSON file

#[derive(Serialize)]
struct Report {
    machine: Machine,
    settings: RunSettings,
    contenders: Vec<ContenderStatus>,
    one_way: Vec<OneWayRow>,
    ping_pong: Vec<PingRow>,
    /// Scenario 1c: 64 B one-way in ringipc's raw-bytes mode.
    bytes_mode: Vec<bytes_mode::BytesRow>,
    /// Scenario 1b: one-way bandwidth with every byte read (a checksum).
    read_every_byte: Vec<arena_bench::ReadAllRow>,
    /// The harness's peak resident memory (VmHWM) at the end of the run.
    peak_rss_kib: u64,
    /// Scenario 2b: ping-pong with busy polling, and the CPU it burns.
    busy_poll: Vec<busy::BusyRow>,
    /// Scenario 2c: one engine core serving many children at once.
    many_channels: Vec<fanout::FanoutRow>,
    child_start: Vec<child_start::StartRow>,
    /// This process's resident memory when scenario 3 began: a fork copies
    /// the page tables of all of it.
    child_start_parent_rss_kib: Option<u64>,
    pool: pool_jobs::PoolReport,
    /// Scenario 4, last table: jobs returning 1 MiB, arena on and off.
    pool_big: Vec<pool_big::PoolBigRow>,
    /// Scenario 5: fork server against re-exec.
    fork_server: forkbench::Report,
    /// Cells that failed, with the error.
    failures: Vec<Failure>,
    /// Share of the machine other processes used during each scenario step.
    foreign_load: Vec<Load>,
    targets: Vec<Target>,
    total_seconds: f64,
}

#[derive(Serialize)]
struct Machine {
    cpu_model: String,
    cores_online: usize,
    cores_usable: Vec<usize>,
    kernel: String,
    ringipc_version: &'static str,
    /// `ringipc::default_backend()`, or its error.
    default_backend: String,
    /// `ringipc::uring_probe()`: "usable", or why not.
    uring_probe: String,
    /// Cores of the two sides, `[sender/parent, receiver/child]`.
    pinning: Option<[usize; 2]>,
    pinning_text: String,
    pipe_default_bytes: Option<usize>,
    pipe_bytes: Option<usize>,
    pipe_max_bytes: Option<usize>,
}

#[derive(Serialize)]
struct RunSettings {
    quick: bool,
    seconds_per_cell: f64,
    runs_per_cell: usize,
    sizes: Vec<usize>,
    ping_sizes: Vec<usize>,
    backend: BackendArg,
}

#[derive(Serialize)]
struct ContenderStatus {
    name: &'static str,
    /// "ok", "skipped: ..." or "not built: ...".
    status: String,
    what: &'static str,
}

#[derive(Serialize, Clone)]
struct OneWayRow {
    contender: &'static str,
    size: usize,
    messages: u64,
    seconds: f64,
    msgs_per_sec: f64,
    mb_per_sec: f64,
    /// msgs/s against raw-pipe's in the same step.
    vs_raw: Option<f64>,
}

#[derive(Serialize, Clone)]
struct PingRow {
    contender: &'static str,
    size: usize,
    rounds: usize,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// p50 against raw-pipe's.
    p50_vs_raw: Option<f64>,
}

#[derive(Serialize)]
struct Failure {
    scenario: &'static str,
    contender: &'static str,
    size: Option<usize>,
    error: String,
}

#[derive(Serialize)]
struct Load {
    step: String,
    share: f64,
}

#[derive(Serialize)]
struct Target {
    what: String,
    verdict: Verdict,
    detail: String,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    #[serde(rename = "MET")]
    Met,
    #[serde(rename = "MISS")]
    Miss,
    #[serde(rename = "not measured")]
    NotMeasured,
}

impl Report {
    fn one_way(&self, c: Contender, size: usize) -> Option<&OneWayRow> {
        let name = c.name();
        self.one_way
            .iter()
            .find(|r| r.contender == name && r.size == size)
    }

    fn ping(&self, c: Contender, size: usize) -> Option<&PingRow> {
        let name = c.name();
        self.ping_pong
            .iter()
            .find(|r| r.contender == name && r.size == size)
    }

    fn start(&self, name: &str) -> Option<&child_start::StartRow> {
        self.child_start.iter().find(|r| r.contender == name)
    }

    fn pool_row(&self, name: &str, job: &str, workers: usize) -> Option<&pool_jobs::PoolRow> {
        self.pool
            .rows
            .iter()
            .find(|r| r.contender == name && r.job == job && r.workers == workers)
    }

    fn failure(&self, scenario: &str, name: &str, size: Option<usize>) -> Option<&Failure> {
        self.failures
            .iter()
            .find(|f| f.scenario == scenario && f.contender == name && f.size == size)
    }

    fn load(&self, step: &str) -> Option<f64> {
        self.foreign_load
            .iter()
            .find(|l| l.step == step)
            .map(|l| l.share)
    }
}

// ---------------------------------------------------------------------------
// The machine

fn machine(pinning: Option<[usize; 2]>, pool_pinned: bool) -> Machine {
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    // SAFETY: sysconf only reads a system constant.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(0) as usize;
    let default_backend = match ringipc::default_backend() {
        Ok(b) => b.name().to_string(),
        Err(e) => format!("error: {e}"),
    };
    let uring_probe = match ringipc::uring_probe() {
        Ok(()) => "usable".to_string(),
        Err(why) => format!("unusable: {why}"),
    };
    let pinning_text = match pinning {
        Some([a, b]) => format!(
            "sender/parent thread on core {a}, receiver/child on core {b}; {}",
            if pool_pinned {
                "pool workers pinned by Pool (worker i on core i)"
            } else {
                "pool workers not pinned"
            }
        ),
        None => "none (--no-pin, or fewer than two usable cores)".into(),
    };
    Machine {
        cpu_model,
        cores_online: online,
        cores_usable: usable_cores(),
        kernel: kernel(),
        ringipc_version: env!("CARGO_PKG_VERSION"),
        default_backend,
        uring_probe,
        pinning,
        pinning_text,
        pipe_default_bytes: default_pipe_size(),
        pipe_bytes: measure::raw_pipe_size().ok(),
        pipe_max_bytes: std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
    }
}

/// `uname -srvm`.
fn kernel() -> String {
    // SAFETY: a zeroed utsname is a valid buffer for uname to fill.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return "unknown".into();
    }
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    format!(
        "{} {} {} {}",
        field(&u.sysname),
        field(&u.release),
        field(&u.version),
        field(&u.machine)
    )
}

/// The cores this process may run on (the main thread's mask, which is
/// never pinned: `Pool` reads it to place its workers).
fn usable_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}

/// This process's resident memory (VmRSS), in KiB.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A fresh pipe's capacity before anyone grows it.
fn default_pipe_size() -> Option<usize> {
    use std::os::fd::AsRawFd;
    let (_r, w) = std::io::pipe().ok()?;
    // SAFETY: F_GETPIPE_SZ takes no argument and reads the capacity.
    let n = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    (n > 0).then_some(n as usize)
}

fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

// ---------------------------------------------------------------------------
// Running the scenarios

struct Plan {
    quick: bool,
    cell: Duration,
    settings: Settings,
    sizes: Vec<usize>,
    backends: Vec<Backend>,
    /// Contenders of scenarios 1 and 2 that can run here.
    contenders: Vec<Contender>,
    pool_pin: bool,
    /// Cores of the two sides, if pinned.
    pin: Option<[usize; 2]>,
    cores: usize,
}

impl Plan {
    fn reps(&self) -> usize {
        self.settings.reps.max(1)
    }

    /// Scenario 3's contenders, the reference last.
    fn starters(&self) -> Vec<child_start::Starter> {
        use child_start::Starter;
        let mut v: Vec<Starter> = self.backends.iter().map(|&b| Starter::Ringipc(b)).collect();
        v.extend([Starter::SelfExecFork, Starter::SelfExec, Starter::BinTrue]);
        v
    }

    fn pool_workers(&self) -> Vec<usize> {
        if self.cores > 1 {
            vec![1, self.cores]
        } else {
            vec![1]
        }
    }

    /// Progress steps, counted the way the scenarios tick.
    fn steps(&self) -> u64 {
        let runs = self.settings.runs_per_cell();
        let n = self.contenders.len();
        let one_way = self.sizes.len() * n * runs;
        let ping = PING_SIZES.len() * n * runs;
        let busy = runs * self.backends.len() * 2 + self.backends.len();
        let start = self.reps() * self.starters().len();
        let pool = 1 + self.reps() * self.backends.len() * self.pool_workers().len();
        (one_way + ping + busy + start + pool) as u64
    }
}

fn contender_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Uring => Contender::RingipcUring.name(),
        _ => Contender::RingipcEpoll.name(),
    }
}

/// Measures a step and records how much of the machine others used meanwhile.
fn with_load<T>(report: &mut Report, step: String, f: impl FnOnce(&mut Report) -> T) -> T {
    let cpu = CpuSnapshot::now();
    let out = f(report);
    if let Some(share) = cpu.and_then(|c| c.foreign_load_since()) {
        report.foreign_load.push(Load { step, share });
    }
    out
}

fn run_one_way(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    for &size in &plan.sizes {
        bar.set_message(format!("1. one-way {}", size_name(size)));
        let results = with_load(report, format!("one-way {size}"), |_| {
            measure::one_way_each(&plan.contenders, size, &plan.settings, &mut |_| bar.inc(1))
        });
        let raw = plan
            .contenders
            .iter()
            .zip(&results)
            .find(|(c, _)| **c == Contender::RawPipe)
            .and_then(|(_, r)| r.as_ref().ok().copied());
        for (&c, r) in plan.contenders.iter().zip(results) {
            match r {
                Ok(t) => report.one_way.push(one_way_row(c, &t, raw.as_ref())),
                Err(error) => report.failures.push(Failure {
                    scenario: "one-way",
                    contender: c.name(),
                    size: Some(size),
                    error,
                }),
            }
        }
    }
}

fn one_way_row(c: Contender, t: &Throughput, raw: Option<&Throughput>) -> OneWayRow {
    OneWayRow {
        contender: c.name(),
        size: t.size,
        messages: t.messages,
        seconds: t.elapsed.as_secs_f64(),
        msgs_per_sec: t.msgs_per_sec(),
        mb_per_sec: t.mb_per_sec(),
        vs_raw: raw.map(|raw| t.msgs_per_sec() / raw.msgs_per_sec()),
    }
}

fn run_ping_pong(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    for size in PING_SIZES {
        bar.set_message(format!("2. ping-pong {}", size_name(size)));
        let results = with_load(report, format!("ping-pong {size}"), |_| {
            measure::ping_pong_each(&plan.contenders, size, &plan.settings, &mut |_| bar.inc(1))
        });
        let raw = plan
            .contenders
            .iter()
            .zip(&results)
            .find(|(c, _)| **c == Contender::RawPipe)
            .and_then(|(_, r)| r.as_ref().ok().copied());
        for (&c, r) in plan.contenders.iter().zip(results) {
            match r {
                Ok(l) => report.ping_pong.push(ping_row(c.name(), &l, raw.as_ref())),
                Err(error) => report.failures.push(Failure {
                    scenario: "ping-pong",
                    contender: c.name(),
                    size: Some(size),
                    error,
                }),
            }
        }
    }
}

fn run_busy_poll(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    bar.set_message("2b. busy polling");
    let raw = report
        .ping(Contender::RawPipe, busy::SIZE)
        .map(|r| r.p50_us);
    let rows = with_load(report, "busy polling".to_string(), |_| {
        busy::run(&plan.backends, &plan.settings, raw, &mut || bar.inc(1))
    });
    for row in rows {
        match row {
            Ok(row) => report.busy_poll.push(row),
            Err((contender, error)) => report.failures.push(Failure {
                scenario: "busy polling",
                contender,
                size: Some(busy::SIZE),
                error,
            }),
        }
    }
}

fn run_bytes_mode(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    if !plan.sizes.contains(&bytes_mode::SIZE) {
        return;
    }
    bar.set_message("1c. 64 B one-way, bytes mode");
    let raw = report
        .one_way(Contender::RawPipe, bytes_mode::SIZE)
        .map(|r| r.msgs_per_sec);
    let tokio_uring = report
        .one_way(Contender::TokioUring, bytes_mode::SIZE)
        .map(|r| r.msgs_per_sec);
    let rows = with_load(report, "64 B one-way, bytes mode".to_string(), |_| {
        plan.backends
            .iter()
            .map(|&b| (b, bytes_mode::run(b, plan.settings.run_time, plan.reps())))
            .collect::<Vec<_>>()
    });
    for (b, r) in rows {
        match r {
            Ok(rate) => report.bytes_mode.push(bytes_mode::BytesRow {
                contender: match b {
                    Backend::Uring => "ringipc-bytes-uring",
                    _ => "ringipc-bytes-epoll",
                },
                size: bytes_mode::SIZE,
                msgs_per_sec: rate,
                vs_raw: raw.map(|raw| rate / raw),
                vs_tokio_uring: tokio_uring.map(|t| rate / t),
            }),
            Err(e) => report.failures.push(Failure {
                scenario: "64 B one-way, bytes mode",
                contender: contender_name(b),
                size: Some(bytes_mode::SIZE),
                error: e.to_string(),
            }),
        }
    }
}

fn run_read_every_byte(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    bar.set_message("1b. one-way, every byte read");
    let r = with_load(report, "one-way, every byte read".to_string(), |_| {
        arena_bench::measure(plan.quick, &plan.backends)
    });
    match r {
        Ok(rows) => report.read_every_byte = rows,
        Err(e) => report.failures.push(Failure {
            scenario: "one-way, every byte read",
            contender: "all",
            size: None,
            error: e.to_string(),
        }),
    }
}

fn run_many_channels(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    bar.set_message("2c. many channels");
    let duration = plan.cell.mul_f64(2.0);
    let rows = with_load(report, "many channels".to_string(), |_| {
        plan.backends
            .iter()
            .map(|&b| {
                let r = fanout::run(b, duration, plan.pin);
                bar.inc(1);
                (b, r)
            })
            .collect::<Vec<_>>()
    });
    for (b, row) in rows {
        match row {
            Ok(row) => report.many_channels.push(row),
            Err(error) => report.failures.push(Failure {
                scenario: "many channels",
                contender: contender_name(b),
                size: Some(fanout::SIZE),
                error,
            }),
        }
    }
}

fn ping_row(name: &'static str, l: &Latency, raw: Option<&Latency>) -> PingRow {
    PingRow {
        contender: name,
        size: l.size,
        rounds: l.rounds,
        p50_us: us(l.p50),
        p99_us: us(l.p99),
        p999_us: us(l.p999),
        p50_vs_raw: raw.map(|raw| us(l.p50) / us(raw.p50)),
    }
}

fn run_pool_big(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    bar.set_message("4. pool, 1 MiB results");
    let rows = with_load(report, "pool, 1 MiB results".to_string(), |_| {
        let mut rows = Vec::new();
        for &b in &plan.backends {
            for arena in [true, false] {
                rows.push((b, pool_big::run(b, 1, arena, plan.cell.mul_f64(2.0))));
            }
        }
        rows
    });
    for (b, row) in rows {
        match row {
            Ok(row) => report.pool_big.push(row),
            Err(error) => report.failures.push(Failure {
                scenario: "pool, 1 MiB results",
                contender: contender_name(b),
                size: Some(pool_big::RESULT),
                error,
            }),
        }
    }
}

// ---------------------------------------------------------------------------
// Targets: the issue's, each checked on this run's numbers

/// Issue 8's bandwidth targets, on scenario 1b (every byte read).
fn read_every_byte_targets(rows: &[arena_bench::ReadAllRow]) -> Vec<Target> {
    let get = |name: &str, size: usize| rows.iter().find(|r| r.contender == name && r.size == size);
    let arena = ["ringipc-uring arena", "ringipc-epoll arena"];
    let (k64, m1, m4) = (64 << 10, 1 << 20, 4 << 20);
    let check = |what: &str,
                 size: usize,
                 f: &dyn Fn(&arena_bench::ReadAllRow) -> f64,
                 min: f64,
                 unit: &str| {
        let got: Vec<(&str, f64)> = arena
            .iter()
            .filter_map(|&n| Some((n, f(get(n, size)?))))
            .collect();
        if got.is_empty() {
            return not_measured(what, "scenario 1b did not run");
        }
        Target {
            what: what.into(),
            verdict: verdict(got.iter().all(|&(_, x)| x >= min)),
            detail: got
                .iter()
                .map(|(n, x)| format!("{n} {x:.2}x {unit}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    };
    let mut out = vec![
        check(
            "1 MiB one-way, every byte read: ringipc arena >= 2x raw pipe",
            m1,
            &|r| r.vs_raw,
            2.0,
            "raw",
        ),
        check(
            "1 MiB one-way, every byte read: ringipc arena >= 1.2x ipc-channel",
            m1,
            &|r| r.vs_ipc_channel,
            1.2,
            "ipc-channel",
        ),
        check(
            "4 MiB one-way, every byte read: ringipc arena >= 3x raw pipe",
            m4,
            &|r| r.vs_raw,
            3.0,
            "raw",
        ),
        check(
            "64 KiB one-way, every byte read: ringipc arena >= ipc-channel",
            k64,
            &|r| r.vs_ipc_channel,
            1.0,
            "ipc-channel",
        ),
    ];
    let what = "1 MiB one-way, every byte read: ringipc inline (arena off) >= tokio pipe + codec";
    out.push(
        match (get("ringipc-epoll inline", m1), get("tokio pipe+codec", m1)) {
            (Some(a), Some(t)) => {
                let x = a.mb_per_sec / t.mb_per_sec;
                Target {
                    what: what.into(),
                    verdict: verdict(x >= 1.0),
                    detail: format!("{x:.2}x of tokio pipe+codec"),
                }
            }
            _ => not_measured(what, "scenario 1b did not run"),
        },
    );
    out
}

fn verdict(ok: bool) -> Verdict {
    if ok { Verdict::Met } else { Verdict::Miss }
}

fn not_measured(what: &str, why: &str) -> Target {
    Target {
        what: what.into(),
        verdict: Verdict::NotMeasured,
        detail: why.into(),
    }
}

/// A target over per-backend values: MET when every one passes.
fn all_backends(what: &str, values: Vec<(&str, f64)>, ok: impl Fn(f64) -> bool) -> Target {
    if values.is_empty() {
        return not_measured(what, "no ringipc backend measured it");
    }
    let detail: Vec<String> = values.iter().map(|(n, x)| format!("{n} {x:.2}x")).collect();
    Target {
        what: what.into(),
        verdict: verdict(values.iter().all(|(_, x)| ok(*x))),
        detail: detail.join(", "),
    }
}

fn targets(r: &Report, plan: &Plan) -> Vec<Target> {
    let ringipc: Vec<Contender> = plan
        .contenders
        .iter()
        .copied()
        .filter(|c| c.backend().is_some())
        .collect();
    let u = Contender::RingipcUring;
    let mut out = Vec::new();

    let what = "64 B one-way: ringipc-uring >= 25% of the raw batched-write rate";
    out.push(
        match (r.one_way(u, 64), r.one_way(Contender::RawPipe, 64)) {
            (Some(a), Some(raw)) => {
                let x = a.msgs_per_sec / raw.msgs_per_sec;
                Target {
                    what: what.into(),
                    verdict: verdict(x >= 0.25),
                    detail: format!("{x:.2}x of raw"),
                }
            }
            _ => not_measured(what, "needs 64 B in --sizes and ringipc-uring"),
        },
    );

    let what = "64 B one-way: ringipc-uring >= 3x tokio unix pipe + LengthDelimitedCodec";
    out.push(
        match (r.one_way(u, 64), r.one_way(Contender::TokioPipe, 64)) {
            (Some(a), Some(t)) => {
                let x = a.msgs_per_sec / t.msgs_per_sec;
                Target {
                    what: what.into(),
                    verdict: verdict(x >= 3.0),
                    detail: format!("{x:.2}x of tokio-pipe+codec"),
                }
            }
            _ => not_measured(what, "needs 64 B in --sizes and ringipc-uring"),
        },
    );

    let mib = 1 << 20;
    let what = "1 MiB one-way: ringipc >= 80% of raw pipe bandwidth";
    out.push(match r.one_way(Contender::RawPipe, mib) {
        Some(raw) => all_backends(
            what,
            ringipc
                .iter()
                .filter_map(|&c| Some((c.name(), r.one_way(c, mib)?.mb_per_sec / raw.mb_per_sec)))
                .collect(),
            |x| x >= 0.8,
        ),
        None => not_measured(what, "needs 1M in --sizes"),
    });

    out.extend(read_every_byte_targets(&r.read_every_byte));

    let what = "64 B one-way: ringipc bytes mode >= tokio-uring with hand framing";
    out.push(if r.bytes_mode.is_empty() {
        not_measured(what, "needs 64 B in --sizes")
    } else {
        let got: Vec<(&str, Option<f64>)> = r
            .bytes_mode
            .iter()
            .map(|b| (b.contender, b.vs_tokio_uring))
            .collect();
        if got.iter().any(|(_, x)| x.is_none()) {
            not_measured(what, "tokio-uring did not run")
        } else {
            Target {
                what: what.into(),
                verdict: verdict(got.iter().all(|(_, x)| x.unwrap_or(0.0) >= 1.0)),
                detail: got
                    .iter()
                    .map(|(n, x)| format!("{n} {:.2}x", x.unwrap_or(0.0)))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        }
    });

    let what = "64 B ping-pong: ringipc p50 <= 1.3x raw blocking pipe";
    out.push(match r.ping(Contender::RawPipe, 64) {
        Some(raw) => all_backends(
            what,
            ringipc
                .iter()
                .filter_map(|&c| Some((c.name(), r.ping(c, 64)?.p50_us / raw.p50_us)))
                .collect(),
            |x| x <= 1.3,
        ),
        None => not_measured(what, "raw pipe ping-pong failed"),
    });

    let what = "64 B ping-pong with busy polling: ringipc p50 <= 0.5x raw blocking pipe";
    out.push(match r.ping(Contender::RawPipe, 64) {
        Some(_) => all_backends(
            what,
            r.busy_poll
                .iter()
                .filter(|b| b.budget_us > 0.0)
                .filter_map(|b| Some((b.contender, b.p50_vs_raw?)))
                .collect(),
            |x| x <= 0.5,
        ),
        None => not_measured(what, "raw pipe ping-pong failed"),
    });

    let what = "many channels: uring >= 1.3x epoll msgs/s, with fewer syscalls per message";
    let row = |name: &str| r.many_channels.iter().find(|m| m.contender == name);
    out.push(match (row("ringipc-uring"), row("ringipc-epoll")) {
        (Some(u), Some(e)) => {
            let speed = u.msgs_per_sec / e.msgs_per_sec;
            let calls = match (&u.syscalls_per_msg, &e.syscalls_per_msg) {
                (Ok(a), Ok(b)) => Some((*a, *b)),
                _ => None,
            };
            Target {
                what: what.to_string(),
                verdict: verdict(speed >= 1.3 && calls.is_some_and(|(a, b)| a < b)),
                detail: match calls {
                    Some((a, b)) => format!(
                        "uring {speed:.2}x epoll msgs/s; syscalls/msg uring {a:.3}, epoll {b:.3}"
                    ),
                    None => format!("uring {speed:.2}x epoll msgs/s; syscalls not counted"),
                },
            }
        }
        _ => not_measured(what, "needs both backends"),
    });

    out.push(uring_vs_epoll(r, plan));

    let what = "child start-to-join: ringipc median within 2x of /bin/true";
    out.push(match r.start(child_start::BIN_TRUE) {
        Some(base) => all_backends(
            what,
            plan.backends
                .iter()
                .filter_map(|&b| {
                    let name = contender_name(b);
                    Some((name, r.start(name)?.median_us / base.median_us))
                })
                .collect(),
            |x| x <= 2.0,
        ),
        None => not_measured(what, "/bin/true could not be run"),
    });

    out.push(all_backends(
        "fork server: start-to-join of an empty function <= 1.0x /bin/true",
        forkbench::fork_ratios(&r.fork_server),
        |x| x <= 1.0,
    ));

    let floor = 0.9 * plan.cores as f64;
    let what = format!(
        "pool 1 ms job: {} workers >= {floor:.1}x one worker (1.8x on 2 cores)",
        plan.cores
    );
    out.push(if plan.cores < 2 {
        not_measured(&what, "one usable core: nothing to scale to")
    } else {
        all_backends(
            &what,
            r.pool
                .scaling
                .iter()
                .map(|s| (s.contender, s.ratio))
                .collect(),
            |x| x >= floor,
        )
    });
    out
}

/// uring speed / epoll speed in every cell both ran: MET when none is
/// below 0.9. Latencies count as speeds (epoll time / uring time).
fn uring_vs_epoll(r: &Report, plan: &Plan) -> Target {
    let what = "uring within 10% of epoll in every scenario (uring speed / epoll speed >= 0.9)";
    let (u, e) = (Contender::RingipcUring, Contender::RingipcEpoll);
    let mut cells: Vec<(&str, String, f64)> = Vec::new();
    for &size in &plan.sizes {
        if let (Some(a), Some(b)) = (r.one_way(u, size), r.one_way(e, size)) {
            cells.push(("one-way", size_name(size), a.msgs_per_sec / b.msgs_per_sec));
        }
    }
    for size in PING_SIZES {
        if let (Some(a), Some(b)) = (r.ping(u, size), r.ping(e, size)) {
            cells.push(("ping-pong p50", size_name(size), b.p50_us / a.p50_us));
        }
    }
    if let (Some(a), Some(b)) = (r.start(u.name()), r.start(e.name())) {
        cells.push(("child start", "median".into(), b.median_us / a.median_us));
    }
    for a in r.pool.rows.iter().filter(|x| x.contender == u.name()) {
        if let Some(b) = r.pool_row(e.name(), a.job, a.workers) {
            let cell = format!("{} job, {} worker(s)", a.job, a.workers);
            cells.push(("pool", cell, a.jobs_per_sec / b.jobs_per_sec));
        }
    }
    if let (Some(a), Some(b)) = (
        r.pool.calls.iter().find(|c| c.contender == u.name()),
        r.pool.calls.iter().find(|c| c.contender == e.name()),
    ) {
        cells.push(("pool call p50", "tiny job".into(), b.p50_us / a.p50_us));
    }
    if cells.is_empty() {
        return not_measured(what, "needs --backend both");
    }
    // Per scenario, the worst cell.
    let mut detail: Vec<String> = Vec::new();
    for scenario in [
        "one-way",
        "ping-pong p50",
        "child start",
        "pool",
        "pool call p50",
    ] {
        let worst = cells
            .iter()
            .filter(|(s, _, _)| *s == scenario)
            .min_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((s, cell, x)) = worst {
            detail.push(format!("{s} worst {x:.2}x ({cell})"));
        }
    }
    Target {
        what: what.into(),
        verdict: verdict(cells.iter().all(|(_, _, x)| *x >= 0.9)),
        detail: detail.join("; "),
    }
}

// ---------------------------------------------------------------------------
// Printing

fn size_name(size: usize) -> String {
    match size {
        s if s >= 1 << 20 && s % (1 << 20) == 0 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 && s % (1 << 10) == 0 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn si(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.1} k", x / 1e3),
        x => format!("{x:.0}  "),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{x:.2}x"))
}

fn kib(bytes: Option<usize>) -> String {
    bytes.map_or("?".into(), |b| format!("{} KiB", b >> 10))
}

fn print_machine(m: &Machine, plan: &Plan, statuses: &[ContenderStatus]) {
    println!("ringipc harness {}", m.ringipc_version);
    println!();
    println!("machine");
    println!(
        "  cpu          {} ({} cores online, {} usable: {:?})",
        m.cpu_model,
        m.cores_online,
        m.cores_usable.len(),
        m.cores_usable
    );
    println!("  kernel       {}", m.kernel);
    println!(
        "  ringipc      default_backend() = {}; uring_probe() = {}",
        m.default_backend, m.uring_probe
    );
    println!("  pinning      {}", m.pinning_text);
    println!(
        "  pipe size    {} per pipe, grown as ringipc grows its own (default {}, pipe-max-size {})",
        kib(m.pipe_bytes),
        kib(m.pipe_default_bytes),
        kib(m.pipe_max_bytes)
    );
    println!(
        "  settings     {:.2} s per cell, {} run(s) per cell{}; sizes {}",
        plan.cell.as_secs_f64(),
        plan.reps(),
        if plan.reps() > 1 {
            " (throughput: median run; latency: samples pooled)"
        } else {
            ""
        },
        plan.sizes
            .iter()
            .map(|&s| size_name(s))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!("contenders (scenarios 1 and 2: both sides on two OS threads)");
    for s in statuses {
        println!("  {:<17} {:<4} {}", s.name, s.status, s.what);
    }
}

fn print_load(r: &Report, step: &str) {
    if let Some(load) = r.load(step).filter(|&l| l > NOISY) {
        println!(
            "  (other processes used {:.0}% of the machine during the next rows)",
            load * 100.0
        );
    }
}

fn print_failure(r: &Report, scenario: &str, name: &str, size: Option<usize>, label: &str) {
    if let Some(f) = r.failure(scenario, name, size) {
        println!("{label}  {:<17} failed: {}", name, f.error);
    }
}

fn print_one_way(r: &Report, plan: &Plan) {
    println!();
    println!("1. one-way throughput (MB = 10^6 payload bytes; vs raw = msgs/s / raw-pipe's)");
    println!(
        "{:>8}  {:<17} {:>10} {:>10} {:>8} {:>10}",
        "size", "contender", "msgs/s", "MB/s", "vs raw", "messages"
    );
    for &size in &plan.sizes {
        print_load(r, &format!("one-way {size}"));
        for &c in &plan.contenders {
            let label = format!("{:>8}", size_name(size));
            match r.one_way(c, size) {
                Some(t) => println!(
                    "{label}  {:<17} {:>10} {:>10.1} {:>8} {:>10}",
                    c.name(),
                    si(t.msgs_per_sec),
                    t.mb_per_sec,
                    ratio(t.vs_raw),
                    t.messages
                ),
                None => print_failure(r, "one-way", c.name(), Some(size), &label),
            }
        }
    }
}

fn print_ping_pong(r: &Report, plan: &Plan) {
    println!();
    println!("2. ping-pong round trip (microseconds; vs raw = p50 / raw-pipe's p50)");
    println!(
        "{:>8}  {:<17} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "size", "contender", "p50", "p99", "p99.9", "vs raw", "rounds"
    );
    for size in PING_SIZES {
        print_load(r, &format!("ping-pong {size}"));
        for &c in &plan.contenders {
            let label = format!("{:>8}", size_name(size));
            match r.ping(c, size) {
                Some(l) => println!(
                    "{label}  {:<17} {:>8.1} {:>8.1} {:>8.1} {:>8} {:>8}",
                    c.name(),
                    l.p50_us,
                    l.p99_us,
                    l.p999_us,
                    ratio(l.p50_vs_raw),
                    l.rounds
                ),
                None => print_failure(r, "ping-pong", c.name(), Some(size), &label),
            }
        }
    }
}

fn print_child_start(r: &Report, plan: &Plan) {
    println!();
    println!("3. child start-to-join (microseconds; vs /bin/true = median / /bin/true's median)");
    println!(
        "   ringipc-*: Process::builder(empty).arg(()).backend(b).start() + join().await, default start mode{}",
        match plan.pin {
            Some([_, b]) => format!(", child pinned to core {b}"),
            None => String::new(),
        }
    );
    println!(
        "   exec self: Command::new(\"/proc/self/exe\").status() returning right after ringipc::init() (this binary's exec cost)"
    );
    println!(
        "   exec self, fork: the same with an empty pre_exec hook, so std forks the parent (ringipc uses posix_spawn instead)"
    );
    println!("   /bin/true: Command::new(\"/bin/true\").status()");
    if let Some(kib) = r.child_start_parent_rss_kib {
        println!(
            "   (this process's resident memory as the scenario began: {} MiB)",
            kib >> 10
        );
    }
    println!(
        "  {:<17} {:>9} {:>9} {:>11} {:>6}",
        "contender", "median", "p99", "vs /bin/true", "runs"
    );
    print_load(r, "child start");
    for name in plan.starters().into_iter().map(child_start::Starter::name) {
        match r.start(name) {
            Some(s) => println!(
                "  {:<17} {:>9.0} {:>9.0} {:>11} {:>6}",
                name,
                s.median_us,
                s.p99_us,
                ratio(s.vs_bin_true),
                s.runs
            ),
            None => print_failure(r, "child start", name, None, ""),
        }
    }
}

fn print_pool(r: &Report, plan: &Plan) {
    let p = &r.pool;
    println!();
    println!(
        "4. pool job throughput (Pool::builder(f).workers(n).backend(b), pool.map(jobs) drained with next().await)"
    );
    println!(
        "   tiny job: returns its input; 1ms job: {} LCG rounds, {:.3} ms per direct call here; workers {}",
        p.spins_per_job,
        p.job_ms,
        if p.workers_pinned {
            "pinned by Pool (worker i on core i)"
        } else {
            "not pinned"
        }
    );
    println!(
        "  {:<17} {:<5} {:>7} {:>10} {:>12} {:>8}",
        "contender", "job", "workers", "jobs/s", "vs 1 worker", "jobs"
    );
    let names: Vec<&'static str> = plan
        .backends
        .iter()
        .map(|&b| contender_name(b))
        .chain(pool_jobs::Threads::ALL.iter().map(|t| t.name()))
        .collect();
    for name in names {
        for job in ["tiny", "1ms"] {
            for workers in plan.pool_workers() {
                if let Some(row) = r.pool_row(name, job, workers) {
                    println!(
                        "  {:<17} {:<5} {:>7} {:>10} {:>12} {:>8}",
                        name,
                        job,
                        workers,
                        si(row.jobs_per_sec),
                        ratio(row.vs_one_worker),
                        row.jobs
                    );
                }
            }
        }
        for workers in plan.pool_workers() {
            print_failure(r, "pool", name, Some(workers), "");
        }
    }
    if !p.calls.is_empty() {
        println!();
        println!(
            "   per-call overhead of the tiny job, one worker (pool.call round trip minus a direct call of {:.1} ns):",
            p.direct_call_ns
        );
        println!(
            "  {:<17} {:>10} {:>10} {:>12} {:>16} {:>7}",
            "contender", "call p50", "call p99", "overhead", "map, per job", "calls"
        );
        for c in &p.calls {
            println!(
                "  {:<17} {:>7.1} us {:>7.1} us {:>9.1} us {:>13} us {:>7}",
                c.contender,
                c.p50_us,
                c.p99_us,
                c.overhead_us,
                c.map_us_per_job.map_or("-".into(), |x| format!("{x:.1}")),
                c.calls
            );
        }
    }
    for s in &p.scaling {
        println!(
            "   1ms-job scaling, {}: {} workers / 1 worker = {:.2}x",
            s.contender, s.workers, s.ratio
        );
    }
}

fn print_targets(r: &Report) {
    println!();
    println!("targets (checked on this run's numbers)");
    let worst = r.foreign_load.iter().map(|l| l.share).fold(0.0, f64::max);
    if worst > NOISY {
        println!(
            "  (other processes used up to {:.0}% of the machine during this run: treat misses with care)",
            worst * 100.0
        );
    }
    for t in &r.targets {
        let v = match t.verdict {
            Verdict::Met => "MET ",
            Verdict::Miss => "MISS",
            Verdict::NotMeasured => "n/a ",
        };
        println!("  [{v}] {}: {}", t.what, t.detail);
    }
}

// ---------------------------------------------------------------------------

fn main() {
    // Children (process start, pool workers) re-execute this binary and
    // take over here: nothing may run before this line (but scenario 5's
    // memory reading, skipped in children).
    let measure_rss = std::env::var_os("RINGIPC_CHILD").is_none()
        && std::env::var_os(child_start::EXIT_AT_ONCE).is_none();
    if measure_rss {
        forkbench::note_rss_before_init();
    }
    ringipc::init();
    if measure_rss {
        forkbench::note_rss_after_init_now();
    }
    if std::env::var_os(child_start::EXIT_AT_ONCE).is_some() {
        return; // scenario 3's "exec self" child
    }
    let args = Args::parse();
    if args.no_arena {
        ringipc::ChannelConfig::new()
            .arena(false)
            .set_process_default();
    }
    let outcome = pin(&args).and_then(|pinning| {
        if args.arena {
            // The same pinning as in the full run, so `--arena` alone
            // measures what the full run's table 1b does.
            arena_bench::run(args.quick).map_err(|e| e as Box<dyn std::error::Error>)
        } else {
            run(args, pinning)
        }
    });
    if let Err(e) = outcome {
        eprintln!("harness: {e}");
        std::process::exit(1);
    }
}

/// Pins the measuring threads as `--pin` / `--no-pin` say (default: the
/// first two usable cores), and returns the pair.
fn pin(args: &Args) -> Result<Option<[usize; 2]>, Box<dyn std::error::Error>> {
    let usable = usable_cores();
    let pinning = match (args.no_pin, args.pin) {
        (true, _) => None,
        (false, Some(cores)) => {
            if let Some(bad) = cores.iter().find(|c| !usable.contains(c)) {
                return Err(
                    format!("--pin: core {bad} is not usable here (usable: {usable:?})").into(),
                );
            }
            Some(cores)
        }
        (false, None) => (usable.len() >= 2).then(|| [usable[0], usable[1]]),
    };
    measure::set_pinning(pinning);
    Ok(pinning)
}

fn run(args: Args, pinning: Option<[usize; 2]>) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let usable = usable_cores();

    let cell =
        Duration::from_secs_f64(args.duration.unwrap_or(if args.quick { 0.06 } else { 0.5 }));
    if cell.is_zero() {
        return Err("--duration must be positive".into());
    }
    let reps = if args.quick { 1 } else { 3 };
    let settings = Settings {
        run_time: cell / reps as u32,
        reps,
        ping_time: cell,
        max_rounds: 200_000,
        warmup_rounds: if args.quick { 200 } else { 1_000 },
    };
    let backends = args.backend.backends();
    let mut statuses = Vec::new();
    let mut contenders = Vec::new();
    let mut usable_backends = Vec::new();
    for c in Contender::ALL {
        if let Some(b) = c.backend()
            && !backends.contains(&b)
        {
            continue;
        }
        let status = match c.available() {
            Ok(()) => {
                contenders.push(c);
                usable_backends.extend(c.backend());
                "ok".to_string()
            }
            Err(why) => format!("skipped: {why}"),
        };
        statuses.push(ContenderStatus {
            name: c.name(),
            status,
            what: c.describe(),
        });
    }
    let plan = Plan {
        quick: args.quick,
        cell,
        settings,
        sizes: args.sizes.clone(),
        backends: usable_backends,
        contenders,
        pool_pin: !args.no_pin,
        pin: pinning,
        cores: usable.len().max(1),
    };

    let mut report = Report {
        machine: machine(pinning, plan.pool_pin),
        settings: RunSettings {
            quick: args.quick,
            seconds_per_cell: cell.as_secs_f64(),
            runs_per_cell: reps,
            sizes: plan.sizes.clone(),
            ping_sizes: PING_SIZES.to_vec(),
            backend: args.backend,
        },
        contenders: statuses,
        one_way: Vec::new(),
        ping_pong: Vec::new(),
        read_every_byte: Vec::new(),
        bytes_mode: Vec::new(),
        peak_rss_kib: 0,
        busy_poll: Vec::new(),
        many_channels: Vec::new(),
        child_start: Vec::new(),
        child_start_parent_rss_kib: None,
        pool: pool_jobs::PoolReport::default(),
        pool_big: Vec::new(),
        fork_server: forkbench::Report::default(),
        failures: Vec::new(),
        foreign_load: Vec::new(),
        targets: Vec::new(),
        total_seconds: 0.0,
    };
    print_machine(&report.machine, &plan, &report.contenders);

    let bar = ProgressBar::new(plan.steps());
    bar.set_style(
        ProgressStyle::with_template("{elapsed:>3} [{bar:32}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    run_one_way(&plan, &mut report, &bar);
    run_read_every_byte(&plan, &mut report, &bar);
    run_bytes_mode(&plan, &mut report, &bar);
    run_ping_pong(&plan, &mut report, &bar);
    run_busy_poll(&plan, &mut report, &bar);
    run_many_channels(&plan, &mut report, &bar);
    child_start::run(&plan, &mut report, &bar);
    pool_jobs::run(&plan, &mut report, &bar);
    run_pool_big(&plan, &mut report, &bar);
    bar.set_message("5. fork server vs re-exec");
    report.fork_server = forkbench::run(&plan.backends, plan.cell, plan.reps());
    bar.finish_and_clear();

    report.targets = targets(&report, &plan);
    print_one_way(&report, &plan);
    arena_bench::print(&report.read_every_byte);
    bytes_mode::print(&report.bytes_mode);
    print_ping_pong(&report, &plan);
    busy::print(&report.busy_poll);
    fanout::print(&report.many_channels);
    print_child_start(&report, &plan);
    print_pool(&report, &plan);
    pool_big::print(&report.pool_big);
    forkbench::print(&report.fork_server);
    print_targets(&report);

    report.peak_rss_kib = arena_bench::peak_rss_kib();
    report.total_seconds = t0.elapsed().as_secs_f64();
    println!();
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", args.json.display());
    match plot::plot(&args.plot, &report, &plan) {
        Ok(()) => println!("wrote {}", args.plot.display()),
        Err(e) => println!("no plot: {e}"),
    }
    println!("total {:.1} s", report.total_seconds);
    Ok(())
}
