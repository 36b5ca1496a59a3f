//! Harness scenario 1c: 64 B one-way through ringipc's raw-bytes mode
//! (`BytesSender::feed` / `BytesReceiver::recv`: the same framing and I/O
//! as typed channels, without rkyv), against the raw pipe and tokio-uring
//! with hand framing from scenario 1 of the same run. It shows what the I/O
//! layer costs apart from serialization and validation.

use super::measure::{Result, Side, join, spawn_side};
use ringipc::{Backend, ChannelConfig};
use serde::Serialize;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Payload bytes per message.
pub const SIZE: usize = 64;

/// One row: a backend's median run.
#[derive(Serialize, Clone)]
pub struct BytesRow {
    pub contender: &'static str,
    pub size: usize,
    pub msgs_per_sec: f64,
    /// Against scenario 1's raw pipe at the same size, when it ran.
    pub vs_raw: Option<f64>,
    /// Against scenario 1's tokio-uring at the same size, when it ran.
    pub vs_tokio_uring: Option<f64>,
}

fn once(backend: Backend, messages: u64) -> Result<f64> {
    let (mut tx, mut rx) = ChannelConfig::new().backend(backend).bytes_pipe()?;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = spawn_side(Side::Parent, move || -> Result<Instant> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let msg = [0xa5u8; SIZE];
        go2.wait();
        let start = Instant::now();
        rt.block_on(async {
            for _ in 0..messages {
                tx.feed(&msg).await?;
            }
            tx.flush().await
        })?;
        Ok(start)
    });
    let receiver = spawn_side(Side::Child, move || -> Result<(Instant, usize)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        go.wait();
        let bytes = rt.block_on(async {
            let mut bytes = 0;
            for _ in 0..messages {
                bytes += rx.recv().await?.len();
            }
            Ok::<_, ringipc::Error>(bytes)
        })?;
        Ok((Instant::now(), bytes))
    });
    let start = join(sender)?;
    let (end, bytes) = join(receiver)?;
    if bytes != SIZE * messages as usize {
        return Err("bytes lost".into());
    }
    Ok(messages as f64 / (end - start).as_secs_f64())
}

/// The median of `reps` runs of about `run_time` each, for `backend`.
pub fn run(backend: Backend, run_time: Duration, reps: usize) -> Result<f64> {
    // Pilot: grow until a run lasts an eighth of the target.
    let mut n = 4096u64;
    let rate = loop {
        let t0 = Instant::now();
        let r = once(backend, n)?;
        if t0.elapsed() >= (run_time / 8).max(Duration::from_millis(5)) || n >= 1 << 28 {
            break r;
        }
        n *= 4;
    };
    let n = (rate * run_time.as_secs_f64()).clamp(4096.0, 1e9) as u64;
    let mut runs = (0..reps.max(1))
        .map(|_| once(backend, n))
        .collect::<Result<Vec<f64>>>()?;
    runs.sort_by(f64::total_cmp);
    Ok(runs[runs.len() / 2])
}

/// Prints the rows.
pub fn print(rows: &[BytesRow]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "\n1c. 64 B one-way, ringipc raw-bytes mode (BytesSender::feed / BytesReceiver::recv: no rkyv), median run"
    );
    println!(
        "  {:<20} {:>10} {:>8} {:>16}",
        "contender", "msgs/s", "vs raw", "vs tokio-uring"
    );
    let ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}x"));
    for r in rows {
        println!(
            "  {:<20} {:>8.2} M {:>8} {:>16}",
            r.contender,
            r.msgs_per_sec / 1e6,
            ratio(r.vs_raw),
            ratio(r.vs_tokio_uring)
        );
    }
}
