//! A pool of pinned worker processes that run jobs for an async application,
//! with backpressure and crash recovery.
//!
//! Each worker is a child process (one per core by default, pinned to it)
//! running a loop: receive `(id, job)` on its job pipe, call the handler,
//! send `(id, busy time, outcome)` on its result pipe. In the parent, one task
//! per worker reads results and completes the matching `call`; when a worker
//! dies it fails exactly the jobs that worker held with
//! [`ErrorKind::WorkerDied`], restarts the worker, and carries on. Jobs are
//! never retried (a job that may have run is not run twice) and never lost
//! (every `call` ends in a result or a typed error).

use crate::backend::Backend;
use crate::channel::{BytesReceiver, BytesSender, ChannelConfig, Receiver, Sender};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Decode, Encode, OwnedMessage, encode_into};
use crate::process::spec::Spec;
use crate::process::{Affinity, ExitStatus, Process, panic_message};
use crate::sys;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::task::JoinHandle;

/// One job on a worker's job pipe.
#[derive(Archive, Serialize, Deserialize)]
pub struct JobMsg<J> {
    id: u64,
    job: J,
}

/// What a worker process is started with.
#[derive(Archive, Serialize, Deserialize)]
pub struct WorkerArgs<J> {
    jobs: Receiver<JobMsg<J>>,
    results: BytesSender,
    /// The handler's code address, as an offset (see `Spec::offset`).
    handler: i64,
}

/// Result frames: id, busy nanoseconds, tag, padding; then the value's
/// archive, 16-byte aligned.
const RESULT_HEADER: usize = 32;
const TAG_OK: u8 = 0;
const TAG_PANIC: u8 = 1;
const TAG_BAD_JOB: u8 = 2;

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
async fn worker_loop<J, R, Fut>(args: WorkerArgs<J>, run: impl Fn(J) -> Fut)
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
            Ok(msg) => (
                msg.id.to_native(),
                rkyv::deserialize::<J, rancor::Error>(&msg.job).map_err(|e| e.to_string()),
            ),
            Err(_) => break,
        };
        let start = Instant::now();
        match job {
            Ok(job) => match run(job).await {
                Ok(value) => {
                    result_frame(&mut buf, id, start.elapsed(), TAG_OK);
                    if let Err(e) = encode_into(&value, &mut buf) {
                        result_frame(&mut buf, id, start.elapsed(), TAG_BAD_JOB);
                        buf.extend_from_slice(format!("cannot encode the result: {e}").as_bytes());
                    }
                }
                Err(p) => {
                    result_frame(&mut buf, id, start.elapsed(), TAG_PANIC);
                    buf.extend_from_slice(panic_message(p).as_bytes());
                }
            },
            Err(e) => {
                result_frame(&mut buf, id, start.elapsed(), TAG_BAD_JOB);
                buf.extend_from_slice(format!("cannot decode the job: {e}").as_bytes());
            }
        }
        if results.send(&buf).await.is_err() {
            break;
        }
    }
}

async fn worker_sync<J, R>(args: WorkerArgs<J>)
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

async fn worker_async<J, R, F>(args: WorkerArgs<J>)
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

type Launcher<J> = fn(WorkerArgs<J>, &WorkerOptions) -> Result<Process<()>>;

#[derive(Clone)]
struct WorkerOptions {
    name: String,
    affinity: Affinity,
    backend: Backend,
}

fn launch<J, Fut>(
    entry: fn(WorkerArgs<J>) -> Fut,
    args: WorkerArgs<J>,
    o: &WorkerOptions,
) -> Result<Process<()>>
where
    J: Decode,
    WorkerArgs<J>: Encode + Decode,
    <WorkerArgs<J> as Archive>::Archived:
        Deserialize<WorkerArgs<J>, HighDeserializer<rancor::Error>>,
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
    launcher: Launcher<J>,
    workers: Option<usize>,
    max_in_flight: usize,
    pin: bool,
    backend: Backend,
    name: String,
    _r: PhantomData<fn() -> R>,
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
    /// Jobs that panicked, could not be decoded, or were lost with the worker.
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
    /// Workers that could not be restarted take no more jobs.
    dead: Vec<bool>,
    closing: bool,
}

struct Inner<J, R: Archive> {
    senders: Vec<tokio::sync::Mutex<Option<Sender<JobMsg<J>>>>>,
    state: Mutex<State<R>>,
    permits: Semaphore,
    /// Signalled whenever a job finishes (capacity frees up, or the pool drains).
    freed: Notify,
    max_in_flight: usize,
}

impl<J, R: Archive> Inner<J, R> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Handle<J, R: Archive> {
    inner: Arc<Inner<J, R>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
}

impl<J, R: Archive> Drop for Handle<J, R> {
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
/// (see `docs/architecture.md`). Cloning it is
/// cheap and shares the workers.
pub struct Pool<J, R: Archive> {
    handle: Arc<Handle<J, R>>,
}

impl<J, R: Archive> Clone for Pool<J, R> {
    fn clone(&self) -> Self {
        Pool {
            handle: self.handle.clone(),
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
        WorkerArgs<J>: Encode + Decode,
        <WorkerArgs<J> as Archive>::Archived:
            Deserialize<WorkerArgs<J>, HighDeserializer<rancor::Error>>,
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
        WorkerArgs<J>: Encode + Decode,
        <WorkerArgs<J> as Archive>::Archived:
            Deserialize<WorkerArgs<J>, HighDeserializer<rancor::Error>>,
    {
        PoolBuilder::new(handler as usize, |a, o| {
            launch(worker_async::<J, R, F>, a, o)
        })
    }
}

impl<J, R> PoolBuilder<J, R> {
    fn new(handler: usize, launcher: Launcher<J>) -> Self {
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

struct WorkerSpawner<J> {
    launcher: Launcher<J>,
    handler: i64,
    cfg: ChannelConfig,
    opts: WorkerOptions,
}

impl<J> WorkerSpawner<J> {
    fn spawn(&self) -> Result<(Process<()>, Sender<JobMsg<J>>, BytesReceiver)> {
        let (job_tx, job_rx) = self.cfg.pipe::<JobMsg<J>>()?;
        let (res_tx, res_rx) = self.cfg.bytes_pipe()?;
        let args = WorkerArgs {
            jobs: job_rx,
            results: res_tx,
            handler: self.handler,
        };
        let proc = (self.launcher)(args, &self.opts)?;
        Ok((proc, job_tx, res_rx))
    }
}

impl<J, R> PoolBuilder<J, R>
where
    J: Send + 'static,
    R: Decode + Send + 'static,
{
    /// Starts the workers. Must run inside a tokio runtime, which also runs
    /// the pool's result readers: keep that runtime going while the pool is
    /// in use (callers may be on other threads or engine cores).
    pub async fn build(self) -> Result<Pool<J, R>> {
        let cores = sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?;
        let n = self.workers.unwrap_or(cores.len()).max(1);
        let backend = self.backend.resolve()?;
        let cfg = ChannelConfig::new().backend(backend);
        let mut spawned = Vec::with_capacity(n);
        let mut spawners = Vec::with_capacity(n);
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
            spawned.push((spawner.spawn()?, core));
            spawners.push(spawner);
        }
        let mut senders = Vec::with_capacity(n);
        let mut stats = Vec::with_capacity(n);
        let mut rest = Vec::with_capacity(n);
        for (i, ((proc, tx, rx), core)) in spawned.into_iter().enumerate() {
            stats.push(WorkerStats {
                worker: i,
                pid: proc.pid(),
                core,
                ..Default::default()
            });
            senders.push(tokio::sync::Mutex::new(Some(tx)));
            rest.push((proc, rx));
        }
        let inner = Arc::new(Inner {
            senders,
            state: Mutex::new(State {
                pending: HashMap::new(),
                next_id: 0,
                stats,
                dead: vec![false; n],
                closing: false,
            }),
            permits: Semaphore::new(n * self.max_in_flight),
            freed: Notify::new(),
            max_in_flight: self.max_in_flight,
        });
        let readers = rest
            .into_iter()
            .zip(spawners)
            .enumerate()
            .map(|(i, ((proc, rx), spawner))| {
                tokio::spawn(reader(inner.clone(), i, proc, rx, spawner))
            })
            .collect();
        Ok(Pool {
            handle: Arc::new(Handle {
                inner,
                readers: Mutex::new(readers),
            }),
        })
    }
}

fn decode_result<R: Decode>(
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
    let r = match payload[16] {
        TAG_OK => {
            let mut v = AlignedVec::<16>::with_capacity(data.len());
            v.extend_from_slice(data);
            OwnedMessage::new(v)
        }
        TAG_PANIC => Err(Error::new(
            ErrorKind::Panicked,
            format!(
                "job {id} panicked in worker {worker}: {}",
                String::from_utf8_lossy(data)
            ),
        )),
        _ => Err(Error::new(
            ErrorKind::InvalidMessage,
            format!(
                "job {id} failed in worker {worker}: {}",
                String::from_utf8_lossy(data)
            ),
        )),
    };
    (id, busy, r)
}

/// Reads worker `w`'s results, completes calls, and restarts the worker when it dies.
async fn reader<J, R>(
    inner: Arc<Inner<J, R>>,
    w: usize,
    mut proc: Process<()>,
    mut rx: BytesReceiver,
    spawner: WorkerSpawner<J>,
) where
    R: Decode,
{
    loop {
        let end = loop {
            match rx.recv().await {
                Ok(payload) => {
                    let (id, busy, result) = decode_result::<R>(payload, w);
                    let mut st = inner.lock();
                    let stats = &mut st.stats[w];
                    stats.busy += busy;
                    match &result {
                        Ok(_) => stats.jobs_done += 1,
                        Err(_) => stats.jobs_failed += 1,
                    }
                    stats.in_flight = stats.in_flight.saturating_sub(1);
                    if let Some(p) = st.pending.remove(&id) {
                        let _ = p.reply.send(result);
                    }
                    drop(st);
                    inner.freed.notify_waiters();
                }
                Err(e) => break e,
            }
        };
        let status = proc.join_timeout(Duration::from_secs(5)).await;
        if inner.lock().closing && matches!(status, Ok(ExitStatus::Code(0))) {
            return;
        }
        let cause = match &status {
            Ok(s) => format!("{s}"),
            Err(e) => format!("{e} (result pipe: {end})"),
        };
        let worker_name = format!("worker {w} (pid {})", proc.pid());
        tracing::warn!(worker = w, pid = proc.pid(), %cause, "pool worker died");
        {
            let mut st = inner.lock();
            let lost: Vec<u64> = st
                .pending
                .iter()
                .filter(|(_, p)| p.worker == w)
                .map(|(id, _)| *id)
                .collect();
            for id in lost {
                let p = st.pending.remove(&id).expect("listed above");
                let _ = p.reply.send(Err(Error::new(
                    ErrorKind::WorkerDied,
                    format!("job {id}: {worker_name} died ({cause}) while holding it"),
                )));
                st.stats[w].jobs_failed += 1;
            }
            st.stats[w].in_flight = 0;
        }
        inner.freed.notify_waiters();
        if inner.lock().closing {
            return;
        }
        // Restart, with a short back-off if the start itself fails.
        let mut attempt = 0;
        let (new_proc, tx, new_rx) = loop {
            match spawner.spawn() {
                Ok(parts) => break parts,
                Err(e) if attempt < 5 => {
                    tracing::warn!(worker = w, error = %e, "restarting pool worker failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => {
                    tracing::error!(worker = w, error = %e, "pool worker could not be restarted");
                    inner.lock().dead[w] = true;
                    *inner.senders[w].lock().await = None;
                    inner.freed.notify_waiters();
                    return;
                }
            }
        };
        *inner.senders[w].lock().await = Some(tx);
        {
            let mut st = inner.lock();
            st.stats[w].restarts += 1;
            st.stats[w].pid = new_proc.pid();
        }
        proc = new_proc;
        rx = new_rx;
    }
}

impl<J, R> Pool<J, R>
where
    J: Encode + Send + 'static,
    JobMsg<J>: Encode,
    R: Decode + Send + 'static,
{
    /// Runs `job` on a worker and returns its result, validated and owned.
    ///
    /// Waits while every worker already has `max_in_flight` jobs. A job that
    /// panics is [`ErrorKind::Panicked`] (the worker lives on); a worker that
    /// dies fails its jobs with [`ErrorKind::WorkerDied`]; a closed pool is
    /// [`ErrorKind::Closed`].
    pub async fn call(&self, job: J) -> Result<OwnedMessage<R>> {
        let inner = &self.handle.inner;
        let _permit = inner
            .permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "pool is shut down"))?;
        self.dispatch(job).await
    }

    /// Like [`Pool::call`], but fails at once with [`ErrorKind::Busy`] when
    /// every worker is full.
    pub async fn try_call(&self, job: J) -> Result<OwnedMessage<R>> {
        let inner = &self.handle.inner;
        let _permit = inner.permits.try_acquire().map_err(|e| match e {
            tokio::sync::TryAcquireError::NoPermits => {
                Error::new(ErrorKind::Busy, "pool is saturated")
            }
            tokio::sync::TryAcquireError::Closed => {
                Error::new(ErrorKind::Closed, "pool is shut down")
            }
        })?;
        self.dispatch(job).await
    }

    /// Picks the least-loaded worker with room, registers the job and sends it.
    async fn dispatch(&self, job: J) -> Result<OwnedMessage<R>> {
        let inner = &self.handle.inner;
        let (w, id, rx) = loop {
            let freed = inner.freed.notified();
            {
                let mut st = inner.lock();
                if st.closing {
                    return Err(Error::new(ErrorKind::Closed, "pool is shutting down"));
                }
                let pick = (0..st.stats.len())
                    .filter(|&w| !st.dead[w] && st.stats[w].in_flight < inner.max_in_flight)
                    .min_by_key(|&w| st.stats[w].in_flight);
                if let Some(w) = pick {
                    let id = st.next_id;
                    st.next_id += 1;
                    st.stats[w].in_flight += 1;
                    let (tx, rx) = oneshot::channel();
                    st.pending.insert(
                        id,
                        PendingJob {
                            worker: w,
                            reply: tx,
                        },
                    );
                    break (w, id, rx);
                }
                if st.dead.iter().all(|&d| d) {
                    return Err(Error::new(
                        ErrorKind::WorkerDied,
                        "every pool worker is dead",
                    ));
                }
            }
            // Every worker is full of jobs whose callers gave up: wait.
            freed.await;
        };
        let sent = {
            let mut guard = inner.senders[w].lock().await;
            match guard.as_mut() {
                Some(tx) => {
                    // Encode before awaiting, so the job is not held across
                    // the write (and need not be `Sync`).
                    let queued = tx.queue(&JobMsg { id, job });
                    match queued {
                        Ok(()) => tx.flush().await,
                        Err(e) => Err(e),
                    }
                }
                None => Err(Error::new(
                    ErrorKind::WorkerDied,
                    format!("worker {w} is gone"),
                )),
            }
        };
        if let Err(e) = sent {
            // The job did not reach the worker (it died under us, or the job
            // would not encode). Unless the worker's reader already failed
            // this job, fail it here: exactly once either way.
            let mut st = inner.lock();
            if st.pending.remove(&id).is_some() {
                st.stats[w].in_flight = st.stats[w].in_flight.saturating_sub(1);
                st.stats[w].jobs_failed += 1;
                drop(st);
                inner.freed.notify_waiters();
                return Err(match e.kind() {
                    ErrorKind::Closed | ErrorKind::Io => Error::new(
                        ErrorKind::WorkerDied,
                        format!("job {id}: worker {w} is gone"),
                    )
                    .with_source(e),
                    _ => e,
                });
            }
        }
        rx.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::WorkerDied,
                format!("job {id}: worker {w} reader stopped"),
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
        let window = self.handle.inner.senders.len() * self.handle.inner.max_in_flight;
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
        loop {
            let freed = inner.freed.notified();
            if inner.lock().pending.is_empty() {
                break;
            }
            freed.await;
        }
        inner.permits.close();
        for s in &inner.senders {
            *s.lock().await = None;
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
        self.handle.inner.senders.len()
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
    JobMsg<J>: Encode,
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
            Err(Error::new(
                ErrorKind::Panicked,
                format!("pool call task: {e}"),
            ))
        }))
    }
}
