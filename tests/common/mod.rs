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

/// The runner of `harness = false` test binaries, whose `main` must call
/// `ringipc::init()` first so they can start children. Each test runs once
/// per start mode (fork server, re-exec) and backend, as
/// `fork::uring::name`. It speaks libtest's command line (libtest-mimic):
/// filters, `--exact`, `--skip`, `--list`, `--ignored`, so
/// `cargo test -- --list` lists and cargo-nextest runs every case. Cases run
/// one at a time on the main thread, whatever `--test-threads` says: they
/// set the process-wide start mode, and some count the process's threads
/// and fds. A uring case whose kernel refuses io_uring is reported ignored,
/// with the reason.
pub fn harness(tests: &[Test]) {
    use libtest_mimic::{Arguments, Completion, Failed, Trial};
    let mut args = Arguments::from_args();
    args.test_threads = Some(1);
    let uring = ringipc::uring_probe().map_err(|why| why.to_string());
    // The fork cases must fork: a server missing here (init ran late, or
    // RINGIPC_START=exec) would make them re-exec cases under another name.
    let fork_ok = match ringipc::fork_server_pid() {
        Some(_) => Ok(()),
        None => Err(format!(
            "no fork server (default start mode {})",
            ringipc::default_start_mode().name()
        )),
    };
    let mut trials = Vec::new();
    for mode in [StartMode::Fork, StartMode::Exec] {
        for &(name, f) in tests {
            for backend in [Backend::Uring, Backend::Epoll] {
                let full = format!("{}::{}::{name}", mode.name(), backend.name());
                let (uring, fork_ok) = (uring.clone(), fork_ok.clone());
                trials.push(Trial::ignorable_test(full, move || {
                    if mode == StartMode::Fork
                        && let Err(why) = fork_ok
                    {
                        return Err(Failed::from(why));
                    }
                    if backend == Backend::Uring
                        && let Err(why) = uring
                    {
                        let why = format!("the kernel refuses io_uring here: {why}");
                        eprintln!("SKIPPED: {why}");
                        return Ok(Completion::ignored_with(why));
                    }
                    ringipc::set_default_start_mode(mode);
                    f(backend);
                    Ok(Completion::Completed)
                }));
            }
        }
    }
    libtest_mimic::run(&args, trials).exit();
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
