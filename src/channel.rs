//! Channels over pipes: typed [`Sender`]/[`Receiver`], [`Duplex`] pairs and
//! raw-bytes [`BytesSender`]/[`BytesReceiver`].
//!
//! Every handle is `Send` (it can move to another thread or into a child
//! process) and every operation takes `&mut self`, so two tasks can never
//! interleave frames on one handle: the compiler enforces what gipc checks at
//! run time with `GIPCLocked`.

use crate::arena::{self, ArenaConfig, Descriptor, Held, RecvArena, SendArena};
use crate::backend::{Backend, Io};
use crate::error::{Error, ErrorKind, Result};
use crate::framing::{DEFAULT_MAX_FRAME, DESCRIPTOR_LEN, Decoder, Encoder, FrameError, FrameKind};
use crate::message::{
    Decode, Encode, Message, OwnedMessage, SlotGuard, SlotWriter, Spill, Storage, encode_into,
};
use crate::sys;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use std::future::poll_fn;
use std::io;
use std::marker::PhantomData;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

/// `feed` flushes by itself once this many bytes are queued, and a `send` or
/// `feed` that finds this many queued writes them before it queues its own
/// frame: a future dropped while it waits has queued nothing, so however
/// many sends are cancelled, a sender holds at most this much plus one frame.
const FEED_HIGH_WATER: usize = 256 * 1024;

/// Options for new channels: backend, maximum frame size and the shared
/// arena that large messages travel through.
///
/// ```
/// use ringipc::{Backend, ChannelConfig};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let (mut tx, mut rx) = ChannelConfig::new()
///     .backend(Backend::Epoll)
///     .max_frame_size(1 << 20)
///     .pipe::<String>()?;
/// tx.send(&"hi".to_string()).await?;
/// assert_eq!(rx.recv().await?.as_str(), "hi");
/// # Ok::<(), ringipc::Error>(())
/// # }).unwrap();
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct ChannelConfig {
    backend: Backend,
    max_frame: usize,
    busy_poll: Option<Duration>,
    arena: Option<ArenaConfig>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig::new()
    }
}

static PROCESS_DEFAULT: Mutex<Option<ChannelConfig>> = Mutex::new(None);

impl ChannelConfig {
    /// The process default (see [`ChannelConfig::set_process_default`]); out
    /// of the box: process-default backend, 256 MiB maximum frame, and a
    /// 16 MiB arena for typed messages of 32 KiB and more.
    pub fn new() -> ChannelConfig {
        if let Some(cfg) = *PROCESS_DEFAULT.lock().unwrap_or_else(|p| p.into_inner()) {
            return cfg;
        }
        ChannelConfig::builtin()
    }

    /// The built-in defaults, whatever the process default says.
    pub fn builtin() -> ChannelConfig {
        ChannelConfig {
            backend: Backend::Auto,
            max_frame: DEFAULT_MAX_FRAME,
            busy_poll: None,
            arena: Some(ArenaConfig {
                size: arena::DEFAULT_ARENA,
                threshold: arena::DEFAULT_THRESHOLD,
                trusted: false,
            }),
        }
    }

    /// Makes this config what [`ChannelConfig::new`] (and so [`pipe`],
    /// [`duplex`], and the channels the process and pool layers create)
    /// returns from now on, in this process.
    pub fn set_process_default(self) {
        *PROCESS_DEFAULT.lock().unwrap_or_else(|p| p.into_inner()) = Some(self);
    }

    /// The backend for channels made from this config.
    pub fn backend(mut self, backend: Backend) -> ChannelConfig {
        self.backend = backend;
        self
    }

    /// Largest payload, in bytes, either end accepts. A receiver checks it
    /// before allocating; a sender refuses larger messages without writing.
    /// Messages that travel through the arena are bounded by its size instead.
    pub fn max_frame_size(mut self, bytes: usize) -> ChannelConfig {
        self.max_frame = bytes;
        self
    }

    /// Busy polling for receivers made from this config: a receive that
    /// finds nothing to read spins for up to `budget` (on the completion
    /// queue with io_uring, with nonblocking reads on epoll) before the task
    /// parks. It cuts the wake-up out of a request/response round trip at
    /// the price of a core spinning while it waits; off by default. See
    /// [`Receiver::set_busy_poll`] and docs/tuning.md.
    ///
    /// ```
    /// use std::time::Duration;
    /// let cfg = ringipc::ChannelConfig::new().busy_poll(Duration::from_micros(50));
    /// # let _ = cfg;
    /// ```
    pub fn busy_poll(mut self, budget: Duration) -> ChannelConfig {
        self.busy_poll = (!budget.is_zero()).then_some(budget);
        self
    }

    fn recv_half(&self, fd: OwnedFd, backend: Backend) -> Result<RecvHalf> {
        let mut half = RecvHalf::new(fd, backend, self.max_frame)?;
        half.busy_poll = self.busy_poll;
        Ok(half)
    }

    /// Turns the shared-memory arena of typed channels on or off (on by
    /// default). With it, a message whose archive reaches the threshold is
    /// serialized once into shared memory and the pipe carries a 32-byte
    /// descriptor; see docs/architecture.md ("Arena").
    pub fn arena(mut self, on: bool) -> ChannelConfig {
        self.arena = match (on, self.arena) {
            (false, _) => None,
            (true, Some(a)) => Some(a),
            (true, None) => ChannelConfig::builtin().arena,
        };
        self
    }

    /// Size of the arena in bytes (rounded up to 4 KiB; default 16 MiB).
    /// Memory is touched only as slots are used. A message larger than the
    /// arena travels inline over the pipe.
    pub fn arena_size(mut self, bytes: usize) -> ChannelConfig {
        let mut a = self
            .arena
            .or(ChannelConfig::builtin().arena)
            .expect("builtin arena");
        a.size = bytes.max(4096);
        self.arena = Some(a);
        self
    }

    /// Archives of at least this many bytes go through the arena (default
    /// 32 KiB); smaller ones stay inline.
    pub fn arena_threshold(mut self, bytes: usize) -> ChannelConfig {
        let mut a = self
            .arena
            .or(ChannelConfig::builtin().arena)
            .expect("builtin arena");
        a.threshold = bytes.max(1);
        self.arena = Some(a);
        self
    }

    /// Reads arena messages in place even after an end was handed to another
    /// process. By default a receiver whose channel crossed a process boundary
    /// copies each message out of the arena before validating it, because
    /// the peer could rewrite the bytes after validation.
    ///
    /// # Safety
    /// Every process that holds the other end (and every process it hands
    /// the end to) must be trusted not to write a slot after sending it:
    /// bytes that change after validation are undefined behaviour when read.
    pub unsafe fn arena_in_place_across_processes(mut self) -> ChannelConfig {
        let mut a = self
            .arena
            .or(ChannelConfig::builtin().arena)
            .expect("builtin arena");
        a.trusted = true;
        self.arena = Some(a);
        self
    }

    fn ends(&self) -> Result<(RecvHalf, SendHalf)> {
        let backend = self.backend.resolve()?;
        let (r, w) = sys::pipe().map_err(|e| Error::io("pipe2", e))?;
        let mut rh = self.recv_half(r, backend)?;
        let mut sh = SendHalf::new(w, backend, self.max_frame)?;
        if let Some(a) = &self.arena
            && self.max_frame >= DESCRIPTOR_LEN
        {
            let (s, r) = arena::pair(a)?;
            sh.arena = Some(s);
            rh.arena = Some(r);
        }
        Ok((rh, sh))
    }

    fn ends_inline(&self) -> Result<(RecvHalf, SendHalf)> {
        let backend = self.backend.resolve()?;
        let (r, w) = sys::pipe().map_err(|e| Error::io("pipe2", e))?;
        Ok((
            self.recv_half(r, backend)?,
            SendHalf::new(w, backend, self.max_frame)?,
        ))
    }

    /// A typed one-way channel.
    pub fn pipe<T>(&self) -> Result<(Sender<T>, Receiver<T>)> {
        let (r, w) = self.ends()?;
        Ok((Sender::from_half(w), Receiver::from_half(r)))
    }

    /// Two typed one-way channels, one each way: the first end sends `A`
    /// and receives `B`.
    pub fn duplex<A, B>(&self) -> Result<(Duplex<A, B>, Duplex<B, A>)> {
        let (a_tx, a_rx) = self.pipe::<A>()?;
        let (b_tx, b_rx) = self.pipe::<B>()?;
        Ok((Duplex { tx: a_tx, rx: b_rx }, Duplex { tx: b_tx, rx: a_rx }))
    }

    /// A raw-bytes one-way channel: frames carry `&[u8]`, no rkyv.
    pub fn bytes_pipe(&self) -> Result<(BytesSender, BytesReceiver)> {
        let (r, w) = self.ends_inline()?;
        Ok((BytesSender { half: w }, BytesReceiver { half: r }))
    }

    /// A raw-bytes channel with this config's arena, for the pool's result
    /// pipes: frames go out with [`BytesSender::feed_message`] and come in
    /// with [`BytesReceiver::recv_owned_frame`].
    pub(crate) fn bytes_pipe_with_arena(&self) -> Result<(BytesSender, BytesReceiver)> {
        let (r, w) = self.ends()?;
        Ok((BytesSender { half: w }, BytesReceiver { half: r }))
    }

    /// Adopts the read end of a pipe (or any stream fd) written in the wire
    /// format by another program. Use [`BytesReceiver::into_typed`] for rkyv
    /// messages.
    pub fn bytes_receiver(&self, fd: OwnedFd) -> Result<BytesReceiver> {
        Ok(BytesReceiver {
            half: self.recv_half(fd, self.backend)?,
        })
    }

    /// Adopts the write end of a pipe (or any stream fd) read by another program.
    pub fn bytes_sender(&self, fd: OwnedFd) -> Result<BytesSender> {
        Ok(BytesSender {
            half: SendHalf::new(fd, self.backend, self.max_frame)?,
        })
    }
}

/// A typed one-way channel on the process-default backend.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
/// struct Job { id: u32, name: String }
///
/// let (mut tx, mut rx) = ringipc::pipe::<Job>()?;
/// tx.send(&Job { id: 7, name: "seven".into() }).await?;
/// let msg = rx.recv().await?;
/// assert_eq!(msg.id, 7);               // read in place, no copy
/// assert_eq!(msg.name.as_str(), "seven");
/// assert_eq!(msg.deserialize()?, Job { id: 7, name: "seven".into() });
/// # Ok::<(), ringipc::Error>(())
/// # }).unwrap();
/// ```
pub fn pipe<T>() -> Result<(Sender<T>, Receiver<T>)> {
    ChannelConfig::new().pipe()
}

/// Two typed pipes, one each way, on the process-default backend.
pub fn duplex<A, B>() -> Result<(Duplex<A, B>, Duplex<B, A>)> {
    ChannelConfig::new().duplex()
}

/// A raw-bytes pipe on the process-default backend.
pub fn bytes_pipe() -> Result<(BytesSender, BytesReceiver)> {
    ChannelConfig::new().bytes_pipe()
}

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
    fn poll_frame(
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
    fn resolve(&mut self, kind: FrameKind, r: Range<usize>) -> Result<&[u8]> {
        if kind != FrameKind::Arena {
            return Ok(&self.dec.buffer()[r]);
        }
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

    async fn frame(&mut self) -> Result<&[u8]> {
        self.release_current();
        let (k, r) = poll_fn(|cx| self.poll_frame(cx, true)).await?;
        self.resolve(k, r)
    }

    async fn frame_timeout(&mut self, timeout: Duration) -> Result<&[u8]> {
        self.release_current();
        let (k, r) =
            match tokio::time::timeout(timeout, poll_fn(|cx| self.poll_frame(cx, true))).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::new(ErrorKind::TimedOut, "recv_timeout")),
            };
        self.resolve(k, r)
    }

    fn try_frame(&mut self) -> Result<Option<&[u8]>> {
        self.release_current();
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll_frame(&mut cx, false) {
            Poll::Ready(Ok((k, r))) => self.resolve(k, r).map(Some),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Ok(None),
        }
    }

    async fn owned_frame(&mut self) -> Result<OwnedFrame> {
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
    fn arena_span(&self) -> Option<Range<usize>> {
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

/// The sending machinery shared by typed and bytes senders.
pub(crate) struct SendHalf {
    pub(crate) io: Io,
    pub(crate) enc: Encoder,
    closed: bool,
    /// The channel's arena, if it has one.
    pub(crate) arena: Option<SendArena>,
    /// Handed to a child: this copy must not write on drop.
    pub(crate) moved: std::sync::atomic::AtomicBool,
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
        }
    }

    fn push(&mut self, fill: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<()> {
        if self.closed {
            return Err(Error::new(ErrorKind::Closed, "send"));
        }
        self.enc.push_with(fill, |len, max| {
            Error::new(
                ErrorKind::FrameTooLarge,
                format!("send: message of {len} bytes exceeds the limit of {max} bytes"),
            )
        })
    }

    /// Queues one typed message: through the arena when it has one and the
    /// archive reaches the threshold, else inline. Waits (before queueing
    /// anything, so a dropped future queues nothing) while the arena is too
    /// full.
    /// Returns whether the message went through the arena.
    async fn push_message<T: Encode>(&mut self, value: &T) -> Result<bool> {
        self.wait_room().await?;
        if self.arena.is_none() {
            return self.push(|buf| encode_into(value, buf)).map(|()| false);
        }
        loop {
            let seq = self.arena.as_ref().map_or(0, |a| a.next_seq);
            match self.try_push_arena(value)? {
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
    fn try_push_arena<T: Encode>(&mut self, value: &T) -> Result<Option<usize>> {
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
        let pushed = self.enc.push_kind_with(
            |buf| {
                let w = SlotWriter::new(&mut *buf, Some(&mut spill));
                rkyv::api::high::to_bytes_in::<_, rancor::BoxedError>(value, w)
                    .map(drop)
                    .map_err(crate::message::serialize_error)?;
                if !spill.spilled {
                    return Ok(FrameKind::Data);
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
            |len, max| {
                Error::new(
                    ErrorKind::FrameTooLarge,
                    format!("send: message of {len} bytes exceeds the limit of {max} bytes"),
                )
            },
        );
        let arena = self.arena.as_mut().expect("has an arena");
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
                    self.push(|buf| encode_into(value, buf))?;
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

    async fn flush(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_flush(cx)).await
    }

    /// Waits, writing, until the queue is below the high-water mark. Call it
    /// before queueing a frame: dropped while it waits, nothing was queued.
    async fn wait_room(&mut self) -> Result<()> {
        if self.enc.queued() >= FEED_HIGH_WATER {
            self.flush().await?;
        }
        Ok(())
    }

    async fn feed_flush(&mut self) -> Result<()> {
        if self.enc.queued() >= FEED_HIGH_WATER {
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

/// The sending end of a typed channel.
pub struct Sender<T> {
    pub(crate) half: SendHalf,
    _t: PhantomData<fn(&T)>,
}

/// The receiving end of a typed channel.
pub struct Receiver<T> {
    pub(crate) half: RecvHalf,
    _t: PhantomData<fn() -> T>,
}

impl<T> Sender<T> {
    pub(crate) fn from_half(half: SendHalf) -> Sender<T> {
        Sender {
            half,
            _t: PhantomData,
        }
    }

    /// The backend this end runs on.
    pub fn backend(&self) -> Backend {
        self.half.backend()
    }

    /// Writes everything queued by [`Sender::feed`].
    ///
    /// Cancellation-safe: if the future is dropped, whatever was not yet
    /// written stays queued and the next `send`/`flush` writes it, so the
    /// stream never holds half a frame followed by another frame.
    pub async fn flush(&mut self) -> Result<()> {
        self.half.flush().await
    }

    /// Flushes and closes this end: the receiver gets every message, then
    /// [`ErrorKind::Closed`]. Dropping the sender also closes it.
    pub async fn close(mut self) -> Result<()> {
        self.half.flush().await
    }

    /// Bytes queued or in flight on this end (diagnostics and tests).
    #[doc(hidden)]
    pub fn queued_bytes(&self) -> usize {
        self.half.enc.queued()
    }

    /// The same stream, written as raw frames.
    pub fn into_bytes(self) -> BytesSender {
        BytesSender { half: self.half }
    }
}

impl<T: Encode> Sender<T> {
    /// Sends one message and waits until the kernel has accepted all of it.
    ///
    /// A message larger than the channel's maximum frame size fails with
    /// [`ErrorKind::FrameTooLarge`] and writes nothing. A reader that is gone
    /// gives [`ErrorKind::Closed`] (never SIGPIPE).
    ///
    /// Cancellation-safe: the frame is queued whole, and dropping the future
    /// leaves it queued for the next `send`/`flush`. When 256 KiB or more
    /// are already queued (sends cancelled before they were written), it
    /// first writes those and only then queues its frame, so a future dropped
    /// while it waits queued nothing and memory stays bounded.
    pub async fn send(&mut self, value: &T) -> Result<()> {
        self.half.push_message(value).await?;
        self.half.flush().await
    }

    /// Queues one message without waiting for it to be written (it is
    /// written when 256 KiB are queued, or on `flush`/`send`). Frames queued
    /// together go out in one write: use it for bursts of small messages.
    /// A message that goes through the arena is flushed at once (with what
    /// was queued before it): its descriptor is all that is left to write.
    pub async fn feed(&mut self, value: &T) -> Result<()> {
        if self.half.push_message(value).await? {
            // The message is already in shared memory: its descriptor goes
            // out now, so the receiver works while the sender serializes the
            // next one (holding descriptors back would serialize the two).
            return self.half.flush().await;
        }
        self.half.feed_flush().await
    }
}

impl<T> Receiver<T> {
    pub(crate) fn from_half(half: RecvHalf) -> Receiver<T> {
        Receiver {
            half,
            _t: PhantomData,
        }
    }

    /// The backend this end runs on.
    pub fn backend(&self) -> Backend {
        self.half.backend()
    }

    /// Closes this end; a sender then gets [`ErrorKind::Closed`].
    pub fn close(self) {}

    /// Sets this end's busy-poll budget (see [`ChannelConfig::busy_poll`]);
    /// `None` or a zero budget parks at once (unless the thread is an engine
    /// core with a default budget). The setting stays with this process's
    /// handle: a child sets its own.
    pub fn set_busy_poll(&mut self, budget: Option<Duration>) {
        self.half.busy_poll = budget.filter(|b| !b.is_zero());
    }

    /// The address range of this channel's arena mapping in this process,
    /// if the channel has an arena (diagnostics: a message whose
    /// [`Message::bytes`] lie inside it was read in place).
    pub fn arena_span(&self) -> Option<Range<usize>> {
        self.half.arena_span()
    }

    /// Bytes of memory this end's receive buffer holds (diagnostics and tests).
    #[doc(hidden)]
    pub fn buffer_capacity(&self) -> usize {
        self.half.dec.capacity()
    }

    /// The same stream, seen as raw frames.
    pub fn into_bytes(self) -> BytesReceiver {
        BytesReceiver { half: self.half }
    }
}

impl<T: Decode> Receiver<T> {
    /// Receives the next message, validated and borrowed in place.
    ///
    /// Ends with [`ErrorKind::Closed`] once the sender is gone and every
    /// message has been delivered; [`ErrorKind::Truncated`] if the stream was
    /// cut inside a frame; [`ErrorKind::InvalidMessage`] for a payload that is
    /// not a valid archive (the channel stays usable).
    ///
    /// Cancellation-safe: a dropped `recv` loses no message.
    pub async fn recv(&mut self) -> Result<Message<'_, T>> {
        let bytes = self.half.frame().await?;
        Message::validate(bytes)
    }

    /// [`Receiver::recv`] with a deadline; [`ErrorKind::TimedOut`] loses nothing.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Message<'_, T>> {
        let bytes = self.half.frame_timeout(timeout).await?;
        Message::validate(bytes)
    }

    /// Returns a message if one can be had without waiting, else `Ok(None)`.
    /// Must be called inside a tokio runtime.
    pub fn try_recv(&mut self) -> Result<Option<Message<'_, T>>> {
        match self.half.try_frame()? {
            Some(bytes) => Message::validate(bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Receives the next message as an [`OwnedMessage`], which can be kept
    /// while later messages are received (and sent to other tasks). A
    /// message that arrived through the arena keeps its slot until the
    /// `OwnedMessage` is dropped, when the slot goes back to the sender (so
    /// holding many large messages makes the sender wait for space); across
    /// processes it is copied out first (see [`ChannelConfig::arena`]).
    /// Errors and cancellation as for [`Receiver::recv`].
    pub async fn recv_owned(&mut self) -> Result<OwnedMessage<T>> {
        OwnedMessage::from_storage(self.half.owned_frame().await?.into_storage())
    }

    /// Receives without validating the archive.
    ///
    /// # Safety
    /// The peer must be trusted to send only valid archives of `T` produced by
    /// ringipc's `Sender<T>` (same `T`, same rkyv version and format features).
    /// An invalid payload is undefined behaviour. Use [`Receiver::recv`]
    /// unless validation shows up in a profile.
    ///
    /// What can be checked without validating is: a payload too short for
    /// the archived root, or whose root would not be aligned for
    /// `T::Archived` (payloads are 16-byte aligned; an archived type aligned
    /// above that, or a payload of the wrong length, would misplace it), is
    /// [`ErrorKind::InvalidMessage`] rather than a misaligned reference.
    pub async unsafe fn recv_unchecked(&mut self) -> Result<Message<'_, T>> {
        let bytes = self.half.frame().await?;
        // SAFETY: forwarded from this function's contract.
        unsafe { Message::unchecked(bytes) }
    }
}

/// One end of a bidirectional channel: sends `S`, receives `R`.
///
/// Built from two pipes. [`Duplex::split`] gives the two directions to
/// different tasks.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[rkyv(archived = ArchivedDuplex)]
pub struct Duplex<S, R> {
    tx: Sender<S>,
    rx: Receiver<R>,
}

impl<S, R> Duplex<S, R> {
    /// The two directions as separate handles.
    pub fn split(self) -> (Sender<S>, Receiver<R>) {
        (self.tx, self.rx)
    }

    /// Borrows the sending direction.
    pub fn sender(&mut self) -> &mut Sender<S> {
        &mut self.tx
    }

    /// Borrows the receiving direction.
    pub fn receiver(&mut self) -> &mut Receiver<R> {
        &mut self.rx
    }
}

impl<S: Encode, R> Duplex<S, R> {
    /// See [`Sender::send`].
    pub async fn send(&mut self, value: &S) -> Result<()> {
        self.tx.send(value).await
    }
}

impl<S, R: Decode> Duplex<S, R> {
    /// See [`Receiver::recv`].
    pub async fn recv(&mut self) -> Result<Message<'_, R>> {
        self.rx.recv().await
    }

    /// See [`Receiver::recv_timeout`].
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<Message<'_, R>> {
        self.rx.recv_timeout(timeout).await
    }
}

/// The sending end of a raw-bytes channel. Any program that writes the frame
/// format of `docs/wire-format.md` can stand on the other side.
pub struct BytesSender {
    pub(crate) half: SendHalf,
}

/// The receiving end of a raw-bytes channel.
pub struct BytesReceiver {
    pub(crate) half: RecvHalf,
}

impl BytesSender {
    /// Queues `value`'s archive as one frame, through the arena when the
    /// channel has one and the archive reaches its threshold (as
    /// [`Sender::feed`]). Fails with nothing queued.
    pub(crate) async fn feed_message<T: Encode>(&mut self, value: &T) -> Result<()> {
        if self.half.push_message(value).await? {
            return self.half.flush().await;
        }
        self.half.feed_flush().await
    }

    /// Sends one frame carrying `bytes`; see [`Sender::send`].
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.half.wait_room().await?;
        self.half.push(|buf| {
            buf.extend_from_slice(bytes);
            Ok(())
        })?;
        self.half.flush().await
    }

    /// Sends one frame of any kind with `payload` as it is, unchecked: lets
    /// tests play a buggy or hostile peer of the arena protocol.
    #[doc(hidden)]
    pub async fn send_raw_frame(&mut self, kind: FrameKind, payload: &[u8]) -> Result<()> {
        self.half.wait_room().await?;
        if self.half.closed {
            return Err(Error::new(ErrorKind::Closed, "send"));
        }
        self.half.enc.push_kind_with(
            |buf| {
                buf.extend_from_slice(payload);
                Ok(kind)
            },
            |len, max| Error::new(ErrorKind::FrameTooLarge, format!("{len} > {max}")),
        )?;
        self.half.flush().await
    }

    /// Queues one frame; see [`Sender::feed`].
    pub async fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        self.half.wait_room().await?;
        self.half.push(|buf| {
            buf.extend_from_slice(bytes);
            Ok(())
        })?;
        self.half.feed_flush().await
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        self.half.flush().await
    }

    /// Flushes and closes this end.
    pub async fn close(mut self) -> Result<()> {
        self.half.flush().await
    }

    /// The backend this end runs on.
    pub fn backend(&self) -> Backend {
        self.half.backend()
    }

    /// Bytes queued or in flight on this end (diagnostics and tests).
    #[doc(hidden)]
    pub fn queued_bytes(&self) -> usize {
        self.half.enc.queued()
    }

    /// Sends rkyv messages of type `T` on this stream from now on.
    pub fn into_typed<T>(self) -> Sender<T> {
        Sender::from_half(self.half)
    }
}

impl BytesReceiver {
    /// The next frame as owned storage: an arena slot (in place) or a copy
    /// in a 16-byte-aligned buffer. Cancellation-safe as `recv`.
    pub(crate) async fn recv_owned_frame(&mut self) -> Result<OwnedFrame> {
        self.half.owned_frame().await
    }

    /// Receives rkyv messages of type `T` from this stream from now on.
    pub fn into_typed<T>(self) -> Receiver<T> {
        Receiver::from_half(self.half)
    }

    /// Receives the next frame's payload, 16-byte aligned, borrowed in place.
    pub async fn recv(&mut self) -> Result<&[u8]> {
        self.half.frame().await
    }

    /// [`BytesReceiver::recv`] with a deadline.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<&[u8]> {
        self.half.frame_timeout(timeout).await
    }

    /// A frame if one can be had without waiting.
    pub fn try_recv(&mut self) -> Result<Option<&[u8]>> {
        self.half.try_frame()
    }

    /// Sets this end's busy-poll budget; see [`Receiver::set_busy_poll`].
    pub fn set_busy_poll(&mut self, budget: Option<Duration>) {
        self.half.busy_poll = budget.filter(|b| !b.is_zero());
    }

    /// Bytes of memory this end's receive buffer holds (diagnostics and tests).
    #[doc(hidden)]
    pub fn buffer_capacity(&self) -> usize {
        self.half.dec.capacity()
    }

    /// The backend this end runs on.
    pub fn backend(&self) -> Backend {
        self.half.backend()
    }
}
