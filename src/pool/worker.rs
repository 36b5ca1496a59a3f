//! The worker side of a pool: the loop a worker child runs, and how the
//! parent starts one.
//!
//! Frames (`docs/wire-format.md`, "Crate frames"): a job is a `wire::Header`
//! (the job's id) followed by the job's archive; a result is two frames, the
//! value's archive (empty when there is none) and then a `wire::Header` (id,
//! busy time, tag) followed by an error text if the job failed. A job that
//! carries fds (`Fd`, `Inherit` fields: a connection to answer, a file) has
//! tag `JOB_WITH_FDS`, and its fds arrive first, as one datagram on the
//! worker's fd channel.

use crate::backend::Backend;
use crate::channel::{BytesReceiver, BytesSender};
use crate::error::{Error, ErrorKind, Result};
use crate::fd_channel::FdReceiver;
use crate::message::{Decode, Encode, Message};
use crate::process::Fd;
use crate::process::handoff::with_inherited;
use crate::process::spec::Spec;
use crate::process::{Affinity, Process, panic_message};
use crate::wire::Header;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// What a worker process is started with.
#[derive(Archive, Serialize, Deserialize)]
pub struct WorkerArgs {
    /// Job frames: a header with the job's id, then the job's archive.
    pub(super) jobs: BytesReceiver,
    /// Two frames per job: the result's archive (through the channel's
    /// arena when large; empty when there is no value), then a header frame
    /// (id, busy time, tag), followed by an error text if any.
    pub(super) results: BytesSender,
    /// The fds of jobs that carry some (a connection, a file): one datagram
    /// per such job, sent before its frame, with the job's id.
    pub(super) fds: FdReceiver<JobFds>,
    /// The handler's code address, as an offset (see `Spec::offset`).
    pub(super) handler: i64,
    /// How many jobs may run at once (1 for a sync handler).
    pub(super) concurrency: u32,
}

/// What a job's fd datagram holds: the job's id and its fds, in the order
/// the job's archive numbers them.
pub(crate) type JobFds = (u64, Vec<Fd<OwnedFd>>);

/// The tag of a job frame whose job carries fds (its datagram comes first).
pub(super) const JOB_WITH_FDS: u8 = 1;

pub(super) const TAG_OK: u8 = 0;
pub(super) const TAG_PANIC: u8 = 1;
pub(super) const TAG_BAD_JOB: u8 = 2;
pub(super) const TAG_BAD_RESULT: u8 = 3;
/// Error texts longer than this are cut, so a header frame always fits.
const MAX_ERROR_TEXT: usize = 64 * 1024;

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

/// What the worker loop got from the job pipe: a job (or why it cannot be
/// decoded) with its id.
type Received<J> = (u64, std::result::Result<J, String>);

/// Reads the next job frame, and its fds first if it carries some. Takes
/// and gives back the two receivers, so the loop can keep one receive in
/// progress across its turns without borrowing them (a job whose frame was
/// read must not be lost while its fds are awaited). `None`: the pool
/// closed the job pipe, or sent something no pool sends.
async fn next_job<J>(
    mut jobs: BytesReceiver,
    mut fds: FdReceiver<JobFds>,
) -> (BytesReceiver, FdReceiver<JobFds>, Option<Received<J>>)
where
    J: Decode,
    J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
{
    let got = 'got: {
        // The pool closed the job pipe (or it broke).
        let Ok(frame) = jobs.recv().await else {
            break 'got None;
        };
        // Not from a ringipc pool.
        let Some((h, archive)) = Header::read(frame) else {
            break 'got None;
        };
        let decode = || Message::<J>::validate(archive).and_then(|m| m.deserialize());
        let job = if h.tag == JOB_WITH_FDS {
            match fds.recv().await {
                Ok((for_id, got)) if for_id == h.id => {
                    let got = got.into_iter().map(|fd| fd.0).collect();
                    let (job, unclaimed) = with_inherited(got, decode);
                    job.and_then(|job| match unclaimed {
                        0 => Ok(job),
                        n => Err(Error::new(
                            ErrorKind::Protocol,
                            format!("{n} fds came with the job but it holds none"),
                        )),
                    })
                }
                Ok((for_id, _)) => Err(Error::new(
                    ErrorKind::Protocol,
                    format!("the fds of job {for_id} came with job {}", h.id),
                )),
                // The pool went away.
                Err(_) => break 'got None,
            }
        } else {
            decode()
        };
        Some((h.id, job.map_err(|e| e.to_string())))
    };
    (jobs, fds, got)
}

/// The worker loop, shared by sync and async handlers: `run` turns a job
/// into the handler's outcome. Up to `concurrency` jobs run at once (always
/// one for a sync handler, whose `run` is ready at once), started in the
/// order they arrive; each result goes back as soon as its job ends, and
/// the parent matches it by id to one of the jobs it knows are running.
/// When the job pipe closes, the running jobs finish and answer first.
async fn worker_loop<J, R, Fut>(args: WorkerArgs, run: impl Fn(J) -> Fut)
where
    J: Decode,
    J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
    R: Encode,
    Fut: Future<Output = std::thread::Result<R>>,
{
    let WorkerArgs {
        jobs,
        mut results,
        fds,
        concurrency,
        ..
    } = args;
    let concurrency = (concurrency as usize).max(1);
    let mut buf = Vec::new();
    let mut running = FuturesUnordered::new();
    let mut incoming = Some(Box::pin(next_job::<J>(jobs, fds)));
    loop {
        let receiving = incoming.is_some() && running.len() < concurrency;
        let done = tokio::select! {
            biased;
            Some(done) = running.next(), if !running.is_empty() => done,
            (jobs, fds, got) = async { incoming.as_mut().expect("checked").await }, if receiving => {
                match got {
                    Some((id, Ok(job))) => {
                        incoming = Some(Box::pin(next_job::<J>(jobs, fds)));
                        let started = Instant::now();
                        let outcome = run(job);
                        running.push(async move {
                            let outcome = outcome.await;
                            (id, started.elapsed(), Ok(outcome))
                        });
                        continue;
                    }
                    Some((id, Err(text))) => {
                        incoming = Some(Box::pin(next_job::<J>(jobs, fds)));
                        (id, Duration::ZERO, Err(text))
                    }
                    None => {
                        incoming = None;
                        continue;
                    }
                }
            }
            else => break,
        };
        let (id, busy, outcome) = done;
        if answer(&mut results, &mut buf, id, busy, outcome)
            .await
            .is_err()
        {
            break;
        }
    }
}

/// Sends one job's result: its value (serialized once, into the arena when
/// it is large; an empty frame when there is none), then its header (id,
/// busy time, tag) with the error text if it failed. `Err`: the result
/// pipe is gone.
async fn answer<R: Encode>(
    results: &mut BytesSender,
    buf: &mut Vec<u8>,
    id: u64,
    busy: Duration,
    outcome: std::result::Result<std::thread::Result<R>, String>,
) -> Result<()> {
    let mut text = String::new();
    let tag = match outcome {
        Ok(Ok(value)) => match results.feed_message(&value).await {
            Ok(()) => TAG_OK,
            Err(e) if matches!(e.kind(), ErrorKind::FrameTooLarge | ErrorKind::Serialize) => {
                text = format!("cannot send the result: {e}");
                TAG_BAD_RESULT
            }
            Err(e) => return Err(e),
        },
        Ok(Err(p)) => {
            text = panic_message(p);
            TAG_PANIC
        }
        Err(e) => {
            text = format!("cannot decode the job: {e}");
            TAG_BAD_JOB
        }
    };
    // No value was queued for a failed job: an empty frame keeps the
    // stream in pairs.
    if tag != TAG_OK {
        results.feed(&[]).await?;
    }
    buf.clear();
    Header::new(tag).id(id).duration(busy).push(buf);
    let mut cut = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    buf.extend_from_slice(&text.as_bytes()[..cut]);
    results.send(buf).await
}

pub(super) async fn worker_sync<J, R>(args: WorkerArgs)
where
    J: Decode,
    J::Archived: Deserialize<J, HighDeserializer<rancor::Error>>,
    R: Encode,
{
    // SAFETY: `handler` is the offset of a `fn(J) -> R` in this same binary,
    // taken by `Pool::builder` for exactly these J and R (made an offset by
    // `PoolBuilder::build`).
    let f = unsafe { std::mem::transmute::<usize, fn(J) -> R>(Spec::resolve(args.handler)) };
    worker_loop(args, |job| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(job)));
        std::future::ready(r)
    })
    .await;
}

pub(super) async fn worker_async<J, R, F>(args: WorkerArgs)
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

/// Starts one worker child; made for the pool's J and R by its builder.
pub(super) type Launcher = fn(WorkerArgs, &WorkerOptions) -> Result<Process<()>>;

#[derive(Clone)]
pub(super) struct WorkerOptions {
    pub name: String,
    pub affinity: Affinity,
    pub backend: Backend,
}

pub(super) fn launch<Fut>(
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
