//! Channel traffic: typed and bytes messages between tasks, through a
//! long-lived echo child, and through engine cores. Sends and receives are
//! cancelled by timeouts at random, handles move to other tasks and to
//! short-lived threads (and back), and every message is checked: content,
//! order, and that no completed send is lost.

use crate::counters::{Beat, COUNTERS, add, anomaly, stopping};
use fastrand::Rng;
use ringipc::{
    Backend, BytesReceiver, BytesSender, ChannelConfig, Engine, ErrorKind, Process, Receiver,
    Result, Sender,
};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The typed message: a sequence number and a payload derived from it.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Msg {
    seq: u64,
    payload: Vec<u8>,
}

/// The payload byte at `i` of message `seq`.
fn pattern(seq: u64, i: usize) -> u8 {
    (seq as u8) ^ (i as u8).wrapping_mul(31) ^ ((i >> 8) as u8)
}

fn fill(seq: u64, len: usize, out: &mut Vec<u8>) {
    out.extend((0..len).map(|i| pattern(seq, i)));
}

fn intact(seq: u64, payload: &[u8]) -> bool {
    payload
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(seq, i))
}

/// Mostly small messages, some of a few KiB, a few over the arena
/// threshold (32 KiB) so typed channels also go through shared memory.
fn size(rng: &mut Rng) -> usize {
    match rng.u32(0..100) {
        0..80 => rng.usize(0..256),
        80..98 => rng.usize(256..16 << 10),
        _ => rng.usize(32 << 10..256 << 10),
    }
}

/// A received message: its sequence number, or what was wrong with it.
pub enum Got {
    Seq(u64, usize),
    Bad(String),
}

/// A sending end the soak can drive (typed or bytes).
pub trait Tx: Send + 'static {
    fn send_seq(
        &mut self,
        seq: u64,
        len: usize,
        feed: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    fn flush_all(&mut self) -> impl Future<Output = Result<()>> + Send;
}

/// A receiving end the soak can drive (typed or bytes).
pub trait Rx: Send + 'static {
    fn recv_seq(&mut self, timeout: Option<Duration>) -> impl Future<Output = Result<Got>> + Send;
    fn try_recv_seq(&mut self) -> Result<Option<Got>>;
}

impl Tx for Sender<Msg> {
    async fn send_seq(&mut self, seq: u64, len: usize, feed: bool) -> Result<()> {
        let mut payload = Vec::with_capacity(len);
        fill(seq, len, &mut payload);
        let m = Msg { seq, payload };
        if feed {
            self.feed(&m).await
        } else {
            self.send(&m).await
        }
    }

    async fn flush_all(&mut self) -> Result<()> {
        self.flush().await
    }
}

fn got_typed(m: &ArchivedMsg) -> Got {
    let seq = m.seq.to_native();
    if intact(seq, &m.payload) {
        Got::Seq(seq, m.payload.len())
    } else {
        Got::Bad(format!("typed message {seq}: payload corrupted"))
    }
}

impl Rx for Receiver<Msg> {
    async fn recv_seq(&mut self, timeout: Option<Duration>) -> Result<Got> {
        let m = match timeout {
            Some(t) => self.recv_timeout(t).await?,
            None => self.recv().await?,
        };
        Ok(got_typed(&m))
    }

    fn try_recv_seq(&mut self) -> Result<Option<Got>> {
        Ok(self.try_recv()?.map(|m| got_typed(&m)))
    }
}

impl Tx for BytesSender {
    async fn send_seq(&mut self, seq: u64, len: usize, feed: bool) -> Result<()> {
        let mut frame = Vec::with_capacity(8 + len);
        frame.extend_from_slice(&seq.to_le_bytes());
        fill(seq, len, &mut frame);
        if feed {
            self.feed(&frame).await
        } else {
            self.send(&frame).await
        }
    }

    async fn flush_all(&mut self) -> Result<()> {
        self.flush().await
    }
}

fn got_bytes(frame: &[u8]) -> Got {
    if frame.len() < 8 {
        return Got::Bad(format!("bytes frame of {} bytes, no header", frame.len()));
    }
    let seq = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
    if intact(seq, &frame[8..]) {
        Got::Seq(seq, frame.len() - 8)
    } else {
        Got::Bad(format!("bytes frame {seq}: payload corrupted"))
    }
}

impl Rx for BytesReceiver {
    async fn recv_seq(&mut self, timeout: Option<Duration>) -> Result<Got> {
        let f = match timeout {
            Some(t) => self.recv_timeout(t).await?,
            None => self.recv().await?,
        };
        Ok(got_bytes(f))
    }

    fn try_recv_seq(&mut self) -> Result<Option<Got>> {
        Ok(self.try_recv()?.map(got_bytes))
    }
}

/// Runs `f` with `h` on a new thread with its own current-thread runtime
/// (and, on uring, its own ring), and gives `h` back when the thread ends.
pub async fn on_thread<H, F, Fut>(h: H, f: F) -> H
where
    H: Send + 'static,
    F: FnOnce(H) -> Fut + Send + 'static,
    Fut: Future<Output = H>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("soak-mover".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let _ = tx.send(rt.block_on(f(h)));
        })
        .expect("spawn a thread");
    rx.await.expect("the mover thread panicked")
}

/// Whether a step may go on.
#[derive(PartialEq, Eq)]
pub enum Flow {
    Go,
    Closed,
}

/// The sending side of a checked stream.
pub struct Producer<T> {
    tx: T,
    rng: Rng,
    next: u64,
    /// Sends (and feeds) that completed.
    pub sure: u64,
    /// Sends cancelled by a timeout: each may or may not have gone out.
    pub maybe: u64,
    what: &'static str,
}

impl<T: Tx> Producer<T> {
    pub fn new(tx: T, rng: Rng, what: &'static str) -> Self {
        Producer {
            tx,
            rng,
            next: 0,
            sure: 0,
            maybe: 0,
            what,
        }
    }

    fn outcome(&mut self, r: Result<()>) -> Flow {
        match r {
            Ok(()) => {
                self.sure += 1;
                Flow::Go
            }
            Err(e) if e.kind() == ErrorKind::Closed => Flow::Closed,
            Err(e) => {
                anomaly(format!("{}: send failed: {e}", self.what));
                Flow::Closed
            }
        }
    }

    /// One message, sent one of several ways.
    pub async fn step(&mut self) -> Flow {
        let seq = self.next;
        self.next += 1;
        let len = size(&mut self.rng);
        match self.rng.u32(0..100) {
            0..88 => {
                let r = self.tx.send_seq(seq, len, false).await;
                self.outcome(r)
            }
            88..94 => {
                // Cancelled if the pipe is full for longer than this.
                let t = Duration::from_micros(self.rng.u64(0..300));
                match tokio::time::timeout(t, self.tx.send_seq(seq, len, false)).await {
                    Ok(r) => self.outcome(r),
                    Err(_) => {
                        add(&COUNTERS.cancelled, 1);
                        self.maybe += 1;
                        Flow::Go
                    }
                }
            }
            94..99 => {
                let r = self.tx.send_seq(seq, len, true).await;
                let flow = self.outcome(r);
                if flow == Flow::Go && self.rng.bool() {
                    match self.tx.flush_all().await {
                        Ok(()) => Flow::Go,
                        Err(e) if e.kind() == ErrorKind::Closed => Flow::Closed,
                        Err(e) => {
                            anomaly(format!("{}: flush failed: {e}", self.what));
                            Flow::Closed
                        }
                    }
                } else {
                    flow
                }
            }
            _ => {
                // Let the consumer catch up, or the pipe fill.
                tokio::time::sleep(Duration::from_micros(self.rng.u64(0..2000))).await;
                let r = self.tx.send_seq(seq, len, false).await;
                self.outcome(r)
            }
        }
    }

    /// Sends a message that cannot be cancelled: the next sync point.
    pub async fn sync(&mut self) -> Option<u64> {
        let seq = self.next;
        self.next += 1;
        let r = self.tx.send_seq(seq, 0, false).await;
        (self.outcome(r) == Flow::Go).then_some(seq)
    }

    /// Flushes what was fed, then gives the sender up.
    pub async fn finish(mut self) -> (u64, u64) {
        let _ = self.tx.flush_all().await;
        (self.sure, self.maybe)
    }
}

/// The receiving side of a checked stream.
pub struct Consumer<R> {
    rx: R,
    rng: Rng,
    last: Option<u64>,
    /// Messages received.
    pub received: u64,
    what: &'static str,
    ledger: Option<Ledger>,
}

impl<R: Rx> Consumer<R> {
    pub fn new(rx: R, rng: Rng, what: &'static str) -> Self {
        Consumer {
            rx,
            rng,
            last: None,
            received: 0,
            what,
            ledger: None,
        }
    }

    fn check(&mut self, got: Got) -> Flow {
        match got {
            Got::Seq(seq, len) => {
                if self.last.is_some_and(|l| seq <= l) {
                    anomaly(format!(
                        "{}: message {seq} after {} (reordered or duplicated)",
                        self.what,
                        self.last.unwrap_or(0)
                    ));
                }
                self.last = Some(seq);
                if let Some(ledger) = &self.ledger {
                    self.check_sync(ledger.clone(), seq);
                }
                self.received += 1;
                add(&COUNTERS.msgs, 1);
                add(&COUNTERS.bytes, len as u64);
                Flow::Go
            }
            Got::Bad(why) => {
                anomaly(format!("{}: {why}", self.what));
                Flow::Closed
            }
        }
    }

    fn failed(&self, e: ringipc::Error) -> Flow {
        match e.kind() {
            ErrorKind::Closed => Flow::Closed,
            ErrorKind::TimedOut => {
                add(&COUNTERS.cancelled, 1);
                Flow::Go
            }
            _ => {
                anomaly(format!("{}: receive failed: {e}", self.what));
                Flow::Closed
            }
        }
    }

    /// Message `seq` arrived, `received` before it: check the sync points
    /// it reaches (a sync skipped means a completed send was lost).
    fn check_sync(&self, ledger: Ledger, seq: u64) {
        let mut ledger = ledger.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(sync, sure, maybe)) = ledger.front() {
            if sync > seq {
                break;
            }
            ledger.pop_front();
            if sync < seq {
                anomaly(format!("{}: sync message {sync} lost", self.what));
            } else if self.received < sure || self.received > sure + maybe {
                anomaly(format!(
                    "{}: {} echoes before sync {sync}, for {sure} completed and {maybe} cancelled sends",
                    self.what, self.received
                ));
            }
        }
    }

    /// Waits for one message (or a timeout), one of several ways.
    pub async fn step(&mut self) -> Flow {
        let r = match self.rng.u32(0..100) {
            0..85 => self.rx.recv_seq(None).await,
            85..95 => {
                let t = Duration::from_micros(self.rng.u64(0..500));
                self.rx.recv_seq(Some(t)).await
            }
            95..98 => match self.rx.try_recv_seq() {
                Ok(Some(g)) => Ok(g),
                Ok(None) => {
                    tokio::task::yield_now().await;
                    return Flow::Go;
                }
                Err(e) => Err(e),
            },
            _ => {
                // A slow consumer: the pipe fills and sends wait.
                tokio::time::sleep(Duration::from_micros(self.rng.u64(0..3000))).await;
                return Flow::Go;
            }
        };
        match r {
            Ok(g) => self.check(g),
            Err(e) => self.failed(e),
        }
    }
}

/// Moves the producer or consumer, now and then: into a new task (which
/// may run on the other runtime thread), or onto a new thread that runs a
/// few steps there and exits (an operation may be left in flight on it).
async fn maybe_move_producer<T: Tx>(p: Producer<T>, rng: &mut Rng) -> Producer<T> {
    match rng.u32(0..1000) {
        0..20 => tokio::spawn(async move {
            let mut p = p;
            p.step().await;
            p
        })
        .await
        .expect("producer task"),
        20..23 => {
            add(&COUNTERS.moves, 1);
            let steps = rng.u32(1..20);
            on_thread(p, move |mut p| async move {
                for _ in 0..steps {
                    if p.step().await == Flow::Closed {
                        break;
                    }
                }
                p
            })
            .await
        }
        _ => p,
    }
}

async fn maybe_move_consumer<R: Rx>(c: Consumer<R>, rng: &mut Rng) -> Consumer<R> {
    match rng.u32(0..1000) {
        0..20 => tokio::spawn(async move {
            let mut c = c;
            c.step().await;
            c
        })
        .await
        .expect("consumer task"),
        20..23 => {
            add(&COUNTERS.moves, 1);
            let steps = rng.u32(1..20);
            on_thread(c, move |mut c| async move {
                for _ in 0..steps {
                    if c.step().await == Flow::Closed {
                        break;
                    }
                }
                // A receive abandoned on a thread that then exits (on
                // uring, its read may still be in flight).
                match tokio::time::timeout(Duration::from_micros(50), c.rx.recv_seq(None)).await {
                    Ok(Ok(g)) => {
                        c.check(g);
                    }
                    Ok(Err(e)) => {
                        c.failed(e);
                    }
                    Err(_) => add(&COUNTERS.cancelled, 1),
                }
                c
            })
            .await
        }
        _ => c,
    }
}

/// One channel lifetime between two tasks: the producer sends up to `n`
/// messages and closes; the consumer checks them, or drops its end early.
async fn session<T: Tx, R: Rx>(tx: T, rx: R, rng: &mut Rng, what: &'static str) {
    let n = rng.u64(100..3000);
    let give_up = (rng.u32(0..10) == 0).then(|| rng.u64(0..n));
    let (pseed, cseed) = (rng.u64(..), rng.u64(..));
    let producer = tokio::spawn(async move {
        let mut p = Producer::new(tx, Rng::with_seed(pseed), what);
        let mut mover = Rng::with_seed(pseed ^ 1);
        for _ in 0..n {
            if stopping() || p.step().await == Flow::Closed {
                break;
            }
            p = maybe_move_producer(p, &mut mover).await;
        }
        p.finish().await
    });
    let mut c = Consumer::new(rx, Rng::with_seed(cseed), what);
    let mut mover = Rng::with_seed(cseed ^ 1);
    loop {
        if give_up.is_some_and(|g| c.received >= g) {
            break;
        }
        if c.step().await == Flow::Closed {
            break;
        }
        c = maybe_move_consumer(c, &mut mover).await;
    }
    let received = c.received;
    drop(c);
    let (sure, maybe) = match producer.await {
        Ok(r) => r,
        Err(e) => {
            anomaly(format!("{what}: producer task: {e}"));
            return;
        }
    };
    add(&COUNTERS.channels, 1);
    if give_up.is_none() && (received < sure || received > sure + maybe) {
        anomaly(format!(
            "{what}: received {received} messages; {sure} sends completed and {maybe} were cancelled"
        ));
    }
}

/// Task-to-task traffic on `backend`, typed or bytes, until the soak stops.
pub async fn task_traffic(backend: Backend, typed: bool, seed: u64, beat: Beat) {
    let cfg = ChannelConfig::new().backend(backend);
    let mut rng = Rng::with_seed(seed);
    while !stopping() {
        let r = if typed {
            match cfg.pipe::<Msg>() {
                Ok((tx, rx)) => {
                    session(tx, rx, &mut rng, "typed task-to-task").await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            match cfg.bytes_pipe() {
                Ok((tx, rx)) => {
                    session(tx, rx, &mut rng, "bytes task-to-task").await;
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        if let Err(e) = r {
            anomaly(format!("pipe on {backend}: {e}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        beat.tick();
    }
}

/// Sync points of an echo stream: (sequence number, sends completed and
/// sends cancelled before it), written before the sync message is sent.
type Ledger = Arc<Mutex<VecDeque<(u64, u64, u64)>>>;

/// Round trips through an echo, its two directions in two tasks (a window
/// that waited for its echoes could deadlock on full pipes): windows of
/// randomly sent messages, each closed by a sync message that cannot be
/// cancelled. When a sync comes back, every completed send before it must
/// have come back too, in order; at the end, every completed send.
async fn echo_windows<T: Tx, R: Rx>(
    tx: T,
    rx: R,
    seed: u64,
    what: &'static str,
    rounds: Option<u64>,
    beat: Beat,
) {
    let ledger = Ledger::default();
    let mut c = Consumer::new(rx, Rng::with_seed(seed ^ 3), what);
    c.ledger = Some(ledger.clone());
    let producer = tokio::spawn(async move {
        let mut rng = Rng::with_seed(seed);
        let mut p = Producer::new(tx, Rng::with_seed(seed ^ 4), what);
        let mut round = 0;
        while !stopping() && rounds.is_none_or(|r| round < r) {
            round += 1;
            for _ in 0..rng.u32(1..16) {
                if p.step().await == Flow::Closed {
                    anomaly(format!("{what}: the echo closed its end"));
                    return p.finish().await;
                }
            }
            ledger
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_back((p.next, p.sure, p.maybe));
            if p.sync().await.is_none() {
                anomaly(format!("{what}: the echo closed its end"));
                return p.finish().await;
            }
            p = maybe_move_producer(p, &mut rng).await;
            beat.tick();
        }
        p.finish().await
    });
    let mut mover = Rng::with_seed(seed ^ 5);
    while c.step().await == Flow::Go {
        c = maybe_move_consumer(c, &mut mover).await;
    }
    // Our sender is gone (the producer ended): so is the echo's.
    let (sure, maybe) = match producer.await {
        Ok(r) => r,
        Err(e) => {
            anomaly(format!("{what}: producer task: {e}"));
            return;
        }
    };
    if c.received < sure || c.received > sure + maybe {
        anomaly(format!(
            "{what}: {} echoes for {sure} completed and {maybe} cancelled sends",
            c.received
        ));
    }
}

/// Echoes typed messages until the sending side closes; returns the count.
pub async fn echo_typed(mut rx: Receiver<Msg>, mut tx: Sender<Msg>) -> u64 {
    let mut n = 0;
    while let Ok(m) = rx.recv().await {
        let Ok(v) = m.deserialize() else { break };
        if tx.send(&v).await.is_err() {
            break;
        }
        n += 1;
    }
    n
}

/// Echoes bytes frames until the sending side closes; returns the count.
pub async fn echo_bytes(mut rx: BytesReceiver, mut tx: BytesSender) -> u64 {
    let mut n = 0;
    let mut buf = Vec::new();
    while let Ok(f) = rx.recv().await {
        buf.clear();
        buf.extend_from_slice(f);
        if tx.send(&buf).await.is_err() {
            break;
        }
        n += 1;
    }
    n
}

/// What the echo child is given.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct EchoArgs {
    typed_in: Receiver<Msg>,
    typed_out: Sender<Msg>,
    bytes_in: BytesReceiver,
    bytes_out: BytesSender,
}

/// The echo child: both echoes at once; returns the messages echoed.
async fn echo_child(a: EchoArgs) -> u64 {
    let (t, b) = tokio::join!(
        echo_typed(a.typed_in, a.typed_out),
        echo_bytes(a.bytes_in, a.bytes_out)
    );
    t + b
}

/// One echo child on `backend` for the whole run, driven with typed and
/// bytes round trips at once; at the end its count must match ours.
pub async fn echo_child_traffic(backend: Backend, seed: u64, beat: Beat) -> Result<()> {
    let cfg = ChannelConfig::new().backend(backend);
    let (typed_to, typed_in) = cfg.pipe::<Msg>()?;
    let (typed_out, typed_from) = cfg.pipe::<Msg>()?;
    let (bytes_to, bytes_in) = cfg.bytes_pipe()?;
    let (bytes_out, bytes_from) = cfg.bytes_pipe()?;
    let mut child = Process::builder_async(echo_child)
        .arg(EchoArgs {
            typed_in,
            typed_out,
            bytes_in,
            bytes_out,
        })
        .backend(backend)
        .name("soak-echo")
        .start()?;
    let typed = tokio::spawn(echo_windows(
        typed_to,
        typed_from,
        seed,
        "typed echo child",
        None,
        beat.clone(),
    ));
    let bytes = tokio::spawn(echo_windows(
        bytes_to,
        bytes_from,
        seed ^ 2,
        "bytes echo child",
        None,
        beat,
    ));
    let _ = typed.await;
    let _ = bytes.await;
    // Our ends are dropped: the child's loops see EOF and it returns.
    match child.join_timeout(Duration::from_secs(30)).await {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => {
            anomaly(format!("echo child on {backend} ended with {s}"));
            Ok(())
        }
        Err(e) => {
            anomaly(format!("echo child on {backend} did not exit: {e}"));
            Ok(())
        }
    }
}

/// Round trips through echo tasks on the engine's cores: each lifetime
/// makes two pipes, hands one end of each to a core, and closes them.
pub async fn engine_traffic(engine: Arc<Engine>, seed: u64, beat: Beat) {
    let cfg = ChannelConfig::new().backend(engine.backend());
    let cores = engine.cores();
    let mut rng = Rng::with_seed(seed);
    while !stopping() {
        let core = cores[rng.usize(0..cores.len())];
        let (to, to_rx) = match cfg.pipe::<Msg>() {
            Ok(p) => p,
            Err(e) => {
                anomaly(format!("engine pipe: {e}"));
                return;
            }
        };
        let (from_tx, from) = match cfg.pipe::<Msg>() {
            Ok(p) => p,
            Err(e) => {
                anomaly(format!("engine pipe: {e}"));
                return;
            }
        };
        let echo = engine.run_on(core, move || echo_typed(to_rx, from_tx));
        let rounds = rng.u64(5..50);
        echo_windows(
            to,
            from,
            rng.u64(..),
            "engine echo",
            Some(rounds),
            beat.clone(),
        )
        .await;
        match tokio::time::timeout(Duration::from_secs(30), echo).await {
            Ok(Ok(_)) => add(&COUNTERS.channels, 1),
            Ok(Err(e)) => anomaly(format!("engine echo on core {core}: {e}")),
            Err(_) => anomaly(format!("engine echo on core {core} did not end")),
        }
    }
}
