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

mod child;
mod forkserver;
pub(crate) mod handoff;
mod inherit;
mod spawner;
pub(crate) mod spec;

pub use child::{EXIT_PANIC, EXIT_START_FAILED, InitOptions, init, init_with};
pub use forkserver::{StartMode, default_start_mode, fork_server_pid, set_default_start_mode};
pub use handoff::{ArchivedHandoffState, HandoffResolver, HandoffState};
pub use inherit::{ArchivedFdIndex, Fd, FdIndex, FdResolver, Inherit, InheritFd};

use crate::backend::Backend;
use crate::backend::epoll::EpollWait;
use crate::backend::uring::{UringWait, waitid_supported};
use crate::channel::{BytesReceiver, ChannelConfig};
use crate::error::{Error, ErrorKind, Result};
use crate::framing::{ABSOLUTE_MAX_FRAME, DEFAULT_MAX_FRAME};
use crate::message::{Decode, Encode, Message, encode_into};
use crate::sys;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use spec::{CHILD_ENV, Outcome, Spec};
use std::ffi::CString;
use std::ffi::OsString;
use std::fmt;
use std::future::{Future, poll_fn};
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

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

/// What dropping an unjoined [`Process`] does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnDrop {
    /// SIGKILL the child and reap it (the default: nothing outlives its handle).
    #[default]
    Kill,
    /// Let it run; a background thread reaps it when it exits, so it never
    /// lingers as a zombie.
    Detach,
}

/// The monomorphised function a child runs: it decodes the arguments, calls
/// the entry (whose address it is given) and encodes the outcome.
pub(crate) type Trampoline = fn(usize, &[u8]) -> Outcome;

fn child_runtime() -> std::result::Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the child's runtime: {e}"))
}

fn decode_args<A>(args: &[u8]) -> std::result::Result<A, String>
where
    A: Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
{
    let archived = rkyv::access::<A::Archived, rancor::BoxedError>(args)
        .map_err(|e| format!("invalid arguments: {e}"));
    let decoded = archived.and_then(|a| {
        rkyv::deserialize::<A, rancor::Error>(a)
            .map_err(|e| format!("cannot decode arguments: {e}"))
    });
    // Inherited fds that no argument claimed are closed now, not when the
    // entry returns.
    handoff::clear_inherited();
    decoded
}

/// Drops the child's runtime without waiting for blocking tasks (tokio's
/// stdin reader, say) that would keep the outcome from being reported.
fn finish(rt: tokio::runtime::Runtime) {
    rt.shutdown_timeout(Duration::from_millis(100));
}

fn encode_value<R: Encode>(value: &R) -> Outcome {
    let mut v = Vec::new();
    match encode_into(value, &mut v) {
        Ok(()) => {
            let mut a = AlignedVec::with_capacity(v.len());
            a.extend_from_slice(&v);
            Outcome::Value(a)
        }
        Err(e) => Outcome::Failed(format!("cannot encode the return value: {e}")),
    }
}

pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => s.to_string(),
            Err(_) => "panic with a non-string payload".into(),
        },
    }
}

fn trampoline_sync<A, R>(entry: usize, args: &[u8]) -> Outcome
where
    A: Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
    R: Encode,
{
    // SAFETY: `entry` was computed from a `fn(A) -> R` in the parent (the
    // builder stores it next to this trampoline, instantiated for the same
    // A and R) and resolved in the same binary.
    let f = unsafe { std::mem::transmute::<usize, fn(A) -> R>(entry) };
    let rt = match child_runtime() {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(e),
    };
    let outcome = {
        let _guard = rt.enter();
        match decode_args::<A>(args) {
            Ok(args) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(args))) {
                Ok(r) => encode_value(&r),
                Err(p) => Outcome::Panic(panic_message(p)),
            },
            Err(e) => Outcome::Failed(e),
        }
    };
    finish(rt);
    outcome
}

fn trampoline_async<A, R, F>(entry: usize, args: &[u8]) -> Outcome
where
    A: Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
    R: Encode,
    F: Future<Output = R>,
{
    // SAFETY: as in `trampoline_sync`, for a `fn(A) -> F`.
    let f = unsafe { std::mem::transmute::<usize, fn(A) -> F>(entry) };
    let rt = match child_runtime() {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(e),
    };
    let args = {
        let _guard = rt.enter();
        decode_args::<A>(args)
    };
    let outcome = match args {
        Ok(args) => {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(f(args)))) {
                Ok(r) => encode_value(&r),
                Err(p) => Outcome::Panic(panic_message(p)),
            }
        }
        Err(e) => Outcome::Failed(e),
    };
    finish(rt);
    outcome
}

/// Options for starting a child; made by [`Process::builder`] or
/// [`Process::builder_async`].
#[must_use]
pub struct ProcessBuilder<A, R> {
    trampoline: Trampoline,
    entry: usize,
    args: Option<A>,
    name: Option<String>,
    affinity: Affinity,
    envs: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    die_with_parent: bool,
    stdin: ChildStdio,
    stdout: ChildStdio,
    stderr: ChildStdio,
    backend: Backend,
    on_drop: OnDrop,
    start_mode: Option<StartMode>,
    max_result: usize,
    _r: PhantomData<fn() -> R>,
}

impl<A, R> ProcessBuilder<A, R> {
    fn new(trampoline: Trampoline, entry: usize) -> Self {
        ProcessBuilder {
            trampoline,
            entry,
            args: None,
            name: None,
            affinity: Affinity::Any,
            envs: Vec::new(),
            cwd: None,
            die_with_parent: true,
            stdin: ChildStdio::Inherit,
            stdout: ChildStdio::Inherit,
            stderr: ChildStdio::Inherit,
            backend: Backend::Auto,
            on_drop: OnDrop::Kill,
            start_mode: None,
            max_result: DEFAULT_MAX_FRAME,
            _r: PhantomData,
        }
    }

    /// The entry's argument. Channel handles inside it (at any depth) move
    /// to the child; their fds are the only ones the child inherits.
    pub fn arg(mut self, args: A) -> Self {
        self.args = Some(args);
        self
    }

    /// A name shown by `ps` (as `comm` and `argv[0]`) and used in errors.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Pins the child (before its entry runs).
    pub fn pin(mut self, affinity: Affinity) -> Self {
        self.affinity = affinity;
        self
    }

    /// Sets an environment variable for the child.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), Some(value.into())));
        self
    }

    /// Removes an environment variable for the child.
    pub fn env_remove(mut self, key: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), None));
        self
    }

    /// The child's working directory.
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Whether the child is SIGKILLed when this process dies (default: yes).
    /// Children are started from a dedicated long-lived thread, so this
    /// follows the process, not the thread that called `start`.
    pub fn die_with_parent(mut self, yes: bool) -> Self {
        self.die_with_parent = yes;
        self
    }

    /// The child's stdin (default: inherited).
    pub fn stdin(mut self, cfg: impl Into<ChildStdio>) -> Self {
        self.stdin = cfg.into();
        self
    }

    /// The child's stdout (default: inherited).
    pub fn stdout(mut self, cfg: impl Into<ChildStdio>) -> Self {
        self.stdout = cfg.into();
        self
    }

    /// The child's stderr (default: inherited).
    pub fn stderr(mut self, cfg: impl Into<ChildStdio>) -> Self {
        self.stderr = cfg.into();
        self
    }

    /// The backend of the child (its process default, like
    /// `RINGIPC_BACKEND`) and of this side's watch on it.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// What dropping the [`Process`] without joining does.
    pub fn on_drop(mut self, on_drop: OnDrop) -> Self {
        self.on_drop = on_drop;
        self
    }

    /// Largest return value, in bytes of its archive, the child may send
    /// back (default 256 MiB, the default maximum frame size). The parent's
    /// control pipe never buffers more than this. A larger value is not
    /// sent: [`Process::result`] fails with [`ErrorKind::FrameTooLarge`].
    pub fn max_result_size(mut self, bytes: usize) -> Self {
        self.max_result = bytes.min(ABSOLUTE_MAX_FRAME - spec::TAG_LEN);
        self
    }

    /// How this child is started (default: [`default_start_mode`]). A fork
    /// asked for where no fork server runs is a re-exec.
    pub fn start_mode(mut self, mode: StartMode) -> Self {
        self.start_mode = Some(mode);
        self
    }
}

impl<A: Encode, R> ProcessBuilder<A, R> {
    /// Starts the child. Blocks for the fork (by the fork server) or the
    /// exec, not for the child's work.
    ///
    /// Fails with [`ErrorKind::Spawn`] (missing binary, unknown core, exec
    /// error, a handle that cannot be handed over) and leaks nothing: handles
    /// in the arguments are closed, no process is left behind.
    pub fn start(self) -> Result<Process<R>> {
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| "ringipc-child".to_string());
        let spawn_err = |what: &str| Error::new(ErrorKind::Spawn, format!("start {name}: {what}"));
        // Without init() first in main, the child would run this program's
        // whole main again (and start children of its own): refuse.
        if !child::INIT_CALLED.load(Ordering::SeqCst) {
            return Err(spawn_err(
                "ringipc::init() was not called in this process; call it first in main (see docs/testing.md for tests)",
            ));
        }
        let cpus = self
            .affinity
            .checked_cores()
            .map_err(|e| spawn_err(e.context()))?;
        let backend = self
            .backend
            .resolve()
            .map_err(|e| spawn_err("backend").with_source(e))?;
        let args = self
            .args
            .ok_or_else(|| spawn_err("no argument given (call .arg(..))"))?;

        let (encoded, fds) = handoff::collect_fds(|| {
            let mut v = Vec::new();
            encode_into(&args, &mut v).map(|()| v)
        });
        let args_bytes =
            encoded.map_err(|e| spawn_err("cannot encode the arguments").with_source(e))?;
        let (ctl_r, ctl_w) = sys::pipe().map_err(|e| spawn_err("pipe").with_source(e))?;
        // A daemon runs with 0–2 closed, so fds of ours may sit there, where
        // a re-executed child's stdio goes (and the spawner's dup2s onto 0–2
        // would overwrite them). Everything handed over is numbered above 2:
        // such an fd is duplicated, and the copy kept until the child started.
        let mut lifted: Vec<OwnedFd> = Vec::new();
        let mut above_stdio = |fd: RawFd| -> Result<RawFd> {
            if fd > 2 {
                return Ok(fd);
            }
            let copy = sys::dup_above(fd, 3).map_err(|e| spawn_err("dup").with_source(e))?;
            let raw = copy.as_raw_fd();
            lifted.push(copy);
            Ok(raw)
        };
        let fds = fds
            .into_iter()
            .map(&mut above_stdio)
            .collect::<Result<Vec<RawFd>>>()?;
        let ctl_w_fd = above_stdio(ctl_w.as_raw_fd())?;
        // SAFETY: getpid has no preconditions.
        let parent_pid = unsafe { libc::getpid() };
        let cstring = |bytes: Vec<u8>| {
            CString::new(bytes)
                .map_err(|_| spawn_err("a NUL byte in the name, environment or directory"))
        };
        // The child's environment: ours as of now, with the builder's changes.
        let mut envs: std::collections::BTreeMap<OsString, OsString> =
            std::env::vars_os().collect();
        for (k, v) in &self.envs {
            match v {
                Some(v) => envs.insert(k.clone(), v.clone()),
                None => envs.remove(k),
            };
        }
        envs.remove(std::ffi::OsStr::new(CHILD_ENV));
        if self.backend != Backend::Auto {
            envs.insert("RINGIPC_BACKEND".into(), backend.name().into());
        }
        let env = envs
            .into_iter()
            .map(|(k, v)| {
                let mut kv = k.into_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(kv)
            })
            .collect::<Result<Vec<_>>>()?;
        let cwd = match &self.cwd {
            Some(dir) => Some(cstring(dir.as_os_str().as_bytes().to_vec())?),
            None => None,
        };
        let mode = self
            .start_mode
            .unwrap_or_else(forkserver::default_start_mode);
        let fork = mode == StartMode::Fork && forkserver::fork_server_pid().is_some();
        if fork && let Some(dir) = &self.cwd {
            // A forked child changes directory after its pid is known:
            // report a directory it cannot enter here, as exec would.
            match std::fs::metadata(dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(spawn_err(&format!("{} is not a directory", dir.display()))),
                Err(e) => return Err(spawn_err(&format!("chdir {}", dir.display())).with_source(e)),
            }
        }
        let spec = Spec {
            anchor_check: Spec::anchor_check(),
            trampoline: Spec::offset(self.trampoline as usize),
            entry: Spec::offset(self.entry),
            args: args_bytes,
            fds: fds.clone(),
            control_fd: ctl_w_fd,
            max_result: self.max_result as u64,
            parent_pid,
            die_with_parent: self.die_with_parent,
            name: name.clone(),
            cpus: cpus.iter().flatten().map(|&c| c as u32).collect(),
            env: fork.then(|| env.iter().map(|e| e.as_bytes().to_vec()).collect()),
            // A forked child starts in the server's directory (the one at
            // `init`): it moves to ours as of now, as an exec'd one inherits.
            cwd: if fork {
                match &cwd {
                    Some(c) => Some(c.as_bytes().to_vec()),
                    None => std::env::current_dir()
                        .ok()
                        .map(|d| d.into_os_string().into_vec()),
                }
            } else {
                None
            },
        };
        let spec_bytes = rkyv::to_bytes::<rancor::Error>(&spec)
            .map_err(|e| spawn_err("cannot encode the start spec").with_source(e))?;
        let memfd: OwnedFd = sys::memfd_spec(c"ringipc-spec", &spec_bytes)
            .map_err(|e| spawn_err("memfd_create").with_source(e))?;
        let memfd_fd = above_stdio(memfd.as_raw_fd())?;

        // Stdio: the child's ends are dropped after the spawn, the parent's
        // ends of pipes are handed out by `take_stdin` and friends.
        let mut child_ends: Vec<OwnedFd> = Vec::new();
        let mut parent_ends: [Option<std::fs::File>; 3] = [None, None, None];
        let mut stdio: [Option<RawFd>; 3] = [None, None, None];
        for (i, cfg) in [self.stdin, self.stdout, self.stderr]
            .into_iter()
            .enumerate()
        {
            let fd = match cfg {
                ChildStdio::Inherit => continue,
                ChildStdio::Null => std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                    .map(OwnedFd::from)
                    .map_err(|e| spawn_err("/dev/null").with_source(e))?,
                ChildStdio::Piped => {
                    let (r, w) = sys::pipe().map_err(|e| spawn_err("stdio pipe").with_source(e))?;
                    let (child, parent) = if i == 0 { (r, w) } else { (w, r) };
                    parent_ends[i] = Some(parent.into());
                    child
                }
                ChildStdio::Fd(fd) => fd,
            };
            stdio[i] = Some(above_stdio(fd.as_raw_fd())?);
            child_ends.push(fd);
        }
        let forked = if fork {
            // Inherited stdio is ours as of now, sent where an exec would
            // pass it on (open, not close-on-exec: with 0–2 closed, a pipe
            // of ours may sit there), else closed in the child too.
            let mut sent = stdio;
            for (i, s) in sent.iter_mut().enumerate() {
                if s.is_none() && sys::is_inheritable(i as RawFd) {
                    *s = Some(i as RawFd);
                }
            }
            forkserver::launch(&forkserver::ForkRequest {
                spec: memfd_fd,
                control: ctl_w_fd,
                stdio: sent,
                handles: &fds,
            })
        } else {
            None
        };
        let (pid, started_by) = match forked {
            Some(pid) => (pid, StartMode::Fork),
            None => {
                let mut env = env;
                env.push(cstring(format!("{CHILD_ENV}={memfd_fd}").into_bytes())?);
                let mut inherit: Vec<RawFd> = vec![memfd_fd, ctl_w_fd];
                inherit.extend_from_slice(&fds);
                inherit.sort_unstable();
                inherit.dedup();
                let pid = spawner::launch(spawner::SpawnRequest {
                    argv0: cstring(name.clone().into_bytes())?,
                    env,
                    cwd,
                    inherit,
                    stdio,
                })
                .map_err(|e| spawn_err("exec").with_source(e))?;
                (pid, StartMode::Exec)
            }
        };
        // The child holds its copies now; the parent's go (handles in `args`
        // were marked as moved when they were encoded).
        drop(args);
        drop(ctl_w);
        drop(memfd);
        drop(child_ends);
        drop(lifted);
        let [stdin, stdout, stderr] = parent_ends;
        let pidfd = match sys::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: kill/waitpid on our own unreaped child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
                return Err(spawn_err("pidfd_open").with_source(e));
            }
        };
        let control = match ChannelConfig::new()
            .backend(backend)
            .max_frame_size(self.max_result + spec::TAG_LEN)
            .bytes_receiver(ctl_r)
        {
            Ok(c) => c,
            Err(e) => {
                let _ = sys::pidfd_send_signal(pidfd.as_raw_fd(), libc::SIGKILL);
                let _ = sys::waitid_pidfd(pidfd.as_raw_fd(), false);
                return Err(spawn_err("control pipe").with_source(e));
            }
        };
        let waiter = if backend == Backend::Uring && waitid_supported() {
            Waiter::Uring(UringWait::default())
        } else {
            Waiter::Epoll(EpollWait::default())
        };
        tracing::debug!(pid, name = %name, mode = started_by.name(), "started child");
        Ok(Process {
            waiter,
            pidfd,
            pid,
            name,
            control: Some(control),
            outcome: None,
            status: None,
            on_drop: self.on_drop,
            started_by,
            stdin,
            stdout,
            stderr,
            _r: PhantomData,
        })
    }
}

enum Waiter {
    Uring(UringWait),
    Epoll(EpollWait),
}

/// A running (or finished) child process started by [`ProcessBuilder::start`].
///
/// Dropping it without joining kills and reaps the child (see [`OnDrop`]).
pub struct Process<R = ()> {
    /// Declared before `pidfd`: it refers to the pidfd and must go first.
    waiter: Waiter,
    pidfd: OwnedFd,
    pid: libc::pid_t,
    name: String,
    control: Option<BytesReceiver>,
    outcome: Option<Outcome>,
    status: Option<ExitStatus>,
    on_drop: OnDrop,
    started_by: StartMode,
    stdin: Option<std::fs::File>,
    stdout: Option<std::fs::File>,
    stderr: Option<std::fs::File>,
    _r: PhantomData<fn() -> R>,
}

impl Process<()> {
    /// A builder for a child running the synchronous `entry`. Inside the
    /// entry a tokio runtime is entered, so `Handle::current().block_on(..)`
    /// works for channel I/O.
    pub fn builder<A, R>(entry: fn(A) -> R) -> ProcessBuilder<A, R>
    where
        A: Decode,
        A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
        R: Encode,
    {
        ProcessBuilder::new(trampoline_sync::<A, R>, entry as usize)
    }

    /// A builder for a child running the `async` function `entry` on a
    /// current-thread tokio runtime.
    pub fn builder_async<A, R, F>(entry: fn(A) -> F) -> ProcessBuilder<A, R>
    where
        A: Decode,
        A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
        R: Encode,
        F: Future<Output = R>,
    {
        ProcessBuilder::new(trampoline_async::<A, R, F>, entry as usize)
    }
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

    /// The write end of the child's stdin, if it was [`ChildStdio::Piped`].
    pub fn take_stdin(&mut self) -> Option<std::fs::File> {
        self.stdin.take()
    }

    /// The read end of the child's stdout, if it was [`ChildStdio::Piped`].
    pub fn take_stdout(&mut self) -> Option<std::fs::File> {
        self.stdout.take()
    }

    /// The read end of the child's stderr, if it was [`ChildStdio::Piped`].
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
        match self.on_drop {
            OnDrop::Kill => {
                let _ = sys::pidfd_send_signal(self.pidfd.as_raw_fd(), libc::SIGKILL);
                // SIGKILL cannot be caught, so this wait is short.
                let _ = sys::waitid_pidfd(self.pidfd.as_raw_fd(), false);
            }
            OnDrop::Detach => {
                let pidfd = match self.pidfd.try_clone() {
                    Ok(fd) => fd,
                    Err(_) => return,
                };
                let _ = std::thread::Builder::new()
                    .name("ringipc-reaper".into())
                    .spawn(move || {
                        let _ = sys::waitid_pidfd(pidfd.as_raw_fd(), false);
                    });
            }
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

/// Starts a child running the synchronous `entry(args)` with default options.
pub fn spawn<A, R>(entry: fn(A) -> R, args: A) -> Result<Process<R>>
where
    A: Encode + Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
    R: Encode,
{
    Process::builder(entry).arg(args).start()
}

/// Starts a child running the `async` `entry(args)` with default options.
///
/// ```
/// async fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// fn main() -> ringipc::Result<()> {
///     ringipc::init();
///     let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
///     rt.block_on(async {
///         let mut child = ringipc::spawn_async(square, 12)?;
///         assert_eq!(child.join_value().await?, 144);
///         Ok(())
///     })
/// }
/// ```
pub fn spawn_async<A, R, F>(entry: fn(A) -> F, args: A) -> Result<Process<R>>
where
    A: Encode + Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
    R: Encode,
    F: Future<Output = R>,
{
    Process::builder_async(entry).arg(args).start()
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
