//! The operations handles own: pipe reads and writes, datagrams with fds on
//! a socket, and waiting for a child's exit.
//!
//! **Operations follow handles.** An operation belongs to the ring it was
//! submitted on, but a handle can move: to another task on another thread,
//! to another runtime, off a thread that then exits. When a handle polls an
//! operation that sits on another thread's ring, that ring is asked to cancel
//! it; whatever the operation did before the cancellation took hold is kept
//! (bytes read land in the decoder's buffer, bytes written advance the
//! encoder), and an `ECANCELED` completion — from that request, or from the
//! kernel cancelling the requests of a thread that exited — means "not done":
//! the operation is submitted again on the ring of the thread polling now.
//! A cancellation the handle did not ask for is never reported as an error.

use super::ring::{Keep, Ring, SigInfo};
use crate::backend::msg::{MsgBuf, Settled};
use crate::framing::{Decoder, Encoder};
use crate::sys;
use io_uring::{opcode, squeue, types};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

/// The kernel caps one read or write at about 2 GiB; stay well below it.
const MAX_IO: usize = 1 << 30;

struct Op {
    ring: Arc<Ring>,
    id: usize,
    /// Cancel (rather than let finish) when the owner goes away.
    cancel_on_drop: bool,
    /// The handle moved off `ring`'s thread and asked `ring` to cancel this
    /// operation; its completion ends the move.
    moving: bool,
}

/// At most one operation in flight, owned by a handle rather than by the
/// future that started it.
#[derive(Default)]
struct OpSlot {
    op: Option<Op>,
}

/// What a finished operation reports.
enum Outcome {
    /// The kernel's result and what the operation kept.
    Done(i32, Keep),
    /// Cancelled without effect (moved handle, exited thread): start it
    /// again on the current thread's ring; the buffer comes back.
    Restart(Keep),
}

impl OpSlot {
    fn start(
        &mut self,
        entry: squeue::Entry,
        keep: Keep,
        fd: Option<Arc<OwnedFd>>,
        cancel_on_drop: bool,
    ) -> Result<(), (io::Error, Keep)> {
        let ring = match Ring::current() {
            Ok(ring) => ring,
            Err(e) => return Err((e, keep)),
        };
        let id = ring.submit(entry, keep, fd)?;
        self.op = Some(Op {
            ring,
            id,
            cancel_on_drop,
            moving: false,
        });
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Outcome>> {
        let op = self.op.as_mut().expect("an operation is in flight");
        if !op.moving && !op.ring.is_current() {
            op.ring.cancel(op.id)?;
            op.moving = true;
        }
        let (res, keep) = ready!(op.ring.poll(op.id, cx))?;
        self.op = None;
        Poll::Ready(Ok(if res == -libc::ECANCELED {
            Outcome::Restart(keep)
        } else {
            Outcome::Done(res, keep)
        }))
    }
}

impl OpSlot {
    /// Whether the operation in flight has completed (reaping if needed).
    fn is_done(&self) -> bool {
        self.op.as_ref().is_some_and(|op| op.ring.is_done(op.id))
    }
}

impl Drop for OpSlot {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            op.ring.orphan(op.id, op.cancel_on_drop);
        }
    }
}

/// Whether `e` says the fd does not take `RWF_NOWAIT` (an fd of another
/// kind, or a pipe on an older kernel).
fn refuses_nowait(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL))
}

/// Whether `e` says "not now" (an empty or full pipe, or a signal): the
/// ring waits instead.
fn would_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// A pipe end on the uring backend.
pub(crate) struct UringIo {
    /// Shared with the slot of the operation in flight, so the fd stays open
    /// until the kernel is done with it even if this handle goes away.
    fd: Arc<OwnedFd>,
    slot: OpSlot,
    /// Reads and writes may go straight to the pipe (see
    /// [`UringIo::poll_read`] and [`UringIo::poll_write`]); false once the fd
    /// refused `RWF_NOWAIT`.
    nowait: bool,
    /// The last read found data at once: the next one tries the pipe
    /// directly before it goes through the ring.
    read_hint: bool,
}

impl UringIo {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<UringIo> {
        // A nonblocking fd would make io_uring return EAGAIN instead of
        // waiting for the pipe, so uring ends are blocking.
        sys::set_nonblocking(fd.as_raw_fd(), false)?;
        Ok(UringIo {
            fd: Arc::new(fd),
            slot: OpSlot::default(),
            nowait: true,
            read_hint: false,
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// For handing the fd to a child: stops the operation in flight, if any,
    /// and returns its result with the bytes of its buffer (for a read: the
    /// buffer up to what the kernel wrote; for a write: the whole buffer).
    pub(crate) fn settle(&self) -> io::Result<Option<(i32, Vec<u8>)>> {
        let Some(op) = &self.slot.op else {
            return Ok(None);
        };
        op.ring.settle(op.id)?;
        Ok(Some(op.ring.peek(op.id, |res, keep| {
            let bytes = match keep {
                Keep::Read(buf) => {
                    let extra = res.max(0) as usize;
                    // SAFETY: the kernel initialised `extra` bytes right after
                    // `buf.len()`, inside the capacity `reserve` made.
                    unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len() + extra) }.to_vec()
                }
                Keep::Write(buf) => buf.clone(),
                _ => Vec::new(),
            };
            (res, bytes)
        })))
    }

    /// One `preadv2(RWF_NOWAIT)` into `dec`'s spare room, committed on
    /// success; only while no operation is in flight (none writes to the
    /// decoder then).
    #[inline]
    fn read_now(&self, dec: &mut Decoder) -> io::Result<usize> {
        debug_assert!(self.slot.op.is_none());
        let (ptr, len) = dec.reserve();
        // SAFETY: `reserve` returned `len` writable bytes at `ptr`, and no
        // operation in flight writes to the decoder.
        let n = unsafe { sys::read_nowait(self.fd.as_raw_fd(), ptr, len.min(MAX_IO)) }?;
        // SAFETY: the kernel initialised `n <= len` bytes.
        unsafe { dec.commit(n) };
        Ok(n)
    }

    /// Reads into `dec`. A read on an empty pipe goes through the ring, which
    /// wakes this task when data comes. When the last read found data at
    /// once (a busy receiver, its peer ahead of it), the pipe is tried
    /// directly first with `preadv2(RWF_NOWAIT)`: a ring read that completes
    /// at once costs a submission, a completion and a wake-up of this
    /// thread's reactor through the ring fd on top of the same copy. A
    /// guess that misses costs one `EAGAIN`, and the next read skips it.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut Decoder,
    ) -> Poll<io::Result<usize>> {
        if self.slot.op.is_none() && self.read_hint && self.nowait {
            match self.read_now(dec) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if refuses_nowait(&e) => self.nowait = false,
                // Empty (or a signal, or an error the ring's read reports
                // too): the ring.
                Err(_) => {}
            }
            self.read_hint = false;
        }
        let mut submitted_now = false;
        loop {
            if self.slot.op.is_none() {
                submitted_now = true;
                let (ptr, len) = dec.reserve();
                let entry =
                    opcode::Read::new(types::Fd(self.fd.as_raw_fd()), ptr, len.min(MAX_IO) as u32)
                        .offset(u64::MAX)
                        .build();
                // The buffer moves into the slot; its heap memory (where
                // `ptr` points) does not move with it.
                let keep = Keep::Read(dec.take_buf());
                if let Err((e, keep)) = self.slot.start(entry, keep, Some(self.fd.clone()), true) {
                    if let Keep::Read(buf) = keep {
                        dec.put_buf(buf);
                    }
                    return Poll::Ready(Err(e));
                }
            }
            let (res, keep) = match ready!(self.slot.poll(cx))? {
                Outcome::Done(res, keep) => (res, keep),
                Outcome::Restart(keep) => {
                    if let Keep::Read(buf) = keep {
                        dec.put_buf(buf);
                    }
                    continue;
                }
            };
            if let Keep::Read(buf) = keep {
                dec.put_buf(buf);
            }
            if res < 0 {
                return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
            }
            // Completed in the poll that submitted it: the data was there.
            self.read_hint = submitted_now && res > 0;
            // SAFETY: the kernel wrote `res` bytes into the region `reserve` returned.
            unsafe { dec.commit(res as usize) };
            return Poll::Ready(Ok(res as usize));
        }
    }

    /// Busy polling. With no read in flight, spins on a non-blocking
    /// `preadv2(RWF_NOWAIT)` until data (or end of stream) is there or
    /// `budget` runs out. A read armed on an empty pipe would complete
    /// through task work that the kernel delivers with an inter-processor
    /// interrupt, several microseconds in a VM (measured: 16 µs round trips
    /// with the armed read, under 10 µs reading directly). When the budget
    /// runs out the read is submitted as usual and the task parks. A read
    /// already in flight (from an earlier poll) is watched on the completion
    /// queue instead.
    pub(crate) fn poll_read_spinning(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut Decoder,
        budget: std::time::Duration,
    ) -> Poll<io::Result<usize>> {
        let deadline = std::time::Instant::now() + budget;
        if self.slot.op.is_none() {
            loop {
                match self.read_now(dec) {
                    Ok(n) => return Poll::Ready(Ok(n)),
                    Err(e) if would_wait(&e) && std::time::Instant::now() < deadline => {
                        std::hint::spin_loop()
                    }
                    // Out of budget, or no RWF_NOWAIT on this fd
                    // (EOPNOTSUPP), or an error the ring's read reports too.
                    Err(_) => return self.poll_read(cx, dec),
                }
            }
        }
        // A read in flight (from an earlier poll, maybe on another thread):
        // poll it once first, which registers this task's waker and restarts
        // an operation that moved; spinning without it would leave the
        // wake-up with the old task.
        if let Poll::Ready(r) = self.poll_read(cx, dec) {
            return Poll::Ready(r);
        }
        loop {
            if self.slot.is_done() {
                match self.poll_read(cx, dec) {
                    Poll::Ready(r) => return Poll::Ready(r),
                    // A moved operation was restarted here.
                    Poll::Pending => {}
                }
            }
            if std::time::Instant::now() >= deadline {
                return Poll::Pending;
            }
            std::hint::spin_loop();
        }
    }

    /// Writes what `enc` holds. While the pipe has room, the write is a
    /// `pwritev2(RWF_NOWAIT)` of its own: the kernel does the same copy as an
    /// io_uring write issued inline, without the submission, the completion
    /// and the ring fd's wake-up of this thread's reactor that a ring write
    /// costs (harness scenario 2c, 64 channels on one core: about 1.1x the
    /// messages/s, up to 1.2x with the direct reads of `poll_read`; 64 KiB one-way
    /// about 1.35x). Only a write that would wait for room goes through the
    /// ring.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        enc: &mut Encoder,
    ) -> Poll<io::Result<usize>> {
        if self.slot.op.is_none() && self.nowait {
            let pending = enc.pending();
            let len = crate::framing::write_len(pending.len()).min(MAX_IO);
            match sys::write_nowait(self.fd.as_raw_fd(), &pending[..len]) {
                Ok(n) => {
                    enc.advance(n);
                    return Poll::Ready(Ok(n));
                }
                // No room (or a signal): the ring waits for room.
                Err(e) if would_wait(&e) => {}
                // An fd that does not take RWF_NOWAIT: the ring for good.
                Err(e) if refuses_nowait(&e) => self.nowait = false,
                // What the ring's write would report too (EPIPE, ...).
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        loop {
            if self.slot.op.is_none() {
                let (buf, pos) = enc.take_buf();
                let len = crate::framing::write_len(buf.len() - pos).min(MAX_IO);
                // SAFETY: `pos <= buf.len()`, so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_ptr().add(pos) };
                let entry = opcode::Write::new(types::Fd(self.fd.as_raw_fd()), ptr, len as u32)
                    .offset(u64::MAX)
                    .build();
                // Writes are left to finish if the handle goes away: bytes
                // handed to the kernel are still delivered.
                let keep = Keep::Write(buf);
                if let Err((e, keep)) = self.slot.start(entry, keep, Some(self.fd.clone()), false) {
                    if let Keep::Write(buf) = keep {
                        enc.put_buf(buf);
                    }
                    return Poll::Ready(Err(e));
                }
            }
            let (res, keep) = match ready!(self.slot.poll(cx))? {
                Outcome::Done(res, keep) => (res, keep),
                Outcome::Restart(keep) => {
                    if let Keep::Write(buf) = keep {
                        enc.put_buf(buf);
                    }
                    continue;
                }
            };
            if let Keep::Write(buf) = keep {
                enc.put_buf(buf);
            }
            if res < 0 {
                return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
            }
            enc.advance(res as usize);
            return Poll::Ready(Ok(res as usize));
        }
    }

    /// For `Drop` of a sender: if nothing is in flight, write what the pipe
    /// takes without blocking (the fd is switched to nonblocking mode for
    /// good; it is about to be closed).
    pub(crate) fn write_now(&mut self, enc: &mut Encoder) {
        if self.slot.op.is_some() || enc.pending().is_empty() {
            return;
        }
        let fd = self.fd.as_raw_fd();
        if sys::set_nonblocking(fd, true).is_err() {
            return;
        }
        while !enc.pending().is_empty() {
            match sys::write(fd, enc.pending()) {
                Ok(n) => enc.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }
}

/// Waits for a child's exit with IORING_OP_WAITID on a pidfd (which also reaps it).
#[derive(Default)]
pub(crate) struct UringWait {
    slot: OpSlot,
}

impl UringWait {
    /// Whether a waitid is submitted and not yet reaped.
    pub(crate) fn in_flight(&self) -> bool {
        self.slot.op.is_some()
    }

    /// `(exited normally, code or signal)` once the process is gone.
    ///
    /// The caller keeps `pidfd` open for as long as this waiter exists (the
    /// kernel resolves it when the waitid is issued).
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        pidfd: RawFd,
    ) -> Poll<io::Result<(bool, i32)>> {
        loop {
            if self.slot.op.is_none() {
                // SAFETY: a zeroed siginfo_t is a valid value for the kernel to fill.
                let info = Box::new(SigInfo(unsafe { std::mem::zeroed() }));
                let entry = opcode::WaitId::new(libc::P_PIDFD, pidfd as libc::id_t, libc::WEXITED)
                    .infop(&info.0 as *const libc::siginfo_t)
                    .build();
                if let Err((e, _)) = self.slot.start(entry, Keep::SigInfo(info), None, true) {
                    return Poll::Ready(Err(e));
                }
            }
            let (res, keep) = match ready!(self.slot.poll(cx))? {
                Outcome::Done(res, keep) => (res, keep),
                // A cancelled waitid reaped nothing: wait again here.
                Outcome::Restart(_) => continue,
            };
            if res < 0 {
                return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
            }
            return match keep {
                Keep::SigInfo(info) => Poll::Ready(Ok(sys::decode_siginfo(&info.0))),
                _ => Poll::Ready(Err(io::Error::other("waitid completion without siginfo"))),
            };
        }
    }
}

/// A `SOCK_SEQPACKET` socket on the uring backend: one datagram (with fds)
/// per `SENDMSG` or `RECVMSG`.
pub(crate) struct UringSock {
    /// Shared with the operation in flight (see [`UringIo`]).
    fd: Arc<OwnedFd>,
    slot: OpSlot,
}

impl UringSock {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<UringSock> {
        // As for pipes: a nonblocking socket would make the ring return
        // EAGAIN instead of waiting.
        sys::set_nonblocking(fd.as_raw_fd(), false)?;
        Ok(UringSock {
            fd: Arc::new(fd),
            slot: OpSlot::default(),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Sends the datagram in `msg` (with the ring while in flight; back in
    /// `msg` when this returns). A send whose handle goes away is left to
    /// finish: the datagram and its fds stay with the ring.
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<MsgBuf>>,
    ) -> Poll<io::Result<usize>> {
        self.poll_msg(cx, msg, false)
    }

    /// Receives one datagram into `msg` (the buffer is with the ring while
    /// in flight and back in `msg` when this returns `Ready`); `Ok(n)` is its
    /// length, 0 at end of stream.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<MsgBuf>>,
    ) -> Poll<io::Result<usize>> {
        self.poll_msg(cx, msg, true)
    }

    /// One SENDMSG or RECVMSG, started here unless one is in flight (from an
    /// earlier poll, maybe on another thread's ring: then it moves here).
    /// Receives are cancelled if the handle goes away (a pending one would
    /// swallow a datagram); sends are left to finish.
    fn poll_msg(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<MsgBuf>>,
        recv: bool,
    ) -> Poll<io::Result<usize>> {
        loop {
            if self.slot.op.is_none() {
                let Some(mut m) = msg.take() else {
                    return Poll::Ready(Err(io::Error::other("no datagram buffer")));
                };
                let fd = types::Fd(self.fd.as_raw_fd());
                let entry = if recv {
                    m.rearm_recv();
                    opcode::RecvMsg::new(fd, m.hdr())
                        .flags(libc::MSG_CMSG_CLOEXEC as u32)
                        .build()
                } else {
                    opcode::SendMsg::new(fd, m.hdr())
                        .flags(libc::MSG_NOSIGNAL as u32)
                        .build()
                };
                if let Err((e, keep)) =
                    self.slot
                        .start(entry, Keep::Msg(m), Some(self.fd.clone()), recv)
                {
                    if let Keep::Msg(m) = keep {
                        *msg = Some(m);
                    }
                    return Poll::Ready(Err(e));
                }
            }
            let (res, keep, restart) = match ready!(self.slot.poll(cx))? {
                Outcome::Done(res, keep) => (res, keep, false),
                Outcome::Restart(keep) => (0, keep, true),
            };
            if let Keep::Msg(m) = keep {
                *msg = Some(m);
            }
            if restart {
                continue;
            }
            if res < 0 {
                return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
            }
            return Poll::Ready(Ok(res as usize));
        }
    }

    /// Whether an operation (a send left by a dropped future) is in flight.
    pub(crate) fn in_flight(&self) -> bool {
        self.slot.op.is_some()
    }

    /// For a hand-over: stops the operation in flight, if any, and says
    /// what it left (see [`Settled`]).
    pub(crate) fn settle(&mut self) -> io::Result<Option<Settled>> {
        let Some(op) = self.slot.op.take() else {
            return Ok(None);
        };
        op.ring.settle(op.id)?;
        let (res, keep) = op.ring.take(op.id);
        Ok(match keep {
            Keep::Msg(m) if m.is_recv() => Some(Settled::Received(res.max(0) as usize, m)),
            Keep::Msg(m) if res == -libc::ECANCELED => Some(Settled::Unsent(m)),
            _ => Some(Settled::Sent),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::os::fd::FromRawFd;

    /// A memfd, which refuses `RWF_NOWAIT` (pipes take it): a read or write
    /// tried directly first falls back to the ring, loses nothing, and the
    /// handle stops trying.
    #[test]
    fn an_fd_without_nowait_goes_through_the_ring() {
        if let Err(why) = super::super::probe() {
            eprintln!("SKIPPED on uring: the kernel refuses io_uring here: {why}");
            return;
        }
        // SAFETY: a valid C string and flags.
        let fd = unsafe { libc::memfd_create(c"nowait".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        let mut io = UringIo::new(fd).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut enc = Encoder::new(1024);
            enc.push(b"through the ring").unwrap();
            let frame = enc.pending().to_vec();
            let n = poll_fn(|cx| io.poll_write(cx, &mut enc)).await.unwrap();
            assert_eq!(n, frame.len());
            assert!(enc.pending().is_empty());
            assert!(!io.nowait, "the refusal is remembered");

            // SAFETY: lseek on an fd this test owns.
            assert_eq!(unsafe { libc::lseek(raw, 0, libc::SEEK_SET) }, 0);
            io.nowait = true;
            io.read_hint = true;
            let mut dec = crate::framing::Decoder::new(1024);
            let n = poll_fn(|cx| io.poll_read(cx, &mut dec)).await.unwrap();
            assert_eq!(n, frame.len());
            assert!(!io.nowait);
            let (_, range) = dec.next_any().unwrap().expect("the whole frame");
            assert_eq!(&dec.buffer()[range], b"through the ring");
        });
    }
}
