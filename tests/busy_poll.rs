//! Opt-in busy polling, on both backends: a receiver that spins before it
//! parks still receives every message in order, whether the message comes
//! within the spin budget or long after it ran out, and `try_recv` never
//! spins.

mod common;

use ringipc::{ChannelConfig, ErrorKind};
use std::time::Duration;

async fn replies_within_and_after_the_budget(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg
        .busy_poll(Duration::from_millis(2))
        .pipe::<u64>()
        .unwrap();
    let writer = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..200u64 {
                // Most arrive while the receiver spins; every 50th long after.
                let pause = if i % 50 == 0 { 20_000 } else { 50 };
                std::thread::sleep(Duration::from_micros(pause));
                tx.send(&i).await.unwrap();
            }
        });
    });
    for i in 0..200u64 {
        assert_eq!(rx.recv().await.unwrap().to_native(), i);
    }
    writer.await.unwrap();
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
}

async fn ping_pong_with_both_ends_spinning(cfg: ChannelConfig) {
    let cfg = cfg.busy_poll(Duration::from_micros(200));
    let (mut a, b) = cfg.duplex::<u64, u64>().unwrap();
    let echo = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut b = b;
        rt.block_on(async {
            while let Ok(m) = b.recv().await {
                let v = m.to_native();
                b.send(&(v + 1)).await.unwrap();
            }
        });
    });
    for i in 0..2_000u64 {
        a.send(&i).await.unwrap();
        assert_eq!(a.recv().await.unwrap().to_native(), i + 1);
    }
    drop(a);
    echo.join().unwrap();
}

async fn set_on_a_handle_and_try_recv_does_not_spin(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<u64>().unwrap();
    // A budget far longer than the test: only try_recv's refusal to spin
    // keeps this from stalling.
    rx.set_busy_poll(Some(Duration::from_secs(3600)));
    assert!(rx.try_recv().unwrap().is_none());
    tx.send(&3).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().to_native(), 3);
    rx.set_busy_poll(None);
    let e = rx
        .recv_timeout(Duration::from_millis(10))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
}

async fn engine_default_budget(cfg: ChannelConfig) {
    let backend = cfg.pipe::<u64>().unwrap().0.backend();
    let engine = ringipc::Engine::builder()
        .cores([0])
        .backend(backend)
        .busy_poll(Duration::from_micros(100))
        .build()
        .unwrap();
    let (mut tx, rx) = cfg.pipe::<u64>().unwrap();
    let got = engine.run_on(0, move || async move {
        let mut rx = rx;
        let mut sum = 0;
        while let Ok(m) = rx.recv().await {
            sum += m.to_native();
        }
        sum
    });
    for i in 1..=100u64 {
        tx.send(&i).await.unwrap();
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    drop(tx);
    assert_eq!(got.await.unwrap(), 5050);
}

both_backends!(
    replies_within_and_after_the_budget,
    ping_pong_with_both_ends_spinning,
    set_on_a_handle_and_try_recv_does_not_spin,
    engine_default_budget,
);
