//! What the soak watches: this process's RSS, open fds, threads, live and
//! zombie children, read from /proc once a second; and the verdict rule
//! that says whether they stayed flat.

use serde::Serialize;
use std::fs;

/// One reading of the process's resources.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Resources {
    /// Resident set size, KiB (`/proc/self/statm`).
    pub rss_kib: u64,
    /// Heap in use, KiB (glibc's `mallinfo2`: allocated chunks plus
    /// mmapped blocks; 0 where there is no such call). Far less noisy than
    /// RSS, which the channels' shared-memory arenas dominate.
    pub heap_kib: u64,
    /// Open file descriptors (`/proc/self/fd`).
    pub fds: u64,
    /// Threads (`Threads:` in `/proc/self/status`).
    pub threads: u64,
    /// Children whose parent is this process, alive (not zombies).
    pub live_children: u64,
    /// Children whose parent is this process, exited and not reaped.
    pub zombies: u64,
    /// Memory mappings (`/proc/self/maps` lines): an arena unmapped late
    /// or never shows here even when its fd was closed.
    pub mappings: u64,
}

impl Resources {
    /// Reads /proc now.
    pub fn read() -> Resources {
        let (live_children, zombies) = children();
        Resources {
            rss_kib: rss_kib(),
            heap_kib: heap_kib(),
            fds: fds(),
            threads: threads(),
            live_children,
            zombies,
            mappings: mappings(),
        }
    }

    /// The metrics, in table order, with their names.
    pub fn metrics(&self) -> [(Metric, u64); 7] {
        [
            (Metric::Rss, self.rss_kib),
            (Metric::Heap, self.heap_kib),
            (Metric::Fds, self.fds),
            (Metric::Threads, self.threads),
            (Metric::LiveChildren, self.live_children),
            (Metric::Zombies, self.zombies),
            (Metric::Mappings, self.mappings),
        ]
    }
}

/// Runs shorter than this (seconds of load) do not judge memory windows.
pub const MEMORY_JUDGED_FROM: f64 = 180.0;

/// A watched metric and its flatness rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Metric {
    /// RSS in KiB.
    Rss,
    /// Heap in use, in KiB.
    Heap,
    /// Open fds.
    Fds,
    /// Threads.
    Threads,
    /// Live child processes.
    LiveChildren,
    /// Zombie child processes.
    Zombies,
    /// Memory mappings.
    Mappings,
}

impl Metric {
    /// Name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Rss => "rss_kib",
            Metric::Heap => "heap_kib",
            Metric::Fds => "fds",
            Metric::Threads => "threads",
            Metric::LiveChildren => "children",
            Metric::Zombies => "zombies",
            Metric::Mappings => "mappings",
        }
    }

    /// The absolute slack of the flatness rule: the last window's mean may
    /// exceed the first window's by 10% plus this much.
    pub fn slack(self) -> f64 {
        match self {
            // Allocator arenas of runtime threads and tokio's blocking pool
            // come and go in MiB steps.
            Metric::Rss => 4096.0,
            // Receive buffers grow to the largest message a channel saw.
            Metric::Heap => 2048.0,
            Metric::Fds => 8.0,
            Metric::Threads => 4.0,
            Metric::LiveChildren => 4.0,
            Metric::Zombies => 2.0,
            // Each live arena is a mapping, each thread a stack and a guard.
            Metric::Mappings => 32.0,
        }
    }

    /// Whether, once every task, child and pool has been joined and the
    /// runtime dropped, the metric must equal its value before the load.
    /// Memory warms up for minutes (buffers and tables grow to what the
    /// random load needs), so its windows are judged only in runs of at
    /// least [`MEMORY_JUDGED_FROM`] seconds.
    pub fn is_memory(self) -> bool {
        matches!(self, Metric::Rss | Metric::Heap | Metric::Mappings)
    }

    /// Memory never returns exactly: the allocator keeps what it grew
    /// (including heaps it made for threads that have exited), and
    /// process-wide state made on first use (the backend probe, tracing's
    /// callsite registry, the pool's code offsets) stays.
    pub fn back_to_baseline(self) -> bool {
        !self.is_memory()
    }
}

fn rss_kib() -> u64 {
    // statm: size resident shared text lib data dt, in pages.
    let pages = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * page_size() / 1024
}

#[cfg(target_env = "gnu")]
fn heap_kib() -> u64 {
    use std::sync::OnceLock;
    type MallInfo2 = unsafe extern "C" fn() -> libc::mallinfo2;
    // Looked up at run time: mallinfo2 is glibc 2.33, the library's floor 2.29.
    static F: OnceLock<Option<MallInfo2>> = OnceLock::new();
    let f = F.get_or_init(|| {
        // SAFETY: the name is NUL-terminated; RTLD_DEFAULT searches the
        // objects already loaded.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"mallinfo2".as_ptr()) };
        // SAFETY: a non-null `mallinfo2` from glibc has exactly this signature.
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, MallInfo2>(p) })
    });
    match f {
        Some(f) => {
            // SAFETY: mallinfo2 takes nothing and only reads allocator state.
            let m = unsafe { f() };
            (m.uordblks + m.hblkhd) as u64 / 1024
        }
        None => 0,
    }
}

#[cfg(not(target_env = "gnu"))]
fn heap_kib() -> u64 {
    0
}

fn mappings() -> u64 {
    fs::read("/proc/self/maps")
        .map(|m| m.iter().filter(|&&b| b == b'\n').count() as u64)
        .unwrap_or(0)
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as u64 } else { 4096 }
}

fn fds() -> u64 {
    // The directory handle read_dir holds is one of the entries listed.
    match fs::read_dir("/proc/self/fd") {
        Ok(d) => (d.count() as u64).saturating_sub(1),
        Err(_) => 0,
    }
}

/// The names of this process's threads, for a report that says which
/// thread outlived the load.
pub fn thread_names() -> Vec<String> {
    let Ok(dir) = fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut names: Vec<String> = dir
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

fn threads() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// (alive, zombie) processes whose parent is this process: a scan of
/// `/proc/*/stat` (fields after the command name: state, then ppid).
fn children() -> (u64, u64) {
    let me = std::process::id();
    let (mut live, mut zombies) = (0, 0);
    let Ok(dir) = fs::read_dir("/proc") else {
        return (0, 0);
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process may exit between listing and reading: skip it.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces and parentheses: parse after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (f.next(), f.next().and_then(|p| p.parse::<u32>().ok()))
        else {
            continue;
        };
        if ppid != me {
            continue;
        }
        if state == "Z" {
            zombies += 1;
        } else {
            live += 1;
        }
    }
    (live, zombies)
}

/// Mean and max of one metric over a window of samples.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Window {
    /// Mean over the window.
    pub mean: f64,
    /// Largest value in the window.
    pub max: u64,
}

impl Window {
    /// Over `values` (empty: zeros).
    pub fn of(values: impl Iterator<Item = u64>) -> Window {
        let (mut n, mut sum, mut max) = (0u64, 0u64, 0u64);
        for v in values {
            n += 1;
            sum += v;
            max = max.max(v);
        }
        Window {
            mean: if n == 0 { 0.0 } else { sum as f64 / n as f64 },
            max,
        }
    }
}

/// The least-squares slope of `(t, v)` points, per minute (0 for fewer
/// than two points).
pub fn trend_per_min(points: impl Iterator<Item = (f64, u64)>) -> f64 {
    let pts: Vec<(f64, f64)> = points.map(|(t, v)| (t, v as f64)).collect();
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let mt = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let mv = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let cov: f64 = pts.iter().map(|p| (p.0 - mt) * (p.1 - mv)).sum();
    let var: f64 = pts.iter().map(|p| (p.0 - mt) * (p.0 - mt)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 60.0 }
}

/// The verdict on one metric.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Which metric.
    pub metric: &'static str,
    /// Before any load started.
    pub baseline: u64,
    /// The first window after warm-up.
    pub first: Window,
    /// The last window of the load.
    pub last: Window,
    /// Largest value over the whole run.
    pub max: u64,
    /// Least-squares slope over the load after warm-up, per minute: for
    /// information (a leak shows as a steady positive trend), not judged.
    pub trend_per_min: f64,
    /// After everything was joined and the runtime dropped.
    pub end: u64,
    /// The last window's mean may be at most this.
    pub limit: f64,
    /// Whether the windows were judged (memory in a short run is not).
    pub judged: bool,
    /// Flat by the rule.
    pub flat: bool,
    /// Why not, if not.
    pub why: Option<String>,
}

/// Applies the rule: the last window's mean is at most the first's plus
/// 10% plus the metric's slack (for memory, only in a run of `secs` of
/// at least [`MEMORY_JUDGED_FROM`]); and, for every metric but memory, the
/// value at the end equals the baseline.
#[allow(clippy::too_many_arguments)]
pub fn verdict(
    metric: Metric,
    secs: f64,
    baseline: u64,
    first: Window,
    last: Window,
    max: u64,
    end: u64,
    trend_per_min: f64,
) -> Verdict {
    let limit = first.mean * 1.10 + metric.slack();
    let judged = !metric.is_memory() || secs >= MEMORY_JUDGED_FROM;
    let mut why = Vec::new();
    if judged && last.mean > limit {
        why.push(format!(
            "last-window mean {:.1} > limit {limit:.1} (first-window mean {:.1} + 10% + {})",
            last.mean,
            first.mean,
            metric.slack()
        ));
    }
    if metric.back_to_baseline() && end != baseline {
        why.push(format!("{end} at the end, {baseline} before the load"));
    }
    Verdict {
        metric: metric.name(),
        baseline,
        first,
        last,
        max,
        trend_per_min,
        end,
        limit,
        judged,
        flat: why.is_empty(),
        why: (!why.is_empty()).then(|| why.join("; ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(values: &[u64]) -> Window {
        Window::of(values.iter().copied())
    }

    /// Judges `first` then `last` window means of `metric` in a run of
    /// `secs`, with `end` against a baseline of `baseline`.
    fn judge(
        metric: Metric,
        secs: f64,
        first: &[u64],
        last: &[u64],
        baseline: u64,
        end: u64,
    ) -> Verdict {
        verdict(
            metric,
            secs,
            baseline,
            window(first),
            window(last),
            0,
            end,
            0.0,
        )
    }

    #[test]
    fn flat_within_ten_percent_and_slack() {
        let v = judge(Metric::Fds, 30.0, &[100, 110], &[120, 122], 7, 7);
        // 105 * 1.1 + 8 = 123.5
        assert!(v.flat, "{v:?}");
        assert!((v.limit - 123.5).abs() < 1e-9);
    }

    #[test]
    fn growth_past_the_limit_is_not_flat() {
        // 10_000 * 1.1 + 4096 = 15_096
        let v = judge(Metric::Rss, 600.0, &[10_000], &[15_200], 0, 0);
        assert!(!v.flat && v.judged);
        assert!(v.why.unwrap().contains("last-window mean"));
        // Memory still warms up in a short run: its windows are not judged.
        let short = judge(Metric::Rss, 30.0, &[10_000], &[15_200], 0, 0);
        assert!(short.flat && !short.judged);
        // Counts are judged in any run.
        let fds = judge(Metric::Fds, 30.0, &[100], &[200], 7, 7);
        assert!(!fds.flat && fds.judged);
    }

    #[test]
    fn counts_must_return_to_baseline() {
        let v = judge(Metric::Fds, 600.0, &[100], &[100], 7, 8);
        assert!(!v.flat);
        assert!(v.why.unwrap().contains("8 at the end, 7 before"));
        let z = judge(Metric::Zombies, 30.0, &[1], &[1], 0, 1);
        assert!(!z.flat);
        // Memory is judged by the windows only.
        let r = judge(Metric::Heap, 600.0, &[5000], &[5000], 30, 150);
        assert!(r.flat);
    }

    #[test]
    fn trend_is_the_slope_per_minute() {
        let pts = (0..10).map(|s| (s as f64, 100 + 2 * s as u64));
        assert!((trend_per_min(pts) - 120.0).abs() < 1e-9);
        assert_eq!(trend_per_min(std::iter::once((1.0, 5))), 0.0);
    }

    #[test]
    fn reads_this_process() {
        let r = Resources::read();
        assert!(r.rss_kib > 0 && r.fds >= 3 && r.threads >= 1);
        assert_eq!(r.zombies, 0);
        // A child that exited and is not yet reaped is a zombie.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let mut seen = false;
        for _ in 0..500 {
            if Resources::read().zombies == 1 {
                seen = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        c.wait().unwrap();
        assert!(seen, "the exited child never showed as a zombie");
        assert_eq!(Resources::read().zombies, 0);
    }
}
