//! A quick side-by-side of ringipc against a hand-written blocking pipe.
//!
//! ```text
//! cargo run --release --example throughput            # about 20-30 s
//! cargo run --release --example throughput -- --quick # a few seconds, noisier
//! cargo run --release --example throughput -- --ping-pong ringipc-uring  # one cell, e.g. under perf
//! ```
//!
//! Contenders: ringipc on io_uring, ringipc on epoll, and a raw blocking
//! `std::io::pipe()` with hand-written framing (a 16-byte header, then the
//! payload; small messages are gathered in a 256 KiB userspace buffer and
//! written in one `write`: the raw batched-write rate). Every pipe is grown
//! to 1 MiB the way ringipc grows its own.
//!
//! Scenarios, each across two OS threads (the shape of a parent and a child
//! process, without process start-up in the numbers):
//! - one-way throughput of 64 B, 4 KiB, 64 KiB and 1 MiB messages. ringipc
//!   sends `Vec<u8>` rkyv messages with `feed` and one `flush` at the end,
//!   as a user moving bulk data would; MB/s counts payload bytes (10^6).
//! - 64 B ping-pong: round-trip latency, p50 and p99.
//!
//! The `measure` module holds one function per scenario and contender and
//! returns plain data, so a bigger harness can reuse it; `main` only
//! formats.

use std::time::Duration;

/// Measuring functions: one per scenario and contender, plain data out.
pub mod measure {
    use ringipc::{Backend, ChannelConfig};
    use std::io::{self, IoSlice, PipeReader, PipeWriter, Read, Write};
    use std::os::fd::AsRawFd;
    use std::sync::{Arc, Barrier};
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
        /// Blocking `std::io::pipe()` with hand-written framing.
        RawPipe,
    }

    impl Contender {
        /// Every contender, raw last (it is the reference).
        pub const ALL: [Contender; 3] = [
            Contender::RingipcUring,
            Contender::RingipcEpoll,
            Contender::RawPipe,
        ];

        /// Name for tables.
        pub fn name(self) -> &'static str {
            match self {
                Contender::RingipcUring => "ringipc-uring",
                Contender::RingipcEpoll => "ringipc-epoll",
                Contender::RawPipe => "raw-pipe",
            }
        }

        /// Whether this machine can run it, or why not.
        pub fn available(self) -> std::result::Result<(), String> {
            match self {
                Contender::RingipcUring => ringipc::uring_probe(),
                _ => Ok(()),
            }
        }

        fn backend(self) -> Option<Backend> {
            match self {
                Contender::RingipcUring => Some(Backend::Uring),
                Contender::RingipcEpoll => Some(Backend::Epoll),
                Contender::RawPipe => None,
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
            }
        }
    }

    /// How long and how often to measure.
    #[derive(Clone, Copy, Debug)]
    pub struct Settings {
        /// Target duration of one throughput run.
        pub run_time: Duration,
        /// Throughput runs per cell (the median is kept); ping-pong runs
        /// per contender (their samples are pooled).
        pub reps: usize,
        /// Ping-pong round trips measured per contender, over all runs.
        pub rounds: usize,
        /// Ping-pong round trips before measuring.
        pub warmup_rounds: usize,
    }

    impl Settings {
        /// The default: about 20-30 s for the whole table.
        pub fn standard() -> Settings {
            Settings {
                run_time: Duration::from_millis(300),
                reps: 5,
                rounds: 30_000,
                warmup_rounds: 2_000,
            }
        }

        /// A few seconds for the whole table; noisier.
        pub fn quick() -> Settings {
            Settings {
                run_time: Duration::from_millis(100),
                reps: 1,
                rounds: 5_000,
                warmup_rounds: 500,
            }
        }
    }

    /// One-way throughput of each contender for `size`-byte messages, in
    /// the order given. A short pilot run per contender sizes its batch to
    /// `settings.run_time`; then `settings.reps` rounds run every contender
    /// once each, interleaved so that background load drifting over time
    /// hits all of them alike, and each keeps its median run.
    pub fn one_way(
        contenders: &[Contender],
        size: usize,
        settings: &Settings,
    ) -> Result<Vec<Throughput>> {
        let pilot_messages = ((16 << 20) / size).clamp(64, 200_000) as u64;
        let mut batch = Vec::new();
        for &c in contenders {
            let pilot = one_way_once(c, size, pilot_messages)?;
            let n = pilot.msgs_per_sec() * settings.run_time.as_secs_f64();
            batch.push(n.clamp(32.0, 1e9) as u64);
        }
        let mut runs: Vec<Vec<Throughput>> = vec![Vec::new(); contenders.len()];
        for _ in 0..settings.reps.max(1) {
            for (i, &c) in contenders.iter().enumerate() {
                runs[i].push(one_way_once(c, size, batch[i])?);
            }
        }
        Ok(runs
            .into_iter()
            .map(|mut r| {
                r.sort_by(|a, b| a.msgs_per_sec().total_cmp(&b.msgs_per_sec()));
                r[r.len() / 2]
            })
            .collect())
    }

    /// One one-way run of exactly `messages` messages.
    pub fn one_way_once(contender: Contender, size: usize, messages: u64) -> Result<Throughput> {
        match contender.backend() {
            Some(backend) => ringipc_one_way(backend, size, messages),
            None => raw_one_way(size, messages),
        }
    }

    /// Ping-pong latency of each contender, in the order given. The round
    /// trips are split into `settings.reps` slices run in turn for every
    /// contender (the same interleaving as [`one_way`]), each on a fresh
    /// channel with its own warm-up.
    pub fn ping_pong(
        contenders: &[Contender],
        size: usize,
        settings: &Settings,
    ) -> Result<Vec<Latency>> {
        let reps = settings.reps.max(1);
        let slice = settings.rounds.div_ceil(reps);
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); contenders.len()];
        for _ in 0..reps {
            for (i, &c) in contenders.iter().enumerate() {
                samples[i].extend(ping_pong_once(c, size, settings.warmup_rounds, slice)?);
            }
        }
        Ok(samples
            .into_iter()
            .map(|s| Latency::from_samples(size, s))
            .collect())
    }

    /// One ping-pong run: `warmup` unmeasured round trips, then one sample
    /// per round trip.
    pub fn ping_pong_once(
        contender: Contender,
        size: usize,
        warmup: usize,
        rounds: usize,
    ) -> Result<Vec<Duration>> {
        match contender.backend() {
            Some(backend) => ringipc_ping_pong(backend, size, warmup, rounds),
            None => raw_ping_pong(size, warmup, rounds),
        }
    }

    fn runtime() -> io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    }

    fn join<T>(h: std::thread::JoinHandle<Result<T>>) -> Result<T> {
        h.join().map_err(|_| "measuring thread panicked")?
    }

    /// ringipc one way: a sender thread `feed`s every message and flushes
    /// once; a receiver thread receives (validates) each one.
    pub fn ringipc_one_way(backend: Backend, size: usize, messages: u64) -> Result<Throughput> {
        let (mut tx, mut rx) = ChannelConfig::new().backend(backend).pipe::<Vec<u8>>()?;
        let go = Arc::new(Barrier::new(2));
        let go2 = go.clone();
        let sender = std::thread::spawn(move || -> Result<Instant> {
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
        let receiver = std::thread::spawn(move || -> Result<(Instant, usize)> {
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
        let (ping, pong) = ChannelConfig::new()
            .backend(backend)
            .duplex::<Vec<u8>, Vec<u8>>()?;
        let echo = std::thread::spawn(move || -> Result<()> {
            let rt = runtime()?;
            let (mut tx, mut rx) = pong.split();
            let msg = vec![0x22u8; size];
            rt.block_on(async {
                loop {
                    match rx.recv().await {
                        Ok(m) => std::hint::black_box(m.len()),
                        Err(e) if e.kind() == ringipc::ErrorKind::Closed => return Ok(()),
                        Err(e) => return Err(e),
                    };
                    tx.send(&msg).await?;
                }
            })?;
            Ok(())
        });
        let pinger = std::thread::spawn(move || -> Result<Vec<Duration>> {
            let rt = runtime()?;
            let (mut tx, mut rx) = ping.split();
            let msg = vec![0x11u8; size];
            let mut samples = Vec::with_capacity(rounds);
            rt.block_on(async {
                for i in 0..warmup + rounds {
                    let t0 = Instant::now();
                    tx.send(&msg).await?;
                    std::hint::black_box(rx.recv().await?.len());
                    if i >= warmup {
                        samples.push(t0.elapsed());
                    }
                }
                Ok::<_, ringipc::Error>(())
            })?;
            Ok(samples)
        });
        let samples = join(pinger)?;
        join(echo)?;
        Ok(samples)
    }

    /// Header of the raw contender's frames: payload length, then reserved zeros.
    const RAW_HEADER: usize = 16;
    /// The raw writer gathers small frames up to this many bytes per
    /// `write`, the same batch size as ringipc's `feed`.
    const RAW_BATCH: usize = 256 << 10;
    /// Smallest read the raw reader asks for, as ringipc's decoder.
    const RAW_READ_CHUNK: usize = 64 << 10;

    fn raw_header(len: usize) -> [u8; RAW_HEADER] {
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

    /// Reads large chunks into one buffer and hands out payloads in place,
    /// as ringipc's decoder does (without its alignment and checks).
    struct RawReader {
        r: PipeReader,
        buf: Vec<u8>,
        start: usize,
        end: usize,
    }

    impl RawReader {
        fn new(r: PipeReader) -> RawReader {
            RawReader {
                r,
                buf: vec![0; RAW_BATCH],
                start: 0,
                end: 0,
            }
        }

        /// Makes `need` bytes available at `start`; false on EOF before any byte.
        fn fill(&mut self, need: usize) -> io::Result<bool> {
            while self.end - self.start < need {
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
                let n = match self.r.read(&mut self.buf[self.end..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if n == 0 {
                    if self.start == self.end {
                        return Ok(false);
                    }
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                self.end += n;
            }
            Ok(true)
        }

        /// The next payload, or `None` at a clean end of stream.
        fn next(&mut self) -> io::Result<Option<&[u8]>> {
            if !self.fill(RAW_HEADER)? {
                return Ok(None);
            }
            let h = &self.buf[self.start..self.start + RAW_HEADER];
            let len = u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) as usize;
            if !self.fill(RAW_HEADER + len)? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let payload = self.start + RAW_HEADER..self.start + RAW_HEADER + len;
            self.start = payload.end;
            Ok(Some(&self.buf[payload]))
        }
    }

    /// Raw pipe one way: blocking writes of batched frames, blocking reads.
    pub fn raw_one_way(size: usize, messages: u64) -> Result<Throughput> {
        let (r, w) = raw_pipe()?;
        let go = Arc::new(Barrier::new(2));
        let go2 = go.clone();
        let sender = std::thread::spawn(move || -> Result<Instant> {
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
        let receiver = std::thread::spawn(move || -> Result<(Instant, usize)> {
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
        let echo = std::thread::spawn(move || -> Result<()> {
            let mut r = RawReader::new(ping_r);
            let mut w = RawWriter::new(pong_w);
            let msg = vec![0x22u8; size];
            while let Some(m) = r.next()? {
                std::hint::black_box(m.len());
                w.send(&msg)?;
            }
            Ok(())
        });
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
        drop(w);
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
            // utime and stime are fields 14 and 15 of the whole line.
            let own = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
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

    fn check_bytes(got: usize, size: usize, messages: u64) -> Result<()> {
        let want = size as u64 * messages;
        if got as u64 != want {
            return Err(format!("received {got} payload bytes, expected {want}").into());
        }
        Ok(())
    }
}

use measure::{Contender, Latency, Settings, Throughput};

const USAGE: &str = "usage: throughput [--quick] [--one-way | --ping-pong] [CONTENDER...]
  CONTENDER: ringipc-uring, ringipc-epoll, raw-pipe (default: all)
  --quick      shorter runs, one per cell (noisier)
  --one-way    only the one-way throughput table
  --ping-pong  only the ping-pong latency table
  --size N     one-way with N-byte messages only";

const SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];
const PING_SIZE: usize = 64;

fn size_name(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn si(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.1} k", x / 1e3),
        x => format!("{x:.0}  "),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Everything measured, for the report and the target checks.
struct Report {
    contenders: Vec<Contender>,
    one_way: Vec<(Contender, Throughput)>,
    ping: Vec<(Contender, Latency)>,
    /// Share of the machine other processes used while each cell ran, keyed
    /// by message size (ping-pong under `PING_KEY`).
    foreign_load: Vec<(usize, f64)>,
}

/// `Report::foreign_load` key of the ping-pong cell.
const PING_KEY: usize = 0;
/// Above this much foreign CPU load a cell's figures are flagged.
const NOISY: f64 = 0.05;

impl Report {
    fn throughput(&self, c: Contender, size: usize) -> Option<&Throughput> {
        self.one_way
            .iter()
            .find(|(k, t)| *k == c && t.size == size)
            .map(|(_, t)| t)
    }

    /// Message sizes measured one way, in the order measured.
    fn sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = Vec::new();
        for (_, t) in &self.one_way {
            if !sizes.contains(&t.size) {
                sizes.push(t.size);
            }
        }
        sizes
    }

    fn load(&self, key: usize) -> Option<f64> {
        self.foreign_load
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, l)| *l)
    }

    fn latency(&self, c: Contender) -> Option<&Latency> {
        self.ping.iter().find(|(k, _)| *k == c).map(|(_, l)| l)
    }

    /// ringipc's message rate as a fraction of raw's, per backend.
    fn rate_ratio(&self, c: Contender, size: usize) -> Option<f64> {
        let raw = self.throughput(Contender::RawPipe, size)?;
        Some(self.throughput(c, size)?.msgs_per_sec() / raw.msgs_per_sec())
    }
}

/// What to run: every contender and scenario unless narrowed on the command line.
struct Selection {
    contenders: Vec<Contender>,
    sizes: Vec<usize>,
    one_way: bool,
    ping_pong: bool,
}

fn measure_all(settings: &Settings, sel: &Selection) -> measure::Result<Report> {
    let mut contenders = Vec::new();
    for &c in &sel.contenders {
        match c.available() {
            Ok(()) => contenders.push(c),
            Err(why) => println!("SKIPPED {}: {why}", c.name()),
        }
    }
    let mut report = Report {
        contenders,
        one_way: Vec::new(),
        ping: Vec::new(),
        foreign_load: Vec::new(),
    };
    for &size in sel.sizes.iter().filter(|_| sel.one_way) {
        let cpu = measure::CpuSnapshot::now();
        let results = measure::one_way(&report.contenders, size, settings)?;
        if let Some(load) = cpu.and_then(|c| c.foreign_load_since()) {
            report.foreign_load.push((size, load));
        }
        for (&c, t) in report.contenders.iter().zip(results) {
            eprintln!(
                "  one-way {:>7} {:<14} {:>10} msg/s",
                size_name(size),
                c.name(),
                si(t.msgs_per_sec())
            );
            report.one_way.push((c, t));
        }
    }
    if sel.ping_pong {
        let cpu = measure::CpuSnapshot::now();
        let results = measure::ping_pong(&report.contenders, PING_SIZE, settings)?;
        if let Some(load) = cpu.and_then(|c| c.foreign_load_since()) {
            report.foreign_load.push((PING_KEY, load));
        }
        for (&c, l) in report.contenders.iter().zip(results) {
            eprintln!("  ping-pong {:<14} p50 {:.1} us", c.name(), us(l.p50));
            report.ping.push((c, l));
        }
    }
    Ok(report)
}

fn print_tables(r: &Report) {
    if !r.one_way.is_empty() {
        print_one_way(r);
    }
    if !r.ping.is_empty() {
        print_ping_pong(r);
    }
}

fn print_one_way(r: &Report) {
    println!();
    println!("one-way throughput (MB = 10^6 payload bytes; ratio = msgs/s vs raw-pipe)");
    println!(
        "{:>8}  {:<14} {:>12} {:>10} {:>9} {:>10}",
        "size", "contender", "msgs/s", "MB/s", "vs raw", "messages"
    );
    for size in r.sizes() {
        print_load(r.load(size));
        for &c in &r.contenders {
            let Some(t) = r.throughput(c, size) else {
                continue;
            };
            let ratio = r
                .rate_ratio(c, size)
                .map_or("-".to_string(), |x| format!("{x:.2}x"));
            println!(
                "{:>8}  {:<14} {:>12} {:>10.1} {:>9} {:>10}",
                size_name(size),
                c.name(),
                si(t.msgs_per_sec()),
                t.mb_per_sec(),
                ratio,
                t.messages
            );
        }
    }
}

/// Flags a cell during which other processes kept the cores busy.
fn print_load(load: Option<f64>) {
    if let Some(load) = load.filter(|&l| l > NOISY) {
        println!(
            "  (other processes used {:.0}% of the machine during the next rows)",
            load * 100.0
        );
    }
}

fn print_ping_pong(r: &Report) {
    println!();
    println!(
        "ping-pong round trip, {} messages (microseconds)",
        size_name(PING_SIZE)
    );
    println!(
        "{:<14} {:>9} {:>9} {:>12} {:>8}",
        "contender", "p50", "p99", "p50 vs raw", "rounds"
    );
    print_load(r.load(PING_KEY));
    let raw = r.latency(Contender::RawPipe).copied();
    for &c in &r.contenders {
        let Some(l) = r.latency(c) else { continue };
        let ratio = raw.map_or("-".to_string(), |raw| {
            format!("{:.2}x", us(l.p50) / us(raw.p50))
        });
        println!(
            "{:<14} {:>9.1} {:>9.1} {:>12} {:>8}",
            c.name(),
            us(l.p50),
            us(l.p99),
            ratio,
            l.rounds
        );
    }
}

/// The issue's targets, each checked on this run's numbers.
fn print_targets(r: &Report) {
    let ringipc: Vec<Contender> = r
        .contenders
        .iter()
        .copied()
        .filter(|c| *c != Contender::RawPipe)
        .collect();
    let verdict = |ok: bool| if ok { "MET " } else { "MISS" };
    println!();
    println!("targets (ratios within this run)");
    let worst = r.foreign_load.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    if worst > NOISY {
        println!(
            "(other processes used up to {:.0}% of the machine during this run: treat misses with care)",
            worst * 100.0
        );
    }

    for (size, floor, what) in [
        (64, 0.25, "64 B one-way >= 25% of raw batched-write rate"),
        (1 << 20, 0.80, "1 MiB one-way >= 80% of raw pipe bandwidth"),
    ] {
        let ratios: Vec<(Contender, f64)> = ringipc
            .iter()
            .filter_map(|&c| Some((c, r.rate_ratio(c, size)?)))
            .collect();
        if ratios.is_empty() {
            continue;
        }
        let ok = ratios.iter().all(|(_, x)| *x >= floor);
        let detail: Vec<String> = ratios
            .iter()
            .map(|(c, x)| format!("{} {x:.2}x", c.name()))
            .collect();
        println!("[{}] {what}: {}", verdict(ok), detail.join(", "));
    }

    if let Some(raw) = r
        .latency(Contender::RawPipe)
        .filter(|_| !ringipc.is_empty())
    {
        let ratios: Vec<(Contender, f64)> = ringipc
            .iter()
            .filter_map(|&c| Some((c, us(r.latency(c)?.p50) / us(raw.p50))))
            .collect();
        let ok = ratios.iter().all(|(_, x)| *x <= 1.3);
        let detail: Vec<String> = ratios
            .iter()
            .map(|(c, x)| format!("{} {x:.2}x", c.name()))
            .collect();
        println!(
            "[{}] 64 B ping-pong p50 within 1.3x of raw blocking pipe: {}",
            verdict(ok),
            detail.join(", ")
        );
    }

    let (u, e) = (Contender::RingipcUring, Contender::RingipcEpoll);
    if r.contenders.contains(&u) && r.contenders.contains(&e) {
        let mut worst: Vec<String> = Vec::new();
        let mut ok = true;
        for size in r.sizes() {
            if let (Some(tu), Some(te)) = (r.throughput(u, size), r.throughput(e, size)) {
                let x = tu.msgs_per_sec() / te.msgs_per_sec();
                ok &= x >= 0.9;
                worst.push(format!("{} {x:.2}x", size_name(size)));
            }
        }
        if let (Some(lu), Some(le)) = (r.latency(u), r.latency(e)) {
            // Latency: uring slower means a larger p50.
            let x = us(le.p50) / us(lu.p50);
            ok &= x >= 0.9;
            worst.push(format!("ping p50 {x:.2}x"));
        }
        if worst.is_empty() {
            return;
        }
        println!(
            "[{}] uring never >10% slower than epoll (uring speed / epoll speed): {}",
            verdict(ok),
            worst.join(", ")
        );
    }
}

fn main() -> measure::Result<()> {
    let mut settings = Settings::standard();
    let mut only: Vec<Contender> = Vec::new();
    let mut sel = Selection {
        contenders: Vec::new(),
        sizes: SIZES.to_vec(),
        one_way: true,
        ping_pong: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => settings = Settings::quick(),
            "--size" => {
                let size = args.next().and_then(|s| s.parse().ok()).filter(|&n| n > 0);
                sel.sizes = vec![size.ok_or("--size takes a message size in bytes")?];
            }
            "--one-way" => sel.ping_pong = false,
            "--ping-pong" => sel.one_way = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            name => match Contender::ALL.into_iter().find(|c| c.name() == name) {
                Some(c) => only.push(c),
                None => return Err(format!("unknown argument {name:?}\n{USAGE}").into()),
            },
        }
    }
    if !sel.one_way && !sel.ping_pong {
        sel.one_way = true;
        sel.ping_pong = true;
    }
    sel.contenders = if only.is_empty() {
        Contender::ALL.to_vec()
    } else {
        only
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ringipc throughput: kernel {}, {cores} cores, pipe size {} KiB, {} ms x {} runs per cell (median), {} ping-pong rounds",
        kernel.trim(),
        measure::raw_pipe_size()? >> 10,
        settings.run_time.as_millis(),
        settings.reps,
        settings.rounds
    );
    let t0 = std::time::Instant::now();
    let report = measure_all(&settings, &sel)?;
    print_tables(&report);
    print_targets(&report);
    println!();
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
