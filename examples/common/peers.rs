//! The contenders a Rust user would pick instead of ringipc, measured the
//! same way as ringipc and the raw pipe in the parent module: one function
//! per scenario and contender, both sides on two OS threads.
//!
//! - tokio's `net::unix::pipe` with tokio-util's `LengthDelimitedCodec`
//!   (a 4-byte length prefix), default settings, `feed` per message and one
//!   `flush`, as the ringipc sender does;
//! - tokio-uring 0.5 on the same 1 MiB pipe with the raw contender's 16-byte
//!   framing and 256 KiB write batches, written by hand;
//! - ipc-channel's bytes channel, which sends each message with its own
//!   `sendmsg` on a unix seqpacket socket (it has no batching to turn on).

use super::{
    FrameBuf, RAW_BATCH, RAW_HEADER, Result, Side, Throughput, check_bytes, join, raw_header,
    raw_pipe, runtime, spawn_side,
};
use futures_util::{SinkExt, StreamExt};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tokio::net::unix::pipe;
use tokio_uring::buf::BoundedBuf;
use tokio_util::bytes::Bytes;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// The codec as a user would make it; only the frame limit is raised so
/// that `--sizes` can go past its 8 MiB default.
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(1 << 30)
        .new_codec()
}

/// tokio pipe one way: `feed` every frame into a `FramedWrite`, one `flush`;
/// a `FramedRead` yields each frame.
pub fn tokio_pipe_one_way(size: usize, messages: u64) -> Result<Throughput> {
    let (r, w) = raw_pipe()?;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = spawn_side(Side::Parent, move || -> Result<Instant> {
        let msg = Bytes::from(vec![0xa5u8; size]);
        runtime()?.block_on(async move {
            let tx = pipe::Sender::from_owned_fd(OwnedFd::from(w))?;
            let mut framed = FramedWrite::new(tx, codec());
            go2.wait();
            let start = Instant::now();
            for _ in 0..messages {
                framed.feed(msg.clone()).await?;
            }
            SinkExt::<Bytes>::flush(&mut framed).await?;
            Ok(start)
        })
    });
    let receiver = spawn_side(Side::Child, move || -> Result<(Instant, usize)> {
        runtime()?.block_on(async move {
            let rx = pipe::Receiver::from_owned_fd(OwnedFd::from(r))?;
            let mut framed = FramedRead::new(rx, codec());
            go.wait();
            let mut bytes = 0;
            for _ in 0..messages {
                bytes += framed.next().await.ok_or("tokio pipe closed early")??.len();
            }
            Ok((Instant::now(), bytes))
        })
    });
    let start = join(sender)?;
    let (end, bytes) = join(receiver)?;
    check_bytes(bytes, size, messages)?;
    Ok(Throughput {
        size,
        messages,
        elapsed: end - start,
    })
}

/// tokio pipe ping-pong: `send` (feed and flush) one frame, await the reply.
pub fn tokio_pipe_ping_pong(size: usize, warmup: usize, rounds: usize) -> Result<Vec<Duration>> {
    let (ping_r, ping_w) = raw_pipe()?;
    let (pong_r, pong_w) = raw_pipe()?;
    let echo = spawn_side(Side::Child, move || -> Result<()> {
        let msg = Bytes::from(vec![0x22u8; size]);
        runtime()?.block_on(async move {
            let mut rx = FramedRead::new(pipe::Receiver::from_owned_fd(ping_r.into())?, codec());
            let mut tx = FramedWrite::new(pipe::Sender::from_owned_fd(pong_w.into())?, codec());
            while let Some(m) = rx.next().await {
                std::hint::black_box(m?.len());
                tx.send(msg.clone()).await?;
            }
            Ok(())
        })
    });
    let pinger = spawn_side(Side::Parent, move || -> Result<Vec<Duration>> {
        let msg = Bytes::from(vec![0x11u8; size]);
        runtime()?.block_on(async move {
            let mut rx = FramedRead::new(pipe::Receiver::from_owned_fd(pong_r.into())?, codec());
            let mut tx = FramedWrite::new(pipe::Sender::from_owned_fd(ping_w.into())?, codec());
            let mut samples = Vec::with_capacity(rounds);
            for i in 0..warmup + rounds {
                let t0 = Instant::now();
                tx.send(msg.clone()).await?;
                let reply = rx.next().await.ok_or("echo closed early")??;
                std::hint::black_box(reply.len());
                if i >= warmup {
                    samples.push(t0.elapsed());
                }
            }
            Ok(samples)
        })
    });
    let samples = join(pinger)?;
    join(echo)?;
    Ok(samples)
}

/// A tokio-uring file on a pipe end. tokio-uring panics if it cannot set
/// up its ring; `Contender::available` checks that first.
fn uring_file(fd: impl Into<OwnedFd>) -> tokio_uring::fs::File {
    tokio_uring::fs::File::from_std(std::fs::File::from(fd.into()))
}

/// Writes hand-framed frames through tokio-uring: small frames are gathered
/// into one 256 KiB buffer per write, as the raw writer does; a larger
/// frame goes out as a header write and a payload write without a copy.
/// (tokio-uring's `writev_at_all` is not used: it cannot finish a partial
/// write, which a 1 MiB pipe gives for any larger frame.)
struct UringWriter {
    file: tokio_uring::fs::File,
    batch: Vec<u8>,
}

impl UringWriter {
    fn new(fd: impl Into<OwnedFd>) -> UringWriter {
        UringWriter {
            file: uring_file(fd),
            batch: Vec::with_capacity(RAW_BATCH),
        }
    }

    /// Queues or writes one frame; hands the payload buffer back.
    async fn feed(&mut self, payload: Vec<u8>) -> io::Result<Vec<u8>> {
        let frame = RAW_HEADER + payload.len();
        if self.batch.len() + frame > RAW_BATCH {
            self.flush().await?;
        }
        if frame <= RAW_BATCH {
            self.batch.extend_from_slice(&raw_header(payload.len()));
            self.batch.extend_from_slice(&payload);
            return Ok(payload);
        }
        self.write(raw_header(payload.len()).to_vec()).await?;
        self.write(payload).await
    }

    /// One frame, written at once (for ping-pong).
    async fn send(&mut self, payload: Vec<u8>) -> io::Result<Vec<u8>> {
        let payload = self.feed(payload).await?;
        self.flush().await?;
        Ok(payload)
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let mut batch = self.write(batch).await?;
        batch.clear();
        self.batch = batch;
        Ok(())
    }

    /// Writes all of `buf`. A pipe ignores the offset.
    async fn write(&self, buf: Vec<u8>) -> io::Result<Vec<u8>> {
        let (res, buf) = self.file.write_all_at(buf, 0).await;
        res.map(|()| buf)
    }
}

/// Reads large chunks through tokio-uring into a [`FrameBuf`].
struct UringReader {
    file: tokio_uring::fs::File,
    frames: FrameBuf,
}

impl UringReader {
    fn new(fd: impl Into<OwnedFd>) -> UringReader {
        UringReader {
            file: uring_file(fd),
            frames: FrameBuf::default(),
        }
    }

    /// The next payload, or `None` at a clean end of stream.
    async fn next(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            if let Some(payload) = self.frames.take() {
                return Ok(Some(&self.frames.buf[payload]));
            }
            self.frames.make_room();
            let f = &mut self.frames;
            // tokio-uring reads into an owned buffer: lend it ours and take
            // it back.
            let spare = std::mem::take(&mut f.buf).slice(f.end..);
            let (res, spare) = self.file.read_at(spare, 0).await;
            f.buf = spare.into_inner();
            let n = res?;
            if n == 0 {
                if f.is_empty() {
                    return Ok(None);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            f.end += n;
        }
    }
}

/// tokio-uring one way: batched frame writes, chunked reads.
pub fn tokio_uring_one_way(size: usize, messages: u64) -> Result<Throughput> {
    let (r, w) = raw_pipe()?;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = spawn_side(Side::Parent, move || -> Result<Instant> {
        tokio_uring::start(async move {
            let mut w = UringWriter::new(w);
            let mut msg = vec![0xa5u8; size];
            go2.wait();
            let start = Instant::now();
            for _ in 0..messages {
                msg = w.feed(msg).await?;
            }
            w.flush().await?;
            Ok(start)
        })
    });
    let receiver = spawn_side(Side::Child, move || -> Result<(Instant, usize)> {
        tokio_uring::start(async move {
            let mut r = UringReader::new(r);
            go.wait();
            let mut bytes = 0;
            for _ in 0..messages {
                bytes += r
                    .next()
                    .await?
                    .ok_or("tokio-uring pipe closed early")?
                    .len();
            }
            Ok((Instant::now(), bytes))
        })
    });
    let start = join(sender)?;
    let (end, bytes) = join(receiver)?;
    check_bytes(bytes, size, messages)?;
    Ok(Throughput {
        size,
        messages,
        elapsed: end - start,
    })
}

/// tokio-uring ping-pong over two pipes.
pub fn tokio_uring_ping_pong(size: usize, warmup: usize, rounds: usize) -> Result<Vec<Duration>> {
    let (ping_r, ping_w) = raw_pipe()?;
    let (pong_r, pong_w) = raw_pipe()?;
    let echo = spawn_side(Side::Child, move || -> Result<()> {
        tokio_uring::start(async move {
            let mut r = UringReader::new(ping_r);
            let mut w = UringWriter::new(pong_w);
            let mut msg = vec![0x22u8; size];
            while let Some(m) = r.next().await? {
                std::hint::black_box(m.len());
                msg = w.send(msg).await?;
            }
            Ok(())
        })
    });
    let pinger = spawn_side(Side::Parent, move || -> Result<Vec<Duration>> {
        tokio_uring::start(async move {
            let mut r = UringReader::new(pong_r);
            let mut w = UringWriter::new(ping_w);
            let mut msg = vec![0x11u8; size];
            let mut samples = Vec::with_capacity(rounds);
            for i in 0..warmup + rounds {
                let t0 = Instant::now();
                msg = w.send(msg).await?;
                std::hint::black_box(r.next().await?.ok_or("echo closed early")?.len());
                if i >= warmup {
                    samples.push(t0.elapsed());
                }
            }
            Ok(samples)
        })
    });
    let samples = join(pinger)?;
    join(echo)?;
    Ok(samples)
}

/// ipc-channel one way: one blocking `send` per message, one `recv` each.
pub fn ipc_channel_one_way(size: usize, messages: u64) -> Result<Throughput> {
    let (tx, rx) = ipc_channel::ipc::bytes_channel()?;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = spawn_side(Side::Parent, move || -> Result<Instant> {
        let msg = vec![0xa5u8; size];
        go2.wait();
        let start = Instant::now();
        for _ in 0..messages {
            tx.send(&msg)?;
        }
        Ok(start)
    });
    let receiver = spawn_side(Side::Child, move || -> Result<(Instant, usize)> {
        go.wait();
        let mut bytes = 0;
        for _ in 0..messages {
            bytes += rx.recv()?.len();
        }
        Ok((Instant::now(), bytes))
    });
    let start = join(sender)?;
    let (end, bytes) = join(receiver)?;
    check_bytes(bytes, size, messages)?;
    Ok(Throughput {
        size,
        messages,
        elapsed: end - start,
    })
}

/// ipc-channel ping-pong over two bytes channels.
pub fn ipc_channel_ping_pong(size: usize, warmup: usize, rounds: usize) -> Result<Vec<Duration>> {
    let (ping_tx, ping_rx) = ipc_channel::ipc::bytes_channel()?;
    let (pong_tx, pong_rx) = ipc_channel::ipc::bytes_channel()?;
    let echo = spawn_side(Side::Child, move || -> Result<()> {
        let msg = vec![0x22u8; size];
        // Ends with Disconnected once the pinger drops its sender.
        while let Ok(m) = ping_rx.recv() {
            std::hint::black_box(m.len());
            pong_tx.send(&msg)?;
        }
        Ok(())
    });
    let pinger = spawn_side(Side::Parent, move || -> Result<Vec<Duration>> {
        let msg = vec![0x11u8; size];
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..warmup + rounds {
            let t0 = Instant::now();
            ping_tx.send(&msg)?;
            std::hint::black_box(pong_rx.recv()?.len());
            if i >= warmup {
                samples.push(t0.elapsed());
            }
        }
        Ok(samples)
    });
    let samples = join(pinger)?;
    join(echo)?;
    Ok(samples)
}
