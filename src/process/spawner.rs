//! Every child is started by `posix_spawn` from one long-lived thread.
//!
//! `posix_spawn` (glibc: `clone(CLONE_VM | CLONE_VFORK)`) does not copy the
//! parent's page tables, so starting a child costs the same whatever the
//! parent's size; `std::process::Command` with a `pre_exec` hook would
//! `fork()` the whole parent instead (measured by the harness: about twice
//! the exec of the binary itself at 32 MiB resident, and growing with it).
//! Everything a hook would do happens in the child's `init` instead.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that created the child exits,
//! not the process: a child started from an engine core thread or a
//! short-lived helper thread would be killed when that thread ends. Starting
//! every child from a thread that lives as long as the process makes "dies
//! with the parent" mean the parent process. The thread also resets its CPU
//! affinity to the process's, so an unpinned child does not inherit the pin
//! of whichever thread asked for it.

use crate::sys;
use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};

/// What to start: `/proc/self/exe` with this `argv[0]` and environment.
pub(crate) struct SpawnRequest {
    pub argv0: CString,
    /// The whole environment, as `KEY=VALUE`.
    pub env: Vec<CString>,
    pub cwd: Option<CString>,
    /// Fds the child keeps at the same numbers (close-on-exec cleared there).
    pub inherit: Vec<RawFd>,
    /// Fds to put at 0, 1 and 2; `None` inherits ours.
    pub stdio: [Option<RawFd>; 3],
}

struct Request {
    req: SpawnRequest,
    reply: SyncSender<io::Result<libc::pid_t>>,
}

fn spawner() -> io::Result<&'static Mutex<Sender<Request>>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<Request>();
    let process_cpus = sys::process_cpus()?;
    std::thread::Builder::new()
        .name("ringipc-spawner".into())
        .spawn(move || {
            let _ = sys::set_affinity(&sys::cpu_set(&process_cpus));
            for r in rx {
                let _ = r.reply.send(spawn(&r.req));
            }
        })?;
    // A racing caller may have installed its own spawner first; then this
    // one's thread exits when `tx` is dropped here.
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

/// Starts the child on the spawner thread and returns its pid once the exec
/// has succeeded (or the error why it failed).
pub(crate) fn launch(req: SpawnRequest) -> io::Result<libc::pid_t> {
    let (reply, rx) = mpsc::sync_channel(1);
    spawner()?
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(Request { req, reply })
        .map_err(|_| io::Error::other("ringipc spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("ringipc spawner thread is gone"))?
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// File actions and attributes, destroyed on drop.
struct Actions {
    fa: libc::posix_spawn_file_actions_t,
    attr: libc::posix_spawnattr_t,
}

impl Drop for Actions {
    fn drop(&mut self) {
        // SAFETY: both were initialised in `spawn` before an Actions existed.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&mut self.fa);
            libc::posix_spawnattr_destroy(&mut self.attr);
        }
    }
}

fn spawn(req: &SpawnRequest) -> io::Result<libc::pid_t> {
    // SAFETY: zeroed values are valid storage for the init calls below,
    // which must succeed before `Actions` takes ownership.
    let mut a: Actions = unsafe { std::mem::zeroed() };
    // SAFETY: `a.fa` / `a.attr` are valid, uninitialised objects of the right type.
    unsafe {
        check(libc::posix_spawn_file_actions_init(&mut a.fa))?;
        if let Err(e) = check(libc::posix_spawnattr_init(&mut a.attr)) {
            libc::posix_spawn_file_actions_destroy(&mut a.fa);
            std::mem::forget(a);
            return Err(e);
        }
    }
    let fa = &mut a.fa as *mut libc::posix_spawn_file_actions_t;
    // A scratch fd number above every fd we hand over: dup2 to a different
    // number clears close-on-exec on the target, which dup2(fd, fd) does not
    // do everywhere.
    let scratch = req
        .inherit
        .iter()
        .copied()
        .chain(req.stdio.iter().flatten().copied())
        .max()
        .unwrap_or(2)
        + 1;
    // SAFETY: `fa` is an initialised file-actions object; every string
    // pointer passed lives in `req` until posix_spawn returns.
    unsafe {
        for (target, fd) in req.stdio.iter().enumerate() {
            if let Some(fd) = fd {
                check(libc::posix_spawn_file_actions_adddup2(
                    fa,
                    *fd,
                    target as libc::c_int,
                ))?;
            }
        }
        for &fd in &req.inherit {
            check(libc::posix_spawn_file_actions_adddup2(fa, fd, scratch))?;
            check(libc::posix_spawn_file_actions_adddup2(fa, scratch, fd))?;
        }
        if !req.inherit.is_empty() {
            check(libc::posix_spawn_file_actions_addclose(fa, scratch))?;
        }
        if let Some(dir) = &req.cwd {
            check(libc::posix_spawn_file_actions_addchdir_np(fa, dir.as_ptr()))?;
        }
        // The spawner thread's signal mask is not the child's business.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::posix_spawnattr_setsigmask(&mut a.attr, &empty))?;
        check(libc::posix_spawnattr_setflags(
            &mut a.attr,
            libc::POSIX_SPAWN_SETSIGMASK as libc::c_short,
        ))?;
    }
    let argv = [req.argv0.as_ptr(), std::ptr::null()];
    let envp: Vec<*const libc::c_char> = req
        .env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut pid: libc::pid_t = 0;
    // SAFETY: the path, argv and envp are NUL-terminated arrays of valid C
    // strings that outlive the call; file actions and attributes are
    // initialised.
    let r = unsafe {
        libc::posix_spawn(
            &mut pid,
            c"/proc/self/exe".as_ptr(),
            &a.fa,
            &a.attr,
            argv.as_ptr() as *const *mut libc::c_char,
            envp.as_ptr() as *const *mut libc::c_char,
        )
    };
    check(r)?;
    Ok(pid)
}
