//! The sending machinery shared by typed and bytes senders: frames queued
//! in the encoder, arena slots for large messages, bounded queueing of
//! cancelled sends, flushing.

use crate::arena::{Descriptor, SendArena};
use crate::backend::{Backend, Io};
use crate::error::{Error, ErrorKind, Result};
use crate::framing::{Encoder, FrameKind};
use crate::message::{Encode, Scratch, SlotWriter, Spill, encode_with};
use crate::sys;
use rkyv::rancor;
use std::future::poll_fn;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, ready};

/// What a frame carries: a message to serialize, or bytes serialized
/// already; written through a `SlotWriter` (which spills into an arena slot
/// past the threshold) or inline into the encoder's buffer.
trait Payload {
    fn write(&self, w: SlotWriter<'_>, scratch: &mut Scratch) -> Result<()>;
    fn inline(&self, buf: &mut Vec<u8>, scratch: &mut Scratch) -> Result<()>;
    /// The payload's size, if known before it is written.
    fn size(&self) -> Option<usize>;
}

struct Archive<'a, T>(&'a T);

impl<T: Encode> Payload for Archive<'_, T> {
    #[inline]
    fn write(&self, w: SlotWriter<'_>, scratch: &mut Scratch) -> Result<()> {
        encode_with(self.0, w, scratch)
    }

    #[inline]
    fn inline(&self, buf: &mut Vec<u8>, scratch: &mut Scratch) -> Result<()> {
        encode_with(self.0, buf, scratch)
    }

    #[inline]
    fn size(&self) -> Option<usize> {
        None
    }
}

struct Bytes<'a>(&'a [u8]);

impl Payload for Bytes<'_> {
    fn write(&self, mut w: SlotWriter<'_>, _: &mut Scratch) -> Result<()> {
        rkyv::ser::Writer::<rancor::BoxedError>::write(&mut w, self.0)
            .map_err(crate::message::serialize_error)
    }

    fn inline(&self, buf: &mut Vec<u8>, _: &mut Scratch) -> Result<()> {
        buf.extend_from_slice(self.0);
        Ok(())
    }

    #[inline]
    fn size(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

/// `feed` flushes by itself once this many bytes are queued, and a `send` or
/// `feed` that finds this many queued writes them before it queues its own
/// frame: a future dropped while it waits has queued nothing, so however
/// many sends are cancelled, a sender holds at most this much plus one frame.
const FEED_HIGH_WATER: usize = 256 * 1024;

fn too_large(len: usize, max: usize) -> Error {
    Error::new(
        ErrorKind::FrameTooLarge,
        format!("send: message of {len} bytes exceeds the limit of {max} bytes"),
    )
}

/// The sending machinery shared by typed and bytes senders.
pub(crate) struct SendHalf {
    pub(crate) io: Io,
    pub(crate) enc: Encoder,
    pub(super) closed: bool,
    /// The channel's arena, if it has one.
    pub(crate) arena: Option<SendArena>,
    /// Handed to a child: this copy must not write on drop.
    pub(crate) moved: std::sync::atomic::AtomicBool,
    /// rkyv's scratch memory for this sender's messages.
    scratch: Scratch,
}

impl SendHalf {
    pub(crate) fn new(fd: OwnedFd, backend: Backend, max_frame: usize) -> Result<SendHalf> {
        sys::ignore_sigpipe();
        Ok(SendHalf {
            io: Io::new(fd, backend)?,
            enc: Encoder::new(max_frame),
            closed: false,
            arena: None,
            moved: Default::default(),
            scratch: Scratch::default(),
        })
    }

    pub(crate) fn resumed(io: Io, enc: Encoder) -> SendHalf {
        sys::ignore_sigpipe();
        SendHalf {
            io,
            enc,
            closed: false,
            arena: None,
            moved: Default::default(),
            scratch: Scratch::default(),
        }
    }

    #[inline]
    pub(super) fn push(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<()> {
        if self.closed {
            return Err(Error::new(ErrorKind::Closed, "send"));
        }
        self.enc.push_with(fill, too_large)
    }

    /// Queues `payload` inline, as one data frame in the encoder's buffer.
    #[inline]
    fn push_inline<P: Payload>(&mut self, payload: &P) -> Result<()> {
        if self.closed {
            return Err(Error::new(ErrorKind::Closed, "send"));
        }
        let scratch = &mut self.scratch;
        self.enc
            .push_with(|buf| payload.inline(buf, scratch), too_large)
    }

    /// Queues one typed message: through the arena when it has one and the
    /// archive reaches the threshold, else inline. Waits (before queueing
    /// anything, so a dropped future queues nothing) while the arena is too
    /// full.
    /// Returns whether the message went through the arena.
    #[inline]
    pub(super) async fn push_message<T: Encode>(&mut self, value: &T) -> Result<bool> {
        self.push_payload(&Archive(value)).await
    }

    /// Queues bytes already serialized (a pool job's frame) as one frame:
    /// into an arena slot when the channel has an arena and they reach its
    /// threshold (one copy, instead of two through the pipe), else inline.
    /// The bytes must be what the receiver expects at a 16-byte-aligned
    /// address: a slot is 4 KiB aligned. Waits as `push_message`.
    pub(crate) async fn push_bytes(&mut self, bytes: &[u8]) -> Result<bool> {
        self.push_payload(&Bytes(bytes)).await
    }

    #[inline]
    async fn push_payload<P: Payload>(&mut self, payload: &P) -> Result<bool> {
        // `wait_room`, spelled out: this generic path is compiled in the
        // caller's crate, where a call to a small async fn of this one is
        // not inlined and costs a small message a few percent.
        if self.at_high_water() {
            self.flush().await?;
        }
        if self.arena.is_none() {
            return self.push_inline(payload).map(|()| false);
        }
        loop {
            let seq = self.arena.as_ref().map_or(0, |a| a.next_seq);
            match self.try_push_arena(payload)? {
                None => return Ok(self.arena.as_ref().is_some_and(|a| a.next_seq != seq)),
                Some(tried) => {
                    // The receiver can only free slots whose descriptors it
                    // has read: write what is queued, then wait.
                    self.flush().await?;
                    let arena = self.arena.as_mut().expect("has an arena");
                    if let Err(e) = poll_fn(|cx| arena.poll_space(cx, tried)).await {
                        if e.kind() == ErrorKind::Protocol {
                            self.closed = true;
                        }
                        return Err(e);
                    }
                }
            }
        }
    }

    /// One attempt: `Ok(None)` when queued, `Ok(Some(n))` when the arena's
    /// largest free extent (n bytes) was too small.
    #[inline]
    fn try_push_arena<P: Payload>(&mut self, payload: &P) -> Result<Option<usize>> {
        if self.closed {
            return Err(Error::new(ErrorKind::Closed, "send"));
        }
        let arena = self.arena.as_mut().expect("has an arena");
        // With nothing lent there is nothing to take back, and a stream of
        // small messages must not read the shared free-ring head per send
        // (in profiles of 64 B one-way that load was a third of the
        // arena's cost on the sender).
        if !arena.slots.all_free()
            && let Err(e) = arena.reclaim()
        {
            self.closed = true;
            return Err(e);
        }
        let extent = arena.slots.largest();
        let mut spill = Spill {
            data: arena.arena.data_ptr(0),
            extent,
            threshold: arena.threshold,
            written: 0,
            spilled: false,
            overflow: None,
        };
        let seq = arena.next_seq;
        // While this sender's archives stay small, serialize with the plain
        // frame-buffer writer, as a channel without an arena does: through
        // the `SlotWriter`, rkyv's generic serializer costs a 64 B message
        // about a quarter more CPU (measured: docs/performance.md, "Small
        // messages"). An archive that turns out to reach the threshold is
        // then copied into a slot (one memcpy), and the sender switches to
        // the `SlotWriter`, which writes large archives straight into the
        // arena, until an archive is small again. Bytes of a known size
        // take the right path at once.
        let small = match payload.size() {
            Some(n) => n < arena.threshold,
            None => arena.small,
        };
        let scratch = &mut self.scratch;
        let pushed = self.enc.push_kind_with(
            |buf| {
                if small {
                    let start = buf.len();
                    payload.inline(buf, scratch)?;
                    let n = buf.len() - start;
                    if n < spill.threshold {
                        return Ok(FrameKind::Data);
                    }
                    if !spill.move_in(buf, start, n) {
                        return Err(Error::new(
                            ErrorKind::Serialize,
                            "message does not fit in the free arena space",
                        ));
                    }
                } else {
                    payload.write(SlotWriter::new(&mut *buf, Some(&mut spill)), scratch)?;
                    if !spill.spilled {
                        return Ok(FrameKind::Data);
                    }
                }
                let (offset, _) = spill.extent.expect("spilled into an extent");
                let d = Descriptor {
                    offset: offset as u64,
                    len: spill.written as u64,
                    seq,
                };
                buf.extend_from_slice(&d.encode());
                Ok(FrameKind::Arena)
            },
            too_large,
        );
        let arena = self.arena.as_mut().expect("has an arena");
        arena.small = pushed.is_ok() && !spill.spilled;
        match pushed {
            Ok(()) => {
                if spill.spilled {
                    let (offset, _) = spill.extent.expect("spilled into an extent");
                    let taken = arena.slots.take(offset, spill.written, seq);
                    debug_assert!(taken);
                    arena.next_seq += 1;
                }
                Ok(None)
            }
            Err(_) if spill.overflow.is_some() => {
                let need = spill.overflow.unwrap_or(0);
                if arena.slots.all_free() || need > arena.arena.data_len() {
                    // Larger than the whole arena: inline over the pipe.
                    self.push_inline(payload)?;
                    return Ok(None);
                }
                Ok(Some(extent.map_or(0, |(_, l)| l)))
            }
            Err(e) => Err(e),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        while self.enc.has_pending() {
            if self.closed {
                return Poll::Ready(Err(Error::new(ErrorKind::Closed, "send")));
            }
            match ready!(self.io.poll_write(cx, &mut self.enc)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // The reader is gone (EPIPE) or the fd broke: later sends fail fast.
                    self.closed = true;
                    return Poll::Ready(Err(Error::io("send", e)));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    pub(super) async fn flush(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Whether the queued bytes reached the high-water mark: write them
    /// (`flush`) before queueing a frame, and after `feed` queued one.
    #[inline]
    pub(super) fn at_high_water(&self) -> bool {
        self.enc.queued() >= FEED_HIGH_WATER
    }

    /// Writes the queue if it reached the high-water mark. Call it before
    /// queueing a frame (dropped while it waits, nothing was queued) and
    /// after `feed` queued one.
    pub(super) async fn wait_room(&mut self) -> Result<()> {
        if self.at_high_water() {
            self.flush().await?;
        }
        Ok(())
    }

    pub(crate) fn backend(&self) -> Backend {
        self.io.backend()
    }
}

impl Drop for SendHalf {
    fn drop(&mut self) {
        // A send future dropped mid-write leaves bytes queued; finish them if
        // the pipe has room right now. Drop never blocks.
        if !self.closed && self.enc.has_pending() && !*self.moved.get_mut() {
            self.io.write_now(&mut self.enc);
        }
    }
}
