//! Reaps children whose handles were dropped unjoined, so `Drop` never
//! blocks (it may run on a runtime thread) and no child lingers as a
//! zombie: one thread for the whole process, started on first use, waits on
//! the children's pidfds with epoll and reaps each as it exits.
//!
//! Hand-written because no crate reaps by pidfd: a tokio task would die
//! with its runtime (leaving zombies), and a thread per child costs a stack
//! and a clone per dropped handle.

use crate::sys;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, PoisonError};

struct Reaper {
    epoll: OwnedFd,
    /// The pidfds being waited on, by number (the epoll event's data).
    children: Mutex<HashMap<RawFd, OwnedFd>>,
    /// The process that started the thread: a forked copy of this process
    /// has the state but not the thread, and starts its own.
    owner: u32,
}

static REAPER: Mutex<Option<&'static Reaper>> = Mutex::new(None);

/// Reaps the child behind `pidfd` once it exits, without blocking the
/// caller. A child that has already exited is reaped at once.
pub(crate) fn reap_later(pidfd: OwnedFd) {
    if !matches!(sys::waitid_pidfd(pidfd.as_raw_fd(), true), Ok(None)) {
        // Reaped now, or not ours to reap (ECHILD): nothing to wait for.
        return;
    }
    match reaper() {
        Ok(r) => {
            let fd = pidfd.as_raw_fd();
            r.children
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(fd, pidfd);
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
                u64: fd as u64,
            };
            // SAFETY: a valid epoll fd, a pidfd kept open in `children`
            // until the reaper thread takes it out, and a valid event.
            let r2 =
                unsafe { libc::epoll_ctl(r.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if r2 != 0 {
                let e = io::Error::last_os_error();
                let pidfd = r
                    .children
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&fd);
                tracing::warn!(error = %e, "cannot watch a dropped child's pidfd; reaping on a thread");
                if let Some(pidfd) = pidfd {
                    reap_on_thread(pidfd);
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the reaper thread; reaping on a thread");
            reap_on_thread(pidfd);
        }
    }
}

/// The fallback: a thread that waits for this one child.
fn reap_on_thread(pidfd: OwnedFd) {
    let _ = std::thread::Builder::new()
        .name("ringipc-reap1".into())
        .spawn(move || {
            let _ = sys::waitid_pidfd(pidfd.as_raw_fd(), false);
        });
}

fn reaper() -> io::Result<&'static Reaper> {
    let mut slot = REAPER.lock().unwrap_or_else(PoisonError::into_inner);
    let me = std::process::id();
    if let Some(r) = *slot
        && r.owner == me
    {
        return Ok(r);
    }
    // SAFETY: plain epoll_create1; the fd is owned below.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // Leaked on purpose: the thread and the handles dropped later in this
    // process's life use it until exit. (At most one per process, plus one
    // per fork that drops a child.)
    let r: &'static Reaper = Box::leak(Box::new(Reaper {
        // SAFETY: `fd` is a new epoll fd nobody else owns.
        epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        children: Mutex::new(HashMap::new()),
        owner: me,
    }));
    std::thread::Builder::new()
        .name("ringipc-reaper".into())
        .spawn(move || run(r))?;
    *slot = Some(r);
    Ok(r)
}

fn run(r: &'static Reaper) {
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 32];
    loop {
        // SAFETY: a valid epoll fd and a writable event array of this length.
        let n = unsafe {
            libc::epoll_wait(
                r.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                -1,
            )
        };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %io::Error::last_os_error(), "the reaper's epoll_wait failed");
            return;
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as RawFd;
            let mut children = r.children.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(pidfd) = children.get(&fd) else {
                continue;
            };
            match sys::waitid_pidfd(pidfd.as_raw_fd(), true) {
                // Not exited after all: wait again (the event was one-shot).
                Ok(None) => {
                    let mut again = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
                        u64: fd as u64,
                    };
                    // SAFETY: as in `reap_later`, re-arming a registered fd.
                    unsafe {
                        libc::epoll_ctl(r.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, &mut again)
                    };
                }
                // Reaped (or not ours): closing the pidfd drops it from the epoll set.
                _ => {
                    children.remove(&fd);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaps_in_the_background() {
        // SAFETY: fork; the child only sleeps briefly and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: leave the forked test process at once.
            unsafe { libc::_exit(0) };
        }
        let pidfd = sys::pidfd_open(pid).unwrap();
        reap_later(pidfd);
        let stat = format!("/proc/{pid}");
        let t = std::time::Instant::now();
        while std::path::Path::new(&stat).exists() && t.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(
            !std::path::Path::new(&stat).exists(),
            "child {pid} not reaped"
        );
    }
}
