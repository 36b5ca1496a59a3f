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
//! `throughput` example. This file holds scenarios 3 and 4, the report, the
//! targets and the plot.

#[path = "common/arena_bench.rs"]
mod arena_bench;
#[path = "common/busy.rs"]
mod busy;
#[path = "common/bytes_mode.rs"]
mod bytes_mode;
#[path = "common/fanout.rs"]
mod fanout;
#[path = "common/measure.rs"]
#[allow(
    dead_code,
    reason = "shared with the throughput example, which uses the rest"
)]
mod measure;
#[path = "common/pool_big.rs"]
mod pool_big;

#[path = "common/forkbench.rs"]
mod forkbench;

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use measure::{Contender, CpuSnapshot, Latency, Settings, Side, Throughput};
use ringipc::{Affinity, Backend, Pool, Process};
use serde::Serialize;
use std::hint::black_box;
use std::path::{Path, PathBuf};
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
    child_start: Vec<StartRow>,
    /// This process's resident memory when scenario 3 began: a fork copies
    /// the page tables of all of it.
    child_start_parent_rss_kib: Option<u64>,
    pool: PoolReport,
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

#[derive(Serialize, Clone)]
struct StartRow {
    contender: &'static str,
    runs: usize,
    median_us: f64,
    p99_us: f64,
    /// Median against /bin/true's.
    vs_bin_true: Option<f64>,
}

#[derive(Serialize, Default)]
struct PoolReport {
    /// Spin iterations of the CPU-bound job, calibrated at start.
    spins_per_job: u64,
    /// What one CPU-bound job took here, called directly (median).
    job_ms: f64,
    /// A direct call of the tiny job, in nanoseconds.
    direct_call_ns: f64,
    /// Whether `Pool` pinned its workers (worker i on core i).
    workers_pinned: bool,
    rows: Vec<PoolRow>,
    calls: Vec<PoolCallRow>,
    /// jobs/s of the CPU-bound job, one worker per core / one worker.
    scaling: Vec<Scaling>,
}

#[derive(Serialize, Clone)]
struct PoolRow {
    contender: &'static str,
    job: &'static str,
    workers: usize,
    jobs: u64,
    seconds: f64,
    jobs_per_sec: f64,
    /// jobs/s against the same job with one worker.
    vs_one_worker: Option<f64>,
}

#[derive(Serialize, Clone)]
struct PoolCallRow {
    contender: &'static str,
    calls: usize,
    p50_us: f64,
    p99_us: f64,
    /// p50 of `pool.call` minus a direct call.
    overhead_us: f64,
    /// 1 / jobs/s of the tiny job through `map` with one worker.
    map_us_per_job: Option<f64>,
}

#[derive(Serialize, Clone)]
struct Scaling {
    contender: &'static str,
    workers: usize,
    ratio: f64,
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

    fn start(&self, name: &str) -> Option<&StartRow> {
        self.child_start.iter().find(|r| r.contender == name)
    }

    fn pool_row(&self, name: &str, job: &str, workers: usize) -> Option<&PoolRow> {
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

// ---------------------------------------------------------------------------
// Scenario 3: child start-to-join

/// The child's entry: nothing.
fn empty(_: ()) {}

/// Who starts the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Starter {
    /// `Process::builder(empty).arg(()).backend(b).start()`, then `join().await`.
    Ringipc(Backend),
    /// `Command::new("/proc/self/exe")` whose `main` returns right after
    /// `ringipc::init()`: exec'ing this binary, with no ringipc work in it.
    SelfExec,
    /// The same with an empty `pre_exec` hook, which makes std fork the
    /// parent instead of using its vfork-style spawn (what ringipc avoids by
    /// calling `posix_spawn` itself).
    SelfExecFork,
    /// `Command::new("/bin/true").status()`.
    BinTrue,
}

const BIN_TRUE: &str = "/bin/true";
/// Set in a [`Starter::SelfExec`] child.
const EXIT_AT_ONCE: &str = "RINGIPC_HARNESS_EXIT_AT_ONCE";

impl Starter {
    fn name(self) -> &'static str {
        match self {
            Starter::Ringipc(b) => contender_name(b),
            Starter::SelfExec => "exec self",
            Starter::SelfExecFork => "exec self, fork",
            Starter::BinTrue => BIN_TRUE,
        }
    }

    /// Start-to-join times of this starter.
    fn measure(self, budget: Duration, min_runs: usize) -> measure::Result<Vec<Duration>> {
        match self {
            Starter::Ringipc(b) => ringipc_start_to_join(b, budget, min_runs),
            Starter::SelfExec => self_exec_start_to_join(budget, min_runs, false),
            Starter::SelfExecFork => self_exec_start_to_join(budget, min_runs, true),
            Starter::BinTrue => bin_true_start_to_join(budget, min_runs),
        }
    }
}

/// Most starts per contender and slice (bounds a very fast machine).
const MAX_STARTS: usize = 2_000;
/// Unmeasured starts at the head of each slice.
const WARMUP_STARTS: usize = 2;

/// Times `start_one` (start a child and wait for it) as often as `budget`
/// allows, at least `min_runs` times, after a short warm-up.
fn time_starts(
    budget: Duration,
    min_runs: usize,
    mut start_one: impl FnMut() -> measure::Result<()>,
) -> measure::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    let start = Instant::now();
    for i in 0.. {
        if i >= WARMUP_STARTS + min_runs
            && (start.elapsed() >= budget || samples.len() >= MAX_STARTS)
        {
            break;
        }
        let t0 = Instant::now();
        start_one()?;
        let took = t0.elapsed();
        if i >= WARMUP_STARTS {
            samples.push(took);
        }
    }
    Ok(samples)
}

/// ringipc: start a child running [`empty`] on `backend` and join it. The
/// parent runs on the parent core; the child is pinned to the child core
/// when pinning is on.
fn ringipc_start_to_join(
    backend: Backend,
    budget: Duration,
    min_runs: usize,
) -> measure::Result<Vec<Duration>> {
    let child_core = measure::pinning().map(|c| c[Side::Child as usize]);
    let parent = measure::spawn_side(Side::Parent, move || {
        let rt = current_thread_runtime()?;
        time_starts(budget, min_runs, || {
            rt.block_on(async {
                let mut builder = Process::builder(empty).arg(()).backend(backend);
                if let Some(core) = child_core {
                    builder = builder.pin(Affinity::Core(core));
                }
                let status = builder.start()?.join().await?;
                if !status.success() {
                    return Err(format!("child exited with {status}").into());
                }
                Ok(())
            })
        })
    });
    measure::join(parent)
}

/// Runs `cmd` to completion, as often as [`time_starts`] says, from the
/// parent core. The child inherits the parent's core: pinning it elsewhere
/// would need `pre_exec`, which makes std fall back from its faster spawn
/// path.
fn std_start_to_join(
    mut cmd: std::process::Command,
    budget: Duration,
    min_runs: usize,
) -> measure::Result<Vec<Duration>> {
    let parent = measure::spawn_side(Side::Parent, move || {
        time_starts(budget, min_runs, || {
            let status = cmd.status()?;
            if !status.success() {
                return Err(format!("{cmd:?} exited with {status}").into());
            }
            Ok(())
        })
    });
    measure::join(parent)
}

/// `Command::new("/bin/true").status()`: the reference.
fn bin_true_start_to_join(budget: Duration, min_runs: usize) -> measure::Result<Vec<Duration>> {
    std_start_to_join(std::process::Command::new(BIN_TRUE), budget, min_runs)
}

/// `Command::new("/proc/self/exe")` that exits at once: what exec'ing this
/// binary costs before ringipc does anything, the floor under ringipc's
/// row. With `fork_path`, an empty `pre_exec` hook makes std `fork` the
/// parent (its page tables included), as any `pre_exec` hook does.
fn self_exec_start_to_join(
    budget: Duration,
    min_runs: usize,
    fork_path: bool,
) -> measure::Result<Vec<Duration>> {
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.env(EXIT_AT_ONCE, "1");
    if fork_path {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook runs between fork and exec and does nothing.
        unsafe { cmd.pre_exec(|| Ok(())) };
    }
    std_start_to_join(cmd, budget, min_runs)
}

fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

// ---------------------------------------------------------------------------
// Scenario 4: pool job throughput

/// A pool job: `spins` rounds of an LCG from `seed`. `spins: 0` is the
/// tiny job (no work: what is left is the pool's per-call cost).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug)]
struct Job {
    spins: u64,
    seed: u64,
}

/// The worker's handler.
fn work(job: Job) -> u64 {
    let mut h = job.seed;
    for _ in 0..job.spins {
        h = h
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
    h
}

fn time_direct(job: Job) -> Duration {
    let t0 = Instant::now();
    black_box(work(black_box(job)));
    t0.elapsed()
}

/// Spins that take `target` here, and what a job of that many took (the
/// median of a few direct calls).
fn calibrate_spins(target: Duration) -> (u64, Duration) {
    let mut spins = 1_000u64;
    while time_direct(Job { spins, seed: 1 }) < Duration::from_millis(20) && spins < 1 << 40 {
        spins *= 2;
    }
    let best = (0..3)
        .map(|_| time_direct(Job { spins, seed: 1 }))
        .min()
        .expect("three runs");
    let spins = ((spins as f64) * target.as_secs_f64() / best.as_secs_f64()).max(1.0) as u64;
    let mut check: Vec<Duration> = (0..11)
        .map(|i| time_direct(Job { spins, seed: i }))
        .collect();
    check.sort_unstable();
    (spins, check[check.len() / 2])
}

/// A direct call of the tiny job, in nanoseconds.
fn direct_call_ns() -> f64 {
    const CALLS: u64 = 10_000_000;
    let t0 = Instant::now();
    for seed in 0..CALLS {
        black_box(work(black_box(Job { spins: 0, seed })));
    }
    t0.elapsed().as_secs_f64() * 1e9 / CALLS as f64
}

/// Jobs done and the time they took.
#[derive(Clone, Copy, Debug, Default)]
struct PoolRun {
    jobs: u64,
    elapsed: Duration,
}

impl PoolRun {
    fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn add(&mut self, other: PoolRun) {
        self.jobs += other.jobs;
        self.elapsed += other.elapsed;
    }
}

async fn build_pool(
    backend: Backend,
    workers: usize,
    pin: bool,
) -> ringipc::Result<Pool<Job, u64>> {
    Pool::builder(work)
        .workers(workers)
        .backend(backend)
        .pin(pin)
        .name("harness-worker")
        .build()
        .await
}

/// `n` jobs of `spins` through `pool.map`, every result drained with
/// `next().await`.
async fn map_jobs(pool: &Pool<Job, u64>, spins: u64, n: u64) -> measure::Result<PoolRun> {
    let start = Instant::now();
    let mut results = pool.map((0..n).map(move |seed| Job { spins, seed }));
    let mut jobs = 0;
    while let Some(r) = results.next().await {
        black_box(r?.to_native());
        jobs += 1;
    }
    Ok(PoolRun {
        jobs,
        elapsed: start.elapsed(),
    })
}

/// Pool throughput for jobs of `spins`: pilot maps (also the warm-up) grow
/// until one lasts an eighth of `budget`, then one map sized to `budget`.
async fn pool_jobs_per_sec(
    pool: &Pool<Job, u64>,
    spins: u64,
    budget: Duration,
) -> measure::Result<PoolRun> {
    let mut n = pool.workers() as u64 * 8;
    loop {
        let pilot = map_jobs(pool, spins, n).await?;
        if pilot.elapsed >= budget / 8 || n >= 1 << 24 {
            let want = (pilot.jobs_per_sec() * budget.as_secs_f64()) as u64;
            return map_jobs(pool, spins, want.max(n)).await;
        }
        n *= 4;
    }
}

/// `pool.call` round trips of the tiny job, one at a time, for `budget`.
async fn pool_call_latency(
    pool: &Pool<Job, u64>,
    budget: Duration,
) -> measure::Result<Vec<Duration>> {
    for seed in 0..100 {
        pool.call(Job { spins: 0, seed }).await?;
    }
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || samples.len() < 100 {
        let t0 = Instant::now();
        black_box(
            pool.call(Job {
                spins: 0,
                seed: samples.len() as u64,
            })
            .await?
            .to_native(),
        );
        samples.push(t0.elapsed());
    }
    Ok(samples)
}

/// What one slice of scenario 4 measures for one backend and worker count.
#[derive(Default)]
struct PoolSlice {
    tiny: PoolRun,
    spin: PoolRun,
    calls: Vec<Duration>,
}

/// One slice for `backend` with `workers`: a fresh pool, the tiny job's
/// rate, the CPU-bound job's rate, and (one worker only) `call` latency.
async fn pool_slice(
    backend: Backend,
    workers: usize,
    spins: u64,
    pin: bool,
    budget: Duration,
) -> measure::Result<PoolSlice> {
    let pool = build_pool(backend, workers, pin).await?;
    let mut slice = PoolSlice {
        tiny: pool_jobs_per_sec(&pool, 0, budget).await?,
        spin: pool_jobs_per_sec(&pool, spins, budget).await?,
        calls: Vec::new(),
    };
    if workers == 1 {
        slice.calls = pool_call_latency(&pool, budget).await?;
    }
    pool.shutdown().await?;
    Ok(slice)
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
    fn starters(&self) -> Vec<Starter> {
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

/// Scenario 3: the contenders take turns in `reps` slices, so that load
/// drifting over time hits all of them alike; samples are pooled.
fn run_child_start(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    bar.set_message("3. child start-to-join");
    report.child_start_parent_rss_kib = rss_kib();
    let starters = plan.starters();
    let slice = plan.cell / plan.reps() as u32;
    let min_runs = if plan.quick { 10usize } else { 30 }.div_ceil(plan.reps());
    let mut samples: Vec<Result<Vec<Duration>, String>> = vec![Ok(Vec::new()); starters.len()];
    with_load(report, "child start".into(), |_| {
        for _ in 0..plan.reps() {
            for (i, starter) in starters.iter().enumerate() {
                if let Ok(done) = &mut samples[i] {
                    match starter.measure(slice, min_runs) {
                        Ok(s) => done.extend(s),
                        Err(e) => samples[i] = Err(e.to_string()),
                    }
                }
                bar.inc(1);
            }
        }
    });
    let stats: Vec<Result<Latency, String>> = samples
        .into_iter()
        .map(|s| s.map(|s| Latency::from_samples(0, s)))
        .collect();
    let base = starters
        .iter()
        .zip(&stats)
        .find(|(s, _)| **s == Starter::BinTrue)
        .and_then(|(_, l)| l.as_ref().ok().copied());
    for (starter, s) in starters.into_iter().zip(stats) {
        match s {
            Ok(l) => report.child_start.push(StartRow {
                contender: starter.name(),
                runs: l.rounds,
                median_us: us(l.p50),
                p99_us: us(l.p99),
                vs_bin_true: base.map(|b| us(l.p50) / us(b.p50)),
            }),
            Err(error) => report.failures.push(Failure {
                scenario: "child start",
                contender: starter.name(),
                size: None,
                error,
            }),
        }
    }
}

/// Scenario 4, on this (unpinned) thread's runtime: `Pool` places its
/// workers itself. Backends and worker counts take turns in `reps` slices,
/// each on a fresh pool.
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

fn run_pool(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
    bar.set_message("4. pool: calibrating the CPU-bound job");
    let (spins, job_time) = calibrate_spins(Duration::from_millis(1));
    report.pool.spins_per_job = spins;
    report.pool.job_ms = job_time.as_secs_f64() * 1e3;
    report.pool.direct_call_ns = direct_call_ns();
    report.pool.workers_pinned = plan.pool_pin;
    bar.inc(1);
    bar.set_message("4. pool jobs");
    let cells: Vec<(Backend, usize)> = plan
        .backends
        .iter()
        .flat_map(|&b| plan.pool_workers().into_iter().map(move |w| (b, w)))
        .collect();
    let mut acc: Vec<Result<PoolSlice, String>> =
        cells.iter().map(|_| Ok(PoolSlice::default())).collect();
    // Each slice measures three things (tiny, CPU-bound, call latency).
    let budget = plan.cell / (plan.reps() as u32);
    let rt = match current_thread_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            report.failures.push(Failure {
                scenario: "pool",
                contender: "runtime",
                size: None,
                error: e.to_string(),
            });
            return;
        }
    };
    for _ in 0..plan.reps() {
        for (i, &(backend, workers)) in cells.iter().enumerate() {
            if let Ok(total) = &mut acc[i] {
                let got = rt.block_on(pool_slice(backend, workers, spins, plan.pool_pin, budget));
                match got {
                    Ok(s) => {
                        total.tiny.add(s.tiny);
                        total.spin.add(s.spin);
                        total.calls.extend(s.calls);
                    }
                    Err(e) => acc[i] = Err(format!("{workers} worker(s): {e}")),
                }
            }
            bar.inc(1);
        }
    }
    for ((backend, workers), r) in cells.into_iter().zip(acc) {
        let name = contender_name(backend);
        match r {
            Ok(s) => pool_rows(report, name, workers, s),
            Err(error) => report.failures.push(Failure {
                scenario: "pool",
                contender: name,
                size: Some(workers),
                error,
            }),
        }
    }
}

fn pool_rows(report: &mut Report, name: &'static str, workers: usize, s: PoolSlice) {
    for (job, run) in [("tiny", s.tiny), ("1ms", s.spin)] {
        let one = match workers {
            1 => Some(run.jobs_per_sec()),
            _ => report.pool_row(name, job, 1).map(|r| r.jobs_per_sec),
        };
        report.pool.rows.push(PoolRow {
            contender: name,
            job,
            workers,
            jobs: run.jobs,
            seconds: run.elapsed.as_secs_f64(),
            jobs_per_sec: run.jobs_per_sec(),
            vs_one_worker: one.map(|one| run.jobs_per_sec() / one),
        });
    }
    if workers > 1
        && let Some(ratio) = report
            .pool_row(name, "1ms", workers)
            .and_then(|r| r.vs_one_worker)
    {
        report.pool.scaling.push(Scaling {
            contender: name,
            workers,
            ratio,
        });
    }
    if !s.calls.is_empty() {
        let l = Latency::from_samples(0, s.calls);
        report.pool.calls.push(PoolCallRow {
            contender: name,
            calls: l.rounds,
            p50_us: us(l.p50),
            p99_us: us(l.p99),
            overhead_us: us(l.p50) - report.pool.direct_call_ns / 1e3,
            map_us_per_job: Some(1e6 / s.tiny.jobs_per_sec()),
        });
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
    out.push(match r.start(BIN_TRUE) {
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
    for name in plan.starters().into_iter().map(Starter::name) {
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
    for &b in &plan.backends {
        let name = contender_name(b);
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
// The plot

/// Throughput (MB/s) against message size, one line per contender; both
/// axes logarithmic (the sizes span five orders of magnitude, the rates two).
fn plot(path: &Path, r: &Report, plan: &Plan) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let xs: Vec<f64> = plan.sizes.iter().map(|&s| s as f64).collect();
    let ys: Vec<f64> = r
        .one_way
        .iter()
        .map(|t| t.mb_per_sec)
        .chain(r.read_every_byte.iter().map(|t| t.mb_per_sec))
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Err("no throughput measured".into());
    }
    let (xmin, xmax) = (
        xs.iter().copied().fold(f64::MAX, f64::min),
        xs.iter().copied().fold(0.0, f64::max),
    );
    let (ymin, ymax) = (
        ys.iter().copied().fold(f64::MAX, f64::min),
        ys.iter().copied().fold(0.0, f64::max),
    );
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (chart_area, foot) = root.split_vertically(600);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            "ringipc harness: one-way throughput by message size",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            ((xmin.min(64.0 * 1024.0) / 1.4)..(xmax.max(4.0 * 1024.0 * 1024.0) * 1.4))
                .log_scale()
                .with_key_points(xs.clone()),
            ((ymin / 1.6)..(ymax * 1.6))
                .log_scale()
                .with_key_points(one_two_five(ymin / 1.6, ymax * 1.6)),
        )?;
    chart
        .configure_mesh()
        .x_desc("message size (log scale)")
        .y_desc("payload MB/s (10^6 bytes/s, log scale)")
        .x_label_formatter(&|x| size_name(x.round() as usize))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let colors = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(44, 160, 44),
        RGBColor(0, 0, 0),
    ];
    for (i, &c) in plan.contenders.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<(f64, f64)> = plan
            .sizes
            .iter()
            .filter_map(|&s| Some((s as f64, r.one_way(c, s)?.mb_per_sec)))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(c.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    // Scenario 1b, dashed: the same transports with every byte read.
    let read_all = [
        ("ringipc-uring arena", colors[0]),
        ("ringipc-epoll arena", colors[1]),
        ("ringipc-epoll inline", RGBColor(140, 86, 75)),
        ("tokio pipe+codec", colors[2]),
        ("ipc-channel", colors[4]),
        ("raw pipe", colors[5]),
    ];
    for (name, color) in read_all {
        let points: Vec<(f64, f64)> = r
            .read_every_byte
            .iter()
            .filter(|row| row.contender == name)
            .map(|row| (row.size as f64, row.mb_per_sec))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(DashedLineSeries::new(
                points.clone(),
                6,
                4,
                color.stroke_width(2),
            ))?
            .label(format!("{name}, every byte read"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(1))
            });
        chart.draw_series(
            points
                .iter()
                .map(|&p| TriangleMarker::new(p, 5, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    let m = &r.machine;
    foot.draw(&Text::new(
        format!(
            "{}, {} usable cores, {}; pinning {}; {:.2} s per cell",
            m.cpu_model,
            m.cores_usable.len(),
            m.kernel,
            m.pinning
                .map_or("off".into(), |[a, b]| format!("cores {a},{b}")),
            plan.cell.as_secs_f64()
        ),
        (16, 8),
        ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    root.present()?;
    Ok(())
}

/// 1, 2, 5, 10, 20, 50, ... within `lo..hi`: labels for a log axis.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.max(1e-9).log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * decade;
            if (lo..=hi).contains(&v) {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

// ---------------------------------------------------------------------------

fn main() {
    // Children (process start, pool workers) re-execute this binary and
    // take over here: nothing may run before this line (but scenario 5's
    // memory reading, skipped in children).
    let measure_rss =
        std::env::var_os("RINGIPC_CHILD").is_none() && std::env::var_os(EXIT_AT_ONCE).is_none();
    if measure_rss {
        forkbench::note_rss_before_init();
    }
    ringipc::init();
    if measure_rss {
        forkbench::note_rss_after_init_now();
    }
    if std::env::var_os(EXIT_AT_ONCE).is_some() {
        return; // scenario 3's "exec self" child
    }
    let args = Args::parse();
    if args.no_arena {
        ringipc::ChannelConfig::new()
            .arena(false)
            .set_process_default();
    }
    if args.arena {
        if let Err(e) = arena_bench::run(args.quick) {
            eprintln!("harness: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(e) = run(args) {
        eprintln!("harness: {e}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
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
        pool: PoolReport::default(),
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
    run_child_start(&plan, &mut report, &bar);
    run_pool(&plan, &mut report, &bar);
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
    match plot(&args.plot, &report, &plan) {
        Ok(()) => println!("wrote {}", args.plot.display()),
        Err(e) => println!("no plot: {e}"),
    }
    println!("total {:.1} s", report.total_seconds);
    Ok(())
}
