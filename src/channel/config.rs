//! [`ChannelConfig`]: the options of new channels, and the constructors
//! that make both ends of a pipe with them.

use super::{BytesReceiver, BytesSender, Duplex, Receiver, RecvHalf, SendHalf, Sender};
use crate::arena::{self, ArenaConfig};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::framing::{DEFAULT_MAX_FRAME, DESCRIPTOR_LEN};
use crate::sys;
use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

#[cfg(doc)]
use super::{duplex, pipe};

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

    /// The backend setting (possibly `Auto`), for handles made alongside.
    pub(crate) fn backend_choice(&self) -> Backend {
        self.backend
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

    /// A raw-bytes channel with this config's arena, for the pool's job and
    /// result pipes: frames go out with [`BytesSender::feed_message`] or
    /// [`BytesSender::feed_frame`] and come in with
    /// [`BytesReceiver::recv_owned_frame`] or [`BytesReceiver::recv`].
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
