//! The parent side of a pool: shared state, and per worker a writer task
//! (job frames out) and a supervisor task (results in, deadlines, death and
//! restart).
//!
//! All bookkeeping lives in one `State` under one mutex, held only for short
//! non-blocking steps. Each worker's jobs sit in its `Slot::jobs` in the
//! order they were sent; a worker starts them in that order, running up to
//! `concurrency` at once (one for a sync handler), so the first
//! `concurrency` jobs of the queue are the ones running. Its next result
//! must answer one of those, and a result for any other id is a protocol
//! error that ends the worker.

use super::worker::{JobFds, Launcher, TAG_OK, TAG_PANIC, WorkerArgs, WorkerOptions};
use super::{DeathCause, WorkerDeath, WorkerStats};
use crate::channel::{BytesReceiver, BytesSender, ChannelConfig, OwnedFrame};
use crate::error::{Error, ErrorKind, Result};
use crate::fd_channel::{FdChannelConfig, FdSender};
use crate::message::{Decode, OwnedMessage};
use crate::process::{ExitStatus, Fd, Process};
use crate::sys;
use crate::wire::Header;
use rkyv::Archive;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};

/// After a worker is seen to exit, results it wrote before exiting are
/// still read, until its pipe ends or stays quiet this long.
const DRAIN_QUIET: Duration = Duration::from_millis(50);
/// ... and for at most this long in all (a grandchild may hold the pipe).
const DRAIN_MAX: Duration = Duration::from_secs(1);
/// How long a worker whose result pipe ended may take to exit before it is
/// killed.
const EXIT_GRACE: Duration = Duration::from_secs(5);

pub(super) type Reply<R> = oneshot::Sender<Result<OwnedMessage<R>>>;

pub(super) struct Job<R: Archive> {
    pub id: u64,
    pub timeout: Option<Duration>,
    pub reply: Reply<R>,
    /// When the worker started it, as the parent reckons (the job entered
    /// the running part of the queue): its timeout counts from here.
    pub started: Option<Instant>,
}

/// A job on its way to a worker's writer: its frame, and the fds it
/// carries (duplicates, open until the datagram is sent).
pub(super) struct Queued {
    pub frame: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// One worker as the parent sees it.
pub(super) struct Slot<R: Archive> {
    pub stats: WorkerStats,
    /// Jobs sent to the worker and not yet answered, oldest first; the
    /// first `concurrency` are running.
    pub jobs: VecDeque<Job<R>>,
    /// How many jobs the worker runs at once.
    pub concurrency: usize,
    /// The worker's job queue (read by its writer task); `None` while no
    /// job may be routed to it: it is ending, restarting or dead.
    pub queue: Option<mpsc::UnboundedSender<Queued>>,
    /// A duplicate of the current process's pidfd: liveness checks and
    /// signals that cannot hit another process after pid reuse.
    pub pidfd: Option<Arc<OwnedFd>>,
    /// Why the pool is ending this worker, once it decided to.
    pub ending: Option<DeathCause>,
    /// The worker broke the protocol: nothing more it sends is believed,
    /// whatever else was already ending it.
    pub distrusted: bool,
    /// `restart_worker` was asked: no new jobs; once its jobs are done the
    /// worker's job pipe is closed, and the callers are answered when the
    /// new worker is up.
    pub restart_waiters: Vec<oneshot::Sender<Result<()>>>,
    /// Could not be restarted (or its supervisor is gone).
    pub dead: bool,
    /// Wakes the supervisor: a timed job started, or a restart was asked.
    pub nudge: Arc<Notify>,
}

impl<R: Archive> Slot<R> {
    pub fn new(stats: WorkerStats, concurrency: usize) -> Slot<R> {
        Slot {
            stats,
            jobs: VecDeque::new(),
            concurrency: concurrency.max(1),
            queue: None,
            pidfd: None,
            ending: None,
            distrusted: false,
            restart_waiters: Vec::new(),
            dead: false,
            nudge: Arc::new(Notify::new()),
        }
    }

    /// Whether a job may be routed here now. A worker that has exited but
    /// whose supervisor has not noticed yet is caught by its pidfd.
    pub fn takes_jobs(&mut self, max_in_flight: usize) -> bool {
        if self.queue.is_none() || !self.restart_waiters.is_empty() {
            return false;
        }
        if self.jobs.len() >= max_in_flight {
            return false;
        }
        if !self.process_alive() {
            self.queue = None;
            return false;
        }
        true
    }

    /// Whether the worker process exists and has not exited (its pidfd is
    /// readable once it has; no pidfd while it is being replaced).
    pub fn process_alive(&self) -> bool {
        self.pidfd
            .as_ref()
            .is_some_and(|fd| !sys::pidfd_exited(fd.as_raw_fd()))
    }

    /// Adds a job sent to the worker. Returns whether it starts at once
    /// with a timeout (its supervisor may be asleep without a deadline).
    pub fn push_job(&mut self, mut job: Job<R>) -> bool {
        let starts = self.jobs.len() < self.concurrency;
        if starts {
            job.started = Some(Instant::now());
        }
        let timed = starts && job.timeout.is_some();
        self.jobs.push_back(job);
        timed
    }

    /// Takes out job `i`, one of the running ones; the next queued job
    /// moves up into their place and starts now.
    fn take_job(&mut self, i: usize) -> Option<Job<R>> {
        let job = self.jobs.remove(i)?;
        if let Some(next) = self.jobs.get_mut(self.concurrency - 1) {
            next.started.get_or_insert_with(Instant::now);
        }
        Some(job)
    }

    /// The running job whose timeout runs out first, and when.
    fn deadline(&self) -> Option<(usize, Instant)> {
        if self.ending.is_some() {
            return None;
        }
        self.jobs
            .iter()
            .take(self.concurrency)
            .enumerate()
            .filter_map(|(i, j)| Some((i, j.started? + j.timeout?)))
            .min_by_key(|&(_, at)| at)
    }

    /// Ends the worker: no more jobs, and SIGKILL. The first cause sticks.
    pub fn end(&mut self, cause: DeathCause) {
        self.ending.get_or_insert(cause);
        self.queue = None;
        if let Some(fd) = &self.pidfd {
            // ESRCH (already exited) is fine: it is ending either way.
            let _ = sys::pidfd_send_signal(fd.as_raw_fd(), libc::SIGKILL);
        }
    }

    /// The worker sent something the protocol does not allow: end it, and
    /// believe nothing more it sends.
    fn broke_protocol(&mut self, why: String) {
        self.distrusted = true;
        self.end(DeathCause::Protocol(why));
    }

    /// The pool is shutting down: a restart that was asked will not happen.
    pub fn refuse_restarts(&mut self) {
        for w in self.restart_waiters.drain(..) {
            let _ = w.send(Err(Error::new(
                ErrorKind::Closed,
                "the pool shut down before the worker was restarted",
            )));
        }
    }

    /// Fails every job the worker holds, exactly once.
    fn fail_jobs(&mut self, why: &str) {
        for job in self.jobs.drain(..) {
            let _ = job.reply.send(Err(Error::new(
                ErrorKind::WorkerDied,
                format!("job {}: {why}", job.id),
            )));
            self.stats.jobs_failed += 1;
        }
    }

    /// The worker is gone for good: nothing more is routed to it, and whoever
    /// waits on a restart learns it.
    fn retire(&mut self, why: &str) {
        self.fail_jobs(why);
        self.queue = None;
        self.pidfd = None;
        self.dead = true;
        for w in self.restart_waiters.drain(..) {
            let _ = w.send(Err(Error::new(ErrorKind::WorkerDied, why.to_string())));
        }
    }
}

pub(super) struct State<R: Archive> {
    pub slots: Vec<Slot<R>>,
    pub next_id: u64,
    pub closing: bool,
}

impl<R: Archive> State<R> {
    pub fn jobs_in_flight(&self) -> usize {
        self.slots.iter().map(|s| s.jobs.len()).sum()
    }
}

pub(super) struct Inner<R: Archive> {
    pub state: Mutex<State<R>>,
    pub permits: Semaphore,
    /// One waiting `call` is woken per freed job slot; all of them when
    /// workers come back or the pool closes.
    pub room: Notify,
    /// Woken on changes `shutdown` waits for (the last job ended, a worker
    /// ended).
    pub changed: Notify,
    pub max_in_flight: usize,
    pub max_frame: usize,
    /// The builder's per-job timeout, for calls that do not set their own.
    pub job_timeout: Option<Duration>,
}

impl<R: Archive> Inner<R> {
    pub fn lock(&self) -> MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct WorkerSpawner {
    pub launcher: Launcher,
    pub handler: i64,
    /// Jobs the worker runs at once.
    pub concurrency: u32,
    pub cfg: ChannelConfig,
    pub opts: WorkerOptions,
}

/// What carries a worker's jobs: the frames, and the fds of jobs that
/// hold some.
pub(super) struct JobPipe {
    pub frames: BytesSender,
    pub fds: FdSender<JobFds>,
}

/// A started worker: its process, its job pipe and its result pipe.
pub(super) struct Started {
    pub proc: Process<()>,
    pub jobs: JobPipe,
    pub results: BytesReceiver,
    pub pidfd: Arc<OwnedFd>,
}

impl WorkerSpawner {
    pub fn spawn(&self) -> Result<Started> {
        // Jobs and results may be large (an image, a tensor): both pipes
        // have the config's arena. A large result is serialized once into
        // shared memory; a large job, serialized by its caller, is copied
        // once into a slot instead of twice through the pipe.
        let (job_tx, job_rx) = self.cfg.bytes_pipe_with_arena()?;
        let (res_tx, res_rx) = self.cfg.bytes_pipe_with_arena()?;
        let (fd_tx, fd_rx) = FdChannelConfig::new()
            .backend(self.cfg.backend_choice())
            .channel::<JobFds>()?;
        let args = WorkerArgs {
            jobs: job_rx,
            results: res_tx,
            fds: fd_rx,
            handler: self.handler,
            concurrency: self.concurrency,
        };
        let proc = (self.launcher)(args, &self.opts)?;
        let pidfd = proc
            .pidfd_dup()
            .map_err(|e| Error::io("duplicate a worker's pidfd", e))?;
        Ok(Started {
            proc,
            jobs: JobPipe {
                frames: job_tx,
                fds: fd_tx,
            },
            results: res_rx,
            pidfd: Arc::new(pidfd),
        })
    }
}

/// Writes a worker's job frames, coalescing whatever queued up into one
/// write. On a write error it asks the supervisor to end the worker (which
/// is then restarted), so a worker that cannot take jobs does not linger.
///
/// A job's fds go first, as one datagram, so the worker never waits for
/// them once it has the job's frame.
pub(super) async fn writer(
    jobs: JobPipe,
    mut queue: mpsc::UnboundedReceiver<Queued>,
    failed: Arc<Notify>,
) {
    let JobPipe {
        frames: mut tx,
        mut fds,
    } = jobs;
    while let Some(job) = queue.recv().await {
        let mut r = write_job(&mut tx, &mut fds, job).await;
        while r.is_ok() {
            match queue.try_recv() {
                Ok(job) => r = write_job(&mut tx, &mut fds, job).await,
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

/// Queues one job's frame for the pipe, its fds (if any) sent first.
async fn write_job(tx: &mut BytesSender, fds: &mut FdSender<JobFds>, job: Queued) -> Result<()> {
    if !job.fds.is_empty() {
        let id = Header::read(&job.frame).map_or(0, |(h, _)| h.id);
        fds.send((id, job.fds.into_iter().map(Fd).collect()))
            .await?;
    }
    tx.feed_frame(&job.frame).await
}

/// Installs a started worker in slot `w`: its queue, pidfd and pid, and a
/// writer task. The caller holds the lock.
pub(super) fn install<R: Archive>(
    slot: &mut Slot<R>,
    jobs: JobPipe,
    pidfd: Arc<OwnedFd>,
    pid: u32,
) -> Arc<Notify> {
    let (qtx, qrx) = mpsc::unbounded_channel();
    let failed = Arc::new(Notify::new());
    tokio::spawn(writer(jobs, qrx, failed.clone()));
    slot.queue = Some(qtx);
    slot.pidfd = Some(pidfd);
    slot.stats.pid = pid;
    slot.ending = None;
    slot.distrusted = false;
    // A new worker starts whatever it is given from now.
    let (c, now) = (slot.concurrency, Instant::now());
    for job in slot.jobs.iter_mut().take(c) {
        job.started = Some(now);
    }
    failed
}

/// Turns a worker's result pair (the value frame, then the header frame)
/// into the call's outcome. The value is not copied: it stays in the
/// buffer (or arena slot) it was received into.
fn decode_result<R: Decode>(
    value: OwnedFrame,
    header: Header,
    text: &[u8],
    worker: usize,
) -> Result<OwnedMessage<R>> {
    let id = header.id;
    let text = || String::from_utf8_lossy(text);
    match header.tag {
        TAG_OK => OwnedMessage::from_storage(value.into_storage()),
        TAG_PANIC => Err(Error::new(
            ErrorKind::Panicked,
            format!("job {id} panicked in worker {worker}: {}", text()),
        )),
        super::worker::TAG_BAD_RESULT => Err(Error::new(
            ErrorKind::Serialize,
            format!("job {id} in worker {worker}: {}", text()),
        )),
        _ => Err(Error::new(
            ErrorKind::InvalidMessage,
            format!("job {id} failed in worker {worker}: {}", text()),
        )),
    }
}

/// Retires worker `w` if its supervisor ends any way other than an orderly
/// shutdown (its runtime was dropped, say), so no `call` waits forever on a
/// supervisor that is gone.
pub(super) struct SupervisorGuard<R: Archive> {
    pub inner: Arc<Inner<R>>,
    pub w: usize,
    pub armed: bool,
}

impl<R: Archive> Drop for SupervisorGuard<R> {
    fn drop(&mut self) {
        if self.armed {
            let w = self.w;
            let mut st = self.inner.lock();
            st.slots[w].retire(&format!(
                "worker {w}'s supervisor stopped (the runtime that built the pool is gone?)"
            ));
            drop(st);
            self.inner.room.notify_waiters();
            self.inner.changed.notify_waiters();
        }
    }
}

/// How a worker's service ended.
enum End {
    /// Its pidfd said it exited (and it was reaped).
    Exited(Result<ExitStatus>),
    /// Its result pipe ended or failed first.
    Pipe,
}

/// One worker's life, from the supervisor's side: reads results, enforces
/// deadlines, and notices death.
struct Service<'a, R: Archive> {
    inner: &'a Inner<R>,
    w: usize,
    rx: BytesReceiver,
    /// The value frame of a pair whose header has not arrived; kept across
    /// `select!` turns, which may drop a receive future but never a frame
    /// already received.
    value: Option<OwnedFrame>,
}

impl<R: Decode> Service<'_, R> {
    /// Reads results until the worker exits or its pipe ends. Each turn
    /// waits for, in order: a frame, the exit, the running jobs' first
    /// deadline, a nudge, or the writer's failure.
    async fn run(&mut self, proc: &mut Process<()>, writer_failed: &Notify) -> End {
        let nudge = self.inner.lock().slots[self.w].nudge.clone();
        let mut exit = pin!(proc.wait_exit());
        loop {
            let deadline = self.inner.lock().slots[self.w].deadline().map(|(_, at)| at);
            let timer = async move {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                r = self.rx.recv_owned_frame() => match r {
                    Ok(frame) => self.on_frame(frame),
                    // The end of the stream, or a worker that died mid-frame:
                    // its exit follows.
                    Err(e) if matches!(e.kind(), ErrorKind::Closed | ErrorKind::Truncated) => {
                        return End::Pipe;
                    }
                    // Bytes that break the wire format: the worker may live on.
                    Err(e) => {
                        let why = format!("a result stream that broke the wire format ({e})");
                        self.inner.lock().slots[self.w].end(DeathCause::Protocol(why));
                        return End::Pipe;
                    }
                },
                status = &mut exit => {
                    self.drain().await;
                    return End::Exited(status);
                }
                () = timer => self.on_deadline(),
                () = nudge.notified() => self.maybe_restart(),
                () = writer_failed.notified() => {
                    // The job pipe broke while the worker lives: end it so
                    // the restart gives it a working pipe.
                    self.inner.lock().slots[self.w].end(DeathCause::JobPipeFailed);
                }
            }
        }
    }

    /// Reads what the worker wrote before it exited.
    async fn drain(&mut self) {
        let until = tokio::time::Instant::now() + DRAIN_MAX;
        loop {
            let quiet = tokio::time::Instant::now() + DRAIN_QUIET;
            match tokio::time::timeout_at(quiet.min(until), self.rx.recv_owned_frame()).await {
                Ok(Ok(frame)) => self.on_frame(frame),
                _ => return,
            }
        }
    }

    fn on_frame(&mut self, frame: OwnedFrame) {
        let Some(value) = self.value.take() else {
            self.value = Some(frame);
            return;
        };
        let w = self.w;
        let mut st = self.inner.lock();
        let slot = &mut st.slots[w];
        if slot.distrusted {
            // Nothing more from a worker that broke the protocol is believed.
            return;
        }
        let Some((header, text)) = Header::read(frame.bytes()) else {
            slot.broke_protocol("a short result frame".into());
            return;
        };
        let Some(job) = (slot.jobs.iter().take(slot.concurrency))
            .position(|j| j.id == header.id)
            .and_then(|i| slot.take_job(i))
        else {
            slot.broke_protocol(format!("a result for job {} it was not running", header.id));
            return;
        };
        let result = decode_result::<R>(value, header, text, w);
        slot.stats.busy += header.elapsed();
        match &result {
            Ok(_) => slot.stats.jobs_done += 1,
            Err(_) => slot.stats.jobs_failed += 1,
        }
        let _ = job.reply.send(result);
        let closing_done = st.closing && st.jobs_in_flight() == 0;
        drop(st);
        // One freed slot: one waiting caller can use it.
        self.inner.room.notify_one();
        if closing_done {
            self.inner.changed.notify_waiters();
        }
        self.maybe_restart();
    }

    /// A running job ran out of time: fail it, and end the worker (the only
    /// way to stop a running handler; its other jobs fail with it).
    fn on_deadline(&mut self) {
        let w = self.w;
        let mut st = self.inner.lock();
        let slot = &mut st.slots[w];
        let Some((i, at)) = slot.deadline() else {
            return;
        };
        if at > Instant::now() {
            return;
        }
        let Some(job) = slot.take_job(i) else {
            return;
        };
        let limit = job.timeout.unwrap_or_default();
        let _ = job.reply.send(Err(Error::new(
            ErrorKind::TimedOut,
            format!(
                "job {} ran longer than its timeout of {limit:?} in worker {w} (pid {}); \
                 the worker is killed and restarted",
                job.id, slot.stats.pid
            ),
        )));
        slot.stats.jobs_failed += 1;
        slot.stats.timeouts += 1;
        slot.end(DeathCause::JobTimedOut { job: job.id });
    }

    /// A restart was asked and the worker's jobs are done: close its job
    /// pipe, so it exits cleanly and is replaced.
    fn maybe_restart(&mut self) {
        let mut st = self.inner.lock();
        let slot = &mut st.slots[self.w];
        if !slot.restart_waiters.is_empty() && slot.jobs.is_empty() && slot.ending.is_none() {
            slot.ending = Some(DeathCause::Restarted);
            // The writer sends what it holds, then its pipe closes.
            slot.queue = None;
        }
    }
}

/// Supervises worker `w` for the pool's life: serves it, and when it dies
/// fails exactly the jobs it held and starts a new one.
///
/// The guard is an argument, not made inside: a task that is dropped before
/// it first runs (its runtime went away) must still retire its worker.
pub(super) async fn supervise<R: Decode>(
    mut guard: SupervisorGuard<R>,
    mut proc: Process<()>,
    rx: BytesReceiver,
    spawner: WorkerSpawner,
    mut writer_failed: Arc<Notify>,
) {
    let inner = guard.inner.clone();
    let w = guard.w;
    let mut service = Service {
        inner: &inner,
        w,
        rx,
        value: None,
    };
    let mut started = Instant::now();
    let mut quick_deaths = 0u32;
    loop {
        let end = service.run(&mut proc, &writer_failed).await;
        let status = match end {
            End::Exited(s) => s,
            End::Pipe => match tokio::time::timeout(EXIT_GRACE, proc.wait_exit()).await {
                Ok(s) => s,
                Err(_) => {
                    let _ = proc.kill();
                    proc.wait_exit().await
                }
            },
        };
        let pid = proc.pid();
        let closing = {
            let mut st = inner.lock();
            let slot = &mut st.slots[w];
            let cause = slot.ending.take().unwrap_or(DeathCause::Exited);
            let death = WorkerDeath {
                pid,
                cause,
                status: status.as_ref().ok().copied(),
            };
            let why = match &status {
                Ok(_) => format!("worker {w} {death} while holding it"),
                Err(e) => format!("worker {w} {death} while holding it ({e})"),
            };
            slot.fail_jobs(&why);
            slot.queue = None;
            slot.pidfd = None;
            slot.stats.last_death = Some(death);
            st.closing
        };
        service.value = None;
        inner.room.notify_waiters();
        inner.changed.notify_waiters();
        if closing {
            guard.armed = false;
            return;
        }
        let asked = matches!(
            inner.lock().slots[w]
                .stats
                .last_death
                .as_ref()
                .map(|d| &d.cause),
            Some(DeathCause::Restarted | DeathCause::Killed | DeathCause::JobTimedOut { .. })
        );
        if !asked {
            tracing::warn!(worker = w, pid, "pool worker died; restarting");
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
        }
        let mut attempt = 0;
        let new = loop {
            match spawner.spawn() {
                Ok(new) => break new,
                Err(e) if attempt < 5 && !inner.lock().closing => {
                    tracing::warn!(worker = w, error = %e, "restarting pool worker failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
                }
                Err(e) => {
                    tracing::error!(worker = w, error = %e, "pool worker could not be restarted");
                    inner.lock().slots[w]
                        .retire(&format!("worker {w} could not be restarted: {e}"));
                    inner.room.notify_waiters();
                    inner.changed.notify_waiters();
                    guard.armed = false;
                    return;
                }
            }
        };
        {
            let mut st = inner.lock();
            if st.closing {
                // Shut down while restarting: the new worker is killed as it
                // drops, and callers waiting for room learn the pool closed.
                drop(st);
                inner.room.notify_waiters();
                guard.armed = false;
                return;
            }
            let slot = &mut st.slots[w];
            writer_failed = install(slot, new.jobs, new.pidfd, new.proc.pid());
            slot.stats.restarts += 1;
            for waiter in slot.restart_waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
        inner.room.notify_waiters();
        proc = new.proc;
        service.rx = new.results;
        started = Instant::now();
    }
}
