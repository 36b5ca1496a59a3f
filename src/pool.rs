//! A pool of pinned worker processes that run jobs for an async application,
//! with backpressure and crash recovery.
//!
//! Each worker is a child process (one per core by default, pinned to it)
//! running a loop: receive `(id, job)` on its job pipe, call the handler,
//! send `(id, busy time, outcome)` on its result pipe. In the parent, a
//! `call` registers its job and hands the encoded frame to the worker's
//! writer task without awaiting any I/O (so a cancelled `call` can never
//! leave a job half-registered); one reader task per worker completes calls
//! and, when its worker dies, fails exactly the jobs that worker held with
//! [`ErrorKind::WorkerDied`], restarts it, and carries on. Jobs are never
//! retried (a job that may have run is not run twice) and never lost (every
//! `call` ends in a result or a typed error).

use crate::backend::Backend;
use crate::channel::{BytesReceiver, BytesSender, ChannelConfig, OwnedFrame};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Decode, Encode, Message, OwnedMessage, encode_into};
use crate::process::spec::Spec;
use crate::process::{Affinity, Process, panic_message};
use crate::sys;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

/// What a worker process is started with.
#[derive(Archive, Serialize, Deserialize)]
pub struct WorkerArgs {
    /// Job frames: id (u64 LE), 8 bytes of padding, then the job's archive.
    jobs: BytesReceiver,
    /// Two frames per job: the result's archive (through the channel's
    /// arena when large; empty when there is no value), then a header frame
    /// (`RESULT_HEADER` bytes, then an error text if any).
    results: BytesSender,
    /// The handler's code address, as an offset (see `Spec::offset`).
    handler: i64,
}

/// Job frames start with the id and padding, so the archive stays aligned.
const JOB_HEADER: usize = 16;

/// Result header frames: id, busy nanoseconds, tag, padding; then, for a
/// failed job, the error text. The value travels in the frame before.
const RESULT_HEADER: usize = 32;
/// Error texts longer than this are cut, so a header frame always fits.
const MAX_ERROR_TEXT: usize = 64 * 1024;
const TAG_OK: u8 = 0;
const TAG_PANIC: u8 = 1;
const TAG_BAD_JOB: u8 = 2;
const TAG_BAD_RESULT: u8 = 3;

fn result_frame(buf: &mut Vec<u8>, id: u64, busy: Duration, tag: u8) {
    buf.clear();
    buf.extend_from_slice(&id.to_le_bytes());
    buf.extend_from_slice(&(busy.as_nanos() as u64).to_le_bytes());
    buf.push(tag);
    buf.resize(RESULT_HEADER, 0);
}

/// Polls a future inside `catch_unwind`, so a panicking async handler fails
/// its job instead of the worker.
struct CatchUnwind<F>(F);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: structural pinning of the only field; it is never moved.
        let inner = unsafe { self.map_unchecked_mut(|s| &mut s.0) };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
            Err(p) => Poll::Ready(Err(p)),
        }
    }
}

/// The worker loop, shared by sync and async handlers: `run` turns a job
/// into the handler's outcome.
async fn worker_loop<J, R, Fut>(args: WorkerArgs, run: impl Fn(J) -> Fut)
where
    J: Decode,
    J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
    R: Encode,
    Fut: Future<Output = std::thread::Result<R>>,
{
    let WorkerArgs {
        mut jobs,
        mut results,
        ..
    } = args;
    let mut buf = Vec::new();
    loop {
        let (id, job) = match jobs.recv().await {
            Ok(frame) if frame.len() >= JOB_HEADER => {
                let id = u64::from_le_bytes(frame[0..8].try_into().expect("8 bytes"));
                let job = Message::<J>::validate(&frame[JOB_HEADER..])
                    .and_then(|m| m.deserialize())
                    .map_err(|e| e.to_string());
                (id, job)
            }
            // A malformed frame (not from a ringipc pool) or the pool closed.
            _ => break,
        };
        let start = Instant::now();
        let mut text = String::new();
        let mut busy = Duration::ZERO;
        let tag = match job {
            Ok(job) => match run(job).await.inspect(|_| busy = start.elapsed()) {
                // The value goes first, serialized once (into the arena when
                // it is large); its header follows.
                Ok(value) => match results.feed_message(&value).await {
                    Ok(()) => TAG_OK,
                    Err(e)
                        if matches!(e.kind(), ErrorKind::FrameTooLarge | ErrorKind::Serialize) =>
                    {
                        text = format!("cannot send the result: {e}");
                        TAG_BAD_RESULT
                    }
                    Err(_) => break,
                },
                Err(p) => {
                    busy = start.elapsed();
                    text = panic_message(p);
                    TAG_PANIC
                }
            },
            Err(e) => {
                text = format!("cannot decode the job: {e}");
                TAG_BAD_JOB
            }
        };
        // No value was queued for a failed job: an empty frame keeps the
        // stream in pairs.
        if tag != TAG_OK && results.feed(&[]).await.is_err() {
            break;
        }
        result_frame(&mut buf, id, busy, tag);
        let mut cut = text.len().min(MAX_ERROR_TEXT);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        buf.extend_from_slice(&text.as_bytes()[..cut]);
        if results.send(&buf).await.is_err() {
            break;
        }
    }
}

async fn worker_sync<J, R>(args: WorkerArgs)
where
    J: Decode,
    J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
    R: Encode,
{
    // SAFETY: `handler` is the offset of a `fn(J) -> R` in this same binary,
    // recorded by `Pool::builder` for exactly these J and R.
    let f = unsafe { std::mem::transmute::<usize, fn(J) -> R>(Spec::resolve(args.handler)) };
    worker_loop(args, |job| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(job)));
        std::future::ready(r)
    })
    .await;
}

async fn worker_async<J, R, F>(args: WorkerArgs)
where
    J: Decode,
    J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
    R: Encode,
    F: Future<Output = R>,
{
    // SAFETY: as in `worker_sync`, for a `fn(J) -> F`.
    let f = unsafe { std::mem::transmute::<usize, fn(J) -> F>(Spec::resolve(args.handler)) };
    worker_loop(args, |job| CatchUnwind(f(job))).await;
}

type Launcher = fn(WorkerArgs, &WorkerOptions) -> Result<Process<()>>;

#[derive(Clone)]
struct WorkerOptions {
    name: String,
    affinity: Affinity,
    backend: Backend,
}

fn launch<Fut>(
    entry: fn(WorkerArgs) -> Fut,
    args: WorkerArgs,
    o: &WorkerOptions,
) -> Result<Process<()>>
where
    Fut: Future<Output = ()>,
{
    Process::builder_async(entry)
        .arg(args)
        .name(o.name.clone())
        .pin(o.affinity.clone())
        .backend(o.backend)
        .start()
}

/// Options for a [`Pool`]; made by [`Pool::builder`] or [`Pool::builder_async`].
#[must_use]
pub struct PoolBuilder<J, R> {
    handler: usize,
    launcher: Launcher,
    workers: Option<usize>,
    max_in_flight: usize,
    pin: bool,
    backend: Backend,
    name: String,
    _r: PhantomData<fn(J) -> R>,
}

/// Per-worker counters, readable at run time with [`Pool::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// The worker's index.
    pub worker: usize,
    /// Its current process id.
    pub pid: u32,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    /// Jobs that returned a value.
    pub jobs_done: u64,
    /// Jobs that failed: panicked, could not be decoded or encoded, returned
    /// an invalid result, or were lost with the worker.
    pub jobs_failed: u64,
    /// How often the worker was restarted after dying.
    pub restarts: u64,
    /// Time spent inside the handler.
    pub busy: Duration,
    /// Jobs sent to it and not yet answered.
    pub in_flight: usize,
}

struct PendingJob<R: Archive> {
    worker: usize,
    reply: oneshot::Sender<Result<OwnedMessage<R>>>,
}

struct State<R: Archive> {
    pending: HashMap<u64, PendingJob<R>>,
    next_id: u64,
    stats: Vec<WorkerStats>,
    /// Each worker's job queue (read by its writer task); `None` while the
    /// worker restarts and after it is dead, so no job is routed to it.
    queues: Vec<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    /// Workers that could not be restarted (or lost their reader).
    dead: Vec<bool>,
    closing: bool,
}

impl<R: Archive> State<R> {
    /// Fails every job worker `w` holds, exactly once.
    fn fail_worker(&mut self, w: usize, why: &str) {
        let lost: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == w)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            let p = self.pending.remove(&id).expect("listed above");
            let _ = p.reply.send(Err(Error::new(
                ErrorKind::WorkerDied,
                format!("job {id}: {why}"),
            )));
            self.stats[w].jobs_failed += 1;
        }
        self.stats[w].in_flight = 0;
    }
}

struct Inner<R: Archive> {
    state: Mutex<State<R>>,
    permits: Semaphore,
    /// Signalled whenever a job finishes (capacity frees up, or the pool drains).
    freed: Notify,
    max_in_flight: usize,
    max_frame: usize,
}

impl<R: Archive> Inner<R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Handle<R: Archive> {
    inner: Arc<Inner<R>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl<R: Archive> Drop for Handle<R> {
    fn drop(&mut self) {
        // Without `shutdown`, dropping the pool kills its workers: the reader
        // tasks own the worker processes, whose handles kill on drop.
        for t in self
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            t.abort();
        }
    }
}

/// A pool of pinned worker processes with backpressure and crash recovery
/// (see `docs/architecture.md`). Cloning it is cheap and shares the workers.
pub struct Pool<J, R: Archive> {
    handle: Arc<Handle<R>>,
    _j: PhantomData<fn(J)>,
}

impl<J, R: Archive> Clone for Pool<J, R> {
    fn clone(&self) -> Self {
        Pool {
            handle: self.handle.clone(),
            _j: PhantomData,
        }
    }
}

impl Pool<(), ()> {
    /// A builder for a pool whose workers run the synchronous `handler`.
    pub fn builder<J, R>(handler: fn(J) -> R) -> PoolBuilder<J, R>
    where
        J: Encode + Decode,
        J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
        R: Encode + Decode,
    {
        PoolBuilder::new(handler as usize, |a, o| launch(worker_sync::<J, R>, a, o))
    }

    /// A builder for a pool whose workers run the `async` `handler`.
    pub fn builder_async<J, R, F>(handler: fn(J) -> F) -> PoolBuilder<J, R>
    where
        J: Encode + Decode,
        J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
        R: Encode + Decode,
        F: Future<Output = R>,
    {
        PoolBuilder::new(handler as usize, |a, o| {
            launch(worker_async::<J, R, F>, a, o)
        })
    }
}

impl<J, R> PoolBuilder<J, R> {
    fn new(handler: usize, launcher: Launcher) -> Self {
        PoolBuilder {
            handler,
            launcher,
            workers: None,
            max_in_flight: 4,
            pin: true,
            backend: Backend::Auto,
            name: "ringipc-worker".into(),
            _r: PhantomData,
        }
    }

    /// How many workers (default: one per core this process may use).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = Some(n);
        self
    }

    /// Jobs sent to one worker and not yet answered (default 4). `call`
    /// waits when every worker has this many.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n.max(1);
        self
    }

    /// Whether worker `i` is pinned to the `i`-th core (default: yes).
    pub fn pin(mut self, yes: bool) -> Self {
        self.pin = yes;
        self
    }

    /// The workers' backend, and this side's.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Workers are named `{name}-{index}` (visible in `ps`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
}

struct WorkerSpawner {
    launcher: Launcher,
    handler: i64,
    cfg: ChannelConfig,
    opts: WorkerOptions,
}

impl WorkerSpawner {
    fn spawn(&self) -> Result<(Process<()>, BytesSender, BytesReceiver)> {
        let (job_tx, job_rx) = self.cfg.bytes_pipe()?;
        // Results may be large (an image, a tensor): their pipe has the
        // config's arena, so a large result is serialized once into shared
        // memory instead of being copied through the pipe.
        let (res_tx, res_rx) = self.cfg.bytes_pipe_with_arena()?;
        let args = WorkerArgs {
            jobs: job_rx,
            results: res_tx,
            handler: self.handler,
        };
        let proc = (self.launcher)(args, &self.opts)?;
        Ok((proc, job_tx, res_rx))
    }
}

/// Writes worker `w`'s job frames, coalescing whatever queued up into one
/// write. On a write error it asks the reader to kill the worker (which is
/// then restarted), so a worker that cannot take jobs does not linger.
async fn writer(
    mut tx: BytesSender,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
    failed: Arc<Notify>,
) {
    while let Some(frame) = queue.recv().await {
        let mut r = tx.feed(&frame).await;
        while r.is_ok() {
            match queue.try_recv() {
                Ok(frame) => r = tx.feed(&frame).await,
                Err(_) => break,
            }
        }
        if r.is_ok() {
            r = tx.flush().await;
        }
        if r.is_err() {
            failed.notify_one();
            return;
        }
    }
}

impl<J, R> PoolBuilder<J, R>
where
    J: Send + 'static,
    R: Decode + Send + 'static,
{
    /// Starts the workers. Must run inside a tokio runtime, which also runs
    /// the pool's reader and writer tasks: keep that runtime going while the
    /// pool is in use (callers may be on other threads or engine cores). If
    /// it stops, calls fail with [`ErrorKind::WorkerDied`] instead of hanging.
    pub async fn build(self) -> Result<Pool<J, R>> {
        let cores = sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?;
        let n = self.workers.unwrap_or(cores.len()).max(1);
        let backend = self.backend.resolve()?;
        let cfg = ChannelConfig::new().backend(backend);
        let mut started = Vec::with_capacity(n);
        for i in 0..n {
            let core = self.pin.then(|| cores[i % cores.len()]);
            let spawner = WorkerSpawner {
                launcher: self.launcher,
                handler: Spec::offset(self.handler),
                cfg,
                opts: WorkerOptions {
                    name: format!("{}-{i}", self.name),
                    affinity: core.map_or(Affinity::Any, Affinity::Core),
                    backend,
                },
            };
            // On error, the workers started so far are killed as `started` drops.
            let (proc, job_tx, res_rx) = spawner.spawn()?;
            started.push((proc, job_tx, res_rx, spawner, core));
        }
        let mut stats = Vec::with_capacity(n);
        let mut queues = Vec::with_capacity(n);
        let mut rest = Vec::with_capacity(n);
        for (i, (proc, job_tx, res_rx, spawner, core)) in started.into_iter().enumerate() {
            stats.push(WorkerStats {
                worker: i,
                pid: proc.pid(),
                core,
                ..Default::default()
            });
            let (qtx, qrx) = mpsc::unbounded_channel();
            let failed = Arc::new(Notify::new());
            tokio::spawn(writer(job_tx, qrx, failed.clone()));
            queues.push(Some(qtx));
            rest.push((proc, res_rx, spawner, failed));
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                pending: HashMap::new(),
                next_id: 0,
                stats,
                queues,
                dead: vec![false; n],
                closing: false,
            }),
            permits: Semaphore::new(n * self.max_in_flight),
            freed: Notify::new(),
            max_in_flight: self.max_in_flight,
            max_frame: crate::framing::DEFAULT_MAX_FRAME,
        });
        let readers = rest
            .into_iter()
            .enumerate()
            .map(|(w, (proc, rx, spawner, failed))| {
                let guard = ReaderGuard {
                    inner: inner.clone(),
                    w,
                    armed: true,
                };
                tokio::spawn(reader(guard, proc, rx, spawner, failed))
            })
            .collect();
        Ok(Pool {
            handle: Arc::new(Handle {
                inner,
                readers: Mutex::new(readers),
            }),
            _j: PhantomData,
        })
    }
}

/// Turns a worker's result pair (the value frame, then the header frame)
/// into the call's outcome. The value is not copied: it stays in the
/// buffer (or arena slot) it was received into.
fn decode_result<R: Decode>(
    value: OwnedFrame,
    payload: &[u8],
    worker: usize,
) -> (u64, Duration, Result<OwnedMessage<R>>) {
    if payload.len() < RESULT_HEADER {
        let e = Error::new(
            ErrorKind::Protocol,
            format!("worker {worker} sent a short result frame"),
        );
        return (u64::MAX, Duration::ZERO, Err(e));
    }
    let id = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
    let busy = Duration::from_nanos(u64::from_le_bytes(
        payload[8..16].try_into().expect("8 bytes"),
    ));
    let data = &payload[RESULT_HEADER..];
    let text = || String::from_utf8_lossy(data);
    let r = match payload[16] {
        TAG_OK => OwnedMessage::from_storage(value.into_storage()),
        TAG_PANIC => Err(Error::new(
            ErrorKind::Panicked,
            format!("job {id} panicked in worker {worker}: {}", text()),
        )),
        TAG_BAD_RESULT => Err(Error::new(
            ErrorKind::Serialize,
            format!("job {id} in worker {worker}: {}", text()),
        )),
        _ => Err(Error::new(
            ErrorKind::InvalidMessage,
            format!("job {id} failed in worker {worker}: {}", text()),
        )),
    };
    (id, busy, r)
}

/// Fails worker `w`'s jobs and retires it if its reader task ends any way
/// other than an orderly shutdown (its runtime was dropped, say), so no
/// `call` waits forever on a reader that is gone.
struct ReaderGuard<R: Archive> {
    inner: Arc<Inner<R>>,
    w: usize,
    armed: bool,
}

impl<R: Archive> Drop for ReaderGuard<R> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.inner.lock();
            let w = self.w;
            st.fail_worker(
                w,
                &format!("worker {w}'s reader stopped (the runtime that built the pool is gone?)"),
            );
            st.queues[w] = None;
            st.dead[w] = true;
            drop(st);
            self.inner.freed.notify_waiters();
        }
    }
}

/// Reads worker `w`'s results, completes calls, and restarts the worker when it dies.
///
/// The guard is an argument, not made inside: a task that is dropped before
/// it first runs (its runtime went away) must still fail its worker's jobs.
async fn reader<R: Decode>(
    mut guard: ReaderGuard<R>,
    mut proc: Process<()>,
    mut rx: BytesReceiver,
    spawner: WorkerSpawner,
    mut writer_failed: Arc<Notify>,
) {
    let inner = guard.inner.clone();
    let w = guard.w;
    let mut started = Instant::now();
    let mut quick_deaths = 0u32;
    loop {
        // A new worker (or the first): no half-received pair.
        let mut value: Option<OwnedFrame> = None;
        let end = loop {
            tokio::select! {
                r = rx.recv_owned_frame() => match r {
                    // The first frame of a pair: the value. Kept across
                    // loop turns (a `select!` may drop the receive future,
                    // never a frame already received).
                    Ok(frame) if value.is_none() => value = Some(frame),
                    Ok(header) => {
                        let v = value.take().expect("checked by the arm above");
                        let (id, busy, result) = decode_result::<R>(v, header.bytes(), w);
                        let mut st = inner.lock();
                        if let Some(p) = st.pending.remove(&id) {
                            let stats = &mut st.stats[w];
                            stats.busy += busy;
                            match &result {
                                Ok(_) => stats.jobs_done += 1,
                                Err(_) => stats.jobs_failed += 1,
                            }
                            stats.in_flight = stats.in_flight.saturating_sub(1);
                            let _ = p.reply.send(result);
                        }
                        drop(st);
                        inner.freed.notify_waiters();
                    }
                    Err(e) => {
                        // No more jobs for this worker while it is dying.
                        inner.lock().queues[w] = None;
                        break e;
                    }
                },
                () = writer_failed.notified() => {
                    // The job pipe broke while the worker lives: kill it so
                    // the restart below gives it a working pipe.
                    let _ = proc.kill();
                }
            }
        };
        let status = match proc.join_timeout(Duration::from_secs(5)).await {
            Ok(s) => Ok(s),
            Err(_) => {
                let _ = proc.kill();
                proc.join().await
            }
        };
        let cause = match &status {
            Ok(s) => format!("{s}"),
            Err(e) => format!("{e} (result pipe: {end})"),
        };
        let closing = {
            let mut st = inner.lock();
            let why = format!(
                "worker {w} (pid {}) died ({cause}) while holding it",
                proc.pid()
            );
            st.fail_worker(w, &why);
            st.queues[w] = None;
            st.closing
        };
        inner.freed.notify_waiters();
        if closing {
            guard.armed = false;
            return;
        }
        tracing::warn!(worker = w, pid = proc.pid(), %cause, "pool worker died; restarting");
        // A worker that dies right after starting would otherwise be
        // restarted in a tight loop: back off (unless the pool is closing).
        if started.elapsed() < Duration::from_secs(1) {
            quick_deaths += 1;
            tokio::time::sleep(Duration::from_millis(25 << quick_deaths.min(6))).await;
            if inner.lock().closing {
                guard.armed = false;
                return;
            }
        } else {
            quick_deaths = 0;
        }
        let mut attempt = 0;
        let (new_proc, job_tx, new_rx) = loop {
            match spawner.spawn() {
                Ok(parts) => break parts,
                Err(e) if attempt < 5 && !inner.lock().closing => {
                    tracing::warn!(worker = w, error = %e, "restarting pool worker failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => {
                    tracing::error!(worker = w, error = %e, "pool worker could not be restarted");
                    inner.lock().dead[w] = true;
                    inner.freed.notify_waiters();
                    guard.armed = false;
                    return;
                }
            }
        };
        let (qtx, qrx) = mpsc::unbounded_channel();
        {
            let mut st = inner.lock();
            if st.closing {
                // Shut down while restarting: the new worker is killed as it
                // drops, and callers waiting for room learn the pool closed.
                drop(st);
                inner.freed.notify_waiters();
                guard.armed = false;
                return;
            }
            st.queues[w] = Some(qtx);
            st.stats[w].restarts += 1;
            st.stats[w].pid = new_proc.pid();
        }
        writer_failed = Arc::new(Notify::new());
        tokio::spawn(writer(job_tx, qrx, writer_failed.clone()));
        inner.freed.notify_waiters();
        proc = new_proc;
        rx = new_rx;
        started = Instant::now();
    }
}

impl<J, R> Pool<J, R>
where
    J: Encode + Send + 'static,
    R: Decode + Send + 'static,
{
    /// Runs `job` on a worker and returns its result, validated and owned.
    ///
    /// Waits while every worker already has `max_in_flight` jobs. A job that
    /// panics is [`ErrorKind::Panicked`] (the worker lives on); a worker that
    /// dies fails its jobs with [`ErrorKind::WorkerDied`]; a closed pool is
    /// [`ErrorKind::Closed`]. Cancelling the future is safe: the job may
    /// still run, its result is dropped, and its slot is freed when it ends.
    pub async fn call(&self, job: J) -> Result<OwnedMessage<R>> {
        let frame = self.encode(job)?;
        let _permit = self
            .handle
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "pool is shut down"))?;
        self.dispatch(frame, true).await
    }

    /// Like [`Pool::call`], but fails at once with [`ErrorKind::Busy`] when
    /// no worker has room.
    pub async fn try_call(&self, job: J) -> Result<OwnedMessage<R>> {
        let frame = self.encode(job)?;
        let _permit = self
            .handle
            .inner
            .permits
            .try_acquire()
            .map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => {
                    Error::new(ErrorKind::Busy, "pool is saturated")
                }
                tokio::sync::TryAcquireError::Closed => {
                    Error::new(ErrorKind::Closed, "pool is shut down")
                }
            })?;
        self.dispatch(frame, false).await
    }

    /// The job frame: room for the id, then the job's archive (16-byte
    /// aligned). Encoding errors reach the caller before anything is registered.
    fn encode(&self, job: J) -> Result<Vec<u8>> {
        let mut frame = vec![0u8; JOB_HEADER];
        encode_into(&job, &mut frame)?;
        let max = self.handle.inner.max_frame;
        if frame.len() > max {
            return Err(Error::new(
                ErrorKind::FrameTooLarge,
                format!(
                    "job of {} bytes exceeds the limit of {max} bytes",
                    frame.len()
                ),
            ));
        }
        Ok(frame)
    }

    /// Registers the job with the least-loaded worker that has room and
    /// queues it for that worker's writer, in one step under the lock: no
    /// await sits between the two, so a cancelled call cannot leak a slot.
    async fn dispatch(&self, mut frame: Vec<u8>, wait: bool) -> Result<OwnedMessage<R>> {
        let inner = &self.handle.inner;
        let rx = loop {
            let freed = inner.freed.notified();
            {
                let mut st = inner.lock();
                if st.closing {
                    return Err(Error::new(ErrorKind::Closed, "pool is shutting down"));
                }
                let pick = (0..st.stats.len())
                    .filter(|&w| {
                        st.queues[w].is_some() && st.stats[w].in_flight < inner.max_in_flight
                    })
                    .min_by_key(|&w| st.stats[w].in_flight);
                if let Some(w) = pick {
                    let id = st.next_id;
                    st.next_id += 1;
                    frame[0..8].copy_from_slice(&id.to_le_bytes());
                    match st.queues[w].as_ref().expect("picked").send(frame) {
                        Ok(()) => {
                            st.stats[w].in_flight += 1;
                            let (tx, rx) = oneshot::channel();
                            st.pending.insert(
                                id,
                                PendingJob {
                                    worker: w,
                                    reply: tx,
                                },
                            );
                            break rx;
                        }
                        Err(mpsc::error::SendError(back)) => {
                            // Its writer is gone; the reader is restarting it.
                            frame = back;
                            st.queues[w] = None;
                            continue;
                        }
                    }
                }
                if st.dead.iter().all(|&d| d) {
                    return Err(Error::new(
                        ErrorKind::WorkerDied,
                        "every pool worker is dead",
                    ));
                }
                if !wait {
                    return Err(Error::new(ErrorKind::Busy, "no pool worker has room"));
                }
            }
            // Every live worker is full (of jobs whose callers may have given
            // up) or restarting: wait for a slot.
            freed.await;
        };
        rx.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::WorkerDied,
                "the pool stopped before the job finished",
            ))
        })
    }

    /// Runs every job, as many at once as the pool takes, and yields the
    /// results in job order.
    pub fn map<I>(&self, jobs: I) -> MapResults<J, R>
    where
        I: IntoIterator<Item = J>,
        I::IntoIter: Send + 'static,
    {
        let inner = &self.handle.inner;
        let window = inner.lock().stats.len() * inner.max_in_flight;
        MapResults {
            pool: self.clone(),
            jobs: Box::new(jobs.into_iter()),
            queue: VecDeque::new(),
            window: window.max(1),
        }
    }

    /// Stops taking jobs, waits for every job in flight to finish, then stops
    /// the workers and waits for them to exit.
    pub async fn shutdown(self) -> Result<()> {
        let inner = self.handle.inner.clone();
        inner.lock().closing = true;
        // Callers waiting for room re-check and get Closed.
        inner.freed.notify_waiters();
        loop {
            let freed = inner.freed.notified();
            if inner.lock().pending.is_empty() {
                break;
            }
            freed.await;
        }
        inner.permits.close();
        // Closing the job queues ends the writers, which closes the job
        // pipes; the workers then exit and their readers return.
        for q in inner.lock().queues.iter_mut() {
            *q = None;
        }
        let readers: Vec<_> = self
            .handle
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for r in readers {
            let _ = r.await;
        }
        Ok(())
    }
}

impl<J, R: Archive> Pool<J, R> {
    /// Per-worker counters.
    pub fn stats(&self) -> Vec<WorkerStats> {
        self.handle.inner.lock().stats.clone()
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.handle.inner.lock().stats.len()
    }
}

/// The ordered results of [`Pool::map`].
pub struct MapResults<J, R: Archive> {
    pool: Pool<J, R>,
    jobs: Box<dyn Iterator<Item = J> + Send>,
    queue: VecDeque<JoinHandle<Result<OwnedMessage<R>>>>,
    window: usize,
}

impl<J, R> MapResults<J, R>
where
    J: Encode + Send + 'static,
    R: Decode + Send + 'static,
{
    /// The next result, in job order; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<OwnedMessage<R>>> {
        while self.queue.len() < self.window {
            let Some(job) = self.jobs.next() else { break };
            let pool = self.pool.clone();
            self.queue
                .push_back(tokio::spawn(async move { pool.call(job).await }));
        }
        let h = self.queue.pop_front()?;
        Some(h.await.unwrap_or_else(|e| {
            let kind = if e.is_panic() {
                ErrorKind::Panicked
            } else {
                ErrorKind::Closed
            };
            Err(Error::new(kind, format!("pool call task: {e}")))
        }))
    }
}

impl<J, R: Archive> Drop for MapResults<J, R> {
    fn drop(&mut self) {
        // Calls not yet collected are cancelled (their jobs may still run).
        for h in self.queue.drain(..) {
            h.abort();
        }
    }
}
