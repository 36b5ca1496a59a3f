//! Thin wrappers over the libc calls ringipc makes. Every `unsafe` libc call
//! of the crate lives here, next to the reason it is sound.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Once;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Creates a pipe whose both ends are close-on-exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    ignore_sigpipe();
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    grow_pipe(&w);
    Ok((r, w))
}

/// Pipe capacity ringipc asks for: large writes move in fewer syscalls.
const WANT_PIPE_SIZE: usize = 1 << 20;

fn max_pipe_size() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(WANT_PIPE_SIZE)
    })
}

/// Raises the pipe's capacity to 1 MiB or the system maximum, whichever is
/// lower. Failure (e.g. the per-user pipe quota) leaves the default, which
/// only costs throughput.
fn grow_pipe(fd: &OwnedFd) {
    let size = WANT_PIPE_SIZE.min(max_pipe_size()) as libc::c_int;
    // SAFETY: F_SETPIPE_SZ takes an int argument and only changes the pipe's capacity.
    let _ = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
}

/// Sets or clears `O_NONBLOCK` on the open file description.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and reads the fd's status flags.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: F_SETFL with an int flag set derived from the current flags.
        cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, new) })?;
    }
    Ok(())
}

/// `read(2)` into `len` bytes at `ptr`.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
pub unsafe fn read(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    // SAFETY: the caller promises `ptr` is writable for `len` bytes.
    let n = unsafe { libc::read(fd, ptr.cast(), len) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` of `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid slice for reads of its length.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Makes sure a write to a pipe whose reader is gone returns `EPIPE` instead of
/// killing the process. Rust binaries already ignore SIGPIPE; this covers
/// programs whose `main` is not Rust's (or that reset it). A handler the
/// program installed itself is left alone.
pub fn ignore_sigpipe() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: sigaction with a null new action only reads the current disposition.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGPIPE, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_DFL
            {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
        }
    });
}
