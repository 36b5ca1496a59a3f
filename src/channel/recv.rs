//! The receiving machinery shared by typed and bytes receivers: reads
//! through the backend into the decoder, frames, arena descriptors, the
//! copy-out of untrusted slots, and busy polling.

use crate::arena::{Descriptor, Held, RecvArena};
use crate::backend::{Backend, Io};
use crate::error::{Error, ErrorKind, Result};
use crate::framing::{Decoder, FrameError, FrameKind};
use crate::message::{SlotGuard, Storage};
use rkyv::util::AlignedVec;
use std::future::poll_fn;
use std::io;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

fn frame_error(op: &'static str, e: FrameError) -> Error {
    let kind = match e {
        FrameError::TooLarge { .. } => ErrorKind::FrameTooLarge,
        FrameError::Protocol(_) | FrameError::UnknownVersion(_) => ErrorKind::Protocol,
        FrameError::Truncated { .. } => ErrorKind::Truncated,
        FrameError::Closed => return Error::new(ErrorKind::Closed, op),
    };
    Error::new(kind, op).with_source(e)
}

/// The receiving machinery shared by typed and bytes receivers.
pub(crate) struct RecvHalf {
    pub(crate) io: Io,
    pub(crate) dec: Decoder,
    /// Set after an I/O error: later calls fail fast instead of reading a
    /// stream of unknown state.
    broken: bool,
    /// Spin budget before parking; `None` falls back to the thread's (an
    /// engine core's) default.
    pub(crate) busy_poll: Option<Duration>,
    /// Set after a bad arena descriptor: the stream cannot be trusted.
    poisoned: bool,
    /// The channel's arena, if it has one.
    pub(crate) arena: Option<Arc<RecvArena>>,
    /// Messages copied out of the arena (untrusted peer) land here.
    copy: AlignedVec<16>,
    /// The last `recv` lent an arena slot (saves a lock per small message).
    lent_current: bool,
}

/// A frame resolved to owned storage, for `recv_owned`.
pub(crate) enum OwnedFrame {
    Heap(AlignedVec<16>),
    Slot(SlotGuard),
}

impl OwnedFrame {
    pub(crate) fn into_storage(self) -> Storage {
        match self {
            OwnedFrame::Heap(v) => Storage::Heap(v),
            OwnedFrame::Slot(g) => Storage::Slot(g),
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        match self {
            OwnedFrame::Heap(v) => v,
            OwnedFrame::Slot(g) => g.bytes(),
        }
    }
}

impl RecvHalf {
    pub(crate) fn new(fd: OwnedFd, backend: Backend, max_frame: usize) -> Result<RecvHalf> {
        Ok(RecvHalf::resumed(
            Io::new(fd, backend)?,
            Decoder::new(max_frame),
        ))
    }

    pub(crate) fn resumed(io: Io, dec: Decoder) -> RecvHalf {
        RecvHalf {
            io,
            dec,
            broken: false,
            busy_poll: None,
            poisoned: false,
            arena: None,
            copy: AlignedVec::new(),
            lent_current: false,
        }
    }

    /// Polls for the next whole frame; returns its kind and payload range.
    /// Only a decoded frame leaves this function, so dropping the future
    /// between polls loses nothing: bytes read so far stay in the decoder,
    /// and a read in flight stays with the handle.
    #[inline]
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        spin: bool,
    ) -> Poll<Result<(FrameKind, Range<usize>)>> {
        // A data frame already buffered, inline; everything else (reads,
        // descriptors, errors) out of line.
        if !self.poisoned
            && let Some(payload) = self.dec.next_data_fast()
        {
            return Poll::Ready(Ok((FrameKind::Data, payload)));
        }
        self.poll_frame_slow(cx, spin)
    }

    fn poll_frame_slow(
        &mut self,
        cx: &mut Context<'_>,
        spin: bool,
    ) -> Poll<Result<(FrameKind, Range<usize>)>> {
        loop {
            if self.poisoned {
                return Poll::Ready(Err(Error::new(
                    ErrorKind::Protocol,
                    "recv after a bad arena descriptor",
                )));
            }
            match self.dec.next_any() {
                Ok(Some((FrameKind::Arena, _))) if self.arena.is_none() => {
                    self.poison();
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::Protocol,
                        "recv: arena descriptor on a channel without an arena",
                    )));
                }
                Ok(Some(f)) => return Poll::Ready(Ok(f)),
                Ok(None) => {}
                Err(e) => {
                    // A broken stream cannot be resynchronised: close our end
                    // so the writer sees EPIPE instead of blocking on a full pipe.
                    self.io.close();
                    return Poll::Ready(Err(frame_error("recv", e)));
                }
            }
            if self.broken {
                return Poll::Ready(Err(Error::new(
                    ErrorKind::Closed,
                    "recv after an I/O error",
                )));
            }
            let budget = self.busy_poll.or_else(crate::backend::thread_busy_poll);
            let read = match budget {
                Some(budget) if spin => {
                    ready!(self.io.poll_read_spinning(cx, &mut self.dec, budget))
                }
                _ => ready!(self.io.poll_read(cx, &mut self.dec)),
            };
            match read {
                Ok(0) => {
                    let e = self.dec.eof();
                    return Poll::Ready(Err(frame_error("recv", e)));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Polled outside a runtime: nothing was read, nothing is broken.
                Err(e) if crate::backend::reactor::is_no_runtime(&e) => {
                    return Poll::Ready(Err(Error::io("recv", e)));
                }
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Err(Error::io("recv", e)));
                }
            }
        }
    }

    fn poison(&mut self) {
        self.poisoned = true;
        self.io.close();
    }

    /// Gives back the slot of the message the previous `recv` lent (its
    /// borrow of the receiver has ended, so the message is gone).
    #[inline]
    fn release_current(&mut self) {
        if self.lent_current
            && let Some(a) = &self.arena
        {
            a.release_current();
        }
        self.lent_current = false;
    }

    /// Checks a descriptor and records its slot as held.
    fn accept(&mut self, r: Range<usize>) -> Result<(Arc<RecvArena>, Held)> {
        let arena = self.arena.clone().expect("checked in poll_frame");
        let held = Descriptor::decode(&self.dec.buffer()[r])
            .map_err(|e| frame_error("recv", e))
            .and_then(|d| arena.accept(&d));
        match held {
            Ok(h) => Ok((arena, h)),
            Err(e) => {
                self.poison();
                Err(e)
            }
        }
    }

    /// The payload of a frame: in the receive buffer, in the arena (read in
    /// place), or copied out of the arena (untrusted peer).
    #[inline]
    fn resolve(&mut self, kind: FrameKind, r: Range<usize>) -> Result<&[u8]> {
        if kind != FrameKind::Arena {
            return Ok(&self.dec.buffer()[r]);
        }
        self.resolve_slot(r)
    }

    fn resolve_slot(&mut self, r: Range<usize>) -> Result<&[u8]> {
        let (arena, held) = self.accept(r)?;
        if arena.in_place() {
            arena.set_current(held);
            self.lent_current = true;
            let arena = self.arena.as_ref().expect("has an arena");
            // SAFETY: the slot stays held (as "current") until the next call
            // on this receiver, which the returned borrow of `self` outlives
            // not; in-place mode means no other process can write it.
            Ok(unsafe { arena.bytes(&held) })
        } else {
            arena.copy_out(&held, &mut self.copy);
            arena.release(&held);
            Ok(&self.copy)
        }
    }

    pub(super) async fn frame(&mut self) -> Result<&[u8]> {
        self.release_current();
        let (k, r) = poll_fn(|cx| self.poll_frame(cx, true)).await?;
        self.resolve(k, r)
    }

    pub(super) async fn frame_timeout(&mut self, timeout: Duration) -> Result<&[u8]> {
        self.release_current();
        let (k, r) =
            match tokio::time::timeout(timeout, poll_fn(|cx| self.poll_frame(cx, true))).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::new(ErrorKind::TimedOut, "recv_timeout")),
            };
        self.resolve(k, r)
    }

    pub(super) fn try_frame(&mut self) -> Result<Option<&[u8]>> {
        self.release_current();
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_frame(&mut cx, false) {
            Poll::Ready(Ok((k, r))) => self.resolve(k, r).map(Some),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }

    pub(super) async fn owned_frame(&mut self) -> Result<OwnedFrame> {
        self.release_current();
        let (k, r) = poll_fn(|cx| self.poll_frame(cx, true)).await?;
        if k != FrameKind::Arena {
            let mut v = AlignedVec::with_capacity(r.len());
            v.extend_from_slice(&self.dec.buffer()[r]);
            return Ok(OwnedFrame::Heap(v));
        }
        let (arena, held) = self.accept(r)?;
        if arena.in_place() {
            Ok(OwnedFrame::Slot(SlotGuard { arena, held }))
        } else {
            let mut v = AlignedVec::new();
            arena.copy_out(&held, &mut v);
            arena.release(&held);
            Ok(OwnedFrame::Heap(v))
        }
    }

    /// Address range of the arena mapping, if this channel has one.
    pub(super) fn arena_span(&self) -> Option<Range<usize>> {
        self.arena.as_ref().map(|a| a.arena.range())
    }

    pub(crate) fn backend(&self) -> Backend {
        self.io.backend()
    }
}

impl Drop for RecvHalf {
    fn drop(&mut self) {
        if let Some(a) = &self.arena {
            a.release_current();
            a.close_notify();
        }
    }
}
