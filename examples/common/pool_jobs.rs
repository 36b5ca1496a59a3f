//! Harness scenario 4: pool job throughput for a tiny job and a CPU-bound
//! job calibrated to about a millisecond here, with one worker and one
//! worker per core, and `pool.call` latency of the tiny job. The same jobs
//! also run on threads, as a user who gives up process isolation would run
//! them: tokio's `spawn_blocking` (a multi-thread runtime whose blocking
//! pool has as many threads as the pool has workers) and a rayon pool of
//! that many threads.

use crate::measure::{self, Latency};
use crate::{Failure, Plan, Report, contender_name, current_thread_runtime, us};
use indicatif::ProgressBar;
use ringipc::{Backend, Pool};
use serde::Serialize;
use std::hint::black_box;
use std::time::{Duration, Instant};

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

#[derive(Serialize, Default)]
pub struct PoolReport {
    /// Spin iterations of the CPU-bound job, calibrated at start.
    pub spins_per_job: u64,
    /// What one CPU-bound job took here, called directly (median).
    pub job_ms: f64,
    /// A direct call of the tiny job, in nanoseconds.
    pub direct_call_ns: f64,
    /// Whether `Pool` pinned its workers (worker i on core i).
    pub workers_pinned: bool,
    pub rows: Vec<PoolRow>,
    pub calls: Vec<PoolCallRow>,
    /// jobs/s of the CPU-bound job, one worker per core / one worker.
    pub scaling: Vec<Scaling>,
}

#[derive(Serialize, Clone)]
pub struct PoolRow {
    pub contender: &'static str,
    pub job: &'static str,
    pub workers: usize,
    pub jobs: u64,
    pub seconds: f64,
    pub jobs_per_sec: f64,
    /// jobs/s against the same job with one worker.
    pub vs_one_worker: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct PoolCallRow {
    pub contender: &'static str,
    pub calls: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    /// p50 of `pool.call` minus a direct call.
    pub overhead_us: f64,
    /// 1 / jobs/s of the tiny job through `map` with one worker.
    pub map_us_per_job: Option<f64>,
}

#[derive(Serialize, Clone)]
pub struct Scaling {
    pub contender: &'static str,
    pub workers: usize,
    pub ratio: f64,
}

/// The thread-pool contenders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    SpawnBlocking,
    Rayon,
}

impl Threads {
    pub const ALL: [Threads; 2] = [Threads::SpawnBlocking, Threads::Rayon];

    pub fn name(self) -> &'static str {
        match self {
            Threads::SpawnBlocking => "spawn_blocking",
            Threads::Rayon => "rayon",
        }
    }
}

/// `n` jobs of `spins` on tokio's blocking pool, at most `window` in
/// flight (as `pool.map` keeps its workers fed), results taken in order.
async fn spawn_blocking_jobs(spins: u64, n: u64, window: usize) -> PoolRun {
    let start = Instant::now();
    let mut queue = std::collections::VecDeque::with_capacity(window);
    let mut jobs = 0;
    for seed in 0..n {
        if queue.len() == window {
            let h: tokio::task::JoinHandle<u64> = queue.pop_front().expect("full");
            black_box(h.await.expect("job"));
            jobs += 1;
        }
        queue.push_back(tokio::task::spawn_blocking(move || {
            work(Job { spins, seed })
        }));
    }
    for h in queue {
        black_box(h.await.expect("job"));
        jobs += 1;
    }
    PoolRun {
        jobs,
        elapsed: start.elapsed(),
    }
}

/// `n` jobs of `spins` on a rayon pool: a parallel iterator, rayon's own
/// way to run a batch.
fn rayon_jobs(pool: &rayon::ThreadPool, spins: u64, n: u64) -> PoolRun {
    use rayon::prelude::*;
    let start = Instant::now();
    let jobs = pool.install(|| {
        (0..n)
            .into_par_iter()
            .map(|seed| black_box(work(Job { spins, seed })))
            .count()
    }) as u64;
    PoolRun {
        jobs,
        elapsed: start.elapsed(),
    }
}

/// Throughput like `pool_jobs_per_sec`: pilot runs grow until one lasts an
/// eighth of `budget`, then one run sized to `budget`.
fn sized_run(budget: Duration, start_n: u64, mut run: impl FnMut(u64) -> PoolRun) -> PoolRun {
    let mut n = start_n;
    loop {
        let pilot = run(n);
        if pilot.elapsed >= budget / 8 || n >= 1 << 24 {
            let want = (pilot.jobs_per_sec() * budget.as_secs_f64()) as u64;
            return run(want.max(n));
        }
        n *= 4;
    }
}

/// One slice of a thread-pool contender with `threads` threads.
fn thread_slice(kind: Threads, threads: usize, spins: u64, budget: Duration) -> PoolSlice {
    let mut slice = PoolSlice::default();
    match kind {
        Threads::SpawnBlocking => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(threads)
                .enable_all()
                .build()
                .expect("runtime");
            let window = threads * 8;
            slice.tiny = sized_run(budget, threads as u64 * 8, |n| {
                rt.block_on(spawn_blocking_jobs(0, n, window))
            });
            slice.spin = sized_run(budget, threads as u64 * 8, |n| {
                rt.block_on(spawn_blocking_jobs(spins, n, window))
            });
            if threads == 1 {
                slice.calls = rt.block_on(async {
                    let call =
                        |seed| tokio::task::spawn_blocking(move || work(Job { spins: 0, seed }));
                    for seed in 0..100 {
                        black_box(call(seed).await.expect("job"));
                    }
                    let mut samples = Vec::new();
                    let start = Instant::now();
                    while start.elapsed() < budget || samples.len() < 100 {
                        let t0 = Instant::now();
                        black_box(call(samples.len() as u64).await.expect("job"));
                        samples.push(t0.elapsed());
                    }
                    samples
                });
            }
        }
        Threads::Rayon => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("rayon pool");
            slice.tiny = sized_run(budget, threads as u64 * 8, |n| rayon_jobs(&pool, 0, n));
            slice.spin = sized_run(budget, threads as u64 * 8, |n| rayon_jobs(&pool, spins, n));
            if threads == 1 {
                // A single job and its result: spawn plus a channel back.
                let call = |seed| {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    pool.spawn(move || {
                        let _ = tx.send(work(Job { spins: 0, seed }));
                    });
                    rx.recv().expect("job")
                };
                for seed in 0..100 {
                    black_box(call(seed));
                }
                let start = Instant::now();
                while start.elapsed() < budget || slice.calls.len() < 100 {
                    let t0 = Instant::now();
                    black_box(call(slice.calls.len() as u64));
                    slice.calls.push(t0.elapsed());
                }
            }
        }
    }
    slice
}

/// Scenario 4, on this (unpinned) thread's runtime: `Pool` places its
/// workers itself. Backends and worker counts take turns in `reps` slices,
/// each on a fresh pool.
pub fn run(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
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
    // The thread-pool contenders, same jobs and worker counts, same slicing.
    let tcells: Vec<(Threads, usize)> = Threads::ALL
        .iter()
        .flat_map(|&t| plan.pool_workers().into_iter().map(move |w| (t, w)))
        .collect();
    let mut tacc: Vec<PoolSlice> = tcells.iter().map(|_| PoolSlice::default()).collect();
    for _ in 0..plan.reps() {
        for (i, &(kind, threads)) in tcells.iter().enumerate() {
            let s = thread_slice(kind, threads, spins, budget);
            tacc[i].tiny.add(s.tiny);
            tacc[i].spin.add(s.spin);
            tacc[i].calls.extend(s.calls);
        }
    }
    for ((kind, threads), s) in tcells.into_iter().zip(tacc) {
        pool_rows(report, kind.name(), threads, s);
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
