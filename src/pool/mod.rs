//! A pool of pinned worker processes that run jobs for an async application,
//! with backpressure, deadlines and crash recovery.
//!
//! Each worker is a child process (one per core by default, pinned to it)
//! running a loop ([`worker`]): receive `(id, job)` on its job pipe, call the
//! handler, send `(id, busy time, outcome)` on its result pipe. In the
//! parent ([`supervisor`]), a `call` registers its job and hands the encoded
//! frame to the worker's writer task without awaiting any I/O (so a
//! cancelled `call` can never leave a job half-registered); one supervisor
//! task per worker completes calls, enforces job timeouts, and when its
//! worker dies (seen by its pidfd or its pipe) fails exactly the jobs that
//! worker held with [`ErrorKind::WorkerDied`], restarts it, and carries on.
//! Jobs are never retried (a job that may have run is not run twice) and
//! never lost (every `call` ends in a result or a typed error).

mod supervisor;
mod worker;

use crate::backend::Backend;
use crate::channel::ChannelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Decode, Encode, OwnedMessage, encode_into};
use crate::process::ExitStatus;
use crate::process::handoff::collect_fds;
use crate::process::spec::Spec;
use crate::sys;
use crate::wire::Header;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use rkyv::{Archive, Deserialize};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use supervisor::{Inner, Job, Queued, Slot, State, SupervisorGuard, WorkerSpawner};
use tokio::sync::{Notify, Semaphore, oneshot};
use tokio::task::JoinHandle;
use worker::{JOB_WITH_FDS, Launcher, WorkerOptions};

/// Most fds one job may carry (the fd channel's default limit).
const MAX_JOB_FDS: usize = 16;

/// Options for a [`Pool`]; made by [`Pool::builder`] or [`Pool::builder_async`].
#[must_use]
pub struct PoolBuilder<J, R> {
    handler: usize,
    launcher: Launcher,
    workers: Option<usize>,
    /// `None`: the default, 4 or `concurrency` if more.
    max_in_flight: Option<usize>,
    /// Jobs one worker runs at once; honoured for async handlers only.
    concurrency: usize,
    is_async: bool,
    job_timeout: Option<Duration>,
    pin: bool,
    backend: Backend,
    name: String,
    _r: PhantomData<fn(J) -> R>,
}

/// Per-worker counters, readable at run time with [`Pool::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// The worker's index, as [`Pool::kill_worker`] and
    /// [`Pool::restart_worker`] take it.
    pub worker: usize,
    /// Its current process id (informational: to signal a worker, use
    /// [`Pool::kill_worker`], which cannot hit another process that reused
    /// the pid).
    pub pid: u32,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    /// Jobs that returned a value.
    pub jobs_done: u64,
    /// Jobs that failed: panicked, could not be decoded or encoded, returned
    /// an invalid result, timed out, or were lost with the worker.
    pub jobs_failed: u64,
    /// Jobs that ran past their timeout (each ended its worker).
    pub timeouts: u64,
    /// How often the worker was replaced after it ended.
    pub restarts: u64,
    /// How the previous worker in this slot ended, if one did.
    pub last_death: Option<WorkerDeath>,
    /// Time spent inside the handler.
    pub busy: Duration,
    /// Jobs sent to it and not yet answered.
    pub in_flight: usize,
}

/// How a pool worker ended; see [`WorkerStats::last_death`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerDeath {
    /// The process id it had.
    pub pid: u32,
    /// Why it ended.
    pub cause: DeathCause,
    /// Its exit status, if it was reaped.
    pub status: Option<ExitStatus>,
}

/// Why a pool worker ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeathCause {
    /// It exited or was killed on its own (a crash, an `exit`, a signal from
    /// outside the pool).
    Exited,
    /// A job ran past its timeout, so the pool killed it.
    JobTimedOut {
        /// The job's id (pool-internal, as in error messages).
        job: u64,
    },
    /// [`Pool::kill_worker`] killed it.
    Killed,
    /// [`Pool::restart_worker`] replaced it.
    Restarted,
    /// Its job pipe could not be written, so the pool killed it.
    JobPipeFailed,
    /// It broke the pool's protocol (a result for a job it was not running),
    /// so the pool killed it.
    Protocol(String),
    /// [`Pool::shutdown_timeout`]'s deadline passed while it still held jobs.
    ShutdownDeadline,
}

impl fmt::Display for WorkerDeath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "(pid {}) ", self.pid)?;
        match &self.cause {
            DeathCause::Exited => write!(f, "died")?,
            DeathCause::JobTimedOut { job } => write!(f, "was killed after job {job} timed out")?,
            DeathCause::Killed => write!(f, "was killed by Pool::kill_worker")?,
            DeathCause::Restarted => write!(f, "was restarted by Pool::restart_worker")?,
            DeathCause::JobPipeFailed => write!(f, "was killed: its job pipe failed")?,
            DeathCause::Protocol(why) => write!(f, "was killed for sending {why}")?,
            DeathCause::ShutdownDeadline => write!(f, "was killed at the shutdown deadline")?,
        }
        match self.status {
            Some(s) => write!(f, " ({s})"),
            None => Ok(()),
        }
    }
}

struct Handle<R: Archive> {
    inner: Arc<Inner<R>>,
    supervisors: Mutex<Vec<JoinHandle<()>>>,
}

impl<R: Archive> Handle<R> {
    fn take_supervisors(&self) -> Vec<JoinHandle<()>> {
        self.supervisors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect()
    }
}

impl<R: Archive> Drop for Handle<R> {
    fn drop(&mut self) {
        // Without `shutdown`, dropping the pool kills its workers: the
        // supervisor tasks own the worker processes, whose handles kill on drop.
        for t in self.take_supervisors() {
            t.abort();
        }
    }
}

/// A pool of pinned worker processes with backpressure, job timeouts and
/// crash recovery (see `docs/architecture.md`). Cloning it is cheap and
/// shares the workers.
///
/// ```
/// # #[allow(clippy::needless_doctest_main)]
/// use std::time::Duration;
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// fn main() -> ringipc::Result<()> {
///     ringipc::init();
///     let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
///     rt.block_on(async {
///         let pool = ringipc::Pool::builder(square)
///             .workers(2)
///             .job_timeout(Duration::from_secs(10))
///             .build()
///             .await?;
///         assert_eq!(pool.call(7).await?.to_native(), 49);
///         pool.shutdown().await
///     })
/// }
/// ```
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
        PoolBuilder::new(handler as usize, |a, o| {
            worker::launch(worker::worker_sync::<J, R>, a, o)
        })
    }

    /// A builder for a pool whose workers run the `async` `handler`.
    pub fn builder_async<J, R, F>(handler: fn(J) -> F) -> PoolBuilder<J, R>
    where
        J: Encode + Decode,
        J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
        R: Encode + Decode,
        F: Future<Output = R>,
    {
        PoolBuilder {
            is_async: true,
            ..PoolBuilder::new(handler as usize, |a, o| {
                worker::launch(worker::worker_async::<J, R, F>, a, o)
            })
        }
    }
}

impl<J, R> PoolBuilder<J, R> {
    fn new(handler: usize, launcher: Launcher) -> Self {
        PoolBuilder {
            handler,
            launcher,
            workers: None,
            max_in_flight: None,
            concurrency: 1,
            is_async: false,
            job_timeout: None,
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

    /// Jobs sent to one worker and not yet answered (default 4, or the
    /// [`concurrency`](Self::concurrency) if that is more). `call` waits
    /// when every worker has this many.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = Some(n.max(1));
        self
    }

    /// How many jobs one worker runs at once, as tasks of its runtime
    /// (default 1). For async handlers that wait on I/O, such as a worker
    /// serving connections handed to it: each job can be a whole
    /// connection, and one worker serves many. Results go back as each job
    /// ends, in any order. A sync handler runs one job at a time whatever
    /// this says, since it holds the worker's thread until it returns.
    ///
    /// Job timeouts count from when a job starts: when it is among the
    /// first `n` of its worker's unanswered jobs. A job that times out
    /// ends its worker, so the jobs running beside it fail with
    /// [`ErrorKind::WorkerDied`].
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long one job may run (default: no limit; [`Pool::call_timeout`]
    /// sets it per call). The clock starts when the worker starts the job,
    /// not while it waits behind the worker's earlier jobs. A job that runs
    /// longer fails with [`ErrorKind::TimedOut`], and its worker is killed
    /// (the only way to stop a running handler) and restarted; the other
    /// jobs that worker held fail with [`ErrorKind::WorkerDied`].
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = Some(timeout);
        self
    }

    /// Whether worker `i` is pinned to the `i`-th core (default: yes).
    /// Unpin where other busy threads share the cores (see
    /// [`PreforkBuilder::pin`](crate::PreforkBuilder::pin)).
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

impl<J, R> PoolBuilder<J, R>
where
    J: Send + 'static,
    R: Decode + Send + 'static,
{
    /// Starts the workers. Must run inside a tokio runtime, which also runs
    /// the pool's supervisor and writer tasks: keep that runtime going while
    /// the pool is in use (callers may be on other threads or engine cores).
    /// If it stops, calls fail with [`ErrorKind::WorkerDied`] instead of
    /// hanging.
    pub async fn build(self) -> Result<Pool<J, R>> {
        let cores = sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?;
        let n = self.workers.unwrap_or(cores.len()).max(1);
        let concurrency = if self.is_async { self.concurrency } else { 1 };
        let max_in_flight = self.max_in_flight.unwrap_or(concurrency.max(4));
        let backend = self.backend.resolve()?;
        let cfg = ChannelConfig::new().backend(backend);
        let mut started = Vec::with_capacity(n);
        for i in 0..n {
            let core = self.pin.then(|| cores[i % cores.len()]);
            let spawner = WorkerSpawner {
                launcher: self.launcher,
                handler: Spec::offset(self.handler),
                concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
                cfg,
                opts: WorkerOptions {
                    name: format!("{}-{i}", self.name),
                    affinity: core.map_or(crate::process::Affinity::Any, |c| {
                        crate::process::Affinity::Core(c)
                    }),
                    backend,
                },
            };
            // On error, the workers started so far are killed as `started` drops.
            let new = spawner.spawn()?;
            started.push((new, spawner, core));
        }
        let mut slots = Vec::with_capacity(n);
        let mut rest = Vec::with_capacity(n);
        for (i, (new, spawner, core)) in started.into_iter().enumerate() {
            let mut slot = Slot::new(
                WorkerStats {
                    worker: i,
                    core,
                    ..Default::default()
                },
                concurrency,
            );
            let failed = supervisor::install(&mut slot, new.jobs, new.pidfd, new.proc.pid());
            slots.push(slot);
            rest.push((new.proc, new.results, spawner, failed));
        }
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                slots,
                next_id: 0,
                closing: false,
            }),
            permits: Semaphore::new(n * max_in_flight),
            room: Notify::new(),
            changed: Notify::new(),
            max_in_flight,
            max_frame: crate::framing::DEFAULT_MAX_FRAME,
            job_timeout: self.job_timeout,
        });
        let supervisors = rest
            .into_iter()
            .enumerate()
            .map(|(w, (proc, rx, spawner, failed))| {
                let guard = SupervisorGuard {
                    inner: inner.clone(),
                    w,
                    armed: true,
                };
                tokio::spawn(supervisor::supervise(guard, proc, rx, spawner, failed))
            })
            .collect();
        Ok(Pool {
            handle: Arc::new(Handle {
                inner,
                supervisors: Mutex::new(supervisors),
            }),
            _j: PhantomData,
        })
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
    /// panics is [`ErrorKind::Panicked`] (the worker lives on); a job that
    /// runs past the pool's [`job_timeout`](PoolBuilder::job_timeout) is
    /// [`ErrorKind::TimedOut`]; a worker that dies fails its jobs with
    /// [`ErrorKind::WorkerDied`]; a closed pool is [`ErrorKind::Closed`].
    /// Cancelling the future is safe: the job may still run, its result is
    /// dropped, and its slot is freed when it ends.
    pub async fn call(&self, job: J) -> Result<OwnedMessage<R>> {
        let timeout = self.handle.inner.job_timeout;
        self.call_with(job, timeout, true).await
    }

    /// [`Pool::call`] with this job's own timeout instead of the pool's
    /// (see [`PoolBuilder::job_timeout`]): past it the job fails with
    /// [`ErrorKind::TimedOut`] and its worker is killed and restarted.
    pub async fn call_timeout(&self, job: J, timeout: Duration) -> Result<OwnedMessage<R>> {
        self.call_with(job, Some(timeout), true).await
    }

    /// Like [`Pool::call`], but fails at once with [`ErrorKind::Busy`] when
    /// no worker has room.
    pub async fn try_call(&self, job: J) -> Result<OwnedMessage<R>> {
        let timeout = self.handle.inner.job_timeout;
        self.call_with(job, timeout, false).await
    }

    async fn call_with(
        &self,
        job: J,
        timeout: Option<Duration>,
        wait: bool,
    ) -> Result<OwnedMessage<R>> {
        let frame = self.encode(job)?;
        let permits = &self.handle.inner.permits;
        let closed = || Error::new(ErrorKind::Closed, "pool is shut down");
        let _permit = if wait {
            permits.acquire().await.map_err(|_| closed())?
        } else {
            permits.try_acquire().map_err(|e| match e {
                tokio::sync::TryAcquireError::NoPermits => {
                    Error::new(ErrorKind::Busy, "pool is saturated")
                }
                tokio::sync::TryAcquireError::Closed => closed(),
            })?
        };
        self.dispatch(frame, timeout, wait).await
    }

    /// The job frame: room for the header, then the job's archive (16-byte
    /// aligned), and duplicates of the fds the job carries (its `Fd` and
    /// `Inherit` fields), which its worker receives with it. Encoding errors
    /// reach the caller before anything is registered.
    fn encode(&self, job: J) -> Result<Queued> {
        let mut frame = vec![0u8; Header::LEN];
        let (encoded, raw) = collect_fds(|| encode_into(&job, &mut frame));
        encoded?;
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
        if raw.len() > MAX_JOB_FDS {
            return Err(Error::new(
                ErrorKind::FrameTooLarge,
                format!(
                    "a job holds {} fds, over the limit of {MAX_JOB_FDS}",
                    raw.len()
                ),
            ));
        }
        let fds = raw
            .iter()
            .map(|&fd| sys::dup_above(fd, 3))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::io("duplicating a job's fd", e))?;
        // The job's own fds (a connection, say) close now: the worker owns
        // the only copies once the job is sent.
        drop(job);
        Ok(Queued { frame, fds })
    }

    /// Registers the job with the least-loaded live worker that has room
    /// and queues it for that worker's writer, in one step under the lock:
    /// no await sits between the two, so a cancelled call cannot leak a slot.
    async fn dispatch(
        &self,
        mut job: Queued,
        timeout: Option<Duration>,
        wait: bool,
    ) -> Result<OwnedMessage<R>> {
        let inner = &self.handle.inner;
        let rx = loop {
            let room = inner.room.notified();
            {
                let mut st = inner.lock();
                if st.closing {
                    return Err(Error::new(ErrorKind::Closed, "pool is shutting down"));
                }
                let max = inner.max_in_flight;
                let mut pick: Option<usize> = None;
                for w in 0..st.slots.len() {
                    if st.slots[w].takes_jobs(max)
                        && pick.is_none_or(|p| st.slots[w].jobs.len() < st.slots[p].jobs.len())
                    {
                        pick = Some(w);
                    }
                }
                if let Some(w) = pick {
                    let id = st.next_id;
                    st.next_id += 1;
                    let tag = if job.fds.is_empty() { 0 } else { JOB_WITH_FDS };
                    Header::new(tag).id(id).write_at(&mut job.frame);
                    let slot = &mut st.slots[w];
                    match slot.queue.as_ref().expect("picked").send(job) {
                        Ok(()) => {
                            let (tx, rx) = oneshot::channel();
                            let timed = slot.push_job(Job {
                                id,
                                timeout,
                                reply: tx,
                                started: None,
                            });
                            if timed {
                                // Its supervisor may sleep without a deadline.
                                slot.nudge.notify_one();
                            }
                            break rx;
                        }
                        Err(tokio::sync::mpsc::error::SendError(back)) => {
                            // Its writer is gone; the supervisor is ending it.
                            job = back;
                            slot.queue = None;
                            continue;
                        }
                    }
                }
                if st.slots.iter().all(|s| s.dead) {
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
            // up) or restarting: wait until a slot frees up.
            room.await;
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
        let window = inner.lock().slots.len() * inner.max_in_flight;
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
        self.shutdown_inner(None).await
    }

    /// [`Pool::shutdown`] with a deadline: jobs still running when it passes
    /// fail with [`ErrorKind::WorkerDied`], their workers are killed, and the
    /// result is [`ErrorKind::TimedOut`] (the pool is shut down either way).
    pub async fn shutdown_timeout(self, deadline: Duration) -> Result<()> {
        self.shutdown_inner(Some(deadline)).await
    }

    async fn shutdown_inner(self, deadline: Option<Duration>) -> Result<()> {
        let inner = self.handle.inner.clone();
        let until = deadline.map(|d| tokio::time::Instant::now() + d);
        {
            let mut st = inner.lock();
            st.closing = true;
            // Restarts asked and not done will not happen: tell their
            // callers now (a supervisor that sees the pool closing returns
            // without starting a new worker).
            for slot in &mut st.slots {
                slot.refuse_restarts();
            }
        }
        // Callers waiting for room re-check and get Closed.
        inner.room.notify_waiters();
        let mut late = 0;
        loop {
            let changed = inner.changed.notified();
            if inner.lock().jobs_in_flight() == 0 {
                break;
            }
            match until {
                None => changed.await,
                Some(at) => {
                    if tokio::time::timeout_at(at, changed).await.is_err() {
                        let mut st = inner.lock();
                        for slot in st.slots.iter_mut().filter(|s| !s.jobs.is_empty()) {
                            late += slot.jobs.len();
                            slot.end(DeathCause::ShutdownDeadline);
                        }
                        break;
                    }
                }
            }
        }
        inner.permits.close();
        // Closing the job queues ends the writers, which closes the job
        // pipes; the workers then exit and their supervisors return.
        for slot in inner.lock().slots.iter_mut() {
            slot.queue = None;
        }
        for s in self.handle.take_supervisors() {
            let _ = s.await;
        }
        if late > 0 {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "pool shutdown: {late} jobs were still running or queued after {:?}; their workers \
                     were killed",
                    deadline.unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }
}

impl<J, R: Archive> Pool<J, R> {
    /// Per-worker counters.
    pub fn stats(&self) -> Vec<WorkerStats> {
        let st = self.handle.inner.lock();
        st.slots
            .iter()
            .map(|s| WorkerStats {
                in_flight: s.jobs.len(),
                ..s.stats.clone()
            })
            .collect()
    }

    /// The number of workers.
    pub fn workers(&self) -> usize {
        self.handle.inner.lock().slots.len()
    }

    /// SIGKILLs worker `index` now, through its pidfd (never another process
    /// that reused its pid). Its jobs fail with [`ErrorKind::WorkerDied`]
    /// and the pool starts a new worker in its place. An index out of range
    /// is [`ErrorKind::InvalidArgument`]; a worker that could not be
    /// restarted earlier is [`ErrorKind::WorkerDied`].
    ///
    /// A worker that has already exited, or is being replaced, is not
    /// killed again: the call returns `Ok` and its death keeps its own cause.
    pub fn kill_worker(&self, index: usize) -> Result<()> {
        let mut st = self.handle.inner.lock();
        let slot = Self::slot(&mut st, index)?;
        if slot.process_alive() {
            slot.end(DeathCause::Killed);
        }
        Ok(())
    }

    /// Replaces worker `index` gracefully: no new jobs go to it, the jobs it
    /// holds finish, then it exits and a new worker starts. Returns once the
    /// new worker takes jobs. Dropping the future does not stop the restart.
    /// Errors as for [`Pool::kill_worker`], or [`ErrorKind::Closed`] if the
    /// pool shuts down first.
    pub async fn restart_worker(&self, index: usize) -> Result<()> {
        let rx = {
            let mut st = self.handle.inner.lock();
            if st.closing {
                return Err(Error::new(ErrorKind::Closed, "pool is shutting down"));
            }
            let slot = Self::slot(&mut st, index)?;
            let (tx, rx) = oneshot::channel();
            slot.restart_waiters.push(tx);
            slot.nudge.notify_one();
            rx
        };
        rx.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Closed,
                "the pool stopped before the worker was restarted",
            ))
        })
    }

    fn slot(st: &mut State<R>, index: usize) -> Result<&mut Slot<R>> {
        let n = st.slots.len();
        let slot = st.slots.get_mut(index).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("no pool worker {index}: the pool has {n}"),
            )
        })?;
        if slot.dead {
            return Err(Error::new(
                ErrorKind::WorkerDied,
                format!("pool worker {index} is dead (it could not be restarted)"),
            ));
        }
        Ok(slot)
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
