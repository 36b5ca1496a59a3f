//! [`Process`]: the parent's handle on a started child: join (and the
//! outcome the child sent back), exit status, signals, piped stdio, what
//! dropping it does, and `join_all` / `join_any`.

use super::spec::Outcome;
use super::{ExitStatus, OnDrop, StartMode};
use crate::backend::epoll::EpollWait;
use crate::backend::uring::UringWait;
use crate::channel::BytesReceiver;
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Decode, Message};
use crate::sys;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use std::fmt;
use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::task::{Context, Poll, ready};
use std::time::Duration;

pub(super) enum Waiter {
    Uring(UringWait),
    Epoll(EpollWait),
}

/// A running (or finished) child process started by
/// [`ProcessBuilder::start`](super::ProcessBuilder::start).
///
/// Dropping it without joining kills and reaps the child (see [`OnDrop`]).
pub struct Process<R = ()> {
    /// Declared before `pidfd`: it refers to the pidfd and must go first.
    pub(super) waiter: Waiter,
    pub(super) pidfd: OwnedFd,
    pub(super) pid: libc::pid_t,
    pub(super) name: String,
    pub(super) control: Option<BytesReceiver>,
    pub(super) outcome: Option<Outcome>,
    pub(super) status: Option<ExitStatus>,
    pub(super) on_drop: OnDrop,
    pub(super) started_by: StartMode,
    pub(super) stdin: Option<std::fs::File>,
    pub(super) stdout: Option<std::fs::File>,
    pub(super) stderr: Option<std::fs::File>,
    pub(super) _r: PhantomData<fn() -> R>,
}

impl<R> Process<R> {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// The name given at start.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the child was actually started: [`StartMode::Exec`] where a
    /// fork was asked for but no fork server was usable.
    pub fn started_by(&self) -> StartMode {
        self.started_by
    }

    fn ctx(&self, op: &str) -> String {
        format!("{op} {} (pid {})", self.name, self.pid)
    }

    /// Waits for the child to exit and reaps it. Cancellation-safe: dropping
    /// the future loses nothing, and a later `join` picks up where it was.
    /// An error that says nothing about the child (no runtime, an I/O error
    /// of this process) is returned and the child's outcome can still be
    /// joined later.
    pub async fn join(&mut self) -> Result<ExitStatus> {
        if let Some(control) = &mut self.control {
            // The control pipe carries the entry's outcome, the child's last
            // word before it exits, and reaches EOF when the child is gone
            // (nothing else holds its write end). Either ends the wait here.
            match control.recv().await {
                Ok(payload) => self.outcome = Some(Outcome::decode(payload)),
                // More than `max_result_size`: the receiver has closed the
                // pipe, so the child's write fails and it exits.
                Err(e) if e.kind() == ErrorKind::FrameTooLarge => {
                    self.outcome = Some(Outcome::TooLarge(e.to_string()));
                }
                // The child is gone, or what it wrote is not an outcome.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Closed | ErrorKind::Truncated | ErrorKind::Protocol
                    ) => {}
                // Transient: keep the pipe, the outcome may still come.
                Err(e) => return Err(Error::new(e.kind(), self.ctx("join")).with_source(e)),
            }
            self.control = None;
        }
        let status = poll_fn(|cx| self.poll_exit(cx)).await?;
        Ok(status)
    }

    /// [`Process::join`] with a deadline: [`ErrorKind::TimedOut`] leaves the
    /// child running and the handle usable.
    pub async fn join_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.join()).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(ErrorKind::TimedOut, self.ctx("join"))),
        }
    }

    /// Waits for the child to exit and reaps it, without reading its
    /// control pipe: a child whose own children hold that pipe open is
    /// still seen to exit. Cancellation-safe like `join`.
    pub(crate) async fn wait_exit(&mut self) -> Result<ExitStatus> {
        poll_fn(|cx| self.poll_exit(cx)).await
    }

    /// A duplicate of the child's pidfd, which names this child and no other
    /// process even after its pid is reused.
    pub(crate) fn pidfd_dup(&self) -> std::io::Result<OwnedFd> {
        self.pidfd.try_clone()
    }

    fn poll_exit(&mut self, cx: &mut Context<'_>) -> Poll<Result<ExitStatus>> {
        if let Some(s) = self.status {
            return Poll::Ready(Ok(s));
        }
        let pidfd = self.pidfd.as_raw_fd();
        // Usually the child is already gone by now (its outcome, or the
        // control pipe's EOF, came as it exited): reap it without arming a
        // wait and paying a wake-up.
        let in_flight = matches!(&self.waiter, Waiter::Uring(w) if w.in_flight());
        if !in_flight && let Ok(Some(s)) = sys::waitid_pidfd(pidfd, true) {
            return Poll::Ready(Ok(self.record(s)));
        }
        let r = match &mut self.waiter {
            Waiter::Uring(w) => ready!(w.poll(cx, pidfd)),
            Waiter::Epoll(w) => {
                if let Err(e) = ready!(w.poll_exited(cx, pidfd)) {
                    return Poll::Ready(Err(Error::io(self.ctx("join"), e)));
                }
                // Readable pidfd: the child has exited, so this does not block.
                sys::waitid_pidfd(pidfd, false)
                    .map(|s| s.expect("blocking waitid returns a status"))
            }
        };
        match r {
            Ok(s) => Poll::Ready(Ok(self.record(s))),
            Err(e) => Poll::Ready(Err(Error::io(self.ctx("join"), e))),
        }
    }

    fn record(&mut self, s: (bool, i32)) -> ExitStatus {
        let status = ExitStatus::from_wait(s);
        self.status = Some(status);
        tracing::debug!(pid = self.pid, %status, "child exited");
        status
    }

    /// The exit status if the child has exited (reaping it), else `None`.
    /// Never blocks.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        // A uring waitid left in flight by an abandoned `join` may already
        // have reaped the child: ask it first, then waitid directly.
        if let Waiter::Uring(w) = &mut self.waiter
            && w.in_flight()
        {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if let Poll::Ready(Ok(s)) = w.poll(&mut cx, self.pidfd.as_raw_fd()) {
                self.status = Some(ExitStatus::from_wait(s));
            }
            return self.status;
        }
        if let Ok(Some(s)) = sys::waitid_pidfd(self.pidfd.as_raw_fd(), true) {
            self.status = Some(ExitStatus::from_wait(s));
        }
        self.status
    }

    /// Whether the child is still running.
    pub fn is_alive(&mut self) -> bool {
        self.exit_status().is_none()
    }

    fn signal(&self, sig: libc::c_int, op: &str) -> Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        match sys::pidfd_send_signal(self.pidfd.as_raw_fd(), sig) {
            Ok(()) => Ok(()),
            // Exited but not yet reaped: nothing to signal.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            Err(e) => Err(Error::io(self.ctx(op), e)),
        }
    }

    /// Sends SIGTERM. A child that already exited is not an error.
    pub fn terminate(&self) -> Result<()> {
        self.signal(libc::SIGTERM, "terminate")
    }

    /// Sends SIGKILL. A child that already exited is not an error.
    pub fn kill(&self) -> Result<()> {
        self.signal(libc::SIGKILL, "kill")
    }

    /// The write end of the child's stdin, if it was
    /// [`ChildStdio::Piped`](super::ChildStdio::Piped).
    pub fn take_stdin(&mut self) -> Option<std::fs::File> {
        self.stdin.take()
    }

    /// The read end of the child's stdout, if it was
    /// [`ChildStdio::Piped`](super::ChildStdio::Piped).
    pub fn take_stdout(&mut self) -> Option<std::fs::File> {
        self.stdout.take()
    }

    /// The read end of the child's stderr, if it was
    /// [`ChildStdio::Piped`](super::ChildStdio::Piped).
    pub fn take_stderr(&mut self) -> Option<std::fs::File> {
        self.stderr.take()
    }

    fn outcome_error(&self) -> Error {
        match (&self.outcome, self.status) {
            (Some(Outcome::Panic(msg)), _) => Error::new(
                ErrorKind::Panicked,
                format!("{} panicked: {msg}", self.ctx("child")),
            ),
            (Some(Outcome::TooLarge(msg)), _) => Error::new(
                ErrorKind::FrameTooLarge,
                format!("{}: {msg}", self.ctx("result")),
            ),
            (Some(Outcome::Failed(msg)), _) => Error::new(
                ErrorKind::Spawn,
                format!("{} could not run its entry: {msg}", self.ctx("child")),
            ),
            (_, Some(status)) => Error::new(
                ErrorKind::Exited,
                format!("{} ended with {status} before returning", self.ctx("child")),
            ),
            (_, None) => Error::new(
                ErrorKind::Exited,
                format!("{}: not joined yet", self.ctx("result")),
            ),
        }
    }
}

impl<R: Decode> Process<R> {
    /// The entry's return value, in place (validated), after [`Process::join`].
    ///
    /// A panic in the child is [`ErrorKind::Panicked`] with its message; a
    /// child that exited or was killed before returning is [`ErrorKind::Exited`].
    pub fn result(&self) -> Result<Message<'_, R>> {
        match &self.outcome {
            Some(Outcome::Value(bytes)) => Message::validate(bytes),
            _ => Err(self.outcome_error()),
        }
    }

    /// Joins, then deserializes the entry's return value.
    pub async fn join_value(&mut self) -> Result<R>
    where
        R::Archived: rkyv::Deserialize<R, HighDeserializer<rancor::Error>>,
    {
        self.join().await?;
        self.result()?.deserialize()
    }
}

impl<R> fmt::Debug for Process<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.pid)
            .field("status", &self.status)
            .finish()
    }
}

impl<R> Drop for Process<R> {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // Ask an in-flight uring waitid to stop (cancellation is requested,
        // not awaited); if it reaps the child first, the waitid below gets
        // ECHILD, which is fine: either way the child is reaped once.
        self.waiter = Waiter::Epoll(EpollWait::default());
        // Neither arm blocks: this may run on a runtime thread. The reaper
        // thread reaps the child when it is gone.
        if self.on_drop == OnDrop::Kill {
            let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
        }
        if let Ok(pidfd) = self.pidfd.try_clone() {
            super::reaper::reap_later(pidfd);
        }
    }
}

/// Joins every child, concurrently; results in the same order.
pub async fn join_all<R>(procs: &mut [Process<R>]) -> Vec<Result<ExitStatus>> {
    let mut futs: Vec<_> = procs.iter_mut().map(|p| Some(Box::pin(p.join()))).collect();
    let mut out: Vec<Option<Result<ExitStatus>>> = (0..futs.len()).map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(r) => {
                        out[i] = Some(r);
                        *f = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|r| r.expect("every join finished"))
        .collect()
}

/// Waits until any one child exits; returns its index and status. The
/// others keep running and can be joined later.
pub async fn join_any<R>(procs: &mut [Process<R>]) -> Option<(usize, Result<ExitStatus>)> {
    if procs.is_empty() {
        return None;
    }
    let mut futs: Vec<_> = procs.iter_mut().map(|p| Box::pin(p.join())).collect();
    Some(
        poll_fn(|cx| {
            for (i, f) in futs.iter_mut().enumerate() {
                if let Poll::Ready(r) = f.as_mut().poll(cx) {
                    return Poll::Ready((i, r));
                }
            }
            Poll::Pending
        })
        .await,
    )
}
