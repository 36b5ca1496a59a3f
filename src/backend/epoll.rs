//! The epoll backend: nonblocking pipe fds on tokio's reactor (`AsyncFd`).
//!
//! The fd is registered lazily with the runtime that first polls it, and
//! registered again if the handle moves to another runtime (a handle created
//! in a parent thread and used in an engine core, say): see
//! [`RuntimeFd`](super::reactor::RuntimeFd).

use super::msg::MsgBuf;
use super::reactor::RuntimeFd;
use crate::framing::{Decoder, Encoder};
use crate::sys;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;

pub(crate) struct EpollIo {
    fd: RuntimeFd,
}

impl EpollIo {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<EpollIo> {
        sys::set_nonblocking(fd.as_raw_fd(), true)?;
        Ok(EpollIo {
            fd: RuntimeFd::new(fd, Interest::READABLE | Interest::WRITABLE),
        })
    }

    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.raw().expect("an EpollIo always holds its fd")
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut Decoder,
    ) -> Poll<io::Result<usize>> {
        let afd = self.fd.registered()?;
        loop {
            let mut guard = ready!(afd.poll_read_ready(cx))?;
            let (ptr, len) = dec.reserve();
            // SAFETY: `reserve` returned `len` writable bytes at `ptr`.
            match guard.try_io(|fd| unsafe { sys::read(fd.as_raw_fd(), ptr, len) }) {
                Ok(Ok(n)) => {
                    // SAFETY: the kernel initialised `n <= len` bytes at `ptr`.
                    unsafe { dec.commit(n) };
                    if n > 0 && n < len {
                        // A pipe returns less than asked only when it is
                        // empty: forget the readiness now instead of paying
                        // a read that returns EAGAIN to learn it (as tokio's
                        // own pipe does).
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        enc: &mut Encoder,
    ) -> Poll<io::Result<usize>> {
        let afd = self.fd.registered()?;
        loop {
            let mut guard = ready!(afd.poll_write_ready(cx))?;
            let want = crate::framing::write_len(enc.pending().len());
            match guard.try_io(|fd| sys::write(fd.as_raw_fd(), &enc.pending()[..want])) {
                Ok(Ok(n)) => {
                    enc.advance(n);
                    if n < want {
                        // Short write: the pipe is full.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    /// Busy polling: nonblocking reads until data arrives or `budget` runs
    /// out. The reactor registration made by `poll_read` stays armed, so a
    /// `Pending` here still gets the task woken.
    pub(crate) fn spin_read(
        &mut self,
        dec: &mut Decoder,
        budget: std::time::Duration,
    ) -> Poll<io::Result<usize>> {
        let Some(fd) = self.fd.raw() else {
            return Poll::Ready(Err(io::Error::from_raw_os_error(libc::EBADF)));
        };
        let deadline = std::time::Instant::now() + budget;
        loop {
            let (ptr, len) = dec.reserve();
            // SAFETY: `reserve` returned `len` writable bytes at `ptr`.
            match unsafe { sys::read(fd, ptr, len) } {
                Ok(n) => {
                    // SAFETY: the kernel initialised `n <= len` bytes at `ptr`.
                    unsafe { dec.commit(n) };
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Poll::Pending;
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    pub(crate) fn write_now(&mut self, enc: &mut Encoder) {
        let Some(fd) = self.fd.raw() else { return };
        while !enc.pending().is_empty() {
            match sys::write(fd, enc.pending()) {
                Ok(n) => enc.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

/// A `SOCK_SEQPACKET` socket on the epoll backend: nonblocking
/// `sendmsg`/`recvmsg` when tokio's reactor says it is ready.
pub(crate) struct EpollSock {
    fd: RuntimeFd,
}

impl EpollSock {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<EpollSock> {
        sys::set_nonblocking(fd.as_raw_fd(), true)?;
        Ok(EpollSock {
            fd: RuntimeFd::new(fd, Interest::READABLE | Interest::WRITABLE),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.raw().expect("an EpollSock always holds its fd")
    }

    /// Sends the datagram in `msg`, which stays there (a datagram is sent
    /// whole or not at all; one whose future was dropped stays in `msg` for
    /// the handle's next send).
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<MsgBuf>>,
    ) -> Poll<io::Result<usize>> {
        self.poll_msg(cx, msg, false)
    }

    /// Receives one datagram into the buffer in `msg`; `Ok(n)` is its
    /// length, 0 at end of stream.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<MsgBuf>>,
    ) -> Poll<io::Result<usize>> {
        self.poll_msg(cx, msg, true)
    }

    /// A nonblocking `recvmsg` or `sendmsg` each time the reactor says the
    /// socket is ready, until one does not return EAGAIN.
    fn poll_msg(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<MsgBuf>>,
        recv: bool,
    ) -> Poll<io::Result<usize>> {
        let afd = self.fd.registered()?;
        let Some(m) = msg.as_mut() else {
            return Poll::Ready(Err(io::Error::other("no datagram buffer")));
        };
        loop {
            let mut guard = if recv {
                ready!(afd.poll_read_ready(cx))?
            } else {
                ready!(afd.poll_write_ready(cx))?
            };
            if recv {
                m.rearm_recv();
            }
            match guard.try_io(|fd| {
                let fd = fd.as_raw_fd();
                // SAFETY: `m.hdr()` describes this MsgBuf's own live buffers
                // (writable for a receive).
                sys::cvt_isize(unsafe {
                    if recv {
                        libc::recvmsg(fd, m.hdr(), libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT)
                    } else {
                        libc::sendmsg(fd, m.hdr(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
                    }
                })
            }) {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

struct Pidfd(RawFd);

impl AsRawFd for Pidfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Waits for a pidfd to become readable (the process exited) on tokio's reactor.
#[derive(Default)]
pub(crate) struct EpollWait {
    pidfd: Option<RuntimeFd<Pidfd>>,
}

impl EpollWait {
    /// Ready once the process behind `pidfd` has exited (not yet reaped).
    ///
    /// The caller keeps `pidfd` open for as long as this waiter exists, and
    /// passes the same one to every call.
    pub(crate) fn poll_exited(
        &mut self,
        cx: &mut Context<'_>,
        pidfd: RawFd,
    ) -> Poll<io::Result<()>> {
        let fd = self.pidfd.get_or_insert_with(|| {
            // SAFETY: the owner of this waiter keeps `pidfd` open while the
            // waiter exists (it is dropped before the pidfd in `Process`).
            unsafe { RuntimeFd::new_unchecked(Pidfd(pidfd), Interest::READABLE) }
        });
        let afd = fd.registered()?;
        let _guard = ready!(afd.poll_read_ready(cx))?;
        // A pidfd stays readable once the process has exited; nothing to clear.
        Poll::Ready(Ok(()))
    }
}
