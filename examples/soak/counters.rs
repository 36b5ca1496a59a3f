//! What the load did, counted from every task: messages, children, jobs,
//! and anomalies (an outcome the library promises cannot happen). Each
//! load loop also has a heartbeat, so a loop that hangs shows up as a
//! stall rather than as a quiet, flat run.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Running totals, updated by the load tasks.
        pub struct Counters {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of the totals at one moment.
        #[derive(Clone, Copy, Debug, Default, Serialize)]
        pub struct Totals {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Counters {
            const fn new() -> Counters {
                Counters { $($name: AtomicU64::new(0),)* }
            }

            /// The totals now.
            pub fn totals(&self) -> Totals {
                Totals { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Messages delivered and checked (order and content), every path.
    msgs,
    /// Their payload bytes.
    bytes,
    /// Sends and receives cancelled by a timeout.
    cancelled,
    /// Channel handles moved to another thread and back.
    moves,
    /// Channel lifetimes (a pipe made, used, closed).
    channels,
    /// Children started.
    children,
    /// Children that returned a value, checked.
    children_ok,
    /// Children killed (SIGKILL or SIGTERM) and joined.
    children_killed,
    /// Children whose panic reached the parent.
    children_panicked,
    /// Children dropped unjoined (killed by the drop, or detached).
    children_dropped,
    /// Pool jobs that returned the right value.
    jobs_ok,
    /// Pool jobs failed with `TimedOut`.
    jobs_timed_out,
    /// Pool jobs failed with `WorkerDied`.
    jobs_worker_died,
    /// Pool jobs failed with `Panicked`.
    jobs_panicked,
    /// Pool workers killed by the soak.
    worker_kills,
    /// Pool workers restarted gracefully by the soak.
    worker_restarts,
    /// Outcomes that should be impossible.
    anomalies,
}

/// The process-wide counters.
pub static COUNTERS: Counters = Counters::new();

impl Totals {
    /// Pool jobs that failed, for any expected reason.
    pub fn jobs_failed(&self) -> u64 {
        self.jobs_timed_out + self.jobs_worker_died + self.jobs_panicked
    }
}

/// Counts `n` on `counter`.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Set once the load is told to stop: later stalls are expected.
pub static STOPPING: AtomicBool = AtomicBool::new(false);

/// Records an anomaly: counted, printed at once, kept (the first 100) for
/// the summary.
pub fn anomaly(what: String) {
    add(&COUNTERS.anomalies, 1);
    eprintln!("ANOMALY: {what}");
    let mut notes = NOTES.lock().unwrap_or_else(|p| p.into_inner());
    if notes.len() < 100 {
        notes.push(what);
    }
}

/// The anomalies recorded so far (the first 100).
pub fn anomalies() -> Vec<String> {
    NOTES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Whether the load should wind down.
pub fn stopping() -> bool {
    STOPPING.load(Relaxed)
}

/// A load loop's progress counter, watched by the sampler.
#[derive(Clone)]
pub struct Beat(Arc<AtomicU64>);

impl Beat {
    /// One more step done.
    pub fn tick(&self) {
        self.0.fetch_add(1, Relaxed);
    }
}

static BEATS: Mutex<Vec<(String, Arc<AtomicU64>)>> = Mutex::new(Vec::new());

/// Registers a heartbeat named `name`.
pub fn beat(name: String) -> Beat {
    let b = Arc::new(AtomicU64::new(0));
    BEATS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((name, b.clone()));
    Beat(b)
}

/// Every heartbeat's name and count.
pub fn beats() -> Vec<(String, u64)> {
    BEATS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(n, b)| (n.clone(), b.load(Relaxed)))
        .collect()
}
