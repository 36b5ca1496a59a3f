//! The arena across processes, on both backends: channel ends handed to
//! children mid-stream with messages still in the arena, and peers killed
//! while writing or while holding slots.
//! `harness = false`: `main` calls `ringipc::init()` first, so this very
//! binary can be re-executed as the children it starts.

mod common;

use ringipc::{Backend, ChannelConfig, ErrorKind, Process, Receiver, Sender};
use std::time::Duration;

fn cfg(b: Backend) -> ChannelConfig {
    ChannelConfig::new()
        .backend(b)
        .arena_size(512 << 10)
        .arena_threshold(4096)
}

fn payload(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 1) as u8)
        .collect()
}

fn intact(seed: u64, got: &[u8]) -> bool {
    got == payload(seed, got.len()).as_slice()
}

// ---- entry functions (run in children) ----

/// Receives until Closed; returns how many arrived intact, in order. The
/// channel crossed a process boundary, so (trust model) every message must
/// have been copied out of the arena before it was validated.
async fn count_intact(mut rx: Receiver<(u64, Vec<u8>)>) -> u64 {
    let span = rx
        .arena_span()
        .expect("the arena travels with the receiver");
    let mut n = 0;
    loop {
        match rx.recv().await {
            Ok(m) => {
                assert_eq!(m.0.to_native(), n, "out of order");
                assert!(intact(n, &m.1), "message {n} corrupted");
                let p = m.bytes().as_ptr() as usize;
                assert!(
                    !span.contains(&p),
                    "message {n} read in place across processes"
                );
                n += 1;
            }
            Err(e) if e.kind() == ErrorKind::Closed => return n,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Sends `count` messages numbered from `first`.
async fn send_from(args: (Sender<(u64, Vec<u8>)>, u64, u64)) {
    let (mut tx, first, count) = args;
    for i in first..first + count {
        tx.send(&(i, payload(i, 100_000))).await.unwrap();
    }
    tx.close().await.unwrap();
}

/// Sends large messages until the channel breaks.
async fn send_forever(mut tx: Sender<(u64, Vec<u8>)>) {
    let mut i = 0;
    while tx.send(&(i, payload(i, 200_000))).await.is_ok() {
        i += 1;
    }
}

/// Receives and keeps every message, then sleeps.
async fn hold_forever(mut rx: Receiver<(u64, Vec<u8>)>) {
    let mut held = Vec::new();
    while let Ok(m) = rx.recv_owned().await {
        held.push(m);
    }
    tokio::time::sleep(Duration::from_secs(3600)).await;
}

// ---- tests ----

/// A receiver handed to a child while descriptors of arena messages are
/// still unread in the pipe: the child reads them (copied out of the
/// arena), then the ones sent after the hand-over.
fn receiver_handed_over_mid_stream(b: Backend) {
    common::block_on(async {
        let (mut tx, rx) = cfg(b).pipe::<(u64, Vec<u8>)>().unwrap();
        for i in 0..4 {
            tx.send(&(i, payload(i, 100_000))).await.unwrap();
        }
        let mut child = Process::builder_async(count_intact)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        for i in 4..40 {
            tx.send(&(i, payload(i, 100_000))).await.unwrap();
        }
        tx.close().await.unwrap();
        assert_eq!(child.join_value().await.unwrap(), 40);
    });
}

/// A sender handed to a child while the parent's receiver holds a slot:
/// the child never reuses it, and its messages arrive after the parent's.
fn sender_handed_over_mid_stream(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = cfg(b).pipe::<(u64, Vec<u8>)>().unwrap();
        tx.send(&(0, payload(0, 100_000))).await.unwrap();
        tx.send(&(1, payload(1, 100_000))).await.unwrap();
        let held = rx.recv_owned().await.unwrap();
        let mut child = Process::builder_async(send_from)
            .arg((tx, 2, 30))
            .backend(b)
            .start()
            .unwrap();
        for i in 1..32 {
            let m = rx.recv().await.unwrap();
            assert_eq!(m.0.to_native(), i);
            assert!(intact(i, &m.1), "message {i} corrupted");
            assert!(intact(0, &held.1), "a held slot was reused");
        }
        assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
        assert!(child.join().await.unwrap().success());
    });
}

/// The sender killed while writing: the receiver gets Closed or Truncated
/// promptly, after whole messages only.
fn sender_killed_mid_write(b: Backend) {
    common::block_on(async {
        let (tx, mut rx) = cfg(b).pipe::<(u64, Vec<u8>)>().unwrap();
        let mut child = Process::builder_async(send_forever)
            .arg(tx)
            .backend(b)
            .start()
            .unwrap();
        for i in 0..5 {
            let m = rx.recv().await.unwrap();
            assert!(intact(i, &m.1));
        }
        child.kill().unwrap();
        let end = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match rx.recv().await {
                    Ok(m) => assert!(intact(m.0.to_native(), &m.1)),
                    Err(e) => return e,
                }
            }
        })
        .await
        .expect("the receiver hung after its sender was killed");
        assert!(
            matches!(end.kind(), ErrorKind::Closed | ErrorKind::Truncated),
            "{end}"
        );
        child.join().await.unwrap();
    });
}

/// The receiver killed while holding every slot: the sender, waiting for
/// space, gets Closed promptly. (A child only holds slots in the trusted
/// in-place mode; by default it copies each message out and frees at once.)
fn receiver_killed_holding_slots(b: Backend) {
    common::block_on(async {
        // SAFETY: both ends run this test binary's code, which never writes
        // a slot after sending it.
        let trusted = unsafe { cfg(b).arena_in_place_across_processes() };
        let (mut tx, rx) = trusted.pipe::<(u64, Vec<u8>)>().unwrap();
        let mut child = Process::builder_async(hold_forever)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        let pid = child.pid();
        let sending = async {
            for i in 0..1000 {
                if let Err(e) = tx.send(&(i, payload(i, 100_000))).await {
                    return (i, e);
                }
            }
            panic!("1000 messages of 100 kB fit in a 512 KiB arena held by the receiver");
        };
        let killer = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            // SAFETY: kill(2) with a pid of our own unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        };
        let ((sent, e), ()) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(sending, killer)
        })
        .await
        .expect("the sender hung after its receiver was killed");
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        assert!(sent >= 4, "only {sent} sent before the arena filled");
        child.join().await.unwrap();
    });
}

/// No shared memory or fds leak across 1,000 channel lifetimes.
fn no_leak_across_lifetimes(b: Backend) {
    common::block_on(async {
        let cfg = ChannelConfig::new().backend(b);
        fn arenas() -> usize {
            std::fs::read_to_string("/proc/self/maps")
                .unwrap()
                .lines()
                .filter(|l| l.contains("ringipc-arena"))
                .count()
        }
        fn fds() -> usize {
            std::fs::read_dir("/proc/self/fd").unwrap().count()
        }
        // Warm up (runtime, ring, reactor), then measure.
        {
            let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
            tx.send(&payload(0, 100_000)).await.unwrap();
            rx.recv_owned().await.unwrap();
        }
        let (m0, f0) = (arenas(), fds());
        for i in 0..1000u64 {
            let (mut tx, mut rx) = cfg.arena_size(256 << 10).pipe::<Vec<u8>>().unwrap();
            tx.send(&payload(i, 40_000)).await.unwrap();
            let owned = rx.recv_owned().await.unwrap();
            if i % 2 == 0 {
                drop(rx); // the message outlives its receiver
            }
            assert!(intact(i, &owned));
        }
        assert!(
            arenas() <= m0,
            "arena mappings leaked: {} -> {}",
            m0,
            arenas()
        );
        assert!(fds() <= f0, "fds leaked: {} -> {}", f0, fds());
    });
}

fn main() {
    ringipc::init();
    common::harness(&[
        (
            "receiver_handed_over_mid_stream",
            receiver_handed_over_mid_stream,
        ),
        (
            "sender_handed_over_mid_stream",
            sender_handed_over_mid_stream,
        ),
        ("sender_killed_mid_write", sender_killed_mid_write),
        (
            "receiver_killed_holding_slots",
            receiver_killed_holding_slots,
        ),
        ("no_leak_across_lifetimes", no_leak_across_lifetimes),
    ]);
}
