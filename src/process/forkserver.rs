//! The fork server: a small process forked by [`init`](crate::init) while
//! the application is still single-threaded, which forks children on request.
//!
//! Re-executing the binary for every child costs an `execve` of the whole
//! program, its dynamic linking and Rust's start-up (about 2–3× a
//! `/bin/true`). A fork of a small, single-threaded process that already ran
//! all of that costs a page-table copy. The application never forks itself
//! after its threads exist; it asks the server over a `SOCK_SEQPACKET`
//! socket, sending the spec memfd, the control pipe, the stdio fds and the
//! handle fds with `SCM_RIGHTS`. The server forks with
//! `clone(CLONE_PARENT | SIGCHLD)`, so the child is the *application's*
//! child: `Process` opens a pidfd on it, watches and reaps it exactly as a
//! re-executed child, and no one else can reap it first.
//!
//! The server holds nothing of the application but the memory it had at
//! `init()`: it closes every fd but its socket (so a pipe the application
//! opens later reaches EOF as before), runs no runtime and starts no thread.
//! It exits on EOF of its socket (the application closed it or died) and is
//! killed with the application's main thread (`PR_SET_PDEATHSIG`). If it is
//! gone or refuses (seccomp, limits), starts fall back to re-exec with a
//! warning.

use super::child::{self, EXIT_START_FAILED};
use super::spec;
use crate::sys;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};

/// How a child process is started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StartMode {
    /// Forked by the fork server that [`init`](crate::init) started (the
    /// default). Where there is none (`init` ran after threads existed, or
    /// the server died or was refused), the child is re-executed instead.
    #[default]
    Fork,
    /// `/proc/self/exe` re-executed, its own fresh program image.
    Exec,
}

impl StartMode {
    /// `"fork"` or `"exec"`.
    pub fn name(self) -> &'static str {
        match self {
            StartMode::Fork => "fork",
            StartMode::Exec => "exec",
        }
    }
}

static DEFAULT_MODE: AtomicU8 = AtomicU8::new(0);

/// Sets how children whose builder names no [`StartMode`] are started, from
/// now on. `init_with` (or `RINGIPC_START`) sets it first; a test suite can
/// switch it between tests to run every test in both modes.
pub fn set_default_start_mode(mode: StartMode) {
    DEFAULT_MODE.store(mode as u8, Ordering::Relaxed);
}

/// How children whose builder names no [`StartMode`] are started.
pub fn default_start_mode() -> StartMode {
    match DEFAULT_MODE.load(Ordering::Relaxed) {
        0 => StartMode::Fork,
        _ => StartMode::Exec,
    }
}

/// The fork server's pid while one runs (for monitoring; if it is killed,
/// later starts re-execute).
pub fn fork_server_pid() -> Option<u32> {
    lock().as_ref().map(|s| s.pid as u32)
}

/// The application's end of the server's socket.
struct Server {
    sock: OwnedFd,
    pidfd: OwnedFd,
    pid: libc::pid_t,
}

static SERVER: Mutex<Option<Server>> = Mutex::new(None);

fn lock() -> std::sync::MutexGuard<'static, Option<Server>> {
    SERVER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Identifies a request (and the layout of its header) to the server.
const MAGIC: u32 = 0x7269_6e67;
/// `SCM_MAX_FD`: the kernel refuses more fds in one message.
const MAX_FDS: usize = 253;
/// Header: magic, bit mask of the stdio fds sent, number of handle fds.
const HEADER_LEN: usize = 12;

/// Whether this process has exactly one thread (`/proc/self/task`).
pub(super) fn single_threaded() -> bool {
    match std::fs::read_dir("/proc/self/task") {
        Ok(d) => d.count() == 1,
        Err(_) => false,
    }
}

/// Forks the server, if this process is still single-threaded. Called by
/// `init`, in the application only.
pub(crate) fn start_server() {
    if !single_threaded() {
        tracing::debug!(
            "ringipc::init() ran after threads were started: no fork server, children are re-executed"
        );
        return;
    }
    let (app_end, server_end) = match sys::seqpacket_pair() {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "fork server: socketpair failed; children are re-executed");
            return;
        }
    };
    // SAFETY: getpid has no preconditions.
    let app = unsafe { libc::getpid() };
    // The signals the server never takes are blocked across the fork (and
    // stay blocked in the server, see `serve_from`).
    // SAFETY: plain signal-set operations on local sets.
    let old_mask = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in SERVER_BLOCKS {
            libc::sigaddset(&mut set, sig);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    };
    // SAFETY: the process is single-threaded (checked above), so the child
    // inherits no lock held by another thread; it only runs `serve`, which
    // never returns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        drop(app_end);
        serve_from(server_end, app);
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
    drop(server_end);
    if pid < 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "fork server: fork failed; children are re-executed");
        return;
    }
    let pidfd = match sys::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            sys::kill_and_reap(pid);
            tracing::warn!(error = %e, "fork server: pidfd_open failed; children are re-executed");
            return;
        }
    };
    tracing::debug!(pid, "fork server started");
    *lock() = Some(Server {
        sock: app_end,
        pidfd,
        pid,
    });
}

/// What a forked child needs from the application, besides the spec.
pub(crate) struct ForkRequest<'a> {
    /// The memfd holding the rkyv spec.
    pub spec: RawFd,
    pub control: RawFd,
    /// The child's stdio; `None` leaves that fd closed in the child.
    pub stdio: [Option<RawFd>; 3],
    /// Handle fds, by index.
    pub handles: &'a [RawFd],
}

/// Asks the server for a child. `None`: there is no usable server (a
/// warning says why if there was one), so the caller re-executes.
pub(crate) fn launch(req: &ForkRequest<'_>) -> Option<libc::pid_t> {
    let mut guard = lock();
    let server = guard.as_ref()?;
    let mut fds: Vec<RawFd> = vec![req.spec, req.control];
    let mut mask = 0u32;
    for (i, fd) in req.stdio.iter().enumerate() {
        if let Some(fd) = fd {
            mask |= 1 << i;
            fds.push(*fd);
        }
    }
    fds.extend_from_slice(req.handles);
    if fds.len() > MAX_FDS {
        tracing::debug!(
            fds = fds.len(),
            "more fds than one message carries; this child is re-executed"
        );
        return None;
    }
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
    header[4..8].copy_from_slice(&mask.to_ne_bytes());
    header[8..12].copy_from_slice(&(req.handles.len() as u32).to_ne_bytes());
    let sock = server.sock.as_raw_fd();
    if let Err(e) = sys::send_with_fds(sock, &header, &fds) {
        let dead = matches!(
            e.raw_os_error(),
            Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN)
        );
        if dead {
            retire(&mut guard, &format!("it is gone ({e})"));
        } else {
            tracing::warn!(error = %e, "fork server: request failed; this child is re-executed");
        }
        return None;
    }
    let mut reply = [0u8; 4];
    let n = loop {
        // SAFETY: `reply` is a writable buffer of the length passed.
        let r = unsafe { libc::recv(sock, reply.as_mut_ptr().cast(), reply.len(), 0) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            retire(&mut guard, &format!("no reply ({e})"));
            return None;
        }
    };
    if n != reply.len() {
        retire(&mut guard, "it is gone (EOF)");
        return None;
    }
    let r = i32::from_ne_bytes(reply);
    if r > 0 {
        return Some(r);
    }
    let e = io::Error::from_raw_os_error(-r);
    match -r {
        // Forking is refused for good (seccomp, a sandbox): stop asking.
        libc::EPERM | libc::ENOSYS | libc::EINVAL => {
            retire(&mut guard, &format!("clone refused ({e})"));
        }
        _ => tracing::warn!(error = %e, "fork server: clone failed; this child is re-executed"),
    }
    None
}

/// Stops using the server: kills it (if it still runs) and reaps it.
fn retire(guard: &mut Option<Server>, why: &str) {
    if let Some(s) = guard.take() {
        tracing::warn!(
            pid = s.pid,
            "fork server unusable: {why}; children are re-executed from now on"
        );
        let _ = sys::pidfd_send_signal(s.pidfd.as_raw_fd(), libc::SIGKILL);
        let _ = sys::waitid_pidfd(s.pidfd.as_raw_fd(), false);
    }
}

/// Signals sent to a whole process group or session that the server keeps
/// blocked (its children unblock them).
const SERVER_BLOCKS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGTERM];

/// The server's main loop, in the forked server process. Never returns.
fn serve_from(sock: OwnedFd, app: libc::pid_t) -> ! {
    // Hold nothing of the application's: not its stdio, pipes or sockets.
    // The socket moves above 2 first (the application may run with 0–2
    // closed, and then the socket sits there).
    let sock = match sys::dup_above(sock.as_raw_fd(), 3) {
        Ok(s) => s,
        // SAFETY: _exit ends the server without running anything of the
        // application's (atexit handlers, destructors).
        Err(_) => unsafe { libc::_exit(1) },
    };
    let sock = sock.as_raw_fd();
    // SAFETY: closing 0–2 the server owns copies of; nothing in this process
    // uses them again.
    unsafe {
        libc::close(0);
        libc::close(1);
        libc::close(2);
    }
    sys::close_fds_except(&[sock]);
    // SAFETY: PR_SET_PDEATHSIG takes a signal number; getppid has no
    // preconditions. If the application died before the prctl, stop.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != app {
            libc::_exit(0);
        }
    }
    sys::set_thread_name("ringipc-forksrv");
    // Ctrl-C, a hang-up or a SIGTERM sent to the whole process group (a
    // service manager stopping the unit) must not take the server away
    // while the application shuts down gracefully, maybe starting children.
    // The server keeps them blocked (`start_server` blocked them across the
    // fork), so they stay pending here and never act; it dies with the
    // application anyway. Blocked, not ignored: a child inherits the mask,
    // so a signal sent to it before it runs stays pending until the child
    // empties its mask, and then acts as it would on a re-executed child
    // (an ignored one would be lost).
    let mut header = [0u8; HEADER_LEN];
    loop {
        let (n, fds) = match sys::recv_with_fds(sock, &mut header, MAX_FDS) {
            // EOF: the application closed its end or exited. (It never
            // sends an empty message.)
            // SAFETY: as above.
            Ok((0, _)) => unsafe { libc::_exit(0) },
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A request that did not fit (its fds were closed): refuse it.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => (0, Vec::new()),
            // SAFETY: as above.
            Err(_) => unsafe { libc::_exit(0) },
        };
        let valid =
            n == HEADER_LEN && u32::from_ne_bytes(header[0..4].try_into().unwrap()) == MAGIC && {
                let mask = u32::from_ne_bytes(header[4..8].try_into().unwrap());
                let handles = u32::from_ne_bytes(header[8..12].try_into().unwrap()) as usize;
                mask < 8 && fds.len() == 2 + mask.count_ones() as usize + handles
            };
        let reply: i32 = if !valid {
            -libc::EINVAL
        } else {
            // SAFETY: a fork without CLONE_VM (a new address space, the
            // child runs on its copy of this stack) in a single-threaded
            // process; CLONE_PARENT makes the application its parent.
            let pid = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
                    0usize,
                    0usize,
                    0usize,
                    0usize,
                )
            };
            if pid == 0 {
                let mask = u32::from_ne_bytes(header[4..8].try_into().unwrap());
                forked_child(sock, mask, fds);
            }
            if pid < 0 {
                -io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EAGAIN)
            } else {
                pid as i32
            }
        };
        drop(fds);
        // SAFETY: `reply` is a readable buffer of the length passed.
        let r = unsafe {
            libc::send(
                sock,
                (&reply as *const i32).cast(),
                std::mem::size_of::<i32>(),
                libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
    }
}

/// The new child, just forked by the server: puts the fds it was sent in
/// place, takes the application's environment and directory, and runs the
/// same path as a re-executed child. Never returns.
fn forked_child(sock: RawFd, mask: u32, fds: Vec<OwnedFd>) -> ! {
    // SAFETY: the server's socket is not this child's business.
    unsafe { libc::close(sock) };
    let code = match forked(mask, fds) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("ringipc child: {msg}");
            EXIT_START_FAILED
        }
    };
    std::process::exit(code);
}

fn forked(mask: u32, fds: Vec<OwnedFd>) -> Result<i32, String> {
    // A re-executed child starts with no signal blocked.
    // SAFETY: an empty set, valid pointers.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
    // The fds arrived at the lowest free numbers, maybe 0–2 (the server has
    // those closed): move every one above 2 before placing stdio.
    let mut moved = Vec::with_capacity(fds.len());
    for fd in fds {
        let fd = if fd.as_raw_fd() < 3 {
            sys::dup_above(fd.as_raw_fd(), 3).map_err(|e| format!("placing fds: {e}"))?
        } else {
            fd
        };
        moved.push(fd);
    }
    let mut it = moved.into_iter();
    let spec_fd = it.next().ok_or("no spec fd")?;
    let control = it.next().ok_or("no control fd")?;
    for target in 0..3 {
        if mask & (1 << target) != 0 {
            let fd = it.next().ok_or("missing stdio fd")?;
            // SAFETY: dup2 onto 0–2, which this process holds nothing at
            // (the server closed them, the received fds moved away); the
            // copy at 0–2 is not close-on-exec, as stdio must be.
            if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                return Err(format!("stdio {target}: {}", io::Error::last_os_error()));
            }
        }
    }
    let handles: Vec<RawFd> = it.map(std::os::fd::IntoRawFd::into_raw_fd).collect();
    let control = std::os::fd::IntoRawFd::into_raw_fd(control);
    let bytes = child::read_spec(std::os::fd::IntoRawFd::into_raw_fd(spec_fd))?;
    let mut keep = handles.clone();
    keep.push(control);
    sys::close_fds_except(&keep);
    let spec = spec::read(&bytes)?;
    if let Some(vars) = spec.env_vars() {
        // SAFETY: this process has one thread (a fork of the single-threaded
        // server), so nothing reads the environment concurrently.
        unsafe {
            libc::clearenv();
            for (key, value) in vars {
                std::env::set_var(key, value);
            }
        }
    }
    if let Some(dir) = spec.cwd.as_ref() {
        use std::os::unix::ffi::OsStrExt;
        let dir = std::path::Path::new(std::ffi::OsStr::from_bytes(dir.as_slice()));
        std::env::set_current_dir(dir).map_err(|e| format!("chdir {}: {e}", dir.display()))?;
    }
    // `init` ran inside a runtime (`#[tokio::main(flavor =
    // "current_thread")]`): this copy of the thread still says so, and a
    // runtime cannot start inside another, so the entry gets a thread of
    // its own, as in a re-executed child. (That runtime's fds are closed.)
    let in_runtime = tokio::runtime::Handle::try_current().is_ok();
    child::run_spec(spec, control, handles, in_runtime)
}
