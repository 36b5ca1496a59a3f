//! Thin wrappers over the libc calls ringipc makes, each next to the reason
//! it is sound. (The exceptions are the calls between fork and exec in
//! `process::ProcessBuilder::start`, which must be inline and allocation-free,
//! and `getppid` in the child.)

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

/// The result of a libc call returning a byte count (or -1 and errno).
pub(crate) fn cvt_isize(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
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

/// A read that never blocks, even on a blocking fd: `preadv2` with
/// `RWF_NOWAIT` at the current position. `WouldBlock` when no data is
/// there (or another reader took it first).
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
pub unsafe fn read_nowait(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: ptr.cast(),
        iov_len: len,
    };
    // SAFETY: one iovec the caller promises is writable; offset -1 reads at
    // the current position, as a pipe requires.
    let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A write that never blocks, even on a blocking fd: `pwritev2` with
/// `RWF_NOWAIT` at the current position. `WouldBlock` when the pipe has no
/// room.
pub fn write_nowait(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one iovec over `buf`, which the kernel only reads; offset -1
    // writes at the current position, as a pipe requires.
    let n = unsafe { libc::pwritev2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
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

/// `pidfd_open(2)`: a close-on-exec fd that refers to process `pid`.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILLs and reaps `pid`, an unreaped child of this process (one whose
/// pidfd could not be opened): an unreaped child's pid cannot be reused,
/// so the signal reaches that child.
pub fn kill_and_reap(pid: libc::pid_t) {
    // SAFETY: kill and waitpid take a pid and (for waitpid) a null status
    // pointer, which the kernel does not write through.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// Sends `sig` to the process behind `pidfd` (no pid-reuse race).
pub fn pidfd_send_signal(pidfd: RawFd, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd,
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the process behind `pidfd` has exited (its pidfd is readable),
/// without waiting and without reaping it. One `poll` with a zero timeout.
pub fn pidfd_exited(pidfd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLIN | libc::POLLHUP) != 0
}

/// Whether a socket's peer has shut down its sending side (`POLLRDHUP`):
/// tells end of stream from an empty datagram after a 0-byte receive.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// The write end of the pipe [`on_sigterm_write`]'s handler writes to.
static SIGTERM_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn sigterm_handler(_: libc::c_int) {
    let fd = SIGTERM_PIPE.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: write(2) is async-signal-safe; one byte from a static.
        unsafe { libc::write(fd, b"T".as_ptr().cast(), 1) };
    }
}

/// Makes SIGTERM write a byte into a new pipe instead of ending the process,
/// and returns the pipe's read end (nonblocking, close-on-exec): the
/// self-pipe trick. Hand-written because tokio's `signal` feature would add
/// a signal driver, and its sockets, to every runtime of every program that
/// uses ringipc. For one process-wide use (a prefork child).
pub fn on_sigterm_write() -> io::Result<OwnedFd> {
    let (r, w) = pipe()?;
    set_nonblocking(r.as_raw_fd(), true)?;
    set_nonblocking(w.as_raw_fd(), true)?;
    // The write end lives as long as the process (the handler may run any
    // time from now on).
    SIGTERM_PIPE.store(
        std::os::fd::IntoRawFd::into_raw_fd(w),
        std::sync::atomic::Ordering::Relaxed,
    );
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn
    // that only calls write(2); SA_RESTART keeps other syscalls going.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = sigterm_handler as *const () as libc::sighandler_t;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        cvt(libc::sigaction(libc::SIGTERM, &act, std::ptr::null_mut()))?;
    }
    Ok(r)
}

/// How a process ended, as reported by `waitid`.
pub fn decode_siginfo(info: &libc::siginfo_t) -> (bool, i32) {
    // SAFETY: the kernel filled `info` for a CLD_* event, for which si_status is valid.
    let status = unsafe { info.si_status() };
    match info.si_code {
        libc::CLD_EXITED => (true, status),
        _ => (false, status),
    }
}

/// `waitid(P_PIDFD, pidfd, WEXITED | flags)`: `Ok(None)` if the process has
/// not exited yet (with `WNOHANG`), else `(exited normally, code or signal)`.
pub fn waitid_pidfd(pidfd: RawFd, nohang: bool) -> io::Result<Option<(bool, i32)>> {
    // SAFETY: a zeroed siginfo_t is a valid value for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let flags = libc::WEXITED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        // SAFETY: `info` is a valid siginfo_t to write into.
        let r = unsafe { libc::waitid(libc::P_PIDFD, pidfd as libc::id_t, &mut info, flags) };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: with WNOHANG, si_pid stays 0 when no child changed state.
    if unsafe { info.si_pid() } == 0 {
        return Ok(None);
    }
    Ok(Some(decode_siginfo(&info)))
}

/// The seals a start spec's memfd carries: its contents can no longer
/// change, and a child checks for them to know the fd it was named is one.
pub const SPEC_SEALS: libc::c_int =
    libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;

/// A memfd holding `data`, rewound and sealed with [`SPEC_SEALS`].
pub fn memfd_spec(name: &std::ffi::CStr, data: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the flags are valid.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: memfd_create returned a new fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    std::io::Write::write_all(&mut f, data)?;
    std::io::Seek::rewind(&mut f)?;
    // SAFETY: F_ADD_SEALS on our memfd, which has no writable mapping.
    cvt(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, SPEC_SEALS) })?;
    Ok(f.into())
}

/// The seals on `fd` (`F_GET_SEALS`); an error for an fd that is not a
/// memfd (or not open).
pub fn seals(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GET_SEALS only reads the fd's seals.
    cvt(unsafe { libc::fcntl(fd, libc::F_GET_SEALS) })
}

/// Whether this process runs in secure-execution mode (`AT_SECURE`: a
/// setuid or setgid binary, or one with file capabilities).
pub fn secure_execution() -> bool {
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(libc::AT_SECURE) != 0 }
}

/// Clears or sets `FD_CLOEXEC`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    let flag = if on { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD with a valid flag value.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flag) })?;
    Ok(())
}

/// Closes every fd from 3 up that is not in `keep` (sorted).
pub fn close_fds_except(keep: &[RawFd]) {
    let mut from: libc::c_uint = 3;
    let mut bounds: Vec<libc::c_uint> = keep.iter().map(|&k| k as libc::c_uint).collect();
    bounds.sort_unstable();
    bounds.dedup();
    for k in bounds.into_iter().chain(std::iter::once(libc::c_uint::MAX)) {
        if k > from {
            let last = if k == libc::c_uint::MAX { k } else { k - 1 };
            // SAFETY: close_range only closes fds in the range; none of them is
            // owned by live Rust objects this early in a child (before the entry runs).
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, last, 0) };
            if r < 0 {
                // Kernels before 5.9: close one by one what /proc says is open.
                close_range_slow(from, last);
            }
        }
        from = from.max(k.saturating_add(1));
    }
}

fn close_range_slow(from: libc::c_uint, last: libc::c_uint) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<libc::c_uint> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= from && fd <= last)
        .collect();
    for fd in fds {
        // SAFETY: see close_fds_except; closing an fd that read_dir used is harmless.
        unsafe { libc::close(fd as libc::c_int) };
    }
}

/// The CPUs the process (its main thread) may run on.
pub fn process_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: getpid has no preconditions.
    cpus_of(unsafe { libc::getpid() })
}

fn cpus_of(pid: libc::pid_t) -> io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) })?;
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// A cpu_set_t holding `cpus` (each below CPU_SETSIZE; checked by the caller).
pub fn cpu_set(cpus: &[usize]) -> libc::cpu_set_t {
    // SAFETY: a zeroed cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        // SAFETY: the caller checked `c < CPU_SETSIZE`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    set
}

/// Pins the calling thread (`pid` 0) to `set`.
pub fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) })?;
    Ok(())
}

/// Sets the calling thread's name (the `comm` shown by `ps` and `top`).
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// A connected, close-on-exec `AF_UNIX` `SOCK_SEQPACKET` pair.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair returned two new fds that nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Asks for a send buffer of `bytes` (the kernel doubles it, and caps it at
/// `net.core.wmem_max` for unprivileged processes).
pub fn set_sndbuf(fd: RawFd, bytes: usize) -> io::Result<()> {
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `v` is a c_int that outlives the call, and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// A socket's `(domain, type)` (`SO_DOMAIN`, `SO_TYPE`).
pub fn socket_kind(fd: RawFd) -> io::Result<(libc::c_int, libc::c_int)> {
    let get = |opt| -> io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `v` and `len` are live and sized for a c_int option.
        cvt(unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        })?;
        Ok(v)
    };
    Ok((get(libc::SO_DOMAIN)?, get(libc::SO_TYPE)?))
}

/// A close-on-exec duplicate of `fd` at the lowest free number ≥ `min`.
pub fn dup_above(fd: RawFd, min: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC creates a new fd and touches nothing else.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: a new fd that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sends `data` with `fds` attached (`SCM_RIGHTS`), without SIGPIPE.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let payload = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words: cmsghdr needs its alignment.
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the fields set below point at live
    // buffers of the lengths given.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsghdr with `payload` bytes
        // of data (CMSG_SPACE above), so the header and data pointers are
        // inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), payload);
        }
    }
    loop {
        // SAFETY: `msg` describes valid buffers (above).
        let r = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one message into `buf` and up to `max_fds` fds (`SCM_RIGHTS`,
/// received close-on-exec). Returns the data length (0: EOF) and the fds; a
/// message whose fds did not all fit is an `EMSGSIZE` error.
pub fn recv_with_fds(
    sock: RawFd,
    buf: &mut [u8],
    max_fds: usize,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<RawFd>()) as u32) };
    let mut cbuf = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the fields set point at live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` describes valid, writable buffers.
    let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_controllen` bytes of `cbuf` with
    // well-formed cmsghdrs; the CMSG_* macros walk them within that length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_CTRUNC | libc::MSG_TRUNC) != 0 {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    Ok((n as usize, fds))
}

/// Whether `fd` is open without close-on-exec: what an exec'd child
/// would inherit.
pub fn is_inheritable(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the fd's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC == 0
}

/// A sealed, close-on-exec memfd of `len` bytes for a channel's arena: its
/// size cannot change afterwards (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`),
/// so a peer cannot truncate it under our mapping and make reads fault.
pub fn memfd_sealed(name: &std::ffi::CStr, len: usize) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the flags are valid.
    let fd = cvt(unsafe {
        libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    })?;
    // SAFETY: memfd_create returned a new fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on an fd we own, with a non-negative length.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS takes an int seal mask.
    cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
    Ok(fd)
}

/// The size of a file and whether it is sealed against shrinking.
pub fn sealed_size(fd: RawFd) -> io::Result<(usize, bool)> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    // SAFETY: F_GET_SEALS takes no argument.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    let shrink = seals >= 0 && seals & libc::F_SEAL_SHRINK != 0;
    Ok((st.st_size as usize, shrink))
}

/// Maps `len` bytes of `fd` shared, readable and writable.
pub fn mmap_shared(fd: RawFd, len: usize) -> io::Result<*mut u8> {
    // SAFETY: a fresh mapping chosen by the kernel (addr null) overlaps
    // nothing of ours; the fd and length are checked by the kernel.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

/// Unmaps a mapping made by [`mmap_shared`].
///
/// # Safety
/// `ptr`/`len` must be exactly one mapping from `mmap_shared` that nothing
/// references any more.
pub unsafe fn munmap(ptr: *mut u8, len: usize) {
    // SAFETY: forwarded from this function's contract.
    unsafe { libc::munmap(ptr.cast(), len) };
}
