//! Measuring functions shared by the `throughput` and `harness` examples:
//! one function per scenario and contender, plain data out.
//!
//! Every contender runs its two sides on two OS threads (the shape of a
//! parent and a child process, without process start-up in the numbers),
//! pinned to the two cores given to [`set_pinning`], if any. The contenders
//! other than ringipc and the raw pipe live in [`peers`].

#[path = "peers.rs"]
pub mod peers;

use ringipc::{Backend, ChannelConfig};
use std::io::{self, IoSlice, PipeReader, PipeWriter, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Errors from any contender.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// Result of a measurement.
pub type Result<T> = std::result::Result<T, Error>;

/// Who moves the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contender {
    /// ringipc typed channels on the io_uring backend.
    RingipcUring,
    /// ringipc typed channels on the epoll backend.
    RingipcEpoll,
    /// tokio's `net::unix::pipe` with tokio-util's `LengthDelimitedCodec`.
    TokioPipe,
    /// tokio-uring reading and writing the pipe, raw framing by hand.
    TokioUring,
    /// ipc-channel's bytes channel (unix seqpacket sockets).
    IpcChannel,
    /// Blocking `std::io::pipe()` with hand-written framing.
    RawPipe,
}

impl Contender {
    /// Every contender, in table order; raw last (it is the reference).
    pub const ALL: [Contender; 6] = [
        Contender::RingipcUring,
        Contender::RingipcEpoll,
        Contender::TokioPipe,
        Contender::TokioUring,
        Contender::IpcChannel,
        Contender::RawPipe,
    ];

    /// ringipc on both backends and the raw pipe.
    pub const RINGIPC_AND_RAW: [Contender; 3] = [
        Contender::RingipcUring,
        Contender::RingipcEpoll,
        Contender::RawPipe,
    ];

    /// Name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Contender::RingipcUring => "ringipc-uring",
            Contender::RingipcEpoll => "ringipc-epoll",
            Contender::TokioPipe => "tokio-pipe+codec",
            Contender::TokioUring => "tokio-uring",
            Contender::IpcChannel => "ipc-channel",
            Contender::RawPipe => "raw-pipe",
        }
    }

    /// What exactly is measured, in one line.
    pub fn describe(self) -> &'static str {
        match self {
            Contender::RingipcUring => {
                "ringipc Sender/Receiver<Vec<u8>> (rkyv, validated), io_uring backend"
            }
            Contender::RingipcEpoll => {
                "ringipc Sender/Receiver<Vec<u8>> (rkyv, validated), epoll backend"
            }
            Contender::TokioPipe => {
                "tokio::net::unix::pipe + tokio-util LengthDelimitedCodec (FramedWrite/FramedRead, default settings)"
            }
            Contender::TokioUring => {
                "tokio-uring 0.5 fs::File on the pipe, 16-byte header framing by hand"
            }
            Contender::IpcChannel => "ipc-channel 0.23 ipc::bytes_channel, blocking send/recv",
            Contender::RawPipe => {
                "blocking std::io::pipe, 16-byte header framing by hand (the floor)"
            }
        }
    }

    /// Whether this machine can run it, or why not.
    pub fn available(self) -> std::result::Result<(), String> {
        match self {
            Contender::RingipcUring => ringipc::uring_probe(),
            // tokio-uring panics when it cannot set up a ring: ask first.
            Contender::TokioUring => io_uring::IoUring::new(8)
                .map(drop)
                .map_err(|e| format!("io_uring_setup failed: {e}")),
            _ => Ok(()),
        }
    }

    /// The ringipc backend, for the ringipc contenders.
    pub fn backend(self) -> Option<Backend> {
        match self {
            Contender::RingipcUring => Some(Backend::Uring),
            Contender::RingipcEpoll => Some(Backend::Epoll),
            _ => None,
        }
    }
}

/// One one-way run: `messages` messages of `size` payload bytes.
#[derive(Clone, Copy, Debug)]
pub struct Throughput {
    /// Payload bytes per message.
    pub size: usize,
    /// Messages delivered.
    pub messages: u64,
    /// From the sender's first message to the receiver holding the last.
    pub elapsed: Duration,
}

impl Throughput {
    /// Messages per second.
    pub fn msgs_per_sec(&self) -> f64 {
        self.messages as f64 / self.elapsed.as_secs_f64()
    }

    /// Payload megabytes (10^6 bytes) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.msgs_per_sec() * self.size as f64 / 1e6
    }
}

/// Round-trip latency of a ping-pong run.
#[derive(Clone, Copy, Debug)]
pub struct Latency {
    /// Payload bytes per message, each way.
    pub size: usize,
    /// Round trips measured (after warm-up).
    pub rounds: usize,
    /// Median round trip.
    pub p50: Duration,
    /// 99th percentile round trip.
    pub p99: Duration,
    /// 99.9th percentile round trip.
    pub p999: Duration,
}

impl Latency {
    /// Summarises round-trip samples.
    pub fn from_samples(size: usize, mut samples: Vec<Duration>) -> Latency {
        assert!(!samples.is_empty(), "no round trips measured");
        samples.sort_unstable();
        let pct = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
        Latency {
            size,
            rounds: samples.len(),
            p50: pct(0.50),
            p99: pct(0.99),
            p999: pct(0.999),
        }
    }
}

/// How long and how often to measure.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Target duration of one throughput run.
    pub run_time: Duration,
    /// Throughput runs per cell (the median is kept); ping-pong slices per
    /// contender (their samples are pooled).
    pub reps: usize,
    /// Target time of the measured round trips of one ping-pong cell, over
    /// all slices.
    pub ping_time: Duration,
    /// At most this many round trips per ping-pong cell.
    pub max_rounds: usize,
    /// Ping-pong round trips before measuring, per slice.
    pub warmup_rounds: usize,
}

impl Settings {
    /// The `throughput` example's default: about 20-30 s for its table.
    pub fn standard() -> Settings {
        Settings {
            run_time: Duration::from_millis(300),
            reps: 5,
            ping_time: Duration::from_millis(500),
            max_rounds: 30_000,
            warmup_rounds: 2_000,
        }
    }

    /// A few seconds for the whole table; noisier.
    pub fn quick() -> Settings {
        Settings {
            run_time: Duration::from_millis(100),
            reps: 1,
            ping_time: Duration::from_millis(100),
            max_rounds: 5_000,
            warmup_rounds: 500,
        }
    }

    /// Runs to make per throughput cell, including its pilot runs (an
    /// estimate, for progress bars).
    pub fn runs_per_cell(&self) -> usize {
        self.reps.max(1) + 1
    }
}

/// One-way throughput of each contender for `size`-byte messages, in the
/// order given; fails if any contender fails.
pub fn one_way(
    contenders: &[Contender],
    size: usize,
    settings: &Settings,
) -> Result<Vec<Throughput>> {
    one_way_each(contenders, size, settings, &mut |_| {})
        .into_iter()
        .map(|r| r.map_err(Error::from))
        .collect()
}

/// One-way throughput of each contender for `size`-byte messages, in the
/// order given, each with its own outcome. Pilot runs per contender, growing
/// until one lasts a few milliseconds, size its batch to `settings.run_time`;
/// then `settings.reps` rounds run every contender once each, interleaved so
/// that background load drifting over time hits all of them alike, and each
/// keeps its median run. `tick` is called after each contender's pilot and
/// after each of its runs.
pub fn one_way_each(
    contenders: &[Contender],
    size: usize,
    settings: &Settings,
    tick: &mut dyn FnMut(Contender),
) -> Vec<std::result::Result<Throughput, String>> {
    let mut batch: Vec<std::result::Result<u64, String>> = Vec::new();
    for &c in contenders {
        batch.push(pilot_batch(c, size, settings.run_time).map_err(|e| e.to_string()));
        tick(c);
    }
    let mut runs: Vec<std::result::Result<Vec<Throughput>, String>> = batch
        .iter()
        .map(|b| b.clone().map(|_| Vec::new()))
        .collect();
    for _ in 0..settings.reps.max(1) {
        for (i, &c) in contenders.iter().enumerate() {
            if let (Ok(n), Ok(done)) = (&batch[i], &mut runs[i]) {
                match one_way_once(c, size, *n) {
                    Ok(t) => done.push(t),
                    Err(e) => runs[i] = Err(e.to_string()),
                }
            }
            tick(c);
        }
    }
    runs.into_iter()
        .map(|r| {
            let mut r = r?;
            r.sort_by(|a, b| a.msgs_per_sec().total_cmp(&b.msgs_per_sec()));
            Ok(r[r.len() / 2])
        })
        .collect()
}

/// Messages for one run of about `run_time`, from pilot runs that grow
/// until one lasts at least an eighth of it (and 5 ms).
fn pilot_batch(contender: Contender, size: usize, run_time: Duration) -> Result<u64> {
    let long_enough = (run_time / 8).max(Duration::from_millis(5));
    let mut n = ((256 << 10) / size.max(1)).max(16) as u64;
    loop {
        let t = one_way_once(contender, size, n)?;
        if t.elapsed >= long_enough || n >= 1 << 30 {
            let want = t.msgs_per_sec() * run_time.as_secs_f64();
            return Ok(want.clamp(16.0, 1e9) as u64);
        }
        n *= 4;
    }
}

/// One one-way run of exactly `messages` messages.
pub fn one_way_once(contender: Contender, size: usize, messages: u64) -> Result<Throughput> {
    match contender {
        Contender::RingipcUring | Contender::RingipcEpoll => {
            let backend = contender.backend().expect("ringipc contender");
            ringipc_one_way(backend, size, messages)
        }
        Contender::TokioPipe => peers::tokio_pipe_one_way(size, messages),
        Contender::TokioUring => peers::tokio_uring_one_way(size, messages),
        Contender::IpcChannel => peers::ipc_channel_one_way(size, messages),
        Contender::RawPipe => raw_one_way(size, messages),
    }
}

/// Ping-pong latency of each contender, in the order given; fails if any
/// contender fails.
pub fn ping_pong(
    contenders: &[Contender],
    size: usize,
    settings: &Settings,
) -> Result<Vec<Latency>> {
    ping_pong_each(contenders, size, settings, &mut |_| {})
        .into_iter()
        .map(|r| r.map_err(Error::from))
        .collect()
}

/// Ping-pong latency of each contender, in the order given, each with its
/// own outcome. A short pilot per contender sizes its round trips to
/// `settings.ping_time`; they are split into `settings.reps` slices run in
/// turn for every contender (the same interleaving as [`one_way_each`]),
/// each on a fresh channel with its own warm-up. `tick` is called after
/// each pilot and slice.
pub fn ping_pong_each(
    contenders: &[Contender],
    size: usize,
    settings: &Settings,
    tick: &mut dyn FnMut(Contender),
) -> Vec<std::result::Result<Latency, String>> {
    let reps = settings.reps.max(1);
    let mut samples: Vec<std::result::Result<(usize, Vec<Duration>), String>> = Vec::new();
    for &c in contenders {
        let pilot = ping_pong_once(c, size, 50, 200).map(|s| Latency::from_samples(size, s));
        samples.push(match pilot {
            Ok(l) => {
                let rounds = settings.ping_time.as_secs_f64() / l.p50.as_secs_f64().max(1e-7);
                let rounds = (rounds as usize).clamp(1_000, settings.max_rounds.max(1_000));
                Ok((rounds.div_ceil(reps), Vec::with_capacity(rounds)))
            }
            Err(e) => Err(e.to_string()),
        });
        tick(c);
    }
    let warmup = settings.warmup_rounds.min(settings.max_rounds / reps / 4);
    for _ in 0..reps {
        for (i, &c) in contenders.iter().enumerate() {
            if let Ok((slice, done)) = &mut samples[i] {
                match ping_pong_once(c, size, warmup, *slice) {
                    Ok(s) => done.extend(s),
                    Err(e) => samples[i] = Err(e.to_string()),
                }
            }
            tick(c);
        }
    }
    samples
        .into_iter()
        .map(|s| s.map(|(_, s)| Latency::from_samples(size, s)))
        .collect()
}

/// One ping-pong run: `warmup` unmeasured round trips, then one sample
/// per round trip.
pub fn ping_pong_once(
    contender: Contender,
    size: usize,
    warmup: usize,
    rounds: usize,
) -> Result<Vec<Duration>> {
    match contender {
        Contender::RingipcUring | Contender::RingipcEpoll => {
            let backend = contender.backend().expect("ringipc contender");
            ringipc_ping_pong(backend, size, warmup, rounds)
        }
        Contender::TokioPipe => peers::tokio_pipe_ping_pong(size, warmup, rounds),
        Contender::TokioUring => peers::tokio_uring_ping_pong(size, warmup, rounds),
        Contender::IpcChannel => peers::ipc_channel_ping_pong(size, warmup, rounds),
        Contender::RawPipe => raw_ping_pong(size, warmup, rounds),
    }
}

/// The cores the two sides run on: `[parent or sender, child or receiver]`.
static PINNING: Mutex<Option<[usize; 2]>> = Mutex::new(None);

/// Pins every later measurement's two sides to these cores (`None`: no pinning).
pub fn set_pinning(cores: Option<[usize; 2]>) {
    *PINNING.lock().unwrap_or_else(|e| e.into_inner()) = cores;
}

/// The cores set with [`set_pinning`].
pub fn pinning() -> Option<[usize; 2]> {
    *PINNING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Which side of a measurement a thread runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The sender, or the side that measures round trips: a parent.
    Parent = 0,
    /// The receiver, or the echo: a child.
    Child = 1,
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> io::Result<()> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::other(format!("core {core} out of range")));
    }
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` is below CPU_SETSIZE, checked above.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the
    // calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread pinned as [`set_pinning`] says for `side`.
pub fn spawn_side<T, F>(side: Side, f: F) -> JoinHandle<Result<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    std::thread::spawn(move || {
        if let Some(cores) = pinning() {
            pin_current_thread(cores[side as usize])?;
        }
        f()
    })
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Waits for a measuring thread and hands back its result.
pub fn join<T>(h: JoinHandle<Result<T>>) -> Result<T> {
    h.join().map_err(|_| "measuring thread panicked")?
}

/// ringipc one way: a sender thread `feed`s every message and flushes
/// once; a receiver thread receives (validates) each one.
pub fn ringipc_one_way(backend: Backend, size: usize, messages: u64) -> Result<Throughput> {
    let (mut tx, mut rx) = ChannelConfig::new().backend(backend).pipe::<Vec<u8>>()?;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = spawn_side(Side::Parent, move || -> Result<Instant> {
        let rt = runtime()?;
        let msg = vec![0xa5u8; size];
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
        let rt = runtime()?;
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
    check_bytes(bytes, size, messages)?;
    Ok(Throughput {
        size,
        messages,
        elapsed: end - start,
    })
}

/// ringipc ping-pong over a duplex: returns one sample per measured round trip.
pub fn ringipc_ping_pong(
    backend: Backend,
    size: usize,
    warmup: usize,
    rounds: usize,
) -> Result<Vec<Duration>> {
    Ok(ringipc_ping_pong_with(backend, size, warmup, rounds, None)?.samples)
}

/// What a ping-pong run measured, with the CPU both sides spent on it.
pub struct PingRun {
    /// One sample per measured round trip.
    pub samples: Vec<Duration>,
    /// CPU time of the two threads during the measured rounds.
    pub cpu: Duration,
    /// Wall time of the measured rounds.
    pub wall: Duration,
}

/// The calling thread's CPU time so far.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// [`ringipc_ping_pong`] with both receivers busy polling for `busy` (none:
/// park at once), also measuring the CPU the two threads burn.
pub fn ringipc_ping_pong_with(
    backend: Backend,
    size: usize,
    warmup: usize,
    rounds: usize,
    busy: Option<Duration>,
) -> Result<PingRun> {
    let mut cfg = ChannelConfig::new().backend(backend);
    if let Some(b) = busy {
        cfg = cfg.busy_poll(b);
    }
    let (ping, pong) = cfg.duplex::<Vec<u8>, Vec<u8>>()?;
    let echo = spawn_side(Side::Child, move || -> Result<Duration> {
        let rt = runtime()?;
        let (mut tx, mut rx) = pong.split();
        let msg = vec![0x22u8; size];
        let mut cpu_at_warmup_end = None;
        let mut n = 0usize;
        rt.block_on(async {
            loop {
                match rx.recv().await {
                    Ok(m) => std::hint::black_box(m.len()),
                    Err(e) if e.kind() == ringipc::ErrorKind::Closed => return Ok(()),
                    Err(e) => return Err(e),
                };
                if n == warmup {
                    cpu_at_warmup_end = Some(thread_cpu_time());
                }
                n += 1;
                tx.send(&msg).await?;
            }
        })?;
        Ok(thread_cpu_time().saturating_sub(cpu_at_warmup_end.unwrap_or_default()))
    });
    let pinger = spawn_side(Side::Parent, move || -> Result<PingRun> {
        let rt = runtime()?;
        let (mut tx, mut rx) = ping.split();
        let msg = vec![0x11u8; size];
        let mut samples = Vec::with_capacity(rounds);
        let mut started = (Instant::now(), thread_cpu_time());
        rt.block_on(async {
            for i in 0..warmup + rounds {
                if i == warmup {
                    started = (Instant::now(), thread_cpu_time());
                }
                let t0 = Instant::now();
                tx.send(&msg).await?;
                std::hint::black_box(rx.recv().await?.len());
                if i >= warmup {
                    samples.push(t0.elapsed());
                }
            }
            Ok::<_, ringipc::Error>(())
        })?;
        Ok(PingRun {
            samples,
            cpu: thread_cpu_time() - started.1,
            wall: started.0.elapsed(),
        })
    });
    let mut run = join(pinger)?;
    run.cpu += join(echo)?;
    Ok(run)
}

/// Header of the hand-framed contenders' frames: payload length, then
/// reserved zeros.
pub const RAW_HEADER: usize = 16;
/// Hand-framed writers gather small frames up to this many bytes per
/// `write`, the same batch size as ringipc's `feed`.
pub const RAW_BATCH: usize = 256 << 10;
/// Smallest read the hand-framed readers ask for, as ringipc's decoder.
const RAW_READ_CHUNK: usize = 64 << 10;

/// The header of a hand-framed frame carrying `len` payload bytes.
pub fn raw_header(len: usize) -> [u8; RAW_HEADER] {
    let mut h = [0u8; RAW_HEADER];
    h[..8].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

/// A pipe grown to 1 MiB (or the system maximum) as ringipc grows its own.
pub fn raw_pipe() -> io::Result<(PipeReader, PipeWriter)> {
    let (r, w) = io::pipe()?;
    let max = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(1 << 20);
    let size = (1usize << 20).min(max) as libc::c_int;
    // SAFETY: F_SETPIPE_SZ takes an int and only changes the capacity of
    // the pipe behind this open fd. Failure keeps the default size, which
    // ringipc also tolerates.
    let _ = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
    Ok((r, w))
}

/// The capacity of a fresh pipe after [`raw_pipe`] grew it, in bytes.
pub fn raw_pipe_size() -> io::Result<usize> {
    let (_r, w) = raw_pipe()?;
    // SAFETY: F_GETPIPE_SZ takes no argument and reads the capacity.
    let n = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes frames through a userspace batch buffer; frames too large for
/// the buffer go out directly with `writev`, without a copy.
struct RawWriter {
    w: PipeWriter,
    batch: Vec<u8>,
}

impl RawWriter {
    fn new(w: PipeWriter) -> RawWriter {
        RawWriter {
            w,
            batch: Vec::with_capacity(RAW_BATCH),
        }
    }

    fn feed(&mut self, payload: &[u8]) -> io::Result<()> {
        let frame = RAW_HEADER + payload.len();
        if self.batch.len() + frame > RAW_BATCH {
            self.flush()?;
        }
        if frame <= RAW_BATCH {
            self.batch.extend_from_slice(&raw_header(payload.len()));
            self.batch.extend_from_slice(payload);
            Ok(())
        } else {
            let h = raw_header(payload.len());
            write_all_vectored(&mut self.w, &mut [IoSlice::new(&h), IoSlice::new(payload)])
        }
    }

    /// One frame, written at once (for ping-pong).
    fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        self.feed(payload)?;
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.w.write_all(&self.batch)?;
        self.batch.clear();
        Ok(())
    }
}

fn write_all_vectored(w: &mut PipeWriter, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The receive buffer of the hand-framed readers: reads land after `end`,
/// whole frames are handed out in place from `start`, as ringipc's decoder
/// does (without its alignment and checks).
pub struct FrameBuf {
    /// The bytes; `start..end` is received and not yet handed out.
    pub buf: Vec<u8>,
    start: usize,
    /// End of the received bytes: the next read lands here.
    pub end: usize,
}

impl Default for FrameBuf {
    fn default() -> Self {
        FrameBuf {
            buf: vec![0; RAW_BATCH],
            start: 0,
            end: 0,
        }
    }
}

impl FrameBuf {
    /// The next frame's payload range in `buf`, if the whole frame is here.
    pub fn take(&mut self) -> Option<Range<usize>> {
        let len = self.next_len()?;
        if self.end - self.start < RAW_HEADER + len {
            return None;
        }
        let payload = self.start + RAW_HEADER..self.start + RAW_HEADER + len;
        self.start = payload.end;
        Some(payload)
    }

    fn next_len(&self) -> Option<usize> {
        let h = self.buf.get(self.start..self.start + RAW_HEADER)?;
        (self.end - self.start >= RAW_HEADER)
            .then(|| u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as usize)
    }

    /// Makes room after `end` for the next read: enough for the frame (or
    /// header) being received, and at least one read chunk.
    pub fn make_room(&mut self) {
        let need = RAW_HEADER + self.next_len().unwrap_or(0);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let room = self.buf.len() - self.start;
        if room < need || self.buf.len() - self.end < RAW_READ_CHUNK {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < need + RAW_READ_CHUNK {
                self.buf.resize(need + RAW_READ_CHUNK, 0);
            }
        }
    }

    /// Whether no received byte is waiting (EOF here is a clean end).
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Reads large chunks with blocking `read` into a [`FrameBuf`].
struct RawReader {
    r: PipeReader,
    frames: FrameBuf,
}

impl RawReader {
    fn new(r: PipeReader) -> RawReader {
        RawReader {
            r,
            frames: FrameBuf::default(),
        }
    }

    /// The next payload, or `None` at a clean end of stream.
    fn next(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            if let Some(payload) = self.frames.take() {
                return Ok(Some(&self.frames.buf[payload]));
            }
            self.frames.make_room();
            let f = &mut self.frames;
            let n = match self.r.read(&mut f.buf[f.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
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

/// Raw pipe one way: blocking writes of batched frames, blocking reads.
pub fn raw_one_way(size: usize, messages: u64) -> Result<Throughput> {
    let (r, w) = raw_pipe()?;
    let go = Arc::new(Barrier::new(2));
    let go2 = go.clone();
    let sender = spawn_side(Side::Parent, move || -> Result<Instant> {
        let mut w = RawWriter::new(w);
        let msg = vec![0xa5u8; size];
        go2.wait();
        let start = Instant::now();
        for _ in 0..messages {
            w.feed(&msg)?;
        }
        w.flush()?;
        Ok(start)
    });
    let receiver = spawn_side(Side::Child, move || -> Result<(Instant, usize)> {
        let mut r = RawReader::new(r);
        go.wait();
        let mut bytes = 0;
        for _ in 0..messages {
            bytes += r.next()?.ok_or("raw pipe closed early")?.len();
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

/// Raw pipe ping-pong over two blocking pipes.
pub fn raw_ping_pong(size: usize, warmup: usize, rounds: usize) -> Result<Vec<Duration>> {
    let (ping_r, ping_w) = raw_pipe()?;
    let (pong_r, pong_w) = raw_pipe()?;
    let echo = spawn_side(Side::Child, move || -> Result<()> {
        let mut r = RawReader::new(ping_r);
        let mut w = RawWriter::new(pong_w);
        let msg = vec![0x22u8; size];
        while let Some(m) = r.next()? {
            std::hint::black_box(m.len());
            w.send(&msg)?;
        }
        Ok(())
    });
    let pinger = spawn_side(Side::Parent, move || -> Result<Vec<Duration>> {
        let mut r = RawReader::new(pong_r);
        let mut w = RawWriter::new(ping_w);
        let msg = vec![0x11u8; size];
        let mut samples = Vec::with_capacity(rounds);
        for i in 0..warmup + rounds {
            let t0 = Instant::now();
            w.send(&msg)?;
            std::hint::black_box(r.next()?.ok_or("echo closed early")?.len());
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

/// CPU time spent by the whole machine and by this process, to tell how
/// much of the cores other processes took while something was measured:
/// on a shared machine that, not ringipc, can explain a bad cell.
#[derive(Clone, Copy, Debug)]
pub struct CpuSnapshot {
    machine_busy: u64,
    own: u64,
    at: Instant,
}

impl CpuSnapshot {
    /// Reads `/proc/stat` and `/proc/self/stat`; `None` if unreadable.
    pub fn now() -> Option<CpuSnapshot> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
        let ticks: Vec<u64> = cpu
            .split_whitespace()
            .map(|t| t.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal: busy is all but
        // idle and iowait.
        let machine_busy = ticks.iter().take(8).sum::<u64>()
            - ticks.get(3).copied().unwrap_or(0)
            - ticks.get(4).copied().unwrap_or(0);
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name, which may itself hold spaces.
        let rest: Vec<&str> = own_stat
            .get(own_stat.rfind(')')? + 2..)?
            .split_whitespace()
            .collect();
        // utime, stime, cutime and cstime are fields 14 to 17 of the whole
        // line; waited-for children (process start, pool workers) count as
        // our own.
        let own = rest[11..15]
            .iter()
            .map(|f| f.parse::<u64>().ok())
            .sum::<Option<u64>>()?;
        Some(CpuSnapshot {
            machine_busy,
            own,
            at: Instant::now(),
        })
    }

    /// Share of all cores (0 to 1) that other processes kept busy since
    /// `self` was taken.
    pub fn foreign_load_since(&self) -> Option<f64> {
        let now = CpuSnapshot::now()?;
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let cores = std::thread::available_parallelism().ok()?.get();
        let wall = now.at.duration_since(self.at).as_secs_f64();
        if hz <= 0 || wall <= 0.0 {
            return None;
        }
        let foreign = (now.machine_busy - self.machine_busy).saturating_sub(now.own - self.own)
            as f64
            / hz as f64;
        Some((foreign / (wall * cores as f64)).clamp(0.0, 1.0))
    }
}

/// Fails unless `got` is exactly `messages` payloads of `size` bytes.
pub fn check_bytes(got: usize, size: usize, messages: u64) -> Result<()> {
    let want = size as u64 * messages;
    if got as u64 != want {
        return Err(format!("received {got} payload bytes, expected {want}").into());
    }
    Ok(())
}
