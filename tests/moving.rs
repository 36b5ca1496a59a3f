//! Handles that move, on both backends: an operation left in flight on one
//! thread (or runtime) is finished on another without losing or repeating a
//! byte, even when the first thread has exited (its io_uring requests are
//! then cancelled by the kernel). Also: many completions at once (the
//! completion queue overflows on uring) while the thread is busy.

mod common;

use ringipc::{ChannelConfig, ErrorKind, Receiver, Sender};
use std::time::Duration;

/// Runs `f` on a new thread with its own current-thread runtime, and waits
/// for that thread to exit.
fn on_short_lived_thread<T: Send + 'static>(f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(f())
    })
    .join()
    .expect("thread")
}

/// Leaves a read in flight on the calling thread: a receive that times out.
async fn leave_read_pending(rx: &mut Receiver<u64>) {
    let Err(e) = rx.recv_timeout(Duration::from_millis(5)).await else {
        panic!("nothing was sent yet");
    };
    assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
}

async fn recv_pending_on_exited_thread(cfg: ChannelConfig) {
    let (mut tx, rx) = cfg.pipe::<u64>().unwrap();
    let mut rx = on_short_lived_thread(async move || {
        let mut rx = rx;
        leave_read_pending(&mut rx).await;
        rx
    });
    for i in 0..3u64 {
        tx.send(&i).await.unwrap();
    }
    for i in 0..3u64 {
        assert_eq!(rx.recv().await.unwrap().to_native(), i);
    }
    drop(tx);
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
}

async fn send_pending_on_exited_thread(cfg: ChannelConfig) {
    // Larger than the pipe (1 MiB at most): the write stays in flight.
    let big: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    // Inline over the pipe (the arena would take the message at once).
    let (tx, mut rx) = cfg.arena(false).pipe::<Vec<u8>>().unwrap();
    let sent = big.clone();
    let mut tx = on_short_lived_thread(async move || {
        let mut tx = tx;
        let r = tokio::time::timeout(Duration::from_millis(20), tx.send(&sent)).await;
        assert!(r.is_err(), "a 4 MiB frame cannot fit in the pipe");
        tx
    });
    // The frame is queued in the sender: finish it here, then send another.
    let reader = tokio::spawn(async move {
        let first = rx.recv().await.unwrap().to_vec();
        let second = rx.recv().await.unwrap().to_vec();
        (first, second)
    });
    tx.flush().await.unwrap();
    tx.send(&vec![7u8; 3]).await.unwrap();
    let (first, second) = reader.await.unwrap();
    assert!(first == big, "the large frame arrived intact");
    assert_eq!(second, vec![7u8; 3]);
}

async fn bounced_across_100_threads(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<u64>().unwrap();
    for i in 0..100u64 {
        (tx, rx) = on_short_lived_thread(async move || {
            let (mut tx, mut rx) = (tx, rx);
            tx.send(&i).await.unwrap();
            assert_eq!(rx.recv().await.unwrap().to_native(), i);
            if i % 2 == 0 {
                leave_read_pending(&mut rx).await;
            }
            (tx, rx)
        });
    }
    tx.send(&100).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().to_native(), 100);
    assert!(rx.try_recv().unwrap().is_none(), "nothing repeated");
}

async fn polled_from_two_runtimes_in_turn(cfg: ChannelConfig) {
    let (tx, rx) = cfg.pipe::<u64>().unwrap();
    std::thread::spawn(move || {
        let (mut tx, mut rx) = (tx, rx);
        let rt1 = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let rt2 = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for i in 0..20u64 {
            let rt = if i % 2 == 0 { &rt1 } else { &rt2 };
            rt.block_on(async {
                // The read left in flight by the other runtime completes here.
                tx.send(&i).await.unwrap();
                assert_eq!(rx.recv().await.unwrap().to_native(), i);
                leave_read_pending(&mut rx).await;
            });
        }
        // One runtime gone, the other goes on.
        drop(rt1);
        rt2.block_on(async {
            tx.send(&99).await.unwrap();
            assert_eq!(rx.recv().await.unwrap().to_native(), 99);
        });
    })
    .join()
    .unwrap();
}

/// One ring polled from two runtimes at once: thread A waits on its own
/// channel while a handle that left a read on A's ring is used by a runtime
/// on thread B, which then idles. A must still be woken.
async fn ring_shared_by_two_live_runtimes(cfg: ChannelConfig) {
    use std::sync::mpsc;
    let (to_main, from_a) = mpsc::channel();
    let (result_tx, result_rx) = mpsc::channel();
    let a = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx_p, mut rx_p) = cfg.pipe::<u64>().unwrap();
            let (tx_x, mut rx_x) = cfg.pipe::<u64>().unwrap();
            leave_read_pending(&mut rx_x).await;
            to_main.send((tx_p, tx_x, rx_x)).unwrap();
            // The deadline is a hang guard, checked first: a wake-up that
            // only comes with the timer counts as a stall.
            let got = tokio::select! {
                biased;
                _ = tokio::time::sleep(Duration::from_secs(20)) => Err("stalled".to_string()),
                m = rx_p.recv() => m.map(|m| m.to_native()).map_err(|e| e.to_string()),
            };
            result_tx.send(got).unwrap();
        });
    });
    let (mut tx_p, tx_x, rx_x) = from_a.recv().unwrap();
    let (idle_tx, idle_rx) = mpsc::channel::<()>();
    let (used_tx, used_rx) = mpsc::channel::<()>();
    let b = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut tx_x, mut rx_x) = (tx_x, rx_x);
        rt.block_on(async {
            // Polls the read that A left on A's ring, before any data comes.
            leave_read_pending(&mut rx_x).await;
            tx_x.send(&1).await.unwrap();
            assert_eq!(rx_x.recv().await.unwrap().to_native(), 1);
        });
        used_tx.send(()).unwrap();
        // B's runtime stays alive but is no longer driven.
        let _ = idle_rx.recv();
        drop((tx_x, rx_x, rt));
    });
    used_rx.recv().unwrap();
    tx_p.send(&42).await.unwrap();
    let got = tokio::task::spawn_blocking(move || result_rx.recv().unwrap())
        .await
        .unwrap();
    idle_tx.send(()).unwrap();
    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(got, Ok(42));
}

async fn returned_from_spawn_blocking(cfg: ChannelConfig) {
    let (mut tx, rx) = cfg.pipe::<u64>().unwrap();
    let handle = tokio::runtime::Handle::current();
    // spawn_blocking needs a runtime with a blocking pool: any runtime has one.
    let mut rx = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut rx = rx;
        rt.block_on(leave_read_pending(&mut rx));
        drop(handle);
        rx
    })
    .await
    .unwrap();
    tx.send(&5).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().to_native(), 5);
}

async fn returned_from_engine_core(cfg: ChannelConfig) {
    let backend = cfg.pipe::<u64>().unwrap().0.backend();
    let engine = ringipc::Engine::builder()
        .cores([0])
        .backend(backend)
        .build()
        .unwrap();
    let (mut tx, mut rx) = engine
        .run_on(0, move || async move {
            let (tx, mut rx) = cfg.pipe::<u64>().unwrap();
            leave_read_pending(&mut rx).await;
            (tx, rx)
        })
        .await
        .unwrap();
    // The core's thread exits; its requests are cancelled by the kernel.
    engine.shutdown();
    tx.send(&1).await.unwrap();
    tx.send(&2).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().to_native(), 1);
    assert_eq!(rx.recv().await.unwrap().to_native(), 2);
}

/// Many receivers each with a read in flight on this thread, all completing
/// while the thread is blocked: on uring, far more completions than the
/// completion queue holds (the rest wait on the kernel's overflow list).
async fn thousands_complete_while_busy(cfg: ChannelConfig) {
    const N: usize = 4096;
    // Pipes only: an arena would add fds per channel, and this is about
    // pipe reads completing.
    let cfg = cfg.arena(false);
    let mut txs: Vec<Sender<u64>> = Vec::with_capacity(N);
    let mut rxs: Vec<Receiver<u64>> = Vec::with_capacity(N);
    for _ in 0..N {
        let (tx, mut rx) = cfg.pipe::<u64>().unwrap();
        assert!(rx.try_recv().unwrap().is_none());
        txs.push(tx);
        rxs.push(rx);
    }
    // This thread is busy (blocked in join) while every write completes a read.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for (i, tx) in txs.iter_mut().enumerate() {
                tx.send(&(i as u64)).await.unwrap();
            }
        });
    })
    .join()
    .unwrap();
    let all = async {
        for (i, rx) in rxs.iter_mut().enumerate() {
            assert_eq!(rx.recv().await.unwrap().to_native(), i as u64);
        }
    };
    // A stall (completions stuck on the overflow list) fails instead of hanging.
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every completion arrives without further submissions");
}

/// A receiver that alternates between finding messages waiting (uring
/// then reads the pipe directly) and finding the pipe empty (a read goes
/// into the ring), moved to a new short-lived thread every few hundred
/// messages, with receive futures dropped mid-way before each move: every
/// message arrives once, in order.
async fn direct_and_ring_reads_across_threads(cfg: ChannelConfig) {
    const N: u64 = 6000;
    const HOPS: u64 = 20;
    let (tx, mut rx) = cfg.pipe::<u64>().unwrap();
    // Bursts, then pauses: the receiver sees both a full and an empty pipe.
    let sender = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut tx = tx;
            for i in 0..N {
                tx.feed(&i).await.unwrap();
                if i % 64 == 63 {
                    tx.flush().await.unwrap();
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
            tx.flush().await.unwrap();
        })
    });
    let mut next = 0u64;
    for hop in 0..HOPS {
        (rx, next) = on_short_lived_thread(async move || {
            let (mut rx, mut next) = (rx, next);
            let until = (hop + 1) * N / HOPS;
            while next < until {
                assert_eq!(rx.recv().await.unwrap().to_native(), next);
                next += 1;
            }
            // A receive dropped mid-way (or that got a message in time).
            if next < N
                && let Ok(m) = tokio::time::timeout(Duration::from_micros(50), rx.recv()).await
            {
                assert_eq!(m.unwrap().to_native(), next);
                next += 1;
            }
            (rx, next)
        });
    }
    while next < N {
        assert_eq!(rx.recv().await.unwrap().to_native(), next);
        next += 1;
    }
    sender.join().unwrap();
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
}

both_backends!(
    direct_and_ring_reads_across_threads,
    recv_pending_on_exited_thread,
    send_pending_on_exited_thread,
    bounced_across_100_threads,
    polled_from_two_runtimes_in_turn,
    ring_shared_by_two_live_runtimes,
    returned_from_spawn_blocking,
    returned_from_engine_core,
    thousands_complete_while_busy,
);
