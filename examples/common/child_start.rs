//! Harness scenario 3: child start-to-join. A ringipc child running an
//! empty function against `std::process::Command` running `/bin/true`,
//! with two rows between them that show where the time goes: exec'ing this
//! binary with nothing to do, and the same through std's fork path, which
//! any `pre_exec` hook selects (ringipc avoids it with `posix_spawn`).

use crate::measure::{self, Latency, Side};
use crate::{
    Failure, Plan, Report, contender_name, current_thread_runtime, rss_kib, us, with_load,
};
use indicatif::ProgressBar;
use ringipc::{Affinity, Backend, Process};
use serde::Serialize;
use std::time::{Duration, Instant};

/// The child's entry: nothing.
fn empty(_: ()) {}

/// Who starts the child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Starter {
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

pub const BIN_TRUE: &str = "/bin/true";
/// Set in a [`Starter::SelfExec`] child.
pub const EXIT_AT_ONCE: &str = "RINGIPC_HARNESS_EXIT_AT_ONCE";

impl Starter {
    pub fn name(self) -> &'static str {
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

#[derive(Serialize, Clone)]
pub struct StartRow {
    pub contender: &'static str,
    pub runs: usize,
    pub median_us: f64,
    pub p99_us: f64,
    /// Median against /bin/true's.
    pub vs_bin_true: Option<f64>,
}

/// Scenario 3: the contenders take turns in `reps` slices, so that load
/// drifting over time hits all of them alike; samples are pooled.
pub fn run(plan: &Plan, report: &mut Report, bar: &ProgressBar) {
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
