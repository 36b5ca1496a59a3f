//! Child processes, on both backends: gipc's scenarios as Rust tests.
//! `harness = false`: `main` calls `ringipc::init()` first, so this very
//! binary can be re-executed as the children it starts.

mod common;

use ringipc::{
    Affinity, Backend, ChannelConfig, ErrorKind, ExitStatus, Process, Receiver, Sender, join_all,
    join_any,
};
use rkyv::{Archive, Deserialize, Serialize};
use std::future::Future;
use std::time::{Duration, Instant};

fn cfg(b: Backend) -> ChannelConfig {
    ChannelConfig::new().backend(b)
}

// ---- entry functions (run in children) ----

/// Sends `[n; 3]` on a sender that may hold the unwritten rest of a frame
/// (it goes first), then closes.
async fn finish_and_send(args: (Sender<Vec<u8>>, u8)) {
    let (mut tx, n) = args;
    tx.send(&vec![n; 3]).await.unwrap();
    tx.close().await.unwrap();
}

fn exit_with(code: i32) {
    std::process::exit(code);
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn panics(msg: String) {
    panic!("{msg}");
}

async fn sleep_then_42(ms: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    42
}

async fn add(pair: (u64, u64)) -> u64 {
    pair.0 + pair.1
}

async fn send_n(args: (Sender<u64>, u64)) {
    let (mut tx, n) = args;
    for i in 0..n {
        tx.feed(&i).await.unwrap();
    }
    tx.close().await.unwrap();
}

async fn sum_all(mut rx: Receiver<u64>) -> u64 {
    let mut sum = 0;
    loop {
        match rx.recv().await {
            Ok(m) => sum += m.to_native(),
            Err(e) if e.kind() == ErrorKind::Closed => return sum,
            Err(e) => panic!("{e}"),
        }
    }
}

async fn forward(args: (Receiver<String>, Sender<String>)) -> u32 {
    let (mut rx, mut tx) = args;
    let mut n = 0;
    while let Ok(m) = rx.recv().await {
        let s = format!("{}>", m.as_str());
        tx.send(&s).await.unwrap();
        n += 1;
    }
    n
}

#[derive(Archive, Serialize, Deserialize)]
struct Generation {
    depth: u32,
    backend: String,
    report: Sender<String>,
}

async fn generation(g: Generation) {
    if g.depth == 3 {
        let mut tx = g.report;
        tx.send(&format!(
            "hello from generation {} pid {}",
            g.depth,
            std::process::id()
        ))
        .await
        .unwrap();
        return;
    }
    let backend = Backend::parse(&g.backend).unwrap();
    let next = Generation {
        depth: g.depth + 1,
        backend: g.backend,
        report: g.report,
    };
    let mut child = Process::builder_async(generation)
        .arg(next)
        .backend(backend)
        .start()
        .unwrap();
    assert!(child.join().await.unwrap().success());
}

/// Nested handles: a vector of senders inside a struct inside an option.
#[derive(Archive, Serialize, Deserialize)]
struct Fanout {
    label: String,
    outs: Option<Vec<Sender<String>>>,
}

async fn fanout(f: Fanout) -> usize {
    let outs = f.outs.unwrap();
    let n = outs.len();
    for (i, mut tx) in outs.into_iter().enumerate() {
        tx.send(&format!("{} {i}", f.label)).await.unwrap();
    }
    n
}

async fn ping_side(args: (Sender<u32>, Receiver<u32>, bool)) -> u32 {
    let (mut tx, mut rx, first) = args;
    let mut last = 0;
    if first {
        tx.send(&0).await.unwrap();
    }
    loop {
        match rx.recv().await {
            Ok(m) => {
                let v = m.to_native();
                last = v;
                if v >= 100 {
                    return v;
                }
                if tx.send(&(v + 1)).await.is_err() {
                    return v;
                }
            }
            Err(_) => return last,
        }
    }
}

async fn list_fds(_: ()) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap() {
        let e = e.unwrap();
        if let Ok(target) = std::fs::read_link(e.path()) {
            out.push(format!(
                "{}={}",
                e.file_name().to_string_lossy(),
                target.display()
            ));
        }
    }
    out
}

async fn list_fds_with(rx: Receiver<u8>) -> Vec<String> {
    let fds = list_fds(()).await;
    drop(rx);
    fds
}

async fn affinity(_: ()) -> Vec<u32> {
    common::thread_affinity()
        .into_iter()
        .map(|c| c as u32)
        .collect()
}

async fn exit_early(mut rx: Receiver<Vec<u8>>) {
    let _ = rx.recv().await;
    std::process::exit(3);
}

async fn spawn_sleeper_and_report(mut report: Sender<u32>) {
    let child = Process::builder_async(sleep_ms)
        .arg(60_000)
        .on_drop(ringipc::OnDrop::Detach)
        .start()
        .unwrap();
    report.send(&child.pid()).await.unwrap();
    std::mem::forget(child);
    tokio::time::sleep(Duration::from_secs(60)).await;
}

async fn stream_forever(mut tx: Sender<Vec<u8>>) {
    let chunk = vec![5u8; 100_000];
    loop {
        tx.send(&chunk).await.unwrap();
    }
}

async fn recv_forever(mut rx: Receiver<Vec<u8>>) {
    while rx.recv().await.is_ok() {}
    tokio::time::sleep(Duration::from_secs(60)).await;
}

fn hello_stdout(_: ()) {
    use std::io::Write;
    let mut out = std::io::stdout();
    write!(out, "hello from the child").unwrap();
    out.flush().unwrap();
}

async fn recv_rest(mut rx: Receiver<u32>) -> Vec<u32> {
    let mut v = Vec::new();
    while let Ok(m) = rx.recv().await {
        v.push(m.to_native());
    }
    v
}

fn env_and_cwd(key: String) -> (Option<String>, String, Option<String>) {
    (
        std::env::var(&key).ok(),
        std::env::current_dir().unwrap().display().to_string(),
        std::env::var("RINGIPC_CHILD").ok(),
    )
}

fn hash_of_fresh_random_state(_: ()) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
}

fn stdin_len_then_stderr(_: ()) -> u64 {
    let mut input = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut input).unwrap();
    eprint!("to stderr");
    input.len() as u64
}

// ---- tests (run in the parent, once per backend) ----

fn exit_codes_and_signals(b: Backend) {
    common::block_on(async {
        for code in [0, 1, 7, 255] {
            let mut p = Process::builder(exit_with)
                .arg(code)
                .backend(b)
                .start()
                .unwrap();
            assert_eq!(p.join().await.unwrap(), ExitStatus::Code(code));
        }
        let mut p = Process::builder_async(sleep_ms)
            .arg(60_000)
            .backend(b)
            .start()
            .unwrap();
        p.kill().unwrap();
        assert_eq!(p.join().await.unwrap(), ExitStatus::Signal(libc::SIGKILL));
        let mut p = Process::builder_async(sleep_ms)
            .arg(60_000)
            .backend(b)
            .start()
            .unwrap();
        p.terminate().unwrap();
        assert_eq!(p.join().await.unwrap().signal(), Some(libc::SIGTERM));
        assert!(
            p.kill().is_ok(),
            "signalling a reaped child is not an error"
        );
    });
}

fn is_alive_before_and_after(b: Backend) {
    common::block_on(async {
        let mut p = Process::builder_async(sleep_ms)
            .arg(200)
            .backend(b)
            .start()
            .unwrap();
        assert!(p.is_alive());
        assert!(p.exit_status().is_none());
        assert!(p.join().await.unwrap().success());
        assert!(!p.is_alive());
        assert_eq!(p.exit_status(), Some(ExitStatus::Code(0)));

        // Polling until it is gone, then joining, still yields the value.
        let mut p = Process::builder_async(add)
            .arg((1, 2))
            .backend(b)
            .start()
            .unwrap();
        while p.is_alive() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(p.join().await.unwrap().success());
        assert_eq!(p.result().unwrap().to_native(), 3);
    });
}

fn join_timeout_on_sleeper(b: Backend) {
    common::block_on(async {
        let mut p = Process::builder_async(sleep_ms)
            .arg(60_000)
            .backend(b)
            .start()
            .unwrap();
        let t = Instant::now();
        let e = p
            .join_timeout(Duration::from_millis(100))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(p.is_alive());
        p.kill().unwrap();
        assert_eq!(
            p.join_timeout(Duration::from_secs(10))
                .await
                .unwrap()
                .signal(),
            Some(9)
        );
    });
}

fn return_value_and_panic(b: Backend) {
    common::block_on(async {
        let mut p = Process::builder_async(add)
            .arg((40, 2))
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.join_value().await.unwrap(), 42);
        assert_eq!(p.result().unwrap().to_native(), 42);

        let mut p = Process::builder(panics)
            .arg("boom at depth 1".to_string())
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(
            p.join().await.unwrap(),
            ExitStatus::Code(ringipc::EXIT_PANIC)
        );
        let e = p.result().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Panicked);
        assert!(e.to_string().contains("boom at depth 1"), "{e}");

        let mut p = Process::builder(exit_with)
            .arg(4)
            .backend(b)
            .start()
            .unwrap();
        p.join().await.unwrap();
        assert_eq!(p.result().unwrap_err().kind(), ErrorKind::Exited);
    });
}

fn three_generations(b: Backend) {
    common::block_on(async {
        let (tx, mut rx) = cfg(b).pipe::<String>().unwrap();
        let g = Generation {
            depth: 1,
            backend: b.name().into(),
            report: tx,
        };
        let mut p = Process::builder_async(generation)
            .arg(g)
            .backend(b)
            .start()
            .unwrap();
        let m = rx.recv_timeout(Duration::from_secs(20)).await.unwrap();
        assert!(
            m.as_str().starts_with("hello from generation 3"),
            "{}",
            m.as_str()
        );
        assert!(p.join().await.unwrap().success());
        assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
    });
}

fn channel_between_two_children(b: Backend) {
    common::block_on(async {
        let (tx, rx) = cfg(b).pipe::<u64>().unwrap();
        let mut producer = Process::builder_async(send_n)
            .arg((tx, 10_000))
            .backend(b)
            .start()
            .unwrap();
        let mut consumer = Process::builder_async(sum_all)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(
            consumer.join_value().await.unwrap(),
            (0..10_000u64).sum::<u64>()
        );
        assert!(producer.join().await.unwrap().success());
    });
}

fn two_children_sync_through_two_pipes(b: Backend) {
    common::block_on(async {
        let (a_tx, a_rx) = cfg(b).pipe::<u32>().unwrap();
        let (b_tx, b_rx) = cfg(b).pipe::<u32>().unwrap();
        let mut first = Process::builder_async(ping_side)
            .arg((a_tx, b_rx, true))
            .backend(b)
            .start()
            .unwrap();
        let mut second = Process::builder_async(ping_side)
            .arg((b_tx, a_rx, false))
            .backend(b)
            .start()
            .unwrap();
        let r = join_all(std::slice::from_mut(&mut first)).await;
        assert!(r[0].as_ref().unwrap().success());
        let v1 = first.result().unwrap().to_native();
        second.join().await.unwrap();
        let v2 = second.result().unwrap().to_native();
        assert_eq!(v1.max(v2), 100, "{v1} {v2}");
    });
}

fn hundred_messages_through_two_forwarders(b: Backend) {
    common::block_on(async {
        let (mut tx, rx1) = cfg(b).pipe::<String>().unwrap();
        let (tx1, rx2) = cfg(b).pipe::<String>().unwrap();
        let (tx2, mut rx) = cfg(b).pipe::<String>().unwrap();
        let mut f1 = Process::builder_async(forward)
            .arg((rx1, tx1))
            .backend(b)
            .start()
            .unwrap();
        let mut f2 = Process::builder_async(forward)
            .arg((rx2, tx2))
            .backend(b)
            .start()
            .unwrap();
        let send = async move {
            for i in 0..100 {
                tx.send(&format!("m{i}")).await.unwrap();
            }
        };
        let recv = async {
            for i in 0..100 {
                assert_eq!(rx.recv().await.unwrap().as_str(), format!("m{i}>>"));
            }
            assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
        };
        tokio::join!(send, recv);
        assert!(f1.join().await.unwrap().success());
        assert!(f2.join().await.unwrap().success());
        assert_eq!(f1.result().unwrap().to_native(), 100);
        assert_eq!(f2.result().unwrap().to_native(), 100);
    });
}

fn nested_handles_in_arguments(b: Backend) {
    common::block_on(async {
        let mut outs = Vec::new();
        let mut ins = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = cfg(b).pipe::<String>().unwrap();
            outs.push(tx);
            ins.push(rx);
        }
        let f = Fanout {
            label: "nested".into(),
            outs: Some(outs),
        };
        let mut p = Process::builder_async(fanout)
            .arg(f)
            .backend(b)
            .start()
            .unwrap();
        for (i, rx) in ins.iter_mut().enumerate() {
            assert_eq!(rx.recv().await.unwrap().as_str(), format!("nested {i}"));
        }
        assert_eq!(p.join_value().await.unwrap(), 3);
    });
}

fn child_exits_while_parent_writes(b: Backend) {
    common::block_on(async {
        let (mut tx, rx) = cfg(b).pipe::<Vec<u8>>().unwrap();
        let mut p = Process::builder_async(exit_early)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        let big = vec![0u8; 1 << 20];
        let mut err = None;
        for _ in 0..100 {
            if let Err(e) = tx.send(&big).await {
                err = Some(e);
                break;
            }
        }
        let e = err.expect("writes to a dead reader must fail");
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        assert_eq!(p.join().await.unwrap(), ExitStatus::Code(3));
    });
}

/// A sender handed to a child while a large inline frame is partly
/// written (it goes out in 128 KiB writes, one of them possibly in flight
/// when the parent lets go): the child writes the rest, then its own
/// message, and the parent reads both whole and in order.
fn sender_handed_over_mid_frame(b: Backend) {
    common::block_on(async {
        let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let (mut tx, mut rx) = cfg(b).arena(false).pipe::<Vec<u8>>().unwrap();
        // Larger than the pipe (1 MiB at most): the send cannot finish.
        let r = tokio::time::timeout(Duration::from_millis(20), tx.send(&big)).await;
        assert!(r.is_err(), "a 4 MiB frame cannot fit in the pipe");
        let mut child = Process::builder_async(finish_and_send)
            .arg((tx, 7u8))
            .backend(b)
            .start()
            .unwrap();
        let first = rx.recv().await.unwrap().to_vec();
        assert!(first == big, "the large frame arrived intact");
        assert_eq!(rx.recv().await.unwrap().to_vec(), vec![7u8; 3]);
        assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
        assert!(child.join().await.unwrap().success());
    });
}

fn pipe_inodes() -> std::collections::BTreeSet<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| t.starts_with("pipe:"))
        .collect()
}

fn only_passed_fds_are_inherited(b: Backend) {
    common::block_on(async {
        let path = std::env::temp_dir().join(format!("ringipc-fdtest-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        // A descriptor without close-on-exec, as C code might leave one.
        // SAFETY: dup of an open fd; closed below.
        let leaky = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(&file)) };
        assert!(leaky >= 0);
        let (other_r, _other_w) = std::io::pipe().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let before = pipe_inodes();
        // No arena: its memfd and notify pipe would be passed too (see
        // tests/arena_process.rs), and this test counts exactly one pipe.
        let (tx, rx) = cfg(b).arena(false).pipe::<u8>().unwrap();
        let passed: Vec<String> = pipe_inodes().difference(&before).cloned().collect();
        assert_eq!(passed.len(), 1, "{passed:?}");
        let mut p = Process::builder_async(list_fds_with)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        p.join().await.unwrap();
        let fds = p.result().unwrap().deserialize().unwrap();
        let text = fds.join(" ");
        assert!(
            !text.contains("ringipc-fdtest"),
            "the parent's file leaked: {text}"
        );
        assert!(
            !text.contains("socket:"),
            "the parent's socket leaked: {text}"
        );
        assert!(
            text.contains(&passed[0]),
            "the passed pipe is missing: {text}"
        );
        let other = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&other_r)
        ))
        .unwrap();
        assert!(
            !text.contains(&other.display().to_string()),
            "the parent's other pipe leaked: {text}"
        );
        // Beyond stdio: the passed pipe and the private control pipe, nothing else.
        let pipes = fds.iter().filter(|f| {
            f.contains("pipe:") && f.split('=').next().unwrap().parse::<u32>().unwrap() > 2
        });
        assert_eq!(pipes.count(), 2, "unexpected pipes in the child: {text}");
        drop((file, listener, tx));
        // SAFETY: closing the fd dup'ed above, owned by nobody else.
        unsafe { libc::close(leaky) };
        let _ = std::fs::remove_file(path);
    });
}

fn pinned_child(b: Backend) {
    common::block_on(async {
        let cores = ringipc_cores();
        let last = *cores.last().unwrap();
        let mut p = Process::builder_async(affinity)
            .arg(())
            .pin(Affinity::Core(last))
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.join_value().await.unwrap(), vec![last as u32]);
        let e = Process::builder_async(affinity)
            .arg(())
            .pin(Affinity::Core(4096))
            .backend(b)
            .start()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Spawn);
        assert!(e.to_string().contains("core 4096"), "{e}");
    });
}

fn ringipc_cores() -> Vec<usize> {
    common::thread_affinity()
}

fn fd_list() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            format!("{}={target}", e.file_name().to_string_lossy())
        })
        .collect()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let mut f = after.split(' ');
        let state = f.next().unwrap();
        let ppid = f.next().unwrap();
        if ppid == me && state == "Z" {
            z.push(pid);
        }
    }
    z
}

fn failed_start_leaks_nothing(b: Backend) {
    common::block_on(async {
        let before = fd_count();
        let (tx, _rx) = cfg(b).pipe::<u64>().unwrap();
        let e = Process::builder_async(send_n)
            .arg((tx, 1))
            .current_dir("/nonexistent/ringipc")
            .backend(b)
            .start()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Spawn, "{e}");
        drop(_rx);
        assert!(
            fd_count() <= before,
            "a failed start leaked fds: {:?}",
            fd_list()
        );
        assert!(zombie_children().is_empty());
    });
}

fn two_hundred_children(b: Backend) {
    common::block_on(async {
        let before = fd_count();
        let mut procs: Vec<Process<u64>> = (0..200)
            .map(|i| {
                Process::builder_async(add)
                    .arg((i, 1))
                    .backend(b)
                    .start()
                    .unwrap()
            })
            .collect();
        for (i, r) in join_all(&mut procs).await.into_iter().enumerate() {
            assert!(r.unwrap().success());
            assert_eq!(procs[i].result().unwrap().to_native(), i as u64 + 1);
        }
        drop(procs);
        assert!(
            zombie_children().is_empty(),
            "zombies: {:?}",
            zombie_children()
        );
        // No growth (an fd some earlier test left closing may go meanwhile).
        assert!(
            fd_count() <= before,
            "fds grew: {before} -> {:?}",
            fd_list()
        );
    });
}

fn join_any_returns_first(b: Backend) {
    common::block_on(async {
        let mut procs = vec![
            Process::builder_async(sleep_ms)
                .arg(60_000)
                .backend(b)
                .start()
                .unwrap(),
            Process::builder_async(sleep_ms)
                .arg(10)
                .backend(b)
                .start()
                .unwrap(),
        ];
        let (i, r) = join_any(&mut procs).await.unwrap();
        assert_eq!(i, 1);
        assert!(r.unwrap().success());
        assert!(procs[0].is_alive());
    });
}

fn drop_kills_and_reaps(b: Backend) {
    common::block_on(async {
        let p = Process::builder_async(sleep_ms)
            .arg(60_000)
            .backend(b)
            .start()
            .unwrap();
        let pid = p.pid();
        drop(p);
        assert!(
            gone_within(pid, Duration::from_secs(10)),
            "child {pid} survived its handle"
        );
    });
}

/// Whether `/proc/{pid}` disappears (the child is dead and reaped) in time.
fn gone_within(pid: u32, limit: Duration) -> bool {
    let path = format!("/proc/{pid}");
    let t = Instant::now();
    while std::path::Path::new(&path).exists() {
        if t.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    true
}

/// Dropped children, killed or detached, are reaped by one reaper thread:
/// no thread per child, no zombie left.
fn dropped_children_are_reaped_without_a_thread_each(b: Backend) {
    common::block_on(async {
        let start = |on_drop| {
            Process::builder_async(sleep_ms)
                .arg(60_000)
                .backend(b)
                .on_drop(on_drop)
                .start()
                .unwrap()
        };
        // Start one first: a start may start helper threads of its own.
        drop(start(ringipc::OnDrop::Kill));
        let threads = || std::fs::read_dir("/proc/self/task").unwrap().count();
        let before = threads();
        let mut pids = Vec::new();
        for on_drop in [ringipc::OnDrop::Detach, ringipc::OnDrop::Kill] {
            let children: Vec<_> = (0..12).map(|_| start(on_drop)).collect();
            pids.extend(children.iter().map(|c| c.pid()));
            drop(children);
        }
        // At most the reaper itself, if no earlier test started it.
        assert!(
            threads() <= before + 1,
            "{} threads, {before} before",
            threads()
        );
        for &pid in &pids[..12] {
            assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
            // SAFETY: kill(2) of our own detached child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for pid in pids {
            assert!(
                gone_within(pid, Duration::from_secs(10)),
                "{pid} not reaped"
            );
        }
        assert!(
            zombie_children().is_empty(),
            "zombies: {:?}",
            zombie_children()
        );
    });
}

fn parent_sigkill_takes_children(b: Backend) {
    common::block_on(async {
        let (tx, mut rx) = cfg(b).pipe::<u32>().unwrap();
        let mut mid = Process::builder_async(spawn_sleeper_and_report)
            .arg(tx)
            .backend(b)
            .start()
            .unwrap();
        let grandchild = rx
            .recv_timeout(Duration::from_secs(20))
            .await
            .unwrap()
            .to_native();
        let alive = |pid: u32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
                .unwrap_or(false)
        };
        assert!(alive(grandchild));
        mid.kill().unwrap();
        mid.join().await.unwrap();
        let t = Instant::now();
        while alive(grandchild) && t.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !alive(grandchild),
            "grandchild {grandchild} outlived its parent by a second"
        );
    });
}

fn buffered_receiver_handed_over(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = cfg(b).pipe::<u32>().unwrap();
        for i in 0..10 {
            tx.feed(&i).await.unwrap();
        }
        tx.flush().await.unwrap();
        // One read takes all ten frames; only two are delivered here, the
        // other eight sit in the receiver's buffer and must move with it.
        assert_eq!(rx.recv().await.unwrap().to_native(), 0);
        assert_eq!(rx.try_recv().unwrap().unwrap().to_native(), 1);
        let mut p = Process::builder_async(recv_rest)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        for i in 10..20 {
            tx.send(&i).await.unwrap();
        }
        drop(tx);
        assert_eq!(p.join_value().await.unwrap(), (2..20).collect::<Vec<u32>>());

        // A receiver with a read in flight (on uring: `try_recv` found nothing
        // and left its read submitted) is settled before it moves.
        let (mut tx, mut rx) = cfg(b).pipe::<u32>().unwrap();
        assert!(rx.try_recv().unwrap().is_none());
        let mut p = Process::builder_async(recv_rest)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        for i in 0..5 {
            tx.send(&i).await.unwrap();
        }
        drop(tx);
        assert_eq!(p.join_value().await.unwrap(), (0..5).collect::<Vec<u32>>());
    });
}

fn child_killed_mid_stream(b: Backend) {
    common::block_on(async {
        let (tx, mut rx) = cfg(b).pipe::<Vec<u8>>().unwrap();
        let mut p = Process::builder_async(stream_forever)
            .arg(tx)
            .backend(b)
            .start()
            .unwrap();
        for _ in 0..5 {
            assert_eq!(rx.recv().await.unwrap().len(), 100_000);
        }
        p.kill().unwrap();
        assert_eq!(p.join().await.unwrap(), ExitStatus::Signal(libc::SIGKILL));
        let e = loop {
            match rx.recv_timeout(Duration::from_secs(10)).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(e.kind(), ErrorKind::Closed | ErrorKind::Truncated),
            "{e}"
        );

        let (mut tx, rx) = cfg(b).pipe::<Vec<u8>>().unwrap();
        let mut p = Process::builder_async(recv_forever)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        tx.send(&vec![1u8; 10]).await.unwrap();
        p.kill().unwrap();
        assert_eq!(p.join().await.unwrap().signal(), Some(libc::SIGKILL));
        // A killed child's io_uring releases its files in a kernel worker,
        // so its read end can outlive the reap for a moment: the sends
        // fail with Closed soon after, never later than this bound.
        let t = Instant::now();
        let e = loop {
            match tx.send(&vec![1u8; 10]).await {
                Err(e) => break e,
                Ok(()) if t.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(()) => panic!("the pipe outlived its killed reader by 10 s"),
            }
        };
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    });
}

fn piped_stdout(b: Backend) {
    common::block_on(async {
        let mut p = Process::builder(hello_stdout)
            .arg(())
            .stdout(ringipc::ChildStdio::Piped)
            .stdin(ringipc::ChildStdio::Null)
            .backend(b)
            .start()
            .unwrap();
        let mut out = p.take_stdout().expect("piped stdout");
        let mut text = String::new();
        std::io::Read::read_to_string(&mut out, &mut text).unwrap();
        assert_eq!(text, "hello from the child");
        assert!(p.join().await.unwrap().success());
    });
}

/// A join left pending on a thread that then exits (its io_uring requests
/// are cancelled by the kernel) finishes on another thread with the child's
/// return value.
fn join_pending_on_exited_thread(b: Backend) {
    let p = Process::builder_async(sleep_then_42)
        .arg(300)
        .backend(b)
        .start()
        .unwrap();
    let mut p = std::thread::spawn(move || {
        let mut p = p;
        common::block_on(async {
            let e = p.join_timeout(Duration::from_millis(30)).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        });
        p
    })
    .join()
    .unwrap();
    common::block_on(async {
        assert!(p.join().await.unwrap().success());
        assert_eq!(p.result().unwrap().to_native(), 42);
    });
}

fn started_in_the_default_mode(b: Backend) {
    common::block_on(async {
        let mut p = Process::builder_async(add)
            .arg((1, 2))
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.started_by(), ringipc::default_start_mode());
        assert_eq!(p.join_value().await.unwrap(), 3);
        let mut p = Process::builder_async(add)
            .arg((2, 2))
            .start_mode(ringipc::StartMode::Exec)
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.started_by(), ringipc::StartMode::Exec);
        assert_eq!(p.join_value().await.unwrap(), 4);
    });
}

fn terminate_right_after_start(b: Backend) {
    common::block_on(async {
        // A signal sent before the child has run a single instruction of
        // its own must act, not be lost (the fork server keeps SIGTERM
        // blocked, never ignored, for this).
        for _ in 0..20 {
            let mut p = Process::builder_async(sleep_ms)
                .arg(60_000)
                .backend(b)
                .start()
                .unwrap();
            p.terminate().unwrap();
            let status = p.join_timeout(Duration::from_secs(20)).await.unwrap();
            assert_eq!(status.signal(), Some(libc::SIGTERM));
        }
    });
}

fn env_and_cwd_as_of_start(b: Backend) {
    common::block_on(async {
        let key = format!("RINGIPC_TEST_LATE_{}", b.name());
        // SAFETY: the harness runs one test at a time and nothing else in
        // this process reads the environment meanwhile.
        unsafe { std::env::set_var(&key, "set-after-init") };
        let before = std::env::current_dir().unwrap();
        let dir = std::env::temp_dir().canonicalize().unwrap();
        std::env::set_current_dir(&dir).unwrap();
        let started = Process::builder(env_and_cwd)
            .arg(key.clone())
            .backend(b)
            .start();
        std::env::set_current_dir(&before).unwrap();
        let mut p = started.unwrap();
        let (value, cwd, marker) = p.join_value().await.unwrap();
        assert_eq!(value.as_deref(), Some("set-after-init"));
        assert_eq!(cwd, dir.display().to_string());
        assert_eq!(marker, None, "the child's start marker leaked into its env");

        let mut p = Process::builder(env_and_cwd)
            .arg(key.clone())
            .env(&key, "from-builder")
            .current_dir("/")
            .backend(b)
            .start()
            .unwrap();
        let (value, cwd, _) = p.join_value().await.unwrap();
        assert_eq!(value.as_deref(), Some("from-builder"));
        assert_eq!(cwd, "/");

        let mut p = Process::builder(env_and_cwd)
            .arg(key.clone())
            .env_remove(&key)
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.join_value().await.unwrap().0, None);
        // SAFETY: as above.
        unsafe { std::env::remove_var(&key) };
    });
}

fn random_state_differs_between_siblings(b: Backend) {
    common::block_on(async {
        let start = || {
            Process::builder(hash_of_fresh_random_state)
                .arg(())
                .backend(b)
                .start()
                .unwrap()
        };
        let (mut x, mut y) = (start(), start());
        let (hx, hy) = (x.join_value().await.unwrap(), y.join_value().await.unwrap());
        assert_ne!(hx, hy, "two children share std's HashMap keys");
    });
}

fn server_holds_no_application_fds(b: Backend) {
    common::block_on(async {
        // A handle passed to a child: once the child is gone, nobody (not
        // the fork server that forwarded it) may hold its write end.
        let (tx, mut rx) = cfg(b).pipe::<u64>().unwrap();
        let mut p = Process::builder_async(send_n)
            .arg((tx, 3))
            .backend(b)
            .start()
            .unwrap();
        for i in 0..3 {
            let m = rx.recv_timeout(Duration::from_secs(20)).await.unwrap();
            assert_eq!(m.to_native(), i);
        }
        let e = rx.recv_timeout(Duration::from_secs(20)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        assert!(p.join().await.unwrap().success());
        // A pipe made after init: EOF as soon as this side drops its end.
        let (tx, mut rx) = cfg(b).pipe::<u64>().unwrap();
        drop(tx);
        let e = rx.recv_timeout(Duration::from_secs(20)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        if let Some(pid) = ringipc::fork_server_pid() {
            let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .unwrap()
                .flatten()
                .map(|e| {
                    let t = std::fs::read_link(e.path()).unwrap_or_default();
                    format!("{}={}", e.file_name().to_string_lossy(), t.display())
                })
                .collect();
            assert_eq!(
                fds.len(),
                1,
                "the fork server holds more than its socket: {fds:?}"
            );
            assert!(fds[0].contains("socket:"), "{fds:?}");
        }
    });
}

fn stdio_piped_null_and_file(b: Backend) {
    common::block_on(async {
        let path = std::env::temp_dir().join(format!(
            "ringipc-stderr-{}-{}",
            std::process::id(),
            b.name()
        ));
        let file = std::fs::File::create(&path).unwrap();
        let mut p = Process::builder(stdin_len_then_stderr)
            .arg(())
            .stdin(ringipc::ChildStdio::Piped)
            .stderr(file)
            .backend(b)
            .start()
            .unwrap();
        let mut stdin = p.take_stdin().expect("piped stdin");
        std::io::Write::write_all(&mut stdin, b"abcd").unwrap();
        drop(stdin);
        assert_eq!(p.join_value().await.unwrap(), 4);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "to stderr");
        let _ = std::fs::remove_file(&path);

        let mut p = Process::builder(stdin_len_then_stderr)
            .arg(())
            .stdin(ringipc::ChildStdio::Null)
            .stderr(ringipc::ChildStdio::Null)
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.join_value().await.unwrap(), 0);
    });
}

fn main() {
    ringipc::init();
    common::harness(&[
        ("exit_codes_and_signals", exit_codes_and_signals),
        ("is_alive_before_and_after", is_alive_before_and_after),
        ("join_timeout_on_sleeper", join_timeout_on_sleeper),
        ("return_value_and_panic", return_value_and_panic),
        ("three_generations", three_generations),
        ("channel_between_two_children", channel_between_two_children),
        (
            "two_children_sync_through_two_pipes",
            two_children_sync_through_two_pipes,
        ),
        (
            "hundred_messages_through_two_forwarders",
            hundred_messages_through_two_forwarders,
        ),
        ("nested_handles_in_arguments", nested_handles_in_arguments),
        (
            "child_exits_while_parent_writes",
            child_exits_while_parent_writes,
        ),
        ("sender_handed_over_mid_frame", sender_handed_over_mid_frame),
        (
            "only_passed_fds_are_inherited",
            only_passed_fds_are_inherited,
        ),
        ("pinned_child", pinned_child),
        ("failed_start_leaks_nothing", failed_start_leaks_nothing),
        ("two_hundred_children", two_hundred_children),
        ("join_any_returns_first", join_any_returns_first),
        ("drop_kills_and_reaps", drop_kills_and_reaps),
        (
            "dropped_children_are_reaped_without_a_thread_each",
            dropped_children_are_reaped_without_a_thread_each,
        ),
        (
            "parent_sigkill_takes_children",
            parent_sigkill_takes_children,
        ),
        (
            "buffered_receiver_handed_over",
            buffered_receiver_handed_over,
        ),
        ("child_killed_mid_stream", child_killed_mid_stream),
        ("piped_stdout", piped_stdout),
        (
            "join_pending_on_exited_thread",
            join_pending_on_exited_thread,
        ),
        ("started_in_the_default_mode", started_in_the_default_mode),
        ("terminate_right_after_start", terminate_right_after_start),
        ("env_and_cwd_as_of_start", env_and_cwd_as_of_start),
        (
            "random_state_differs_between_siblings",
            random_state_differs_between_siblings,
        ),
        (
            "server_holds_no_application_fds",
            server_holds_no_application_fds,
        ),
        ("stdio_piped_null_and_file", stdio_piped_null_and_file),
        (
            "oversized_result_is_a_typed_error",
            oversized_result_is_a_typed_error,
        ),
        (
            "join_keeps_the_outcome_across_transient_errors",
            join_keeps_the_outcome_across_transient_errors,
        ),
    ]);
}

// ---- bounded control pipe, join that keeps the outcome (issue 11) ----

async fn big_vec(n: u64) -> Vec<u8> {
    vec![7; n as usize]
}

fn oversized_result_is_a_typed_error(b: Backend) {
    common::block_on(async {
        let mut p = Process::builder_async(big_vec)
            .arg(2 << 20)
            .max_result_size(1 << 20)
            .backend(b)
            .start()
            .unwrap();
        let e = p.join_value().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        assert!(e.to_string().contains("exceeds the limit"), "{e}");
        let mut p = Process::builder_async(big_vec)
            .arg(512 << 10)
            .max_result_size(1 << 20)
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.join_value().await.unwrap().len(), 512 << 10);
    });
}

fn join_keeps_the_outcome_across_transient_errors(b: Backend) {
    let mut p = Process::builder_async(sleep_then_42)
        .arg(300)
        .backend(b)
        .start()
        .unwrap();
    {
        // Outside any runtime: an error (epoll needs a runtime) or pending.
        let mut join = std::pin::pin!(p.join());
        let r = join
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        if let std::task::Poll::Ready(r) = r {
            assert!(r.is_err(), "joined a sleeping child: {r:?}");
        }
    }
    common::block_on(async {
        let e = p.join_timeout(Duration::from_millis(20)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut);
        assert!(p.join().await.unwrap().success());
        assert_eq!(p.result().unwrap().to_native(), 42);
    });
}
