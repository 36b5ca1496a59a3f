//! Pool load: callers running jobs that compute, sleep past their timeout,
//! or panic, up to three at once per worker, while a killer SIGKILLs random
//! workers. Every call must end in
//! the right value or an expected typed error.
//!
//! Worker kills and graceful restarts go through `Pool::kill_worker` and
//! `Pool::restart_worker`, timeouts through `Pool::call_timeout` (which
//! kills the worker running a job past its deadline), and the end through
//! `Pool::shutdown_timeout`. How each worker last died is checked as the
//! load runs: only the soak's own kills, restarts and timeouts may end one.

use crate::counters::{Beat, COUNTERS, add, anomaly, stopping};
use fastrand::Rng;
use ringipc::{Backend, DeathCause, ErrorKind, OwnedMessage, Pool, Result};
use std::collections::HashSet;
use std::time::Duration;

/// A job: compute, sleep (to be timed out, or not), or panic.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Job {
    Compute(u64),
    Sleep(u64),
    Panic(u64),
}

fn mix(mut x: u64) -> u64 {
    for _ in 0..1000 {
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51afd7ed558ccd);
    }
    x
}

/// The handler is async and each worker runs up to three jobs at once
/// (`concurrency`), so a job timed out kills a worker with other jobs
/// running beside it, and results come back out of order.
async fn run_job(job: Job) -> u64 {
    match job {
        Job::Compute(x) => mix(x),
        Job::Sleep(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            ms
        }
        Job::Panic(x) => {
            // The caller sees the message; keep the worker's stderr quiet.
            std::panic::set_hook(Box::new(|_| {}));
            panic!("soak job panic {x}")
        }
    }
}

type SoakPool = Pool<Job, u64>;

/// Builds a pool of two workers on `backend`.
pub async fn build(backend: Backend) -> Result<SoakPool> {
    Pool::builder_async(run_job)
        .workers(2)
        .concurrency(3)
        .max_in_flight(4)
        .pin(false)
        .backend(backend)
        .name(format!("soak-pool-{backend}"))
        .build()
        .await
}

/// What a call expects.
#[derive(Clone, Copy)]
enum Expect {
    Value(u64),
    Panic,
}

fn judge(r: Result<OwnedMessage<u64>>, expect: Expect, timed: bool) {
    let c = &COUNTERS;
    match (r, expect) {
        (Ok(v), Expect::Value(want)) if v.to_native() == want => add(&c.jobs_ok, 1),
        (Ok(v), _) => anomaly(format!("pool job returned {} unexpectedly", v.to_native())),
        (Err(e), _) if e.kind() == ErrorKind::WorkerDied => add(&c.jobs_worker_died, 1),
        (Err(e), _) if e.kind() == ErrorKind::TimedOut && timed => add(&c.jobs_timed_out, 1),
        (Err(e), Expect::Panic) if e.kind() == ErrorKind::Panicked => add(&c.jobs_panicked, 1),
        (Err(e), _) => anomaly(format!("pool job: {e}")),
    }
}

/// One caller: jobs one after another until the soak stops.
pub async fn caller(pool: SoakPool, seed: u64, beat: Beat) {
    let mut rng = Rng::with_seed(seed);
    while !stopping() {
        match rng.u32(0..100) {
            0..84 => {
                let x = rng.u64(..);
                judge(
                    pool.call(Job::Compute(x)).await,
                    Expect::Value(mix(x)),
                    false,
                );
            }
            84..90 => {
                // Runs far past its deadline.
                let ms = rng.u64(500..2000);
                let t = Duration::from_millis(rng.u64(20..200));
                judge(
                    pool.call_timeout(Job::Sleep(ms), t).await,
                    Expect::Value(ms),
                    true,
                );
            }
            90..94 => {
                let ms = rng.u64(0..20);
                judge(pool.call(Job::Sleep(ms)).await, Expect::Value(ms), false);
            }
            94..98 => {
                let x = rng.u64(..);
                judge(pool.call(Job::Panic(x)).await, Expect::Panic, false);
            }
            _ => {
                let xs: Vec<u64> = (0..rng.u64(2..12)).map(|_| rng.u64(..)).collect();
                let mut results = pool.map(xs.clone().into_iter().map(Job::Compute));
                for x in xs {
                    match results.next().await {
                        Some(r) => judge(r, Expect::Value(mix(x)), false),
                        None => anomaly("pool map ended early".into()),
                    }
                }
            }
        }
        beat.tick();
        tokio::time::sleep(Duration::from_micros(rng.u64(0..2000))).await;
    }
}

/// Every one to four seconds, kills a random worker or restarts one
/// gracefully; checks how every worker last died.
pub async fn killer(pool: SoakPool, seed: u64, beat: Beat) {
    let mut rng = Rng::with_seed(seed);
    let mut seen = HashSet::new();
    while !stopping() {
        tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
        check_deaths(&pool, &mut seen);
        if stopping() {
            break;
        }
        let i = rng.usize(0..pool.workers());
        if rng.u32(0..4) == 0 {
            match tokio::time::timeout(Duration::from_secs(30), pool.restart_worker(i)).await {
                Ok(Ok(())) => add(&COUNTERS.worker_restarts, 1),
                Ok(Err(e)) => anomaly(format!("restart_worker({i}): {e}")),
                Err(_) => anomaly(format!("hang: restart_worker({i}) took over 30 s")),
            }
        } else {
            match pool.kill_worker(i) {
                Ok(()) => add(&COUNTERS.worker_kills, 1),
                Err(e) => anomaly(format!("kill_worker({i}): {e}")),
            }
        }
        beat.tick();
    }
}

/// A worker may end only by the soak's hand (a kill, a restart, a job
/// timeout) or its job pipe breaking as it is killed; a worker that died
/// on its own or broke the protocol is an anomaly.
fn check_deaths(pool: &SoakPool, seen: &mut HashSet<u32>) {
    for s in pool.stats() {
        let Some(d) = s.last_death else { continue };
        if !seen.insert(d.pid) {
            continue;
        }
        match d.cause {
            DeathCause::Killed
            | DeathCause::Restarted
            | DeathCause::JobTimedOut { .. }
            | DeathCause::JobPipeFailed => {}
            _ => anomaly(format!("pool worker {} {d}", s.worker)),
        }
    }
}

/// Shuts the pool down (killing workers still busy after 10 s) and prints
/// what its workers went through.
pub async fn finish(pool: SoakPool, backend: Backend) {
    let stats = pool.stats();
    let mut seen = HashSet::new();
    check_deaths(&pool, &mut seen);
    if let Err(e) = pool.shutdown_timeout(Duration::from_secs(10)).await {
        anomaly(format!("pool shutdown: {e}"));
    }
    let restarts: u64 = stats.iter().map(|s| s.restarts).sum();
    let timeouts: u64 = stats.iter().map(|s| s.timeouts).sum();
    let done: u64 = stats.iter().map(|s| s.jobs_done).sum();
    let failed: u64 = stats.iter().map(|s| s.jobs_failed).sum();
    println!(
        "pool on {backend}: {done} jobs done, {failed} failed, {timeouts} timed out, {restarts} worker restarts"
    );
}
