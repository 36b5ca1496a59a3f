//! The shared-memory arena of typed channels, in one process, on both
//! backends. (Handoff to children and killed peers: tests/arena_process.rs.)

mod common;

use ringipc::framing::{Descriptor, FrameKind};
use ringipc::{ChannelConfig, ErrorKind, OwnedMessage};
use std::time::Duration;

/// A payload whose every byte depends on `seed`, so a mix-up shows.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) >> 1) as u8)
        .collect()
}

fn check(seed: u64, got: &[u8]) {
    let want = payload(seed, got.len());
    assert!(got == want.as_slice(), "payload {seed} corrupted");
}

fn inside(span: &std::ops::Range<usize>, bytes: &[u8]) -> bool {
    let p = bytes.as_ptr() as usize;
    span.contains(&p) && p + bytes.len() <= span.end
}

/// A large message is read in place: its bytes lie inside the arena
/// mapping. A small one stays inline (in the receive buffer).
async fn large_read_in_place_small_inline(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let span = rx
        .arena_span()
        .expect("typed channels have an arena by default");
    tx.send(&payload(1, 1 << 20)).await.unwrap();
    tx.send(&payload(2, 100)).await.unwrap();
    {
        let m = rx.recv().await.unwrap();
        assert_eq!(m.len(), 1 << 20);
        check(1, &m);
        assert!(
            inside(&span, m.as_slice()),
            "1 MiB message was not read in place"
        );
    }
    let m = rx.recv().await.unwrap();
    check(2, &m);
    assert!(
        !inside(&span, m.as_slice()),
        "100 B message went through the arena"
    );
}

/// With the arena off, nothing maps one and large messages still arrive.
async fn arena_off_is_inline(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.arena(false).pipe::<Vec<u8>>().unwrap();
    assert!(rx.arena_span().is_none());
    let send = async move { tx.send(&payload(3, 1 << 20)).await.unwrap() };
    let recv = async move { check(3, &rx.recv().await.unwrap()) };
    tokio::join!(send, recv);
}

/// A slot is reused only after the message holding it is dropped: while an
/// OwnedMessage holds one, later messages land elsewhere and it stays intact.
async fn slot_reused_only_after_drop(cfg: ChannelConfig) {
    let cfg = cfg.arena_size(256 << 10).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    tx.send(&payload(10, 60_000)).await.unwrap();
    let held: OwnedMessage<Vec<u8>> = rx.recv_owned().await.unwrap();
    let held_range = {
        let p = held.as_slice().as_ptr() as usize;
        p..p + held.len()
    };
    for i in 0..40 {
        tx.send(&payload(100 + i, 50_000)).await.unwrap();
        let m = rx.recv().await.unwrap();
        check(100 + i, &m);
        let p = m.as_slice().as_ptr() as usize;
        assert!(
            p + m.len() <= held_range.start || p >= held_range.end,
            "message {i} reused a slot still held"
        );
    }
    check(10, &held);
    let freed = held_range.clone();
    drop(held);
    // Now the space comes back: some later message lands on it.
    let mut reused = false;
    for i in 0..10 {
        tx.send(&payload(200 + i, 50_000)).await.unwrap();
        let m = rx.recv().await.unwrap();
        check(200 + i, &m);
        let p = m.as_slice().as_ptr() as usize;
        reused |= p < freed.end && p + m.len() > freed.start;
    }
    assert!(reused, "a freed slot was never used again");
}

/// 100k messages of random sizes across the threshold arrive whole and in
/// order, with sender and receiver running concurrently.
async fn random_sizes_in_order(cfg: ChannelConfig) {
    const N: u64 = 100_000;
    let cfg = cfg.arena_size(1 << 20).arena_threshold(8 << 10);
    let (mut tx, mut rx) = cfg.pipe::<(u64, Vec<u8>)>().unwrap();
    let size = |i: u64| {
        let r = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
        if r.is_multiple_of(5) {
            (r % (64 << 10)) as usize
        } else {
            (r % 2048) as usize
        }
    };
    let send = async move {
        for i in 0..N {
            let n = size(i);
            let mut v = vec![0u8; n];
            if n > 1 {
                v[0] = i as u8;
                v[n - 1] = (i >> 8) as u8;
            }
            tx.feed(&(i, v)).await.unwrap();
        }
        tx.close().await.unwrap();
    };
    let recv = async move {
        let mut arena = 0;
        let span = rx.arena_span().unwrap();
        for i in 0..N {
            let m = rx.recv().await.unwrap();
            assert_eq!(m.0.to_native(), i, "out of order");
            let n = size(i);
            assert_eq!(m.1.len(), n);
            if n > 1 {
                assert_eq!(
                    (m.1[0], m.1[n - 1]),
                    (i as u8, (i >> 8) as u8),
                    "message {i} of {n} bytes, in arena: {}, at {:#x} (arena {:x?})",
                    inside(&span, m.bytes()),
                    m.bytes().as_ptr() as usize,
                    span
                );
            }
            if inside(&span, m.bytes()) {
                arena += 1;
            }
        }
        assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
        arena
    };
    let ((), arena) = tokio::join!(send, recv);
    assert!(arena > 1000, "only {arena} messages used the arena");
}

/// A full arena makes the sender wait (memory stays at the arena's size);
/// a send cancelled while it waits queues nothing; a drop wakes it.
async fn full_arena_backpressure_and_cancel(cfg: ChannelConfig) {
    let cfg = cfg.arena_size(512 << 10).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let mut held = Vec::new();
    let mut sent = 0u64;
    // Fill the arena while the receiver holds every message.
    loop {
        match tokio::time::timeout(Duration::from_millis(100), tx.send(&payload(sent, 100_000)))
            .await
        {
            Ok(r) => r.unwrap(),
            Err(_) => break,
        }
        sent += 1;
        held.push(rx.recv_owned().await.unwrap());
        assert!(sent < 100, "the sender never waited for space");
    }
    assert!(sent >= 4, "only {sent} messages of 100 kB fit in 512 KiB");
    // The cancelled send queued nothing.
    assert!(rx.try_recv().unwrap().is_none());
    // Drop one from another task while the sender waits: it proceeds.
    let first = held.remove(0);
    let waiter = async {
        tx.send(&payload(1000, 100_000)).await.unwrap();
    };
    let freer = async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
    };
    tokio::join!(waiter, freer);
    check(1000, &rx.recv().await.unwrap());
    for (i, m) in held.iter().enumerate() {
        check(i as u64 + 1, m);
    }
}

/// A receiver that keeps up slowly: sender and receiver both finish, the
/// sender waiting for space many times (no lost wake-up).
async fn slow_receiver_no_lost_wakeup(cfg: ChannelConfig) {
    const N: u64 = 300;
    let cfg = cfg.arena_size(256 << 10).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let send = async move {
        for i in 0..N {
            tx.send(&payload(i, 90_000)).await.unwrap();
        }
    };
    let recv = async move {
        for i in 0..N {
            let m = rx.recv_owned().await.unwrap();
            tokio::task::yield_now().await;
            check(i, &m);
        }
    };
    tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(send, recv) })
        .await
        .expect("sender or receiver hung");
}

/// Across threads and runtimes: the sender waits on one runtime, the
/// receiver frees on another thread.
async fn across_threads(cfg: ChannelConfig) {
    const N: u64 = 200;
    let cfg = cfg.arena_size(256 << 10).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let t = std::thread::spawn(move || {
        common::block_on(async move {
            for i in 0..N {
                check(i, &rx.recv().await.unwrap());
            }
        })
    });
    for i in 0..N {
        tx.send(&payload(i, 100_000)).await.unwrap();
    }
    drop(tx);
    t.join().unwrap();
}

/// Messages larger than the whole arena still arrive (inline), in order
/// with arena messages around them.
async fn larger_than_arena(cfg: ChannelConfig) {
    let cfg = cfg.arena_size(64 << 10).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let sizes = [10_000usize, 3 << 20, 20_000, 65_536, 200, 1 << 20];
    let send = async move {
        for (i, n) in sizes.iter().enumerate() {
            tx.send(&payload(i as u64, *n)).await.unwrap();
        }
    };
    let recv = async move {
        for (i, n) in sizes.iter().enumerate() {
            let m = rx.recv().await.unwrap();
            assert_eq!(m.len(), *n);
            check(i as u64, &m);
        }
    };
    tokio::join!(send, recv);
}

/// Many large messages held at once, each in its own slot, all intact.
async fn many_held_at_once(cfg: ChannelConfig) {
    let cfg = cfg.arena_size(8 << 20).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let span = rx.arena_span().unwrap();
    let mut held = Vec::new();
    for i in 0..100 {
        tx.send(&payload(i, 40_000)).await.unwrap();
        let m = rx.recv_owned().await.unwrap();
        assert!(inside(&span, m.bytes()));
        held.push(m);
    }
    let mut starts: Vec<usize> = held.iter().map(|m| m.bytes().as_ptr() as usize).collect();
    starts.sort_unstable();
    starts.dedup();
    assert_eq!(starts.len(), 100);
    for (i, m) in held.iter().enumerate() {
        check(i as u64, m);
    }
    // Owned messages move to other threads and free from there.
    std::thread::spawn(move || drop(held)).join().unwrap();
    tx.send(&payload(7, 6 << 20)).await.unwrap();
    check(7, &rx.recv().await.unwrap());
}

/// Descriptor frames are untrusted: out of bounds, misaligned, out of
/// sequence, overlapping a held slot, malformed, or on a channel without an
/// arena are Protocol errors, and the receiver stays failed.
async fn hostile_descriptors(cfg: ChannelConfig) {
    let arena = 1 << 20;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        (
            "beyond the end",
            Descriptor {
                offset: arena as u64,
                len: 16,
                seq: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "straddles the end",
            Descriptor {
                offset: arena as u64 - 4096,
                len: 8192,
                seq: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "overflows",
            Descriptor {
                offset: u64::MAX - 4095,
                len: 8192,
                seq: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "misaligned",
            Descriptor {
                offset: 8,
                len: 16,
                seq: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "empty",
            Descriptor {
                offset: 0,
                len: 0,
                seq: 0,
            }
            .encode()
            .to_vec(),
        ),
        (
            "stale sequence",
            Descriptor {
                offset: 0,
                len: 64,
                seq: 5,
            }
            .encode()
            .to_vec(),
        ),
        ("short", vec![0u8; 24]),
        ("reserved set", {
            let mut b = Descriptor {
                offset: 0,
                len: 64,
                seq: 0,
            }
            .encode();
            b[30] = 1;
            b.to_vec()
        }),
    ];
    for (what, frame) in bad {
        let (tx, mut rx) = cfg.arena_size(arena).pipe::<Vec<u8>>().unwrap();
        let mut raw = tx.into_bytes();
        raw.send_raw_frame(FrameKind::Arena, &frame).await.unwrap();
        let e = rx.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{what}: {e}");
        let e = rx.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{what} (again): {e}");
    }
    // A slot of zeros is not a valid archive of a NonZeroU32: InvalidMessage, and the
    // channel stays usable (the slot goes back on the next call).
    let (tx, mut rx) = cfg
        .arena_size(arena)
        .pipe::<std::num::NonZeroU32>()
        .unwrap();
    let mut raw = tx.into_bytes();
    raw.send_raw_frame(
        FrameKind::Arena,
        &Descriptor {
            offset: 0,
            len: 8192,
            seq: 0,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert_eq!(
        rx.recv_owned().await.unwrap_err().kind(),
        ErrorKind::InvalidMessage
    );
    raw.send_raw_frame(
        FrameKind::Arena,
        &Descriptor {
            offset: 0,
            len: 8192,
            seq: 1,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert_eq!(
        rx.recv().await.unwrap_err().kind(),
        ErrorKind::InvalidMessage
    );
    // A replayed (stale) sequence number.
    raw.send_raw_frame(
        FrameKind::Arena,
        &Descriptor {
            offset: 0,
            len: 64,
            seq: 1,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Protocol);

    // A descriptor on a channel without an arena.
    let (tx, mut rx) = cfg.arena(false).pipe::<Vec<u8>>().unwrap();
    let mut raw = tx.into_bytes();
    raw.send_raw_frame(
        FrameKind::Arena,
        &Descriptor {
            offset: 0,
            len: 64,
            seq: 0,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Protocol);
}

/// A descriptor that overlaps a slot an OwnedMessage still holds is refused.
async fn overlapping_descriptor_refused(cfg: ChannelConfig) {
    let (tx, mut rx) = cfg
        .arena_size(1 << 20)
        .arena_threshold(4096)
        .pipe::<Vec<u8>>()
        .unwrap();
    let mut tx = tx;
    tx.send(&payload(1, 50_000)).await.unwrap();
    let held = rx.recv_owned().await.unwrap();
    let mut raw = tx.into_bytes();
    raw.send_raw_frame(
        FrameKind::Arena,
        &Descriptor {
            offset: 4096,
            len: 64,
            seq: 1,
        }
        .encode(),
    )
    .await
    .unwrap();
    let e = rx.recv().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
    assert!(e.to_string().contains("overlaps"), "{e}");
    check(1, &held);
}

/// A receiver dropped while the sender waits for space: the sender gets
/// Closed, not a hang.
async fn receiver_gone_while_sender_waits(cfg: ChannelConfig) {
    let cfg = cfg.arena_size(128 << 10).arena_threshold(4096);
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    tx.send(&payload(1, 100_000)).await.unwrap();
    let held = rx.recv_owned().await.unwrap();
    let second = payload(2, 100_000);
    let send = tx.send(&second);
    let gone = async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(rx);
        held
    };
    let (r, held) = tokio::join!(send, gone);
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    check(1, &held);
}

both_backends!(
    large_read_in_place_small_inline,
    arena_off_is_inline,
    slot_reused_only_after_drop,
    random_sizes_in_order,
    full_arena_backpressure_and_cancel,
    slow_receiver_no_lost_wakeup,
    across_threads,
    larger_than_arena,
    many_held_at_once,
    hostile_descriptors,
    overlapping_descriptor_refused,
    receiver_gone_while_sender_waits,
);
