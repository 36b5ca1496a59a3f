//! Memory stays bounded whatever a caller does: cancelled sends against a
//! stalled consumer, and headers that announce more than ever arrives. Every
//! test runs on both backends.

mod common;

use ringipc::{ChannelConfig, ErrorKind};
use rkyv::{Archive, Deserialize, Serialize};
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Waker};

/// The high-water mark of a sender's queue (`FEED_HIGH_WATER`, 256 KiB)
/// plus room for one more frame of the sizes sent here and the hello frame.
const QUEUE_BOUND: usize = 256 * 1024 + 80 * 1024;

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
struct Msg {
    seq: u64,
    pad: Vec<u8>,
}

fn msg(seq: u64, size: usize) -> Msg {
    Msg {
        seq,
        pad: vec![seq as u8; size],
    }
}

/// Polls `fut` once and drops it: a send cancelled at its first poll, the
/// way a `timeout` or `select!` that fires at once cancels it.
fn poll_once_and_drop<F: Future>(fut: F) {
    let mut fut = pin!(fut);
    let _ = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
}

/// 50,000 sends cancelled against a consumer that never reads, then the
/// consumer reads: the queue never held more than the bound, and what
/// arrives is whole messages in order, ending with one sent normally.
async fn cancelled_typed_sends(cfg: ChannelConfig, count: u64, size: usize) {
    let (mut tx, mut rx) = cfg.pipe::<Msg>().unwrap();
    let mut most = 0;
    for seq in 0..count {
        poll_once_and_drop(tx.send(&msg(seq, size)));
        most = most.max(tx.queued_bytes());
        assert!(
            tx.queued_bytes() <= QUEUE_BOUND,
            "after {seq} cancelled sends {} bytes are queued",
            tx.queued_bytes()
        );
    }
    // Arena messages leave only descriptors in the pipe, which never fills.
    assert!(
        most > 0 || size >= 32 * 1024,
        "the sends never queued anything"
    );
    let last = count + 1;
    let final_msg = msg(last, size);
    let (sent, got) = tokio::join!(tx.send(&final_msg), async {
        let mut got = 0u64;
        let mut prev = None;
        loop {
            let m = rx.recv().await.expect("whole, valid messages");
            let seq = m.seq.to_native();
            assert!(prev.is_none_or(|p| seq > p), "{seq} after {prev:?}");
            assert_eq!(m.pad.len(), size);
            assert!(m.pad.iter().all(|&b| b == seq as u8), "message {seq} torn");
            prev = Some(seq);
            got += 1;
            if seq == last {
                return got;
            }
        }
    });
    sent.unwrap();
    assert!(got >= 2, "only {got} messages arrived");
}

async fn cancelled_sends_stay_bounded(cfg: ChannelConfig) {
    cancelled_typed_sends(cfg, 50_000, 4096).await;
}

/// Messages above the arena threshold go through shared memory; a send
/// cancelled while it waits for arena space or queue room queues nothing.
async fn cancelled_arena_sends_stay_bounded(cfg: ChannelConfig) {
    cancelled_typed_sends(cfg, 5_000, 64 * 1024).await;
}

async fn cancelled_feeds_stay_bounded(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.bytes_pipe().unwrap();
    for seq in 0..50_000u32 {
        let mut frame = seq.to_le_bytes().to_vec();
        frame.resize(4096, seq as u8);
        poll_once_and_drop(tx.feed(&frame));
        poll_once_and_drop(tx.send(&frame));
        assert!(
            tx.queued_bytes() <= QUEUE_BOUND,
            "after {seq} cancelled feeds {} bytes are queued",
            tx.queued_bytes()
        );
    }
    let (sent, ()) = tokio::join!(tx.send(b"end"), async {
        let mut prev: Option<u32> = None;
        loop {
            let f = rx.recv().await.expect("whole frames");
            if f == b"end" {
                break;
            }
            assert_eq!(f.len(), 4096);
            let seq = u32::from_le_bytes(f[..4].try_into().unwrap());
            assert!(f[4..].iter().all(|&b| b == seq as u8), "frame {seq} torn");
            assert!(prev.is_none_or(|p| seq >= p), "{seq} after {prev:?}");
            prev = Some(seq);
        }
    });
    sent.unwrap();
}

async fn cancelled_duplex_sends_stay_bounded(cfg: ChannelConfig) {
    let (mut a, mut b) = cfg.duplex::<Msg, Msg>().unwrap();
    for seq in 0..50_000 {
        poll_once_and_drop(a.send(&msg(seq, 4096)));
        assert!(a.sender().queued_bytes() <= QUEUE_BOUND);
    }
    let final_msg = msg(u64::MAX, 1);
    let (sent, m) = tokio::join!(a.send(&final_msg), async {
        loop {
            let m = b.recv().await.unwrap();
            if m.seq == u64::MAX {
                break m.pad.len();
            }
        }
    });
    sent.unwrap();
    assert_eq!(m, 1);
    drop(a);
    assert_eq!(b.recv().await.unwrap_err().kind(), ErrorKind::Closed);
}

both_backends!(
    cancelled_sends_stay_bounded,
    cancelled_arena_sends_stay_bounded,
    cancelled_feeds_stay_bounded,
    cancelled_duplex_sends_stay_bounded,
    announced_frame_reserves_nothing,
    large_frames_arrive_whole,
);

/// A raw writer announces a 200 MiB frame (under the 256 MiB limit) and
/// sends 100 bytes of it: the receiver's buffer stays near one read chunk.
/// Then 256 KiB more arrive, the writer goes away, and the receiver reports
/// the cut frame.
async fn announced_frame_reserves_nothing(cfg: ChannelConfig) {
    use ringipc::framing::{FrameKind, header, hello_frame};
    use std::io::Write;
    use std::time::Duration;
    let (r, w) = std::io::pipe().unwrap();
    let mut rx = cfg.bytes_receiver(r.into()).unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    // The writer blocks while the pipe is full, so it gets its own thread.
    let writer = std::thread::spawn(move || {
        let mut w = std::fs::File::from(std::os::fd::OwnedFd::from(w));
        let mut s = hello_frame().to_vec();
        s.extend_from_slice(&header(FrameKind::Data, 200 << 20));
        s.extend_from_slice(&[7; 100]);
        w.write_all(&s).unwrap();
        wait.recv().unwrap();
        w.write_all(&[7; 256 * 1024]).unwrap();
    });
    let e = rx
        .recv_timeout(Duration::from_millis(100))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    assert!(
        rx.buffer_capacity() <= 1 << 20,
        "a 148-byte prefix made the receiver hold {} bytes",
        rx.buffer_capacity()
    );
    // More bytes arrive: room grows with them (however many got here
    // before the timeout), never to the announced size.
    go.send(()).unwrap();
    let _ = rx.recv_timeout(Duration::from_millis(100)).await;
    assert!(
        rx.buffer_capacity() <= 2 << 20,
        "{} bytes held for at most 256 KiB received",
        rx.buffer_capacity()
    );
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Truncated);
    writer.join().unwrap();
}

/// Large frames still arrive whole through the growing buffer.
async fn large_frames_arrive_whole(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.bytes_pipe().unwrap();
    let payload: Vec<u8> = (0..(5 << 20) + 3).map(|i| (i % 251) as u8).collect();
    let (sent, ()) = tokio::join!(
        async {
            for _ in 0..3 {
                tx.send(&payload).await?;
            }
            tx.send(b"small").await
        },
        async {
            for _ in 0..3 {
                assert!(rx.recv().await.unwrap() == &payload[..]);
            }
            assert_eq!(rx.recv().await.unwrap(), b"small");
        }
    );
    sent.unwrap();
}
