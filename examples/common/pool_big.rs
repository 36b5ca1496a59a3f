//! Harness scenario 4b: pool jobs that return 1 MiB, with the result pipe's
//! shared-memory arena on (the default) and off. The caller reads every
//! byte of every result (a checksum of 8-byte words), so neither mode wins
//! by leaving data unread.

use ringipc::{Backend, ChannelConfig, Pool};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Bytes each job returns.
pub const RESULT: usize = 1 << 20;

/// One row: one backend, arena on or off.
#[derive(Serialize, Clone)]
pub struct PoolBigRow {
    pub contender: &'static str,
    pub arena: bool,
    pub workers: usize,
    pub jobs: u64,
    pub jobs_per_sec: f64,
    /// Result bytes per second (10^6), read by the caller.
    pub mb_per_sec: f64,
}

/// The job: returns `RESULT` bytes derived from `seed`.
fn big_result(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; RESULT];
    for (i, w) in v.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&(seed ^ i as u64).to_le_bytes());
    }
    v
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0u64, |acc, w| {
        acc ^ u64::from_le_bytes(w.try_into().unwrap())
    })
}

/// Runs jobs through a fresh pool of `workers` for about `budget` and
/// returns jobs per second. `arena` sets the process default for the
/// pool's channels (restored before returning).
pub fn run(
    backend: Backend,
    workers: usize,
    arena: bool,
    budget: Duration,
) -> Result<PoolBigRow, String> {
    let before = ChannelConfig::new();
    ChannelConfig::builtin().arena(arena).set_process_default();
    let out = measure(backend, workers, budget);
    before.set_process_default();
    let (jobs, elapsed) = out?;
    let secs = elapsed.as_secs_f64();
    Ok(PoolBigRow {
        contender: match backend {
            Backend::Uring => "ringipc-uring",
            _ => "ringipc-epoll",
        },
        arena,
        workers,
        jobs,
        jobs_per_sec: jobs as f64 / secs,
        mb_per_sec: (jobs as f64 * RESULT as f64) / secs / 1e6,
    })
}

fn measure(backend: Backend, workers: usize, budget: Duration) -> Result<(u64, Duration), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let pool = Pool::builder(big_result)
            .workers(workers)
            .backend(backend)
            .build()
            .await
            .map_err(|e| e.to_string())?;
        // Warm up (workers started, arenas touched), then measure batches
        // until the budget is spent.
        drain(&pool, 0, 8).await?;
        let start = Instant::now();
        let mut jobs = 0u64;
        while start.elapsed() < budget {
            drain(&pool, jobs + 8, 16).await?;
            jobs += 16;
        }
        let elapsed = start.elapsed();
        pool.shutdown().await.map_err(|e| e.to_string())?;
        Ok((jobs, elapsed))
    })
}

async fn drain(pool: &Pool<u64, Vec<u8>>, first: u64, n: u64) -> Result<(), String> {
    let mut results = pool.map(first..first + n);
    let mut seed = first;
    while let Some(r) = results.next().await {
        let m = r.map_err(|e| e.to_string())?;
        let want = checksum(&big_result(seed));
        if m.len() != RESULT || checksum(&m) != want {
            return Err(format!("job {seed}: wrong result"));
        }
        seed += 1;
    }
    Ok(())
}

/// Prints the rows, with arena-on against arena-off per backend.
pub fn print(rows: &[PoolBigRow]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "   pool jobs returning 1 MiB (every result byte read by the caller), result pipe's arena on and off:"
    );
    println!(
        "  {:<16} {:>6} {:>8} {:>10} {:>10} {:>12}",
        "contender", "arena", "workers", "jobs/s", "MB/s", "on vs off"
    );
    for r in rows {
        let off = rows
            .iter()
            .find(|o| o.contender == r.contender && !o.arena && o.workers == r.workers);
        let ratio = match off {
            Some(o) if r.arena && o.jobs_per_sec > 0.0 => {
                format!("{:.2}x", r.jobs_per_sec / o.jobs_per_sec)
            }
            _ => String::new(),
        };
        println!(
            "  {:<16} {:>6} {:>8} {:>10.0} {:>10.0} {:>12}",
            r.contender,
            if r.arena { "on" } else { "off" },
            r.workers,
            r.jobs_per_sec,
            r.mb_per_sec,
            ratio
        );
    }
}
