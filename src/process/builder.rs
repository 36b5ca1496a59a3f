//! [`ProcessBuilder`]: a child's options, and `start`, which hands the
//! arguments' fds over, writes the start spec and has the child forked by
//! the fork server or re-executed by the spawner thread.

use super::handle::{Process, Waiter};
use super::spec::{self, CHILD_ENV, Spec};
use super::trampoline::{Trampoline, trampoline_async, trampoline_sync};
use super::{Affinity, ChildStdio, OnDrop, StartMode, child, forkserver, handoff, spawner};
use crate::backend::Backend;
use crate::backend::epoll::EpollWait;
use crate::backend::uring::{UringWait, waitid_supported};
use crate::channel::ChannelConfig;
use crate::error::{Error, ErrorKind, Result};
use crate::framing::{ABSOLUTE_MAX_FRAME, DEFAULT_MAX_FRAME};
use crate::message::{Decode, Encode, encode_into};
use crate::sys;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use std::ffi::CString;
use std::ffi::OsString;
use std::future::Future;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;

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

    /// How this child is started (default: [`default_start_mode`](super::default_start_mode)). A fork
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
                sys::kill_and_reap(pid);
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
