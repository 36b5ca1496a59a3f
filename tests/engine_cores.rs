//! Engine cores serving many channels at once, on both backends: 200
//! channels on one core, each in request/response with a peer thread, with
//! timers in between, lose and reorder nothing; a busy-polling receiver
//! whose read was left in flight on another thread works there.

mod common;

use ringipc::{ChannelConfig, Engine};
use std::time::Duration;

fn engine(cfg: ChannelConfig) -> Engine {
    let backend = cfg.pipe::<u64>().unwrap().0.backend();
    Engine::builder()
        .cores([0])
        .backend(backend)
        .build()
        .unwrap()
}

async fn many_channels_on_one_core(cfg: ChannelConfig) {
    const PEERS: usize = 200;
    const ROUNDS: u64 = 50;
    let engine = engine(cfg);
    let mut core_ends = Vec::new();
    let mut peer_ends = Vec::new();
    for _ in 0..PEERS {
        let (a, b) = cfg.duplex::<u64, u64>().unwrap();
        core_ends.push(a);
        peer_ends.push(b);
    }
    // The peers: one thread answering every channel, each request + 1.
    let peers = std::thread::spawn(move || {
        common::block_on(async move {
            let mut tasks = Vec::new();
            for mut b in peer_ends {
                tasks.push(tokio::spawn(async move {
                    while let Ok(m) = b.recv().await {
                        let v = m.to_native();
                        b.send(&(v + 1)).await.unwrap();
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    });
    let total = engine
        .run_on(0, move || async move {
            let mut tasks = Vec::new();
            for (i, mut a) in core_ends.into_iter().enumerate() {
                tasks.push(tokio::task::spawn_local(async move {
                    let mut n = 0;
                    for r in 0..ROUNDS {
                        let v = (i as u64) << 32 | r;
                        a.send(&v).await.unwrap();
                        assert_eq!(a.recv().await.unwrap().to_native(), v + 1);
                        n += 1;
                        if r % 10 == 0 {
                            tokio::time::sleep(Duration::from_micros(100)).await;
                        }
                    }
                    n
                }));
            }
            let mut total = 0;
            for t in tasks {
                total += t.await.unwrap();
            }
            total
        })
        .await
        .unwrap();
    assert_eq!(total, PEERS as u64 * ROUNDS);
    peers.join().unwrap();
}

async fn busy_polling_and_a_moved_handle_on_a_core(cfg: ChannelConfig) {
    let engine = engine(cfg);
    let (mut tx, rx) = cfg
        .busy_poll(Duration::from_micros(100))
        .pipe::<u64>()
        .unwrap();
    // A read left in flight on this thread, then finished on the core.
    let mut rx = rx;
    assert!(rx.try_recv().unwrap().is_none());
    let got = engine.run_on(0, move || async move {
        let mut sum = 0;
        while let Ok(m) = rx.recv().await {
            sum += m.to_native();
        }
        sum
    });
    for i in 1..=100u64 {
        tx.send(&i).await.unwrap();
    }
    drop(tx);
    assert_eq!(got.await.unwrap(), 5050);
}

both_backends!(
    many_channels_on_one_core,
    busy_polling_and_a_moved_handle_on_a_core,
);
