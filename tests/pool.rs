//! The thread-per-core engine and the worker pool, on both backends.
//! `harness = false` so pool workers (children) can re-execute this binary.

mod common;

use ringipc::{Backend, ChannelConfig, DeathCause, Engine, ErrorKind, ExitStatus, Fd, Pool};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn affinity_of_this_thread() -> Vec<usize> {
    common::thread_affinity()
}

fn all_cores() -> Vec<usize> {
    affinity_of_this_thread()
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The thread count once threads of earlier tests that are still exiting
/// have gone: the same count twice, 20 ms apart (bounded).
fn settled_thread_count() -> usize {
    let mut last = thread_count();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        let now = thread_count();
        if now == last {
            return now;
        }
        last = now;
    }
    last
}

/// Asserts the thread count comes back to `threads`. A joined thread can
/// stay listed in /proc/self/task for a moment (the kernel wakes `join`
/// before it has released the task), so this waits for it, with a bound.
fn assert_threads_back_to(threads: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while thread_count() > threads && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        thread_count() <= threads,
        "{what}: {} threads, {threads} before",
        thread_count()
    );
}

// ---- engine ----

fn engine_on_all_cores(b: Backend) {
    let threads = settled_thread_count();
    let engine = Engine::builder().backend(b).build().unwrap();
    assert_eq!(engine.cores(), all_cores());
    assert_eq!(engine.backend(), b);
    let seen = engine
        .block_on_all(|core| async move {
            let name = std::thread::current().name().unwrap().to_string();
            (
                core,
                affinity_of_this_thread(),
                name,
                Backend::Auto.resolve().unwrap(),
            )
        })
        .unwrap();
    for (core, aff, name, backend) in seen {
        assert_eq!(aff, vec![core], "core thread {core} is not pinned");
        assert_eq!(name, format!("ringipc-core-{core}"));
        assert_eq!(
            backend, b,
            "Auto on an engine thread means the engine's backend"
        );
    }
    drop(engine);
    assert_threads_back_to(threads, "engine threads leaked");
}

fn engine_on_one_core(b: Backend) {
    let core = *all_cores().last().unwrap();
    let engine = Engine::builder().cores([core]).backend(b).build().unwrap();
    assert_eq!(
        engine
            .block_on(move || async move { affinity_of_this_thread() })
            .unwrap(),
        vec![core]
    );
    let other = common::block_on(engine.run_on(core + 1000, || async {})).unwrap_err();
    assert_eq!(other.kind(), ErrorKind::Unsupported);
    let e = Engine::builder()
        .cores([4096])
        .backend(b)
        .build()
        .err()
        .unwrap();
    assert!(e.to_string().contains("4096"), "{e}");
}

fn engine_panic_is_an_error(b: Backend) {
    let threads = settled_thread_count();
    let engine = Engine::builder().backend(b).build().unwrap();
    let core = engine.cores()[0];
    let e = common::block_on(engine.run_on(core, || async { panic!("core task exploded") }))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Panicked);
    assert!(e.to_string().contains("core task exploded"), "{e}");
    // The core keeps serving, and shutdown is clean.
    assert_eq!(
        common::block_on(engine.run_on(core, || async { 5 })).unwrap(),
        5
    );
    engine.shutdown();
    assert_threads_back_to(threads, "engine threads leaked after a panic");
}

fn channels_between_cores(b: Backend) {
    let engine = Engine::builder().backend(b).build().unwrap();
    let cores = engine.cores();
    let (first, last) = (cores[0], *cores.last().unwrap());
    let (mut tx, mut rx) = ChannelConfig::new().backend(b).pipe::<u64>().unwrap();
    let sender = engine.run_on(first, move || async move {
        for i in 0..10_000u64 {
            tx.feed(&i).await.unwrap();
        }
        tx.close().await.unwrap();
    });
    let receiver = engine.run_on(last, move || async move {
        let mut sum = 0;
        while let Ok(m) = rx.recv().await {
            sum += m.to_native();
        }
        sum
    });
    let (s, r) = common::block_on(async { tokio::join!(sender, receiver) });
    s.unwrap();
    assert_eq!(r.unwrap(), (0..10_000u64).sum::<u64>());
}

// ---- pool handlers (run in worker children) ----

fn square(x: u64) -> u64 {
    x * x
}

fn where_am_i(_: ()) -> (u32, Vec<u32>) {
    (
        std::process::id(),
        affinity_of_this_thread()
            .into_iter()
            .map(|c| c as u32)
            .collect(),
    )
}

async fn slow_echo(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    ms
}

fn tagged(id: u64) -> (u64, u64) {
    // A little real work so kills land mid-job too.
    let mut h = id;
    for _ in 0..2_000 {
        h = h.wrapping_mul(6364136223846793005).wrapping_add(1);
    }
    (id, h)
}

fn panics_on_13(x: u64) -> u64 {
    if x == 13 {
        panic!("unlucky {x}");
    }
    x
}

/// `n` bytes of a pattern that depends on `n`, or a panic for `n == 13`.
fn pattern(n: u64) -> Vec<u8> {
    if n == 13 {
        panic!("unlucky {n}");
    }
    (0..n).map(|i| (i as u8) ^ (n as u8)).collect()
}

/// Forks a grandchild that keeps the worker's pipes open for 30 s, then
/// the worker dies: only its pidfd tells the pool.
fn fork_then_die(_: u64) -> u64 {
    // SAFETY: fork in a worker; the grandchild only sleeps and _exits.
    match unsafe { libc::fork() } {
        0 => {
            std::thread::sleep(Duration::from_secs(30));
            // SAFETY: leave without running the worker's destructors.
            unsafe { libc::_exit(0) }
        }
        // SAFETY: die without answering.
        _ => unsafe { libc::_exit(7) },
    }
}

/// For `x > 0`, writes a forged result pair (for a job nobody sent) to
/// every pipe this worker may write, then answers normally. (Job 0 first,
/// so the result stream has begun.)
fn forge_result(x: u64) -> u64 {
    if x == 0 {
        return 0;
    }
    let mut enc = ringipc::framing::Encoder::resume(1 << 20, true, &[]);
    enc.push(&[]).unwrap();
    let mut header = vec![0u8; 32];
    header[0..8].copy_from_slice(&u64::MAX.to_le_bytes());
    enc.push(&header).unwrap();
    let bytes = enc.pending().to_vec();
    for fd in 3..256 {
        // SAFETY: fstat/fcntl/write on fd numbers that may or may not be open.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::fstat(fd, &mut st) != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
                continue;
            }
            if libc::fcntl(fd, libc::F_GETFL) & libc::O_ACCMODE != libc::O_WRONLY {
                continue;
            }
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        }
    }
    x
}

// ---- pool tests ----

fn pool_results_and_ordered_map(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(square)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        assert_eq!(pool.call(7).await.unwrap().to_native(), 49);
        let mut results = pool.map(0..200u64);
        let mut i = 0u64;
        while let Some(r) = results.next().await {
            assert_eq!(r.unwrap().to_native(), i * i);
            i += 1;
        }
        assert_eq!(i, 200);
        let done: u64 = pool.stats().iter().map(|s| s.jobs_done).sum();
        assert_eq!(done, 201);
        pool.shutdown().await.unwrap();
    });
}

/// Results of every size, large ones (through the result pipe's arena)
/// mixed with small ones and with panics (which send no value): each call
/// gets its own bytes.
fn pool_large_results(b: Backend) {
    check_large_results(b);
}

/// The same with the arena turned off by the process default: large
/// results go over the pipe.
fn pool_large_results_without_arena(b: Backend) {
    let before = ChannelConfig::new();
    ChannelConfig::builtin().arena(false).set_process_default();
    check_large_results(b);
    before.set_process_default();
}

fn check_large_results(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(pattern)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        let sizes: Vec<u64> = (0..60u64)
            .map(|i| match i % 6 {
                0 => 1 << 20,
                1 => 64,
                2 => 13,
                3 => 4 << 20,
                4 => 40_000 + i,
                _ => 0,
            })
            .collect();
        let mut results = pool.map(sizes.clone());
        let mut held = Vec::new();
        for &n in &sizes {
            let r = results.next().await.expect("one result per job");
            if n == 13 {
                let e = r.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Panicked, "{e}");
                continue;
            }
            let m = r.unwrap();
            assert_eq!(m.len() as u64, n);
            assert!(
                m.iter()
                    .enumerate()
                    .all(|(i, &x)| x == (i as u8) ^ (n as u8))
            );
            // Keep some results alive while later ones arrive.
            if held.len() < 8 {
                held.push(m);
            }
        }
        assert!(results.next().await.is_none());
        drop(held);
        // The workers are still in step after all of that.
        assert_eq!(pool.call(5).await.unwrap().len(), 5);
        let failed: u64 = pool.stats().iter().map(|s| s.jobs_failed).sum();
        assert_eq!(failed, 10);
        pool.shutdown().await.unwrap();
    });
}

fn pool_workers_are_pinned(b: Backend) {
    common::block_on(async {
        let cores = all_cores();
        let pool = Pool::builder(where_am_i).backend(b).build().await.unwrap();
        assert_eq!(
            pool.workers(),
            cores.len(),
            "one worker per core by default"
        );
        let mut seen = HashSet::new();
        for s in pool.stats() {
            assert_eq!(s.core, Some(cores[s.worker]));
        }
        for _ in 0..(cores.len() * 20) {
            let r = pool.call(()).await.unwrap().deserialize().unwrap();
            assert_eq!(r.1.len(), 1, "worker not pinned: {:?}", r.1);
            seen.insert((r.0, r.1[0]));
        }
        let pinned: HashSet<u32> = seen.iter().map(|(_, c)| *c).collect();
        assert!(pinned.iter().all(|c| cores.contains(&(*c as usize))));
        pool.shutdown().await.unwrap();
    });
}

fn pool_backpressure(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(1)
            .max_in_flight(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        let mut calls = Vec::new();
        for _ in 0..6 {
            let p = pool.clone();
            calls.push(tokio::spawn(async move { p.call(100).await }));
        }
        let t = Instant::now();
        let mut max_seen = 0;
        while t.elapsed() < Duration::from_millis(250) {
            max_seen = max_seen.max(pool.stats()[0].in_flight);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert!(max_seen <= 2, "bound exceeded: {max_seen}");
        assert_eq!(max_seen, 2, "the bound was never reached");
        let e = pool.try_call(1).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy);
        for c in calls {
            assert_eq!(c.await.unwrap().unwrap().to_native(), 100);
        }
        pool.shutdown().await.unwrap();
    });
}

fn pool_job_panic_keeps_worker(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(panics_on_13)
            .workers(1)
            .backend(b)
            .build()
            .await
            .unwrap();
        let e = pool.call(13).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Panicked);
        assert!(e.to_string().contains("unlucky 13"), "{e}");
        assert_eq!(pool.call(14).await.unwrap().to_native(), 14);
        let s = &pool.stats()[0];
        assert_eq!((s.restarts, s.jobs_failed, s.jobs_done), (0, 1, 1));
        pool.shutdown().await.unwrap();
    });
}

/// 10,000 jobs while workers are SIGKILLed at random: every job ends in its
/// own correct result or in `WorkerDied`, none twice, none missing.
fn pool_crash_recovery_accounts_for_every_job(b: Backend) {
    common::block_on(async {
        const JOBS: u64 = 10_000;
        let pool = Pool::builder(tagged)
            .workers(2)
            .max_in_flight(8)
            .backend(b)
            .build()
            .await
            .unwrap();
        let killer_pool = pool.clone();
        let killer = tokio::spawn(async move {
            let mut seed = 0x9e3779b97f4a7c15u64;
            for _ in 0..6 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                tokio::time::sleep(Duration::from_millis(5 + seed % 30)).await;
                let stats = killer_pool.stats();
                let victim = &stats[(seed % stats.len() as u64) as usize];
                // SAFETY: plain kill(2) of our own worker.
                unsafe { libc::kill(victim.pid as i32, libc::SIGKILL) };
            }
        });
        let mut results = pool.map(0..JOBS);
        let (mut ok, mut died, mut id) = (0u64, 0u64, 0u64);
        while let Some(r) = results.next().await {
            match r {
                Ok(m) => {
                    assert_eq!(m.0.to_native(), id, "result for the wrong job");
                    assert_eq!(m.deserialize().unwrap(), tagged(id));
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
                    assert!(e.to_string().contains("worker"), "{e}");
                    died += 1;
                }
            }
            id += 1;
        }
        killer.await.unwrap();
        assert_eq!(ok + died, JOBS);
        let stats = pool.stats();
        let restarts: u64 = stats.iter().map(|s| s.restarts).sum();
        let done: u64 = stats.iter().map(|s| s.jobs_done).sum();
        let failed: u64 = stats.iter().map(|s| s.jobs_failed).sum();
        assert!(restarts >= 1, "no worker was restarted: {stats:?}");
        assert_eq!(done, ok, "{stats:?}");
        assert_eq!(failed, died, "{stats:?}");
        eprintln!("    {ok} ok, {died} lost with their worker, {restarts} restarts");
        pool.shutdown().await.unwrap();
    });
}

fn pool_shutdown_drains_in_flight(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(2)
            .max_in_flight(4)
            .backend(b)
            .build()
            .await
            .unwrap();
        let pids: Vec<u32> = pool.stats().iter().map(|s| s.pid).collect();
        let mut calls = Vec::new();
        for i in 0..16 {
            let p = pool.clone();
            calls.push(tokio::spawn(async move { p.call(20 + i).await }));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let closer = pool.clone();
        drop(pool);
        closer.shutdown().await.unwrap();
        for (i, c) in calls.into_iter().enumerate() {
            let r = c.await.unwrap();
            match r {
                Ok(v) => assert_eq!(v.to_native(), 20 + i as u64),
                // A call that had not reached the pool when it closed.
                Err(e) => assert_eq!(e.kind(), ErrorKind::Closed, "{e}"),
            }
        }
        for pid in pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "worker {pid} still running"
            );
        }
    });
}

fn engine_panic_before_the_future(b: Backend) {
    let engine = Engine::builder().backend(b).build().unwrap();
    let core = engine.cores()[0];
    let make = || -> std::future::Ready<()> { panic!("panicked while building the future") };
    let e = common::block_on(engine.run_on(core, make)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Panicked, "{e}");
    assert_eq!(engine.block_on(|| async { 1 }).unwrap(), 1, "the core died");
    // Blocking inside async code is refused, not a deadlock.
    let e = common::block_on(async { engine.block_on(|| async {}) }).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

/// Calls abandoned by a timeout free their slots once their jobs end, and
/// the pool still serves and shuts down.
fn pool_cancelled_calls_do_not_leak(b: Backend) {
    // One job at a time, and three side by side (`concurrency`).
    for concurrency in [1, 3] {
        cancelled_calls_do_not_leak(b, concurrency);
    }
}

fn cancelled_calls_do_not_leak(b: Backend, concurrency: usize) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(1)
            .concurrency(concurrency)
            .max_in_flight(concurrency.max(2))
            .backend(b)
            .build()
            .await
            .unwrap();
        for _ in 0..20 {
            let r = tokio::time::timeout(Duration::from_millis(1), pool.call(20)).await;
            assert!(r.is_err(), "a 20 ms job answered within 1 ms");
        }
        let v = tokio::time::timeout(Duration::from_secs(10), pool.call(1))
            .await
            .expect("pool hung");
        assert_eq!(v.unwrap().to_native(), 1);
        let t = Instant::now();
        while pool.stats()[0].in_flight > 0 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.stats()[0].in_flight, 0, "slots leaked");
        tokio::time::timeout(Duration::from_secs(10), pool.shutdown())
            .await
            .expect("shutdown hung")
            .unwrap();
    });
}

/// A pool whose runtime is gone fails calls instead of hanging them.
fn pool_outliving_its_runtime_fails_calls(b: Backend) {
    let pool = std::thread::spawn(move || {
        common::block_on(Pool::builder(square).workers(1).backend(b).build()).unwrap()
    })
    .join()
    .unwrap();
    common::block_on(async {
        let r = tokio::time::timeout(Duration::from_secs(10), pool.call(3))
            .await
            .expect("call hung");
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
    });
}

/// A job past its timeout fails with `TimedOut`, its worker is killed and
/// restarted, the other jobs it held fail with `WorkerDied`, and the pool
/// serves on. The clock starts when the worker starts the job.
fn pool_job_timeout_restarts_the_worker(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(1)
            .max_in_flight(3)
            .job_timeout(Duration::from_millis(300))
            .backend(b)
            .build()
            .await
            .unwrap();
        let pid = pool.stats()[0].pid;
        let stuck = {
            let p = pool.clone();
            tokio::spawn(async move { p.call(60_000).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let behind = {
            let p = pool.clone();
            tokio::spawn(async move { p.call(1).await })
        };
        let e = tokio::time::timeout(Duration::from_secs(20), stuck)
            .await
            .expect("a timed-out job hung")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        let e = behind.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
        assert!(e.to_string().contains("timed out"), "{e}");
        assert_eq!(pool.call(5).await.unwrap().to_native(), 5);
        let s = &pool.stats()[0];
        assert_eq!((s.timeouts, s.restarts), (1, 1), "{s:?}");
        assert_ne!(s.pid, pid);
        let death = s.last_death.as_ref().expect("a death is recorded");
        assert_eq!(death.pid, pid);
        assert!(
            matches!(death.cause, DeathCause::JobTimedOut { .. }),
            "{death:?}"
        );
        assert_eq!(death.status, Some(ExitStatus::Signal(libc::SIGKILL)));

        // Per call: a queued job's clock starts when its worker starts it.
        let first = {
            let p = pool.clone();
            tokio::spawn(async move { p.call_timeout(600, Duration::from_secs(3)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = pool.call_timeout(600, Duration::from_secs(1)).await;
        assert_eq!(second.unwrap().to_native(), 600, "queue time was counted");
        assert_eq!(first.await.unwrap().unwrap().to_native(), 600);
        let e = pool
            .call_timeout(60_000, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert_eq!(pool.stats()[0].timeouts, 2);
        pool.shutdown().await.unwrap();
    });
}

/// `shutdown_timeout` kills workers still busy at its deadline, fails
/// their jobs, and says so.
fn pool_shutdown_deadline_kills_busy_workers(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        let pids: Vec<u32> = pool.stats().iter().map(|s| s.pid).collect();
        let stuck = {
            let p = pool.clone();
            tokio::spawn(async move { p.call(60_000).await })
        };
        let quick = {
            let p = pool.clone();
            tokio::spawn(async move { p.call(10).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = tokio::time::timeout(
            Duration::from_secs(20),
            pool.shutdown_timeout(Duration::from_millis(300)),
        )
        .await
        .expect("shutdown ignored its deadline")
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("1 jobs"), "{e}");
        assert_eq!(quick.await.unwrap().unwrap().to_native(), 10);
        let e = stuck.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
        assert!(e.to_string().contains("shutdown deadline"), "{e}");
        for pid in pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "worker {pid} still running"
            );
        }
    });
}

/// A worker that dies while a grandchild keeps its pipes open is seen
/// through its pidfd: its job fails now, not when the grandchild exits.
fn pool_worker_death_seen_through_pidfd(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(fork_then_die)
            .workers(1)
            .backend(b)
            .build()
            .await
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), pool.call(0))
            .await
            .expect("a dead worker's job hung")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
        let s = &pool.stats()[0];
        let death = s.last_death.as_ref().expect("a death is recorded");
        assert_eq!(death.cause, DeathCause::Exited);
        assert_eq!(death.status, Some(ExitStatus::Code(7)));
        drop(pool);
    });
}

/// A job is never routed to a worker that has exited but whose supervisor
/// has not run since (the runtime is busy here): the pidfd is checked.
fn pool_skips_a_dead_worker_not_yet_noticed(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(square)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        assert_eq!(pool.call(2).await.unwrap().to_native(), 4);
        let pid = pool.stats()[0].pid;
        // SAFETY: kill(2) of our own worker.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        // Block this (current-thread) runtime until the worker is a zombie,
        // so its supervisor cannot have noticed.
        let stat = format!("/proc/{pid}/stat");
        let t = Instant::now();
        while !std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z "))
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::yield_now();
        }
        for i in 0..4 {
            assert_eq!(pool.call(i).await.unwrap().to_native(), i * i, "job {i}");
        }
        pool.shutdown().await.unwrap();
    });
}

/// `kill_worker` and `restart_worker` act by index through the pidfd; a
/// restart lets the worker's jobs finish first.
fn pool_kill_and_restart_worker_by_index(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        let before: Vec<u32> = pool.stats().iter().map(|s| s.pid).collect();
        pool.kill_worker(0).unwrap();
        let t = Instant::now();
        while pool.stats()[0].restarts == 0 && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let s = pool.stats()[0].clone();
        assert_eq!(s.restarts, 1, "{s:?}");
        assert_ne!(s.pid, before[0]);
        let death = s.last_death.expect("a death is recorded");
        assert_eq!((death.pid, death.cause), (before[0], DeathCause::Killed));
        assert_eq!(death.status, Some(ExitStatus::Signal(libc::SIGKILL)));

        // A worker gets a 300 ms job, then a graceful restart: the job ends
        // well, and the new worker takes jobs when restart_worker returns.
        let job = {
            let p = pool.clone();
            tokio::spawn(async move { p.call(300).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let busy = pool.stats().iter().position(|s| s.in_flight == 1).unwrap();
        let (pid, restarts) = (pool.stats()[busy].pid, pool.stats()[busy].restarts);
        pool.restart_worker(busy).await.unwrap();
        assert_eq!(job.await.unwrap().unwrap().to_native(), 300);
        let s = pool.stats()[busy].clone();
        assert_eq!(s.restarts, restarts + 1, "{s:?}");
        assert_ne!(s.pid, pid);
        let death = s.last_death.expect("a death is recorded");
        assert_eq!(death.cause, DeathCause::Restarted);
        assert_eq!(death.status, Some(ExitStatus::Code(0)));
        assert_eq!(pool.call(3).await.unwrap().to_native(), 3);

        let e = pool.kill_worker(2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        let e = pool.restart_worker(9).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        pool.shutdown().await.unwrap();
    });
}

/// A graceful restart still waiting for its worker's job when the pool shuts
/// down is answered `Closed`, not left hanging (the caller's own pool handle
/// keeps the pool's state alive).
fn pool_restart_worker_answers_when_shutdown_comes_first(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(1)
            .backend(b)
            .build()
            .await
            .unwrap();
        let job = {
            let p = pool.clone();
            tokio::spawn(async move { p.call(5_000).await })
        };
        while pool.stats()[0].in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let restart = {
            let p = pool.clone();
            tokio::spawn(async move { p.restart_worker(0).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let e = pool
            .shutdown_timeout(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        let e = tokio::time::timeout(Duration::from_secs(10), restart)
            .await
            .expect("restart_worker hung after the pool shut down")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        let e = job.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
    });
}

/// A result for a job the worker was not running ends that worker instead
/// of being ignored (or answering someone else's call).
fn pool_rejects_a_result_for_another_job(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(forge_result)
            .workers(1)
            .backend(b)
            .build()
            .await
            .unwrap();
        assert_eq!(pool.call(0).await.unwrap().to_native(), 0);
        let e = tokio::time::timeout(Duration::from_secs(10), pool.call(1))
            .await
            .expect("hung")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
        assert!(e.to_string().contains("was not running"), "{e}");
        let death = pool.stats()[0].last_death.clone().expect("a death");
        assert!(matches!(death.cause, DeathCause::Protocol(_)), "{death:?}");
        drop(pool);
    });
}

/// The sum of a job's bytes and its length.
fn sum_job(data: Vec<u8>) -> (u64, u64) {
    (data.iter().map(|&b| b as u64).sum(), data.len() as u64)
}

/// Large jobs go through the job pipe's arena (one copy into a slot), many
/// at once so slots are reused, after a run of calls dropped mid-way; one larger than the whole arena (16 MiB)
/// goes inline over the pipe. Each arrives whole.
fn pool_large_jobs_through_the_arena(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(sum_job)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        let job = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        let want = |v: &Vec<u8>| (v.iter().map(|&b| b as u64).sum::<u64>(), v.len() as u64);
        // Calls dropped mid-way (some before, some after their job was
        // queued) leave no arena slot taken: the rounds below still run.
        for seed in 0..32u8 {
            let v = job(1 << 20, seed);
            let _ =
                tokio::time::timeout(Duration::from_micros(seed as u64 * 50), pool.call(v)).await;
        }
        let calls: Vec<_> = (0..48u8)
            .map(|seed| {
                let p = pool.clone();
                let v = job((1 << 20) + seed as usize * 4099, seed);
                let w = want(&v);
                tokio::spawn(async move {
                    let r = p.call(v).await.unwrap();
                    ((r.0.to_native(), r.1.to_native()), w)
                })
            })
            .collect();
        for c in calls {
            let ((sum, len), (wsum, wlen)) = c.await.unwrap();
            assert_eq!((sum, len), (wsum, wlen));
        }
        let big = job(20 << 20, 7);
        let w = want(&big);
        let got = pool.call(big).await.unwrap();
        assert_eq!((got.0.to_native(), got.1.to_native()), w);
        pool.shutdown().await.unwrap();
    });
}

/// A request on a connection handed to the worker: reads a u32 and answers
/// it plus `add` on the same connection; `add == u32::MAX` dies first.
fn answer((add, conn): (u32, Fd<std::net::TcpStream>)) -> u32 {
    use std::io::{Read, Write};
    if add == u32::MAX {
        std::process::abort();
    }
    let mut conn = conn.0;
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    let x = u32::from_le_bytes(buf);
    conn.write_all(&(x + add).to_le_bytes()).unwrap();
    x
}

fn fds_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Closes with a reset, so 10,000 connections leave no TIME_WAIT behind.
fn close_now(s: std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `l` is a valid linger value of the size passed.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Accepted connections travel to workers inside jobs: each worker answers
/// its client directly (the parent copies no request or answer bytes), fd
/// counts stay flat in the parent and the workers over 10,000 connections,
/// and a worker killed mid-request fails that one call and connection
/// while the next is served.
fn pool_jobs_carry_connections(b: Backend) {
    use std::io::{Read, Write};
    common::block_on(async {
        let pool = Pool::builder(answer)
            .workers(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let one = |i: u32| {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            client.write_all(&i.to_le_bytes()).unwrap();
            let (conn, _) = listener.accept().unwrap();
            (client, conn)
        };
        let mut before = None;
        for i in 0..10_000u32 {
            if i == 100 {
                let workers: Vec<usize> = pool.stats().iter().map(|s| fds_of(s.pid)).collect();
                before = Some((fds_of(std::process::id()), workers));
            }
            let (mut client, conn) = one(i);
            let got = pool.call((1, Fd(conn))).await.unwrap();
            assert_eq!(got.to_native(), i);
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).unwrap();
            assert_eq!(u32::from_le_bytes(buf), i + 1);
            close_now(client);
        }
        let (parent, workers) = before.unwrap();
        assert_eq!(fds_of(std::process::id()), parent, "the parent leaked fds");
        let now: Vec<usize> = pool.stats().iter().map(|s| fds_of(s.pid)).collect();
        assert_eq!(now, workers, "a worker leaked fds");
        assert_eq!(pool.stats().iter().map(|s| s.restarts).sum::<u64>(), 0);

        // A worker dies holding a connection: that call fails, its client
        // sees the connection end, and the next connection is served.
        let (mut client, conn) = one(7);
        let e = pool.call((u32::MAX, Fd(conn))).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
        let mut buf = [0u8; 4];
        // A reset, since the request was never read; or a plain end.
        match client.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("the connection outlived its worker: {other:?}"),
        }
        let (mut client, conn) = one(8);
        assert_eq!(pool.call((2, Fd(conn))).await.unwrap().to_native(), 8);
        client.read_exact(&mut buf).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 10);
        pool.shutdown().await.unwrap();
    });
}

/// Two jobs that need each other: each writes a byte to its end of a
/// socket pair and then reads the other's, so neither can end unless both
/// run at once. Returns its role.
async fn rendezvous((role, end): (u8, Fd<std::os::unix::net::UnixStream>)) -> u8 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    end.0.set_nonblocking(true).unwrap();
    let mut end = tokio::net::UnixStream::from_std(end.0).unwrap();
    end.write_all(&[role]).await.unwrap();
    let mut other = [0u8; 1];
    end.read_exact(&mut other).await.unwrap();
    assert_eq!(other[0], 1 - role);
    role
}

/// A worker with `concurrency(n)` runs up to n async jobs at once: two jobs
/// that each wait for the other complete (one at a time, the first would
/// wait forever).
fn pool_concurrent_jobs_run_side_by_side(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(rendezvous)
            .workers(1)
            .concurrency(2)
            .backend(b)
            .build()
            .await
            .unwrap();
        for _ in 0..20 {
            let (x, y) = std::os::unix::net::UnixStream::pair().unwrap();
            let first = {
                let p = pool.clone();
                tokio::spawn(async move { p.call((0, Fd(x))).await })
            };
            let second = tokio::time::timeout(Duration::from_secs(20), pool.call((1, Fd(y))))
                .await
                .expect("the jobs never ran side by side")
                .unwrap();
            assert_eq!(*second, 1);
            let first = tokio::time::timeout(Duration::from_secs(20), first)
                .await
                .expect("the jobs never ran side by side")
                .unwrap()
                .unwrap();
            assert_eq!(*first, 0);
        }
        let s = &pool.stats()[0];
        assert_eq!(
            (s.jobs_done, s.jobs_failed, s.restarts),
            (40, 0, 0),
            "{s:?}"
        );
        pool.shutdown().await.unwrap();
    });
}

/// With jobs running side by side, a job that times out fails alone with
/// `TimedOut`, a job that ended before it is answered, the jobs still
/// running beside it fail with `WorkerDied` (the worker is killed), and
/// the restarted worker serves the next call. Shutdown lets running jobs
/// finish.
fn pool_concurrent_job_timeout_and_drain(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder_async(slow_echo)
            .workers(1)
            .concurrency(3)
            .backend(b)
            .build()
            .await
            .unwrap();
        let call = |ms: u64, timeout: Option<Duration>| {
            let p = pool.clone();
            tokio::spawn(async move {
                match timeout {
                    Some(t) => p.call_timeout(ms, t).await,
                    None => p.call(ms).await,
                }
            })
        };
        let stuck = call(60_000, Some(Duration::from_secs(1)));
        let quick = call(50, None);
        let beside = call(60_000, None);
        // Answered while the stuck job runs.
        assert_eq!(quick.await.unwrap().unwrap().to_native(), 50);
        let e = stuck.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        let e = beside.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WorkerDied, "{e}");
        assert_eq!(pool.call(5).await.unwrap().to_native(), 5);
        let s = &pool.stats()[0];
        assert_eq!((s.timeouts, s.restarts), (1, 1), "{s:?}");

        // Three jobs running at once when shutdown comes: all finish.
        let running: Vec<_> = (0..3).map(|_| call(300, None)).collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        pool.shutdown().await.unwrap();
        for r in running {
            assert_eq!(r.await.unwrap().unwrap().to_native(), 300);
        }
    });
}

fn sleep_sync(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// A sync handler holds its worker's thread, so `concurrency` does not
/// apply: jobs run one at a time, and a queued job's timeout counts from
/// when it starts, not from when the jobs ahead of it started.
fn pool_sync_handlers_run_one_job_at_a_time(b: Backend) {
    common::block_on(async {
        let pool = Pool::builder(sleep_sync)
            .workers(1)
            .concurrency(3)
            .backend(b)
            .build()
            .await
            .unwrap();
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let p = pool.clone();
                tokio::spawn(async move { p.call_timeout(500, Duration::from_millis(1200)).await })
            })
            .collect();
        for c in calls {
            assert_eq!(c.await.unwrap().unwrap().to_native(), 500);
        }
        assert_eq!(pool.stats()[0].timeouts, 0);
        pool.shutdown().await.unwrap();
    });
}

fn main() {
    ringipc::init();
    common::harness(&[
        ("engine_on_all_cores", engine_on_all_cores),
        (
            "pool_concurrent_jobs_run_side_by_side",
            pool_concurrent_jobs_run_side_by_side,
        ),
        (
            "pool_concurrent_job_timeout_and_drain",
            pool_concurrent_job_timeout_and_drain,
        ),
        (
            "pool_sync_handlers_run_one_job_at_a_time",
            pool_sync_handlers_run_one_job_at_a_time,
        ),
        ("engine_on_one_core", engine_on_one_core),
        ("engine_panic_is_an_error", engine_panic_is_an_error),
        ("channels_between_cores", channels_between_cores),
        ("pool_results_and_ordered_map", pool_results_and_ordered_map),
        ("pool_workers_are_pinned", pool_workers_are_pinned),
        ("pool_large_results", pool_large_results),
        (
            "pool_large_results_without_arena",
            pool_large_results_without_arena,
        ),
        ("pool_backpressure", pool_backpressure),
        ("pool_job_panic_keeps_worker", pool_job_panic_keeps_worker),
        (
            "pool_crash_recovery_accounts_for_every_job",
            pool_crash_recovery_accounts_for_every_job,
        ),
        (
            "pool_shutdown_drains_in_flight",
            pool_shutdown_drains_in_flight,
        ),
        (
            "engine_panic_before_the_future",
            engine_panic_before_the_future,
        ),
        (
            "pool_cancelled_calls_do_not_leak",
            pool_cancelled_calls_do_not_leak,
        ),
        (
            "pool_outliving_its_runtime_fails_calls",
            pool_outliving_its_runtime_fails_calls,
        ),
        (
            "pool_job_timeout_restarts_the_worker",
            pool_job_timeout_restarts_the_worker,
        ),
        (
            "pool_shutdown_deadline_kills_busy_workers",
            pool_shutdown_deadline_kills_busy_workers,
        ),
        (
            "pool_worker_death_seen_through_pidfd",
            pool_worker_death_seen_through_pidfd,
        ),
        (
            "pool_skips_a_dead_worker_not_yet_noticed",
            pool_skips_a_dead_worker_not_yet_noticed,
        ),
        (
            "pool_kill_and_restart_worker_by_index",
            pool_kill_and_restart_worker_by_index,
        ),
        (
            "pool_restart_worker_answers_when_shutdown_comes_first",
            pool_restart_worker_answers_when_shutdown_comes_first,
        ),
        (
            "pool_rejects_a_result_for_another_job",
            pool_rejects_a_result_for_another_job,
        ),
        ("pool_jobs_carry_connections", pool_jobs_carry_connections),
        (
            "pool_large_jobs_through_the_arena",
            pool_large_jobs_through_the_arena,
        ),
    ]);
}
