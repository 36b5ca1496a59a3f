//! Child churn: children started and joined, killed, terminated after a
//! join timeout, panicking, talking over a channel, dropped unjoined (kill
//! on drop, or detached), started by re-exec instead of the fork server,
//! and joined in batches. Every outcome is checked.

use crate::channels::{Consumer, Flow, Msg, Producer};
use crate::counters::{Beat, COUNTERS, add, anomaly, stopping};
use fastrand::Rng;
use ringipc::{Backend, ChannelConfig, EXIT_PANIC, ErrorKind, OnDrop, Process, Sender, StartMode};
use std::time::Duration;

fn square(x: u64) -> u64 {
    x.wrapping_mul(x)
}

fn panicker(x: u64) -> u64 {
    // The parent sees the message through `result()`; keep stderr quiet.
    std::panic::set_hook(Box::new(|_| {}));
    panic!("soak panic {x}")
}

fn sleeper(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// What the talking child is given.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct TalkArgs {
    tx: Sender<Msg>,
    n: u64,
    seed: u64,
}

/// Sends `n` messages (some cancelled) and returns how many completed.
async fn talker(a: TalkArgs) -> u64 {
    let mut p = Producer::new(a.tx, Rng::with_seed(a.seed), "child talker");
    for _ in 0..a.n {
        if p.step().await == Flow::Closed {
            break;
        }
    }
    p.finish().await.0
}

/// Which outcome a step aims for.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Value,
    Exec,
    Talk,
    Panic,
    Kill,
    Terminate,
    DropKill,
    DropDetach,
    Batch,
}

fn pick(rng: &mut Rng) -> Kind {
    match rng.u32(0..100) {
        0..25 => Kind::Value,
        25..30 => Kind::Exec,
        30..45 => Kind::Talk,
        45..58 => Kind::Panic,
        58..68 => Kind::Kill,
        68..74 => Kind::Terminate,
        74..84 => Kind::DropKill,
        84..94 => Kind::DropDetach,
        _ => Kind::Batch,
    }
}

async fn step(backend: Backend, rng: &mut Rng) -> ringipc::Result<()> {
    let kind = pick(rng);
    let c = &COUNTERS;
    match kind {
        Kind::Value | Kind::Exec => {
            let x = rng.u64(..);
            let mut b = Process::builder(square).arg(x).backend(backend);
            if matches!(kind, Kind::Exec) {
                b = b.start_mode(StartMode::Exec);
            }
            let mut p = b.name("soak-square").start()?;
            add(&c.children, 1);
            let v = p.join_value().await?;
            if v != square(x) {
                anomaly(format!("child returned {v}, not {}", square(x)));
            }
            add(&c.children_ok, 1);
        }
        Kind::Talk => {
            let cfg = ChannelConfig::new().backend(backend);
            let (tx, rx) = cfg.pipe::<Msg>()?;
            let n = rng.u64(1..200);
            let mut p = Process::builder_async(talker)
                .arg(TalkArgs {
                    tx,
                    n,
                    seed: rng.u64(..),
                })
                .backend(backend)
                .name("soak-talker")
                .start()?;
            add(&c.children, 1);
            let mut cons = Consumer::new(rx, Rng::with_seed(rng.u64(..)), "child talker");
            while cons.step().await == Flow::Go {}
            let sure = p.join_value().await?;
            // Cancelled sends may or may not arrive, so at least `sure`.
            if cons.received < sure || cons.received > n {
                anomaly(format!(
                    "talking child: {} messages received, {sure} completed of {n}",
                    cons.received
                ));
            }
            add(&c.channels, 1);
            add(&c.children_ok, 1);
        }
        Kind::Panic => {
            let x = rng.u64(..);
            let mut p = Process::builder(panicker)
                .arg(x)
                .backend(backend)
                .name("soak-panic")
                .start()?;
            add(&c.children, 1);
            let status = p.join().await?;
            match p.result() {
                Err(e)
                    if e.kind() == ErrorKind::Panicked
                        && e.to_string().contains(&x.to_string()) => {}
                Err(e) => anomaly(format!("panicking child: {e}")),
                Ok(_) => anomaly("panicking child returned a value".into()),
            }
            if status.code() != Some(EXIT_PANIC) {
                anomaly(format!("panicking child ended with {status}"));
            }
            add(&c.children_panicked, 1);
        }
        Kind::Kill => {
            let mut p = Process::builder(sleeper)
                .arg(60_000)
                .backend(backend)
                .name("soak-killed")
                .start()?;
            add(&c.children, 1);
            tokio::time::sleep(Duration::from_micros(rng.u64(0..5000))).await;
            p.kill()?;
            let status = p.join().await?;
            if status.signal() != Some(libc::SIGKILL) {
                anomaly(format!("killed child ended with {status}"));
            }
            add(&c.children_killed, 1);
        }
        Kind::Terminate => {
            let mut p = Process::builder(sleeper)
                .arg(60_000)
                .backend(backend)
                .name("soak-terminated")
                .start()?;
            add(&c.children, 1);
            let t = Duration::from_millis(rng.u64(1..20));
            match p.join_timeout(t).await {
                Err(e) if e.kind() == ErrorKind::TimedOut => {}
                other => anomaly(format!("join_timeout on a sleeper: {other:?}")),
            }
            p.terminate()?;
            let status = p.join().await?;
            if status.signal() != Some(libc::SIGTERM) {
                anomaly(format!("terminated child ended with {status}"));
            }
            add(&c.children_killed, 1);
        }
        Kind::DropKill => {
            let p = Process::builder(sleeper)
                .arg(60_000)
                .backend(backend)
                .name("soak-dropped")
                .start()?;
            add(&c.children, 1);
            tokio::time::sleep(Duration::from_micros(rng.u64(0..3000))).await;
            drop(p);
            add(&c.children_dropped, 1);
        }
        Kind::DropDetach => {
            // Short-lived: a reaper thread collects it when it exits.
            let p = Process::builder(sleeper)
                .arg(rng.u64(0..50))
                .backend(backend)
                .on_drop(OnDrop::Detach)
                .name("soak-detached")
                .start()?;
            add(&c.children, 1);
            drop(p);
            add(&c.children_dropped, 1);
        }
        Kind::Batch => {
            let xs: Vec<u64> = (0..rng.usize(2..6)).map(|_| rng.u64(..)).collect();
            let mut ps = Vec::new();
            for &x in &xs {
                ps.push(
                    Process::builder(square)
                        .arg(x)
                        .backend(backend)
                        .name("soak-batch")
                        .start()?,
                );
                add(&c.children, 1);
            }
            if rng.bool() {
                for r in ringipc::join_all(&mut ps).await {
                    r?;
                }
            } else {
                // One, whichever ends first; then the rest.
                if let Some((_, r)) = ringipc::join_any(&mut ps).await {
                    r?;
                }
                for r in ringipc::join_all(&mut ps).await {
                    r?;
                }
            }
            for (p, x) in ps.iter().zip(&xs) {
                let v = p.result()?.to_native();
                if v != square(*x) {
                    anomaly(format!("batch child returned {v}, not {}", square(*x)));
                }
                add(&c.children_ok, 1);
            }
        }
    }
    Ok(())
}

/// Starts children one after another on `backend` until the soak stops.
pub async fn churn(backend: Backend, seed: u64, beat: Beat) {
    let mut rng = Rng::with_seed(seed);
    while !stopping() {
        if let Err(e) = step(backend, &mut rng).await {
            anomaly(format!("child on {backend}: {e}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        beat.tick();
        tokio::time::sleep(Duration::from_millis(rng.u64(0..10))).await;
    }
}
