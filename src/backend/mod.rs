//! Moving bytes on pipe fds: the `uring` backend (io_uring, one ring per
//! thread) and the `epoll` backend (tokio's reactor). The backend is chosen
//! once per process ([`Backend::Auto`]); a channel may also be pinned to one
//! backend explicitly, which is how the test suite runs every test on both.
//!
//! Both backends keep the same contract, which is what makes the channels
//! above them cancellation-safe:
//! - reads land in the decoder's buffer, and a read still in flight when its
//!   future is dropped stays owned by the handle: the next poll picks up its
//!   result, so no byte is lost;
//! - writes come from the encoder's buffer and are accounted for when they
//!   complete, so a dropped future never loses track of what was written.

pub(crate) mod epoll;
pub(crate) mod msg;
pub(crate) mod reactor;
pub(crate) mod uring;

use crate::error::{Error, ErrorKind, Result};
use crate::framing::{Decoder, Encoder};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

/// Which I/O backend moves the bytes.
///
/// ```
/// use ringipc::Backend;
/// // What `Auto` picks on this machine (io_uring where the kernel allows it).
/// let chosen = Backend::Auto.resolve()?;
/// assert!(matches!(chosen, Backend::Uring | Backend::Epoll));
/// # Ok::<(), ringipc::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Backend {
    /// The process default: `RINGIPC_BACKEND` if set, else io_uring when the
    /// probe finds every opcode ringipc submits, else epoll. On an engine
    /// thread, the engine's backend.
    #[default]
    Auto,
    /// io_uring. Requesting it where it is unusable is an error, never a
    /// silent fallback.
    Uring,
    /// epoll through tokio's reactor; works on every kernel ringipc supports.
    Epoll,
}

impl Backend {
    /// Resolves `Auto` to the process default and checks that `Uring` is usable.
    /// The result is always `Uring` or `Epoll`.
    pub fn resolve(self) -> Result<Backend> {
        match self {
            Backend::Auto => match THREAD_DEFAULT.with(|d| d.get()) {
                Some(b) => Ok(b),
                None => process_default(),
            },
            Backend::Uring => match uring_probe() {
                Ok(()) => Ok(Backend::Uring),
                Err(why) => Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("io_uring backend requested but unusable: {why}"),
                )),
            },
            Backend::Epoll => Ok(Backend::Epoll),
        }
    }

    /// Parses `uring`, `epoll` or `auto` (the values of `RINGIPC_BACKEND`).
    pub fn parse(s: &str) -> Result<Backend> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(Backend::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Backend::Uring),
            "epoll" => Ok(Backend::Epoll),
            other => Err(Error::new(
                ErrorKind::Unsupported,
                format!("unknown backend {other:?} (expected uring, epoll or auto)"),
            )),
        }
    }

    /// The lower-case name: `auto`, `uring` or `epoll`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

thread_local! {
    /// An engine thread's backend, which `Auto` means on that thread.
    static THREAD_DEFAULT: std::cell::Cell<Option<Backend>> = const { std::cell::Cell::new(None) };
    /// An engine thread's busy-poll budget, for receivers that set none.
    static THREAD_BUSY_POLL: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

/// Makes receivers polled on this thread spin for `budget` before parking,
/// unless they set their own.
pub(crate) fn set_thread_busy_poll(budget: Option<Duration>) {
    THREAD_BUSY_POLL.with(|d| d.set(budget.filter(|b| !b.is_zero())));
}

/// This thread's default busy-poll budget.
pub(crate) fn thread_busy_poll() -> Option<Duration> {
    THREAD_BUSY_POLL.try_with(|d| d.get()).ok().flatten()
}

/// Makes `Auto` mean `backend` (already resolved) on this thread.
pub(crate) fn set_thread_default(backend: Backend) {
    THREAD_DEFAULT.with(|d| d.set(Some(backend)));
}

/// Why io_uring is unusable here, if it is. Probed once per process.
pub fn uring_probe() -> std::result::Result<(), String> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            let r = uring::probe();
            match &r {
                Ok(()) => tracing::debug!("io_uring probe: usable"),
                Err(why) => tracing::debug!("io_uring probe: unusable: {why}"),
            }
            r
        })
        .clone()
}

/// The backend this process uses for [`Backend::Auto`], resolved once:
/// `RINGIPC_BACKEND` if set (an unusable `uring` there is an error), else
/// io_uring where the probe passes, else epoll.
pub fn process_default() -> Result<Backend> {
    static DEFAULT: OnceLock<std::result::Result<Backend, String>> = OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            let asked = match std::env::var("RINGIPC_BACKEND") {
                Ok(v) => Backend::parse(&v).map_err(|e| e.context().to_string())?,
                Err(_) => Backend::Auto,
            };
            let chosen = match asked {
                Backend::Auto => {
                    if uring_probe().is_ok() {
                        Backend::Uring
                    } else {
                        Backend::Epoll
                    }
                }
                other => other.resolve().map_err(|e| e.context().to_string())?,
            };
            tracing::debug!(backend = chosen.name(), "ringipc backend selected");
            Ok(chosen)
        })
        .clone()
        .map_err(|why| Error::new(ErrorKind::Unsupported, why))
}

/// One end of a pipe on the backend chosen for it.
pub(crate) enum Io {
    Uring(uring::UringIo),
    Epoll(epoll::EpollIo),
    /// The fd was closed after the stream broke.
    Closed(Backend),
}

impl Io {
    /// Adopts `fd` for `backend` (resolved here), setting its blocking mode
    /// to what that backend needs.
    pub(crate) fn new(fd: OwnedFd, backend: Backend) -> Result<Io> {
        Ok(match backend.resolve()? {
            Backend::Uring => {
                Io::Uring(uring::UringIo::new(fd).map_err(|e| Error::io("adopt fd", e))?)
            }
            _ => Io::Epoll(epoll::EpollIo::new(fd).map_err(|e| Error::io("adopt fd", e))?),
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Io::Uring(_) => Backend::Uring,
            Io::Epoll(_) => Backend::Epoll,
            Io::Closed(b) => *b,
        }
    }

    /// Closes the fd (an in-flight read is cancelled as on drop).
    pub(crate) fn close(&mut self) {
        let b = self.backend();
        *self = Io::Closed(b);
    }

    fn closed() -> io::Error {
        io::Error::from_raw_os_error(libc::EBADF)
    }

    /// Reads into the decoder's spare room; `Ok(0)` is end of stream.
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut Decoder,
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Uring(u) => u.poll_read(cx, dec),
            Io::Epoll(e) => e.poll_read(cx, dec),
            Io::Closed(_) => Poll::Ready(Err(Io::closed())),
        }
    }

    /// Writes (part of) the encoder's pending bytes and advances it.
    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        enc: &mut Encoder,
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Uring(u) => u.poll_write(cx, enc),
            Io::Epoll(e) => e.poll_write(cx, enc),
            Io::Closed(_) => Poll::Ready(Err(Io::closed())),
        }
    }

    /// [`Io::poll_read`] with busy polling: waits for data by spinning for
    /// up to `budget` before the task parks. `Pending` once the budget ran
    /// out; the task's wake-up is registered as after `poll_read`.
    pub(crate) fn poll_read_spinning(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut Decoder,
        budget: Duration,
    ) -> Poll<io::Result<usize>> {
        match self {
            Io::Uring(u) => u.poll_read_spinning(cx, dec, budget),
            Io::Epoll(e) => match e.poll_read(cx, dec) {
                Poll::Ready(r) => Poll::Ready(r),
                Poll::Pending => e.spin_read(dec, budget),
            },
            Io::Closed(_) => Poll::Ready(Err(Io::closed())),
        }
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Io::Uring(u) => u.raw_fd(),
            Io::Epoll(e) => e.raw_fd(),
            Io::Closed(_) => -1,
        }
    }

    /// Stops the operation in flight, if any (uring only), returning its
    /// result and buffer bytes; see `UringIo::settle`.
    pub(crate) fn settle(&self) -> io::Result<Option<(i32, Vec<u8>)>> {
        match self {
            Io::Uring(u) => u.settle(),
            Io::Epoll(_) | Io::Closed(_) => Ok(None),
        }
    }

    /// Best-effort, non-blocking write of what is pending, for `Drop`.
    pub(crate) fn write_now(&mut self, enc: &mut Encoder) {
        match self {
            Io::Uring(u) => u.write_now(enc),
            Io::Epoll(e) => e.write_now(enc),
            Io::Closed(_) => {}
        }
    }
}

/// A `SOCK_SEQPACKET` socket (datagrams with fds) on the backend chosen for it.
pub(crate) enum SockIo {
    Uring(uring::UringSock),
    Epoll(epoll::EpollSock),
}

impl SockIo {
    /// Adopts `fd` for `backend` (resolved here).
    pub(crate) fn new(fd: OwnedFd, backend: Backend) -> Result<SockIo> {
        Ok(match backend.resolve()? {
            Backend::Uring => {
                SockIo::Uring(uring::UringSock::new(fd).map_err(|e| Error::io("adopt socket", e))?)
            }
            _ => {
                SockIo::Epoll(epoll::EpollSock::new(fd).map_err(|e| Error::io("adopt socket", e))?)
            }
        })
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            SockIo::Uring(_) => Backend::Uring,
            SockIo::Epoll(_) => Backend::Epoll,
        }
    }

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            SockIo::Uring(u) => u.raw_fd(),
            SockIo::Epoll(e) => e.raw_fd(),
        }
    }

    /// Sends the datagram in `msg`. On uring the buffer is with the ring
    /// while in flight; on epoll it stays in `msg`.
    pub(crate) fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<msg::MsgBuf>>,
    ) -> Poll<io::Result<usize>> {
        match self {
            SockIo::Uring(u) => u.poll_send(cx, msg),
            SockIo::Epoll(e) => e.poll_send(cx, msg),
        }
    }

    /// Receives one datagram into the buffer in `msg` (back there when this
    /// returns `Ready`); `Ok(0)` is end of stream.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        msg: &mut Option<Box<msg::MsgBuf>>,
    ) -> Poll<io::Result<usize>> {
        match self {
            SockIo::Uring(u) => u.poll_recv(cx, msg),
            SockIo::Epoll(e) => e.poll_recv(cx, msg),
        }
    }

    /// Whether an operation is in flight (uring: a send whose future was
    /// dropped).
    pub(crate) fn in_flight(&self) -> bool {
        match self {
            SockIo::Uring(u) => u.in_flight(),
            SockIo::Epoll(_) => false,
        }
    }

    /// Stops the operation in flight (uring only), for a hand-over.
    pub(crate) fn settle(&mut self) -> io::Result<Option<msg::Settled>> {
        match self {
            SockIo::Uring(u) => u.settle(),
            SockIo::Epoll(_) => Ok(None),
        }
    }
}
