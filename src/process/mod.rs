//! Child processes that run a Rust function: start, pass channel handles,
//! pin, watch, join.
//!
//! Children are forked by the fork server that [`init`](crate::init)
//! started while the program was single-threaded (`forkserver.rs`), or
//! started by re-executing the current binary (`/proc/self/exe`), never by
//! `fork()`ing the running program. Either way the child runs the entry
//! function on a fresh tokio runtime, sends its return value (or panic
//! message) back on a private pipe and exits. Exit is observed without SIGCHLD handlers:
//! `IORING_OP_WAITID` on the uring backend where the kernel has it, a pidfd
//! on tokio's reactor otherwise.

mod builder;
mod child;
mod forkserver;
mod handle;
pub(crate) mod handoff;
mod inherit;
mod reaper;
mod spawner;
pub(crate) mod spec;
mod trampoline;

pub use builder::{ProcessBuilder, spawn, spawn_async};
pub use child::{EXIT_PANIC, EXIT_START_FAILED, InitOptions, init, init_with};
pub use forkserver::{StartMode, default_start_mode, fork_server_pid, set_default_start_mode};
pub use handle::{Process, join_all, join_any};
pub use handoff::{ArchivedHandoffState, HandoffResolver, HandoffState};
pub use inherit::{ArchivedFdIndex, Fd, FdIndex, FdResolver, Inherit, InheritFd};
pub(crate) use trampoline::{Trampoline, panic_message};

use crate::error::{Error, ErrorKind, Result};
use crate::sys;
use std::fmt;
use std::os::fd::OwnedFd;

/// Which CPUs a child (or an engine thread) may run on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Affinity {
    /// Wherever the process may run (no pinning).
    #[default]
    Any,
    /// Exactly this core.
    Core(usize),
    /// Any of these cores.
    Set(Vec<usize>),
}

impl Affinity {
    /// The cores named, checked against the cores this process may use; an
    /// unknown core is an error, never a silent no-op.
    pub(crate) fn checked_cores(&self) -> Result<Option<Vec<usize>>> {
        let want = match self {
            Affinity::Any => return Ok(None),
            Affinity::Core(c) => vec![*c],
            Affinity::Set(s) => s.clone(),
        };
        let allowed = sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?;
        if want.is_empty() {
            return Err(Error::new(ErrorKind::Spawn, "empty core set"));
        }
        if let Some(bad) = want.iter().find(|c| !allowed.contains(c)) {
            return Err(Error::new(
                ErrorKind::Spawn,
                format!(
                    "core {bad} does not exist or is not available to this process (available: {allowed:?})"
                ),
            ));
        }
        Ok(Some(want))
    }
}

/// Where a child's stdin, stdout or stderr goes.
#[derive(Debug, Default)]
#[non_exhaustive]
pub enum ChildStdio {
    /// The parent's (the default).
    #[default]
    Inherit,
    /// `/dev/null`.
    Null,
    /// A new pipe; the parent's end comes from `Process::take_stdin` and friends.
    Piped,
    /// This fd (a file, a socket, one end of a pipe).
    Fd(OwnedFd),
}

impl From<OwnedFd> for ChildStdio {
    fn from(fd: OwnedFd) -> Self {
        ChildStdio::Fd(fd)
    }
}

impl From<std::fs::File> for ChildStdio {
    fn from(f: std::fs::File) -> Self {
        ChildStdio::Fd(f.into())
    }
}

/// How a child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

impl ExitStatus {
    /// The exit code, if it exited.
    pub fn code(self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// The terminating signal, if it was killed.
    pub fn signal(self) -> Option<i32> {
        match self {
            ExitStatus::Signal(s) => Some(s),
            ExitStatus::Code(_) => None,
        }
    }

    /// Exit code 0.
    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    fn from_wait((exited, value): (bool, i32)) -> ExitStatus {
        if exited {
            ExitStatus::Code(value)
        } else {
            ExitStatus::Signal(value)
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// What dropping an unjoined [`Process`] does. Neither blocks the dropping
/// thread (which may be a runtime's): one `ringipc-reaper` thread per
/// process, started on first use, waits on dropped children's pidfds and
/// reaps each as it exits, so none lingers as a zombie.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnDrop {
    /// SIGKILL the child; it is reaped as soon as it is gone (the default:
    /// nothing outlives its handle).
    #[default]
    Kill,
    /// Let it run; it is reaped when it exits.
    Detach,
}

// Handles and processes move between tasks and threads: keep them `Send`.
const _: () = {
    const fn is_send<T: Send>() {}
    is_send::<Process<u32>>();
    is_send::<crate::Sender<u32>>();
    is_send::<crate::Receiver<u32>>();
    is_send::<crate::BytesSender>();
    is_send::<crate::BytesReceiver>();
};
