//! Shared test support: every I/O test body runs once per backend.
#![allow(dead_code)]

use ringipc::{Backend, ChannelConfig, StartMode};
use std::future::Future;

/// Runs `body` on a fresh current-thread runtime with channels on `backend`.
/// A uring test skips only when the kernel refuses io_uring, and says why.
pub fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(ChannelConfig) -> Fut,
    Fut: Future<Output = ()>,
{
    if backend == Backend::Uring
        && let Err(why) = ringipc::uring_probe()
    {
        eprintln!("SKIPPED on uring: the kernel refuses io_uring here: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(body(ChannelConfig::new().backend(backend)));
}

/// `both_backends!(name, ...)` expands each `async fn name(cfg: ChannelConfig)`
/// into `uring::name` and `epoll::name` tests.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { $crate::common::run(ringipc::Backend::Uring, super::$name) })*
        }
        mod epoll {
            $(#[test] fn $name() { $crate::common::run(ringipc::Backend::Epoll, super::$name) })*
        }
    };
}

/// A named test body, run once per backend.
pub type Test = (&'static str, fn(Backend));

/// A tiny libtest look-alike for `harness = false` test binaries, whose
/// `main` must call `ringipc::init()` first so they can start children.
/// Each test runs once per start mode (fork server, re-exec) and backend, as
/// `fork::uring::name`; an argument filters tests by substring.
pub fn harness(tests: &[Test]) {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let uring = ringipc::uring_probe();
    // The fork cases must fork: a server missing here (init ran late, or
    // RINGIPC_START=exec) would make them re-exec cases under another name.
    let fork_ok = match ringipc::fork_server_pid() {
        Some(_) => Ok(()),
        None => Err(format!(
            "no fork server (default start mode {})",
            ringipc::default_start_mode().name()
        )),
    };
    let mut cases = Vec::new();
    for mode in [StartMode::Fork, StartMode::Exec] {
        for &(name, f) in tests {
            for backend in [Backend::Uring, Backend::Epoll] {
                let full = format!("{}::{}::{name}", mode.name(), backend.name());
                if filter.as_deref().is_some_and(|f| !full.contains(f)) {
                    continue;
                }
                cases.push((full, mode, backend, f));
            }
        }
    }
    println!("\nrunning {} tests", cases.len());
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    let mut failures = Vec::new();
    for (name, mode, backend, f) in cases {
        if mode == StartMode::Fork
            && let Err(why) = &fork_ok
        {
            println!("test {name} ... FAILED: {why}");
            failures.push(name);
            failed += 1;
            continue;
        }
        ringipc::set_default_start_mode(mode);
        if backend == Backend::Uring
            && let Err(why) = &uring
        {
            println!("test {name} ... SKIPPED: the kernel refuses io_uring here: {why}");
            skipped += 1;
            continue;
        }
        let start = std::time::Instant::now();
        match std::panic::catch_unwind(|| f(backend)) {
            Ok(()) => {
                println!("test {name} ... ok ({:.2?})", start.elapsed());
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failures.push(name);
                failed += 1;
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:\n    {}", failures.join("\n    "));
    }
    println!(
        "\ntest result: {}. {passed} passed; {failed} failed; {skipped} ignored; 0 measured; 0 filtered out\n",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(101);
    }
}

/// Runs `fut` on a fresh current-thread runtime.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(fut)
}

/// The CPUs the calling thread may run on.
pub fn thread_affinity() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    assert_eq!(r, 0, "sched_getaffinity");
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect()
}
