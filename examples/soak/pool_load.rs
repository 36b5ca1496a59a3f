//! Pool load: callers running jobs that compute, sleep past their timeout,
//! or panic, while a killer SIGKILLs random workers. Every call must end in
//! the right value or an expected typed error.
//!
//! The supervision calls (`call_timeout`, `kill_worker`, `shutdown_timeout`)
//! go through the small functions at the top, so the soak can follow the
//! pool's API as it grows.

use crate::counters::{Beat, COUNTERS, add, anomaly, stopping};
use fastrand::Rng;
use ringipc::{Backend, Error, ErrorKind, OwnedMessage, Pool, Result};
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

fn run_job(job: Job) -> u64 {
    match job {
        Job::Compute(x) => mix(x),
        Job::Sleep(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
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

/// `call` with a deadline: a job still running then fails with `TimedOut`.
async fn call_timeout(pool: &SoakPool, job: Job, t: Duration) -> Result<OwnedMessage<u64>> {
    match tokio::time::timeout(t, pool.call(job)).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(ErrorKind::TimedOut, "pool call timed out")),
    }
}

/// SIGKILLs worker `i`; the pool restarts it.
fn kill_worker(pool: &SoakPool, i: usize) -> Result<()> {
    let pid = pool.stats()[i].pid as libc::pid_t;
    // SAFETY: kill(2) takes no pointers. The pid is the worker's, read a
    // moment ago; the pool reaps it, so it cannot have been reused yet
    // unless the worker died and was reaped in between (then another of
    // our children may be hit, which the soak would report).
    if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Already dead and reaped: it is being restarted.
        Some(libc::ESRCH) => Ok(()),
        _ => Err(Error::new(ErrorKind::Io, format!("kill worker {i} (pid {pid})")).with_source(e)),
    }
}

/// Stops the pool, letting jobs in flight finish.
async fn shutdown(pool: SoakPool) -> Result<()> {
    pool.shutdown().await
}

/// Builds a pool of two workers on `backend`.
pub async fn build(backend: Backend) -> Result<SoakPool> {
    Pool::builder(run_job)
        .workers(2)
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
                    call_timeout(&pool, Job::Sleep(ms), t).await,
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

/// Kills a random worker every one to four seconds.
pub async fn killer(pool: SoakPool, seed: u64, beat: Beat) {
    let mut rng = Rng::with_seed(seed);
    while !stopping() {
        tokio::time::sleep(Duration::from_millis(rng.u64(1000..4000))).await;
        if stopping() {
            break;
        }
        let i = rng.usize(0..pool.workers());
        match kill_worker(&pool, i) {
            Ok(()) => add(&COUNTERS.worker_kills, 1),
            Err(e) => anomaly(format!("{e}")),
        }
        beat.tick();
    }
}

/// Shuts the pool down; every worker must be gone after.
pub async fn finish(pool: SoakPool) {
    if let Err(e) = shutdown(pool).await {
        anomaly(format!("pool shutdown: {e}"));
    }
}
