//! One-way bandwidth where every receiver reads every byte (a checksum), so
//! no transport wins by leaving data unread: ringipc with its arena (in
//! place, both ends in this process), ringipc with the arena off (inline
//! over the pipe), tokio's pipe with LengthDelimitedCodec, ipc-channel, and
//! a blocking raw pipe. Run with `harness --arena`.

use super::measure::{Result, Side, join, raw_pipe, spawn_side};
use futures_util::{SinkExt, StreamExt};
use ringipc::{Backend, ChannelConfig};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Barrier};
use std::time::Instant;

/// Reads every byte: a sum of 8-byte words (vectorises to memory speed).
fn checksum(b: &[u8]) -> u64 {
    let mut words = b.chunks_exact(8);
    let mut s = 0u64;
    for w in &mut words {
        s = s.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    for &x in words.remainder() {
        s = s.wrapping_add(x as u64);
    }
    s
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs a sender and a receiver thread; returns MB/s over the receiver's
/// finish minus the sender's start, and checks the receiver's checksum.
fn two_sides<S, R>(size: usize, messages: u64, send: S, recv: R) -> Result<f64>
where
    S: FnOnce(Arc<Barrier>) -> Result<Instant> + Send + 'static,
    R: FnOnce(Arc<Barrier>) -> Result<u64> + Send + 'static,
{
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let s = spawn_side(Side::Parent, move || send(go2));
    let r = spawn_side(Side::Child, move || {
        let sum = recv(go)?;
        Ok((Instant::now(), sum))
    });
    let start = join(s)?;
    let (end, sum) = join(r)?;
    let want = checksum(&vec![0xa5u8; size]).wrapping_mul(messages);
    if sum != want {
        return Err("checksum mismatch: bytes lost or corrupted".into());
    }
    Ok((size as f64 * messages as f64) / (end - start).as_secs_f64() / 1e6)
}

fn ringipc(cfg: ChannelConfig, size: usize, messages: u64) -> Result<f64> {
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>()?;
    two_sides(
        size,
        messages,
        move |go| {
            let rt = runtime()?;
            let msg = vec![0xa5u8; size];
            go.wait();
            let start = Instant::now();
            rt.block_on(async {
                for _ in 0..messages {
                    tx.feed(&msg).await?;
                }
                tx.flush().await
            })?;
            Ok(start)
        },
        move |go| {
            let rt = runtime()?;
            go.wait();
            Ok(rt.block_on(async {
                let mut sum = 0u64;
                for _ in 0..messages {
                    sum = sum.wrapping_add(checksum(&rx.recv().await?));
                }
                Ok::<_, ringipc::Error>(sum)
            })?)
        },
    )
}

fn tokio_codec(size: usize, messages: u64) -> Result<f64> {
    use tokio::net::unix::pipe;
    use tokio_util::bytes::Bytes;
    use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(1 << 30)
            .new_codec()
    };
    let (r, w) = raw_pipe()?;
    two_sides(
        size,
        messages,
        move |go| {
            let msg = Bytes::from(vec![0xa5u8; size]);
            runtime()?.block_on(async move {
                let tx = pipe::Sender::from_owned_fd(OwnedFd::from(w))?;
                let mut framed = FramedWrite::new(tx, codec());
                go.wait();
                let start = Instant::now();
                for _ in 0..messages {
                    framed.feed(msg.clone()).await?;
                }
                SinkExt::<Bytes>::flush(&mut framed).await?;
                Ok(start)
            })
        },
        move |go| {
            runtime()?.block_on(async move {
                let rx = pipe::Receiver::from_owned_fd(OwnedFd::from(r))?;
                let mut framed = FramedRead::new(rx, codec());
                go.wait();
                let mut sum = 0u64;
                for _ in 0..messages {
                    let m = framed.next().await.ok_or("closed early")??;
                    sum = sum.wrapping_add(checksum(&m));
                }
                Ok(sum)
            })
        },
    )
}

fn ipc_channel(size: usize, messages: u64) -> Result<f64> {
    let (tx, rx) = ipc_channel::ipc::bytes_channel()?;
    two_sides(
        size,
        messages,
        move |go| {
            let msg = vec![0xa5u8; size];
            go.wait();
            let start = Instant::now();
            for _ in 0..messages {
                tx.send(&msg)?;
            }
            Ok(start)
        },
        move |go| {
            go.wait();
            let mut sum = 0u64;
            for _ in 0..messages {
                sum = sum.wrapping_add(checksum(&rx.recv()?));
            }
            Ok(sum)
        },
    )
}

fn raw(size: usize, messages: u64) -> Result<f64> {
    let (mut r, mut w) = raw_pipe()?;
    two_sides(
        size,
        messages,
        move |go| {
            let msg = vec![0xa5u8; size];
            go.wait();
            let start = Instant::now();
            for _ in 0..messages {
                w.write_all(&(size as u32).to_le_bytes())?;
                w.write_all(&msg)?;
            }
            Ok(start)
        },
        move |go| {
            go.wait();
            let mut buf = Vec::new();
            let mut sum = 0u64;
            for _ in 0..messages {
                let mut h = [0u8; 4];
                r.read_exact(&mut h)?;
                buf.resize(u32::from_le_bytes(h) as usize, 0);
                r.read_exact(&mut buf)?;
                sum = sum.wrapping_add(checksum(&buf));
            }
            Ok(sum)
        },
    )
}

pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// One cell of the table: a contender at one size, every byte read.
#[derive(serde::Serialize, Clone)]
pub struct ReadAllRow {
    pub contender: &'static str,
    pub size: usize,
    /// Best of the runs, payload MB/s (10^6 bytes).
    pub mb_per_sec: f64,
    pub vs_raw: f64,
    pub vs_ipc_channel: f64,
}

/// The sizes of the table.
pub const SIZES: [usize; 3] = [64 << 10, 1 << 20, 4 << 20];

/// Measures every contender at 64 KiB, 1 MiB and 4 MiB (best of `reps`
/// runs of about `secs` each).
pub fn measure(quick: bool, backends: &[Backend]) -> Result<Vec<ReadAllRow>> {
    let (reps, secs) = if quick { (2, 0.15) } else { (5, 0.5) };
    let arena = ChannelConfig::builtin();
    type F = Box<dyn Fn(usize, u64) -> Result<f64>>;
    let mut contenders: Vec<(&'static str, F)> = Vec::new();
    for &b in backends {
        if b == Backend::Uring && ringipc::uring_probe().is_err() {
            continue;
        }
        let cfg = arena.backend(b);
        contenders.push((
            if b == Backend::Uring {
                "ringipc-uring arena"
            } else {
                "ringipc-epoll arena"
            },
            Box::new(move |s, n| ringipc(cfg, s, n)),
        ));
    }
    let inline = arena.backend(Backend::Epoll).arena(false);
    contenders.push((
        "ringipc-epoll inline",
        Box::new(move |s, n| ringipc(inline, s, n)),
    ));
    contenders.push(("tokio pipe+codec", Box::new(tokio_codec)));
    contenders.push(("ipc-channel", Box::new(ipc_channel)));
    contenders.push(("raw pipe", Box::new(raw)));
    let mut rows = Vec::new();
    for size in SIZES {
        // Message count for about `secs` at 2 GB/s, at least 16.
        let n = ((2e9 * secs) / size as f64).max(16.0) as u64;
        let mut results = Vec::new();
        for (name, f) in &contenders {
            let mut best = 0f64;
            for _ in 0..reps {
                best = best.max(f(size, n)?);
            }
            results.push((*name, best));
        }
        let find = |want: &str| results.iter().find(|r| r.0 == want).map_or(1.0, |r| r.1);
        let (raw, ipc) = (find("raw pipe"), find("ipc-channel"));
        for (name, mb) in &results {
            rows.push(ReadAllRow {
                contender: name,
                size,
                mb_per_sec: *mb,
                vs_raw: mb / raw,
                vs_ipc_channel: mb / ipc,
            });
        }
    }
    Ok(rows)
}

/// Prints the table, with the harness's peak RSS.
pub fn print(rows: &[ReadAllRow]) {
    if rows.is_empty() {
        return;
    }
    println!(
        "\n1b. one-way bandwidth, receiver checksums every byte (MB/s, best of the runs; ratio to raw pipe / ipc-channel)"
    );
    println!(
        "   ringipc's arena: 16 MiB per channel, threshold 32 KiB (the defaults); both ends in this process, so the arena is read in place"
    );
    for size in SIZES {
        println!("  {} KiB:", size >> 10);
        for r in rows.iter().filter(|r| r.size == size) {
            println!(
                "    {:<22} {:>9.0} MB/s   {:>5.2}x raw   {:>5.2}x ipc-channel",
                r.contender, r.mb_per_sec, r.vs_raw, r.vs_ipc_channel
            );
        }
    }
    println!(
        "   peak RSS of the harness so far: {} MiB",
        peak_rss_kib() >> 10
    );
}

/// The table alone (`harness --arena`).
pub fn run(quick: bool) -> Result<()> {
    let rows = measure(quick, &[Backend::Uring, Backend::Epoll])?;
    print(&rows);
    Ok(())
}
