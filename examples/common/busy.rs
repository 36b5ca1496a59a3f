//! Harness scenario 2b: 64 B ping-pong with opt-in busy polling against the
//! same channels parking at once, with the CPU each burns. Both sides of
//! every run spin (a request/response pair where each waits for the other).

use crate::measure::{self, PingRun, Settings};
use ringipc::Backend;
use serde::Serialize;
use std::time::Duration;

/// The spin budget the scenario gives each receiver.
pub const BUDGET: Duration = Duration::from_micros(50);
/// Message size of the scenario.
pub const SIZE: usize = 64;

/// One row of the scenario.
#[derive(Serialize, Clone)]
pub struct BusyRow {
    /// e.g. `ringipc-uring+busy`.
    pub contender: &'static str,
    /// The spin budget, or 0 for parking at once.
    pub budget_us: f64,
    pub rounds: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    /// p50 against the raw blocking pipe's in scenario 2.
    pub p50_vs_raw: Option<f64>,
    /// CPU time of both threads per wall second (2.0: two cores flat out).
    pub cores_busy: f64,
    /// CPU time of both threads per round trip.
    pub cpu_us_per_round: f64,
}

/// Runs every backend parking and busy polling, in `settings.reps`
/// interleaved slices; `raw_p50_us` comes from scenario 2.
pub fn run(
    backends: &[Backend],
    settings: &Settings,
    raw_p50_us: Option<f64>,
    tick: &mut dyn FnMut(),
) -> Vec<Result<BusyRow, (&'static str, String)>> {
    let reps = settings.reps.max(1);
    let rounds = (settings.max_rounds / 10).max(2_000).div_ceil(reps);
    let warmup = settings.warmup_rounds.min(rounds / 4);
    let cases: Vec<(Backend, Option<Duration>)> = backends
        .iter()
        .flat_map(|&b| [(b, None), (b, Some(BUDGET))])
        .collect();
    let mut runs: Vec<Result<PingRun, String>> = cases
        .iter()
        .map(|_| {
            Ok(PingRun {
                samples: Vec::new(),
                cpu: Duration::ZERO,
                wall: Duration::ZERO,
            })
        })
        .collect();
    for _ in 0..reps {
        for (i, &(b, busy)) in cases.iter().enumerate() {
            if let Ok(acc) = &mut runs[i] {
                match measure::ringipc_ping_pong_with(b, SIZE, warmup, rounds, busy) {
                    Ok(r) => {
                        acc.samples.extend(r.samples);
                        acc.cpu += r.cpu;
                        acc.wall += r.wall;
                    }
                    Err(e) => runs[i] = Err(e.to_string()),
                }
            }
            tick();
        }
    }
    cases
        .iter()
        .zip(runs)
        .map(|(&(b, busy), run)| {
            let name = match (b, busy.is_some()) {
                (Backend::Uring, false) => "ringipc-uring",
                (Backend::Uring, true) => "ringipc-uring+busy",
                (_, false) => "ringipc-epoll",
                (_, true) => "ringipc-epoll+busy",
            };
            let run = run.map_err(|e| (name, e))?;
            let n = run.samples.len();
            let l = measure::Latency::from_samples(SIZE, run.samples);
            let p50_us = l.p50.as_secs_f64() * 1e6;
            Ok(BusyRow {
                contender: name,
                budget_us: busy.map_or(0.0, |b| b.as_secs_f64() * 1e6),
                rounds: n,
                p50_us,
                p99_us: l.p99.as_secs_f64() * 1e6,
                p50_vs_raw: raw_p50_us.map(|raw| p50_us / raw),
                cores_busy: run.cpu.as_secs_f64() / run.wall.as_secs_f64().max(1e-9),
                cpu_us_per_round: run.cpu.as_secs_f64() * 1e6 / n.max(1) as f64,
            })
        })
        .collect()
}

/// Prints the scenario's table.
pub fn print(rows: &[BusyRow]) {
    println!();
    println!(
        "2b. busy polling, {SIZE} B ping-pong (both receivers spin up to {} us before parking; vs raw = p50 / raw-pipe's p50 in 2.)",
        BUDGET.as_micros()
    );
    println!(
        "  {:<20} {:>8} {:>8} {:>8} {:>11} {:>12} {:>8}",
        "contender", "p50", "p99", "vs raw", "cores busy", "CPU us/trip", "rounds"
    );
    for r in rows {
        println!(
            "  {:<20} {:>8.1} {:>8.1} {:>8} {:>11.2} {:>12.1} {:>8}",
            r.contender,
            r.p50_us,
            r.p99_us,
            r.p50_vs_raw.map_or("-".into(), |x| format!("{x:.2}x")),
            r.cores_busy,
            r.cpu_us_per_round,
            r.rounds
        );
    }
}
