//! Soak: hours of mixed load in minutes, and a check that nothing grows.
//!
//! ```text
//! cargo run --release --example soak -- --minutes 10          # both backends at once
//! cargo run --release --example soak -- --minutes 0.5 --backend epoll --json soak.json
//! ```
//!
//! On one multi-threaded tokio runtime, for each backend at once: typed
//! and bytes messages between tasks and through a long-lived echo child
//! and engine cores (sends and receives cancelled by timeouts, handles
//! moved to other tasks and threads); children started and joined,
//! killed, panicking, dropped unjoined (killed or detached); a pool whose
//! workers are SIGKILLed at random and whose jobs time out or panic.
//! Every message and outcome is checked; one that should be impossible is
//! an anomaly. Once a second it samples RSS, open fds, threads, live and
//! zombie children; at the end it compares the first and last windows of
//! the load (and the counts after everything was joined with those before
//! the load) and exits non-zero unless every metric stayed flat, no loop
//! stalled and no anomaly was seen (memory windows are judged in runs of
//! three minutes or more: memory warms up for minutes). The rule is in
//! `soak/probe.rs` (`verdict`) and docs/testing.md.

// `cargo test --example soak` runs the verdict's unit tests, without main.
#![cfg_attr(test, allow(dead_code))]

#[path = "soak/channels.rs"]
mod channels;
#[path = "soak/children.rs"]
mod children;
#[path = "soak/counters.rs"]
mod counters;
#[path = "soak/pool_load.rs"]
mod pool_load;
#[path = "soak/probe.rs"]
mod probe;

use clap::{Parser, ValueEnum};
use counters::{COUNTERS, STOPPING, Totals, anomaly, beat};
use probe::{Resources, Verdict, Window};
use ringipc::{Backend, Engine};
use serde::Serialize;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    about = "Mixed load for minutes; checks that memory, fds, threads and children stay flat"
)]
struct Args {
    /// How long the load runs, in minutes (fractions are fine: 0.5).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// Which backend the load uses; `both` runs the whole load on each at
    /// the same time.
    #[arg(long, value_enum, default_value_t = Which::Both)]
    backend: Which,
    /// Seed for every random choice (printed when not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Print a line every this many seconds (samples are taken every second).
    #[arg(long, default_value_t = 10)]
    print_every: u64,
    /// A loop that makes no progress for this many seconds is a stall.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
    /// Run only these parts of the load (to narrow a finding down).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "tasks,echo,engine,children,pool"
    )]
    only: Vec<Part>,
    /// Worker threads of the runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write the samples and the verdict here, as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The parts of the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
enum Part {
    /// Typed and bytes channels between tasks.
    Tasks,
    /// The long-lived echo child.
    Echo,
    /// Echo tasks on engine cores.
    Engine,
    /// Child churn.
    Children,
    /// The pool, its callers and its killer.
    Pool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
enum Which {
    Uring,
    Epoll,
    Both,
}

/// The backends to load; with `both`, uring is left out (and the reason
/// printed) where the kernel refuses it.
fn backends(which: Which) -> Result<Vec<Backend>, String> {
    let uring = ringipc::uring_probe();
    match which {
        Which::Epoll => Ok(vec![Backend::Epoll]),
        Which::Uring => match uring {
            Ok(()) => Ok(vec![Backend::Uring]),
            Err(why) => Err(format!("the kernel refuses io_uring here: {why}")),
        },
        Which::Both => match uring {
            Ok(()) => Ok(vec![Backend::Uring, Backend::Epoll]),
            Err(why) => {
                println!("SKIPPED uring: the kernel refuses io_uring here: {why}; epoll only");
                Ok(vec![Backend::Epoll])
            }
        },
    }
}

/// One reading: resources and counters, `t` seconds after the load started.
#[derive(Clone, Copy, Debug, Serialize)]
struct Sample {
    t: f64,
    #[serde(flatten)]
    res: Resources,
    #[serde(flatten)]
    totals: Totals,
}

/// Samples once a second on its own thread (so a stuck runtime does not
/// stop the sampling), prints every `print_every` seconds, and reports
/// loops that stopped making progress.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(t0: Instant, print_every: u64, stall: Duration, secs: f64) -> Sampler {
        // Room for the whole run up front, so the samples themselves do not
        // show as heap growth.
        let room = secs as usize + 120;
        let samples = Arc::new(Mutex::new(Vec::with_capacity(room)));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("soak-sampler".into())
            .spawn(move || sample_loop(t0, print_every, stall, &s, &st))
            .expect("spawn the sampler");
        Sampler {
            samples,
            stop,
            thread,
        }
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Relaxed);
        let _ = self.thread.join();
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn sample_loop(
    t0: Instant,
    print_every: u64,
    stall: Duration,
    samples: &Mutex<Vec<Sample>>,
    stop: &AtomicBool,
) {
    let mut last_beats: Vec<(String, u64, Instant, bool)> = Vec::new();
    let mut prev: Option<Sample> = None;
    let mut k = 1u64;
    while !stop.load(Relaxed) {
        let due = t0 + Duration::from_secs(k);
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
            continue;
        }
        let s = Sample {
            t: t0.elapsed().as_secs_f64(),
            res: Resources::read(),
            totals: COUNTERS.totals(),
        };
        if k.is_multiple_of(print_every.max(1)) {
            print_line(&s, prev.as_ref());
            prev = Some(s);
        }
        samples.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        watch_beats(&mut last_beats, stall);
        k += 1;
    }
}

fn print_line(s: &Sample, prev: Option<&Sample>) {
    let dt = prev.map_or(s.t, |p| s.t - p.t).max(1e-9);
    let rate = (s.totals.msgs - prev.map_or(0, |p| p.totals.msgs)) as f64 / dt;
    let r = &s.res;
    let c = &s.totals;
    println!(
        "[{:>5.0}s] rss {:>7} KiB  heap {:>6} KiB  fds {:>4}  threads {:>3}  children {:>3}  zombies {:>2}  maps {:>4} | msgs {:>10} ({:>6.0}/s)  children {:>6}  jobs {:>7} ok {:>5} failed  kills {:>4}  anomalies {}",
        s.t,
        r.rss_kib,
        r.heap_kib,
        r.fds,
        r.threads,
        r.live_children,
        r.zombies,
        r.mappings,
        c.msgs,
        rate,
        c.children,
        c.jobs_ok,
        c.jobs_failed(),
        c.worker_kills,
        c.anomalies
    );
}

/// A loop whose heartbeat has not moved for `stall` is reported once (and
/// again if it moves and then stops again).
fn watch_beats(last: &mut Vec<(String, u64, Instant, bool)>, stall: Duration) {
    let now = Instant::now();
    for (name, v) in counters::beats() {
        match last.iter_mut().find(|(n, ..)| *n == name) {
            None => last.push((name, v, now, false)),
            Some(entry) => {
                if entry.1 != v {
                    *entry = (name, v, now, false);
                } else if !entry.3 && !counters::stopping() && now - entry.2 > stall {
                    entry.3 = true;
                    anomaly(format!(
                        "stall: {name} made no progress for {:.0} s",
                        (now - entry.2).as_secs_f64()
                    ));
                }
            }
        }
    }
}

/// The task handles of the load, by name.
struct Tasks(Vec<(String, tokio::task::JoinHandle<()>)>);

impl Tasks {
    /// Spawns `make(beat)` with a heartbeat of the same name.
    fn spawn<F, Fut>(&mut self, name: String, make: F)
    where
        F: FnOnce(counters::Beat) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let b = beat(name.clone());
        self.0.push((name, tokio::spawn(make(b))));
    }

    /// Waits for every task, up to `limit` in all; one still running then
    /// is a hang (reported, and aborted).
    async fn join(self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        for (name, mut h) in self.0 {
            match tokio::time::timeout_at(deadline, &mut h).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => anomaly(format!("{name}: task failed: {e}")),
                Err(_) => {
                    anomaly(format!(
                        "hang: {name} still running {:.0} s after the stop",
                        limit.as_secs_f64()
                    ));
                    h.abort();
                }
            }
        }
    }
}

/// The whole load, for `secs` seconds, then an orderly stop.
async fn load(
    backends: Vec<Backend>,
    engines: Vec<Arc<Engine>>,
    parts: Vec<Part>,
    seed: u64,
    secs: f64,
) {
    let mut tasks = Tasks(Vec::new());
    let mut pools = Vec::new();
    let on = |p: Part| parts.contains(&p);
    for (i, (&b, engine)) in backends.iter().zip(engines).enumerate() {
        let s = seed.wrapping_add(1000 * i as u64);
        if on(Part::Tasks) {
            tasks_part(&mut tasks, b, s);
        }
        if on(Part::Echo) {
            tasks.spawn(format!("{b} echo child"), |beat| async move {
                if let Err(e) = channels::echo_child_traffic(b, s + 20, beat).await {
                    anomaly(format!("echo child on {b}: {e}"));
                }
            });
        }
        if on(Part::Engine) {
            tasks.spawn(format!("{b} engine echo"), |beat| {
                channels::engine_traffic(engine, s + 30, beat)
            });
        }
        if on(Part::Children) {
            for k in 0..2 {
                tasks.spawn(format!("{b} child churn {k}"), |beat| {
                    children::churn(b, s + 40 + k, beat)
                });
            }
        }
        if on(Part::Pool) {
            match pool_load::build(b).await {
                Ok(pool) => {
                    for k in 0..3 {
                        let p = pool.clone();
                        tasks.spawn(format!("{b} pool caller {k}"), |beat| {
                            pool_load::caller(p, s + 50 + k, beat)
                        });
                    }
                    let p = pool.clone();
                    tasks.spawn(format!("{b} pool killer"), |beat| {
                        pool_load::killer(p, s + 60, beat)
                    });
                    pools.push((pool, b));
                }
                Err(e) => anomaly(format!("pool on {b}: {e}")),
            }
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    STOPPING.store(true, Relaxed);
    tasks.join(Duration::from_secs(60)).await;
    for (pool, b) in pools {
        if tokio::time::timeout(Duration::from_secs(30), pool_load::finish(pool, b))
            .await
            .is_err()
        {
            anomaly("hang: pool shutdown took over 30 s".into());
        }
    }
}

/// Channels between tasks: two typed streams and one bytes stream.
fn tasks_part(tasks: &mut Tasks, b: Backend, s: u64) {
    for k in 0..2 {
        tasks.spawn(format!("{b} typed task-to-task {k}"), |beat| {
            channels::task_traffic(b, true, s + k, beat)
        });
    }
    tasks.spawn(format!("{b} bytes task-to-task"), |beat| {
        channels::task_traffic(b, false, s + 10, beat)
    });
}

/// Reads the resources until every metric that must return to its
/// baseline has (detached children and reaper threads take a moment), or
/// `limit` passes; returns the last reading.
fn settle(baseline: &Resources, limit: Duration) -> Resources {
    let until = Instant::now() + limit;
    loop {
        let r = Resources::read();
        let back = r
            .metrics()
            .iter()
            .zip(baseline.metrics())
            .all(|((m, v), (_, b))| !m.back_to_baseline() || *v == b);
        if back || Instant::now() > until {
            return r;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts and joins one child by re-exec, from a thread that then exits.
fn prime(backend: Backend) -> ringipc::Result<()> {
    fn nothing(_: ()) {}
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut p = ringipc::Process::builder(nothing)
                .arg(())
                .backend(backend)
                .start_mode(ringipc::StartMode::Exec)
                .start()?;
            p.join().await?;
            // The reaper thread and its epoll fd (started by the first child
            // dropped while alive) live as long as the process.
            let nap = ringipc::Process::builder(nap)
                .arg(())
                .backend(backend)
                .on_drop(ringipc::OnDrop::Detach)
                .start()?;
            drop(nap);
            tokio::time::sleep(Duration::from_millis(600)).await;
            Ok(())
        })
    })
    .join()
    .expect("priming thread")
}

fn nap(_: ()) {
    std::thread::sleep(Duration::from_millis(200));
}

#[derive(Serialize)]
struct Report {
    minutes: f64,
    backends: Vec<&'static str>,
    seed: u64,
    runtime_threads: usize,
    warm_up_secs: f64,
    window_secs: f64,
    baseline: Resources,
    end: Resources,
    verdicts: Vec<Verdict>,
    totals: Totals,
    anomalies: Vec<String>,
    flat: bool,
    samples: Vec<Sample>,
}

fn main() -> ExitCode {
    ringipc::init();
    let args = Args::parse();
    let backends = match backends(args.backend) {
        Ok(b) => b,
        Err(why) => {
            eprintln!("soak: {why}");
            return ExitCode::from(2);
        }
    };
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let secs = (args.minutes * 60.0).max(3.0);
    let names: Vec<&'static str> = backends.iter().map(|b| b.name()).collect();
    println!(
        "soak: {:.1} min, the whole load on {} at once, {} runtime threads, --seed {seed}",
        secs / 60.0,
        names.join(" and "),
        args.threads
    );

    // Process-lifetime state made before the baseline, so the end can be
    // compared with it exactly: the exec spawner thread (started by the
    // first child started by re-exec) and the reaper thread.
    if let Err(e) = prime(backends[0]) {
        eprintln!("soak: priming child: {e}");
        return ExitCode::from(2);
    }
    let t0 = Instant::now();
    let sampler = Sampler::start(
        t0,
        args.print_every,
        Duration::from_secs(args.stall_secs),
        secs,
    );
    // Before anything of the load exists: the sampler thread, the fork
    // server and this thread.
    let baseline = Resources::read();
    let baseline_threads = probe::thread_names();
    let engines: Vec<Arc<Engine>> = match backends
        .iter()
        .map(|&b| Engine::builder().backend(b).build().map(Arc::new))
        .collect()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("soak: engine: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(load(
        backends,
        engines.clone(),
        args.only.clone(),
        seed,
        secs,
    ));
    rt.shutdown_timeout(Duration::from_secs(10));
    // Joins the engines' core threads.
    drop(engines);

    let end = settle(&baseline, Duration::from_secs(20));
    if end.threads != baseline.threads {
        println!(
            "threads before the load: {:?}; after: {:?}",
            baseline_threads,
            probe::thread_names()
        );
    }
    let samples = sampler.stop();
    report(&args, &names, seed, secs, baseline, end, samples)
}

fn report(
    args: &Args,
    names: &[&'static str],
    seed: u64,
    secs: f64,
    baseline: Resources,
    end: Resources,
    samples: Vec<Sample>,
) -> ExitCode {
    // Skip the warm-up (pools and children starting, buffers growing);
    // then compare a window at the start with one at the end of the load.
    let warm_up = (secs / 10.0).min(10.0);
    let window = ((secs - warm_up) / 3.0).min(60.0);
    let load: Vec<&Sample> = samples.iter().filter(|s| s.t <= secs + 0.5).collect();
    let in_range = |lo: f64, hi: f64| load.iter().filter(move |s| s.t > lo && s.t <= hi);
    let verdicts: Vec<Verdict> = (0..baseline.metrics().len())
        .map(|i| {
            let pick = move |s: &&&Sample| s.res.metrics()[i].1;
            let metric = baseline.metrics()[i].0;
            let first = Window::of(in_range(warm_up, warm_up + window).map(|s| pick(&s)));
            let last = Window::of(in_range(secs - window, secs + 0.5).map(|s| pick(&s)));
            let max = samples
                .iter()
                .map(|s| s.res.metrics()[i].1)
                .max()
                .unwrap_or(0);
            let trend = probe::trend_per_min(
                in_range(warm_up, secs + 0.5).map(|s| (s.t, s.res.metrics()[i].1)),
            );
            probe::verdict(
                metric,
                secs,
                baseline.metrics()[i].1,
                first,
                last,
                max,
                end.metrics()[i].1,
                trend,
            )
        })
        .collect();
    let totals = COUNTERS.totals();
    let anomalies = counters::anomalies();

    println!(
        "\nfirst window: {:.0}-{:.0} s; last window: {:.0}-{:.0} s; end: after every task, child and pool was joined and the runtime dropped",
        warm_up,
        warm_up + window,
        secs - window,
        secs
    );
    println!(
        "{:<9} {:>9} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8}  verdict",
        "metric",
        "baseline",
        "first mean",
        "first max",
        "last mean",
        "last max",
        "limit",
        "trend/min",
        "end"
    );
    for v in &verdicts {
        println!(
            "{:<9} {:>9} {:>11.1} {:>10} {:>10.1} {:>10} {:>10.1} {:>+10.1} {:>8}  {}",
            v.metric,
            v.baseline,
            v.first.mean,
            v.first.max,
            v.last.mean,
            v.last.max,
            v.limit,
            v.trend_per_min,
            v.end,
            match &v.why {
                None if v.judged => "flat".to_string(),
                None => format!(
                    "flat at the end; windows not judged (memory, run under {:.0} min)",
                    probe::MEMORY_JUDGED_FROM / 60.0
                ),
                Some(why) => format!("NOT FLAT: {why}"),
            }
        );
    }
    let t = &totals;
    println!(
        "\nmessages {} ({:.1} MiB, {:.0}/s), cancelled sends/receives {}, handle moves {}, channel lifetimes {}",
        t.msgs,
        t.bytes as f64 / (1 << 20) as f64,
        t.msgs as f64 / secs,
        t.cancelled,
        t.moves,
        t.channels
    );
    println!(
        "children {} started: {} returned, {} killed, {} panicked, {} dropped unjoined",
        t.children, t.children_ok, t.children_killed, t.children_panicked, t.children_dropped
    );
    println!(
        "pool jobs {} ok, {} failed ({} timed out, {} worker died, {} panicked); {} workers killed, {} restarted",
        t.jobs_ok,
        t.jobs_failed(),
        t.jobs_timed_out,
        t.jobs_worker_died,
        t.jobs_panicked,
        t.worker_kills,
        t.worker_restarts
    );
    for a in &anomalies {
        println!("anomaly: {a}");
    }
    let flat = verdicts.iter().all(|v| v.flat) && t.anomalies == 0;
    println!(
        "\nsoak: {}",
        if flat {
            "FLAT (every metric flat, no anomaly, no stall)".to_string()
        } else {
            format!(
                "NOT FLAT ({} metrics not flat, {} anomalies)",
                verdicts.iter().filter(|v| !v.flat).count(),
                t.anomalies
            )
        }
    );
    if let Some(path) = &args.json {
        let rep = Report {
            minutes: secs / 60.0,
            backends: names.to_vec(),
            seed,
            runtime_threads: args.threads,
            warm_up_secs: warm_up,
            window_secs: window,
            baseline,
            end,
            verdicts,
            totals,
            anomalies,
            flat,
            samples,
        };
        match std::fs::File::create(path)
            .map_err(|e| e.to_string())
            .and_then(|f| serde_json::to_writer_pretty(f, &rep).map_err(|e| e.to_string()))
        {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("soak: cannot write {}: {e}", path.display()),
        }
    }
    if flat {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
