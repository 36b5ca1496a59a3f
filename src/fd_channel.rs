//! Fd channels: typed messages with file descriptors attached
//! (`SCM_RIGHTS` over a `SOCK_SEQPACKET` pair). The user-facing description
//! is on [`fd_channel`].

use crate::backend::msg::{MsgBuf, Received, SCM_MAX_FD};
use crate::backend::{Backend, SockIo};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Decode, Encode, Message, encode_into};
use crate::process::handoff::{collect_fds, name_handle, register, take_inherited, with_inherited};
use crate::sys;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor::{self, Fallible, Source};
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Place, Serialize};
use std::fmt;
use std::future::poll_fn;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Bytes before the archive in every datagram.
pub const FD_HEADER_LEN: usize = 16;
/// Magic bytes at the start of every datagram.
const FD_MAGIC: [u8; 4] = *b"RIFD";
/// Largest datagram: what an unprivileged socket buffer takes at once
/// (`net.core.wmem_max` is 208 KiB by default).
const MAX_MESSAGE_LIMIT: usize = 128 * 1024;

/// Settings of an fd channel. The defaults: the process-default backend,
/// messages of up to 64 KiB with up to 16 fds.
#[derive(Clone, Copy, Debug)]
pub struct FdChannelConfig {
    backend: Backend,
    max_message: usize,
    max_fds: usize,
}

impl Default for FdChannelConfig {
    fn default() -> Self {
        FdChannelConfig::new()
    }
}

impl FdChannelConfig {
    /// The defaults.
    pub fn new() -> FdChannelConfig {
        FdChannelConfig {
            backend: Backend::Auto,
            max_message: 64 * 1024,
            max_fds: 16,
        }
    }

    /// The backend both ends use.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Largest message, header included (at most 128 KiB, which one
    /// datagram of an unprivileged socket can hold).
    pub fn max_message(mut self, bytes: usize) -> Self {
        self.max_message = bytes;
        self
    }

    /// Most fds in one message (at most 253, the kernel's `SCM_MAX_FD`).
    pub fn max_fds(mut self, fds: usize) -> Self {
        self.max_fds = fds;
        self
    }

    fn check(&self) -> Result<()> {
        if !(FD_HEADER_LEN + 16..=MAX_MESSAGE_LIMIT).contains(&self.max_message) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "fd channel: max_message {} is outside {}..={MAX_MESSAGE_LIMIT}",
                    self.max_message,
                    FD_HEADER_LEN + 16
                ),
            ));
        }
        if self.max_fds > SCM_MAX_FD {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "fd channel: max_fds {} is over the kernel's limit of {SCM_MAX_FD}",
                    self.max_fds
                ),
            ));
        }
        Ok(())
    }

    /// A new fd channel with these settings.
    pub fn channel<T>(self) -> Result<(FdSender<T>, FdReceiver<T>)> {
        self.check()?;
        let (a, b) = sys::seqpacket_pair().map_err(|e| Error::io("socketpair", e))?;
        // Room for a few whole datagrams in flight; the kernel caps the
        // value at net.core.wmem_max for unprivileged processes.
        let _ = sys::set_sndbuf(a.as_raw_fd(), 4 * self.max_message);
        Ok((
            FdSender::adopt(a, self, None)?,
            FdReceiver::adopt(b, self, None)?,
        ))
    }
}

impl FdChannelConfig {
    /// Wraps one end of an `AF_UNIX` `SOCK_SEQPACKET` socket pair made
    /// elsewhere (say, before a fork) as a sender. Any other fd is
    /// [`ErrorKind::InvalidArgument`].
    pub fn sender_from<T>(self, socket: OwnedFd) -> Result<FdSender<T>> {
        self.check()?;
        check_socket(&socket)?;
        FdSender::adopt(socket, self, None)
    }

    /// Wraps one end of an `AF_UNIX` `SOCK_SEQPACKET` socket pair made
    /// elsewhere as a receiver; see [`FdChannelConfig::sender_from`].
    pub fn receiver_from<T>(self, socket: OwnedFd) -> Result<FdReceiver<T>> {
        self.check()?;
        check_socket(&socket)?;
        FdReceiver::adopt(socket, self, None)
    }
}

fn check_socket(fd: &OwnedFd) -> Result<()> {
    match sys::socket_kind(fd.as_raw_fd()) {
        Ok((libc::AF_UNIX, libc::SOCK_SEQPACKET)) => Ok(()),
        Ok(_) => Err(Error::new(
            ErrorKind::InvalidArgument,
            "an fd channel needs an AF_UNIX SOCK_SEQPACKET socket",
        )),
        Err(e) => Err(Error::new(
            ErrorKind::InvalidArgument,
            "an fd channel needs an AF_UNIX SOCK_SEQPACKET socket",
        )
        .with_source(e)),
    }
}

/// A new fd channel with the default settings ([`FdChannelConfig::new`]):
/// a channel that carries file descriptors inside typed messages.
///
/// A pipe carries bytes only. An fd channel is an `AF_UNIX`
/// `SOCK_SEQPACKET` socket pair: each message is one datagram, and the fds
/// of its fd-owning fields travel with it as `SCM_RIGHTS` ancillary data.
/// A message type marks those fields with [`Fd<T>`](crate::Fd) or
/// `#[rkyv(with = Inherit)]` (any [`InheritFd`](crate::InheritFd) type:
/// `File`, `OwnedFd`, std and tokio sockets), and may hold ringipc's own
/// channel ends ([`Sender`](crate::Sender), [`Receiver`](crate::Receiver),
/// the bytes ends, and fd channel ends), nested anywhere. The receiver gets
/// the same types back, owning fresh fds that name the same open files.
///
/// ```
/// use ringipc::{Fd, fd_channel};
/// use std::io::{Read, Seek, Write};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> ringipc::Result<()> {
/// let (mut tx, mut rx) = fd_channel::<(String, Fd<std::fs::File>)>()?;
/// let mut file = tempfile_for_doc();
/// file.write_all(b"shared").unwrap();
/// tx.send(("a log".to_string(), Fd(file))).await?;
///
/// let (name, Fd(mut file)) = rx.recv().await?;
/// file.rewind().unwrap();
/// let mut text = String::new();
/// file.read_to_string(&mut text).unwrap();
/// assert_eq!((name.as_str(), text.as_str()), ("a log", "shared"));
/// # Ok(()) }
/// # fn tempfile_for_doc() -> std::fs::File {
/// #     let p = std::env::temp_dir().join(format!("ringipc-doc-{}", std::process::id()));
/// #     let f = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&p).unwrap();
/// #     std::fs::remove_file(&p).unwrap();
/// #     f
/// # }
/// ```
///
/// Messages are deserialized (owned values come out, not in-place
/// archives): the fds must become owned values in the receiver. Fd channels
/// are for control messages (connections, files, channel ends); bulk data
/// goes over a pipe ([`pipe`](crate::pipe)). Wire format:
/// `docs/wire-format.md`, "Fd channels".
///
/// **Limits and hostile peers.** A message is at most
/// [`FdChannelConfig::max_message`] bytes and [`FdChannelConfig::max_fds`]
/// fds; a sender over either limit gets an error before anything is sent.
/// The receiver checks every datagram on its own: one longer than its buffer
/// (`MSG_TRUNC`), with more fds than it has room for (`MSG_CTRUNC`), with
/// another kind of ancillary data, with a malformed header, with more or
/// fewer fds than its header announces, or whose message leaves some of its
/// fds unclaimed is [`ErrorKind::Protocol`]; an archive that fails
/// validation is [`ErrorKind::InvalidMessage`]. Every fd that came with a
/// refused datagram is closed, and the next `recv` reads the next datagram.
pub fn fd_channel<T>() -> Result<(FdSender<T>, FdReceiver<T>)> {
    FdChannelConfig::new().channel()
}

/// A datagram that must be sent before anything else: one whose send a
/// hand-over stopped.
struct Unsent {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

struct SendInner {
    sock: SockIo,
    /// The datagram being sent (on uring it is with the ring while in flight).
    msg: Option<Box<MsgBuf>>,
    unsent: Option<Unsent>,
    cfg: FdChannelConfig,
}

/// The sending end of an fd channel; see [`fd_channel`].
///
/// A handle can move between tasks, threads and runtimes, and into a child
/// process (as a start argument or inside a message on another fd channel).
pub struct FdSender<T> {
    // A mutex so that a hand-over (which serializes through `&self`) can
    // stop the send in flight; the send path uses `get_mut`, no locking.
    inner: Mutex<SendInner>,
    _t: PhantomData<fn(T)>,
}

impl<T> fmt::Debug for FdSender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdSender").finish_non_exhaustive()
    }
}

impl<T> FdSender<T> {
    fn adopt(fd: OwnedFd, cfg: FdChannelConfig, unsent: Option<Unsent>) -> Result<Self> {
        Ok(FdSender {
            inner: Mutex::new(SendInner {
                sock: SockIo::new(fd, cfg.backend)?,
                msg: None,
                unsent,
                cfg,
            }),
            _t: PhantomData,
        })
    }

    fn inner(&mut self) -> &mut SendInner {
        self.inner.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend this end runs on.
    pub fn backend(&mut self) -> Backend {
        self.inner().sock.backend()
    }
}

impl<T: Encode> FdSender<T> {
    /// Sends `value`, with the fds of its fd-owning fields, as one message.
    /// `value` is consumed: its fds (and channel ends) now belong to the
    /// receiver, which gets duplicates naming the same open files.
    ///
    /// Errors before anything is sent: a message over the size or fd limit
    /// ([`ErrorKind::FrameTooLarge`]), a field that cannot be serialized. A
    /// closed receiver is [`ErrorKind::Closed`]. On an error `value` is
    /// dropped: the fds it held close, and ringipc channel ends inside it
    /// were already handed over (serialized), so they close too, with
    /// anything they had queued. If the future is dropped before it
    /// completes, the message may or may not be delivered, but never twice
    /// nor in part.
    pub async fn send(&mut self, value: T) -> Result<()> {
        let inner = self.inner();
        // A send left in flight by a dropped future, or a datagram a
        // hand-over stopped, goes first.
        poll_fn(|cx| inner.poll_flush(cx)).await?;
        let msg = encode(&value, &inner.cfg)?;
        drop(value);
        inner.msg = Some(msg);
        poll_fn(|cx| inner.poll_flush(cx)).await
    }

    /// [`FdSender::send`] with a deadline ([`ErrorKind::TimedOut`]: the
    /// message may or may not have been sent, as for a dropped future).
    pub async fn send_timeout(&mut self, value: T, timeout: Duration) -> Result<()> {
        tokio::time::timeout(timeout, self.send(value))
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::TimedOut, "fd channel send")))
    }
}

impl SendInner {
    /// Drives what is queued (an unsent datagram from a hand-over, then the
    /// current one, then an operation left in flight) to completion.
    fn poll_flush(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<()>> {
        use std::task::Poll;
        loop {
            if self.msg.is_none()
                && !self.sock.in_flight()
                && let Some(u) = self.unsent.take()
            {
                self.msg = Some(MsgBuf::send(&u.bytes, u.fds));
            }
            if self.msg.is_none() && !self.sock.in_flight() {
                return Poll::Ready(Ok(()));
            }
            let r = std::task::ready!(self.sock.poll_send(cx, &mut self.msg));
            // Sent (or failed): the datagram and its fds are done with.
            self.msg = None;
            if let Err(e) = r {
                // A receiver that closed with datagrams unread resets the
                // connection: that is a closed channel too.
                let closed = matches!(e.raw_os_error(), Some(libc::ECONNRESET | libc::EPIPE));
                return Poll::Ready(Err(if closed {
                    Error::new(ErrorKind::Closed, "fd channel send").with_source(e)
                } else {
                    Error::io("fd channel send", e)
                }));
            }
        }
    }
}

/// Serializes `value` into a datagram: header, then the archive; its fds
/// are duplicated so they stay open until the kernel has taken them.
fn encode<T: Encode>(value: &T, cfg: &FdChannelConfig) -> Result<Box<MsgBuf>> {
    let mut bytes = vec![0u8; FD_HEADER_LEN];
    let (encoded, fds) = collect_fds(|| encode_into(value, &mut bytes));
    encoded?;
    if fds.len() > cfg.max_fds {
        return Err(Error::new(
            ErrorKind::FrameTooLarge,
            format!(
                "fd channel: the message holds {} fds, over the limit of {}",
                fds.len(),
                cfg.max_fds
            ),
        ));
    }
    if bytes.len() > cfg.max_message {
        return Err(Error::new(
            ErrorKind::FrameTooLarge,
            format!(
                "fd channel: the message is {} bytes, over the limit of {}",
                bytes.len(),
                cfg.max_message
            ),
        ));
    }
    let archive_len = (bytes.len() - FD_HEADER_LEN) as u32;
    bytes[0..4].copy_from_slice(&FD_MAGIC);
    bytes[4..8].copy_from_slice(&(fds.len() as u32).to_le_bytes());
    bytes[8..12].copy_from_slice(&archive_len.to_le_bytes());
    let owned = fds
        .iter()
        .map(|&fd| sys::dup_above(fd, 3))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(|e| Error::io("fd channel: duplicating an fd to send", e))?;
    Ok(MsgBuf::send(&bytes, owned))
}

/// A received datagram kept aside: one a hand-over stopped.
struct Pending {
    bytes: AlignedVec<16>,
    received: Received,
}

struct RecvInner {
    sock: SockIo,
    buf: Option<Box<MsgBuf>>,
    pending: Option<Pending>,
    closed: bool,
    cfg: FdChannelConfig,
}

/// The receiving end of an fd channel; see [`fd_channel`].
pub struct FdReceiver<T> {
    // As in `FdSender`: locked only by a hand-over.
    inner: Mutex<RecvInner>,
    _t: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for FdReceiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FdReceiver").finish_non_exhaustive()
    }
}

impl<T> FdReceiver<T> {
    fn adopt(fd: OwnedFd, cfg: FdChannelConfig, pending: Option<Pending>) -> Result<Self> {
        Ok(FdReceiver {
            inner: Mutex::new(RecvInner {
                sock: SockIo::new(fd, cfg.backend)?,
                buf: Some(MsgBuf::recv(cfg.max_message, cfg.max_fds)),
                pending,
                closed: false,
                cfg,
            }),
            _t: PhantomData,
        })
    }

    fn inner(&mut self) -> &mut RecvInner {
        self.inner.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend this end runs on.
    pub fn backend(&mut self) -> Backend {
        self.inner().sock.backend()
    }
}

impl<T> FdReceiver<T>
where
    T: Decode,
    T::Archived: Deserialize<T, HighDeserializer<rancor::BoxedError>>,
{
    /// Receives the next message. [`ErrorKind::Closed`] once every sender is
    /// gone and every message was read. Cancel-safe: a dropped future loses
    /// no message.
    pub async fn recv(&mut self) -> Result<T> {
        let inner = self.inner();
        if let Some(p) = inner.pending.take() {
            return decode(&p.bytes[..p.received.len], p.received, inner.cfg.max_fds);
        }
        if inner.closed {
            return Err(Error::new(ErrorKind::Closed, "fd channel recv"));
        }
        let n = poll_fn(|cx| inner.sock.poll_recv(cx, &mut inner.buf))
            .await
            .map_err(|e| Error::io("fd channel recv", e))?;
        let buf = inner
            .buf
            .as_mut()
            .expect("the buffer is back after a receive");
        let received = buf.take_received(n);
        if n == 0 && received.is_plain() {
            // End of stream, or an empty datagram (which a ringipc sender
            // never sends): the peer's hang-up tells them apart.
            if sys::peer_hung_up(inner.sock.raw_fd()) {
                inner.closed = true;
                return Err(Error::new(ErrorKind::Closed, "fd channel recv"));
            }
            return Err(protocol("fd channel: an empty datagram"));
        }
        decode(&buf.data()[..received.len], received, inner.cfg.max_fds)
    }

    /// [`FdReceiver::recv`] with a deadline; [`ErrorKind::TimedOut`] loses
    /// nothing.
    pub async fn recv_timeout(&mut self, timeout: Duration) -> Result<T> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::TimedOut, "fd channel recv")))
    }
}

fn protocol(why: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorKind::Protocol, why)
}

/// Checks one datagram and rebuilds its message. The fds of a refused
/// datagram are closed when `received` drops.
fn decode<T>(bytes: &[u8], received: Received, max_fds: usize) -> Result<T>
where
    T: Decode,
    T::Archived: Deserialize<T, HighDeserializer<rancor::BoxedError>>,
{
    // The control buffer is rounded up to whole words, so it can hold one
    // fd more than `max_fds` without MSG_CTRUNC.
    if received.fds_truncated || received.fds.len() > max_fds {
        return Err(protocol(
            "fd channel: a datagram with more fds than max_fds (the kernel closed the rest)",
        ));
    }
    if received.truncated {
        return Err(protocol(
            "fd channel: a datagram longer than max_message (its tail was discarded)",
        ));
    }
    if received.foreign_control {
        return Err(protocol("fd channel: ancillary data other than SCM_RIGHTS"));
    }
    if bytes.len() < FD_HEADER_LEN {
        return Err(protocol(format!(
            "fd channel: a datagram of {} bytes, shorter than its header",
            bytes.len()
        )));
    }
    let (head, archive) = bytes.split_at(FD_HEADER_LEN);
    if head[0..4] != FD_MAGIC || head[12..16] != [0; 4] {
        return Err(protocol("fd channel: a datagram with a bad header"));
    }
    let announced = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
    let archive_len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize;
    if announced != received.fds.len() {
        return Err(protocol(format!(
            "fd channel: the header announces {announced} fds, {} came",
            received.fds.len()
        )));
    }
    if archive_len != archive.len() {
        return Err(protocol(format!(
            "fd channel: the header announces {archive_len} archive bytes, {} came",
            archive.len()
        )));
    }
    let msg = Message::<T>::validate(archive)?;
    let (value, unclaimed) = with_inherited(received.fds, || {
        rkyv::deserialize::<T, rancor::BoxedError>(&*msg)
    });
    let value = value.map_err(|e| {
        let kind = match rancor::BoxedError::inner(&e).downcast_ref::<Error>() {
            Some(inner) => inner.kind(),
            None => ErrorKind::InvalidMessage,
        };
        Error::new(kind, "fd channel: rebuilding the message").with_source(e)
    })?;
    if unclaimed > 0 {
        return Err(protocol(format!(
            "fd channel: {unclaimed} fds came with a message that does not hold them"
        )));
    }
    Ok(value)
}

// ---- Hand-over: fd channel ends as child arguments or inside messages ----

const ROLE_SEND: u8 = 1;
const ROLE_RECV: u8 = 2;

/// The archived form of a handed-over fd channel end (an rkyv detail).
#[doc(hidden)]
#[derive(Archive, Serialize, Deserialize, Debug)]
#[rkyv(archived = ArchivedFdChannelState)]
pub struct FdChannelState {
    index: u32,
    role: u8,
    max_message: u64,
    max_fds: u32,
    /// A datagram the hand-over stopped: for a sender, one not yet sent; for
    /// a receiver, one received and not yet read.
    pending: Option<PendingState>,
}

/// A datagram carried by a hand-over (an rkyv detail).
#[doc(hidden)]
#[derive(Archive, Serialize, Deserialize, Debug)]
pub struct PendingState {
    bytes: Vec<u8>,
    fds: Vec<u32>,
    truncated: bool,
    fds_truncated: bool,
    foreign_control: bool,
}

/// The resolver of a handed-over fd channel end (an rkyv detail).
#[doc(hidden)]
pub struct FdChannelResolver {
    state: FdChannelState,
    inner: FdChannelStateResolver,
}

fn limits(cfg: &FdChannelConfig) -> (u64, u32) {
    (cfg.max_message as u64, cfg.max_fds as u32)
}

fn export_send(inner: &Mutex<SendInner>) -> Result<FdChannelState> {
    let mut st = inner.lock().unwrap_or_else(PoisonError::into_inner);
    let st = &mut *st;
    // A send in flight is stopped; if the kernel had not taken it yet, the
    // datagram travels with the handle and its new owner sends it first.
    if let Some(m) = st
        .sock
        .settle()
        .map_err(|e| Error::io("hand over fd sender", e))?
        .and_then(|s| s.unsent())
    {
        let (bytes, fds) = m;
        // Sent before anything a dropped future left in `msg`, which
        // came later.
        st.unsent = Some(Unsent { bytes, fds });
    }
    if let Some(m) = st.msg.take() {
        // Epoll: a datagram a dropped future never sent.
        let (bytes, fds) = (*m).into_unsent();
        st.unsent.get_or_insert(Unsent { bytes, fds });
    }
    let index = register(st.sock.raw_fd())?;
    let pending = match &st.unsent {
        Some(u) => Some(PendingState {
            bytes: u.bytes.clone(),
            fds: u
                .fds
                .iter()
                .map(|fd| register(fd.as_raw_fd()))
                .collect::<Result<_>>()?,
            truncated: false,
            fds_truncated: false,
            foreign_control: false,
        }),
        None => None,
    };
    let (max_message, max_fds) = limits(&st.cfg);
    Ok(FdChannelState {
        index,
        role: ROLE_SEND,
        max_message,
        max_fds,
        pending,
    })
}

fn export_recv(inner: &Mutex<RecvInner>) -> Result<FdChannelState> {
    let mut st = inner.lock().unwrap_or_else(PoisonError::into_inner);
    let st = &mut *st;
    if let Some(settled) = st
        .sock
        .settle()
        .map_err(|e| Error::io("hand over fd receiver", e))?
    {
        let Some((n, mut buf)) = settled.received() else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "fd receiver: a send was in flight",
            ));
        };
        // Taken even when nothing arrived: a hostile empty datagram's fds
        // would otherwise stay in the buffer, overwritten by the next receive.
        let received = buf.take_received(n);
        if n > 0 || !received.is_plain() {
            let mut bytes = AlignedVec::with_capacity(received.len);
            bytes.extend_from_slice(&buf.data()[..received.len]);
            st.pending.get_or_insert(Pending { bytes, received });
        }
        st.buf = Some(buf);
    }
    let index = register(st.sock.raw_fd())?;
    let pending = match &st.pending {
        Some(p) => Some(PendingState {
            bytes: p.bytes.to_vec(),
            fds: p
                .received
                .fds
                .iter()
                .map(|fd| register(fd.as_raw_fd()))
                .collect::<Result<_>>()?,
            truncated: p.received.truncated,
            fds_truncated: p.received.fds_truncated,
            foreign_control: p.received.foreign_control,
        }),
        None => None,
    };
    let (max_message, max_fds) = limits(&st.cfg);
    Ok(FdChannelState {
        index,
        role: ROLE_RECV,
        max_message,
        max_fds,
        pending,
    })
}

/// The settings and socket of an archived end, checked.
fn import(state: &ArchivedFdChannelState, role: u8) -> Result<(OwnedFd, FdChannelConfig)> {
    if state.role != role {
        return Err(protocol("inherited fd channel end has the wrong direction"));
    }
    let cfg = FdChannelConfig::new()
        .max_message(state.max_message.to_native() as usize)
        .max_fds(state.max_fds.to_native() as usize);
    cfg.check()
        .map_err(|e| protocol("inherited fd channel end has bad limits").with_source(e))?;
    Ok((take_inherited(state.index.to_native())?, cfg))
}

fn import_pending(p: &ArchivedPendingState) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let fds = p
        .fds
        .iter()
        .map(|i| take_inherited(i.to_native()))
        .collect::<Result<Vec<_>>>()?;
    Ok((p.bytes.to_vec(), fds))
}

fn import_send<T>(state: &ArchivedFdChannelState) -> Result<FdSender<T>> {
    let (fd, cfg) = import(state, ROLE_SEND)?;
    let unsent = match state.pending.as_ref() {
        Some(p) => {
            let (bytes, fds) = import_pending(p)?;
            Some(Unsent { bytes, fds })
        }
        None => None,
    };
    FdSender::adopt(fd, cfg, unsent)
}

fn import_recv<T>(state: &ArchivedFdChannelState) -> Result<FdReceiver<T>> {
    let (fd, cfg) = import(state, ROLE_RECV)?;
    let pending = match state.pending.as_ref() {
        Some(p) => {
            let (raw, fds) = import_pending(p)?;
            let mut bytes = AlignedVec::with_capacity(raw.len());
            bytes.extend_from_slice(&raw);
            Some(Pending {
                received: Received {
                    len: bytes.len(),
                    truncated: p.truncated,
                    fds_truncated: p.fds_truncated,
                    fds,
                    foreign_control: p.foreign_control,
                },
                bytes,
            })
        }
        None => None,
    };
    FdReceiver::adopt(fd, cfg, pending)
}

macro_rules! fd_handoff_impls {
    ($ty:ident, $export:ident, $import:ident) => {
        impl<T> Archive for $ty<T> {
            type Archived = ArchivedFdChannelState;
            type Resolver = FdChannelResolver;

            fn resolve(&self, resolver: FdChannelResolver, out: Place<ArchivedFdChannelState>) {
                resolver.state.resolve(resolver.inner, out);
            }
        }

        impl<T, S> Serialize<S> for $ty<T>
        where
            S: Fallible + Writer + Allocator + ?Sized,
            S::Error: Source,
        {
            fn serialize(&self, serializer: &mut S) -> Result<FdChannelResolver, S::Error> {
                let state = $export(&self.inner)
                    .map_err(|e| S::Error::new(name_handle(e, std::any::type_name::<Self>())))?;
                let inner = state.serialize(serializer)?;
                Ok(FdChannelResolver { state, inner })
            }
        }

        impl<T, D> Deserialize<$ty<T>, D> for ArchivedFdChannelState
        where
            D: Fallible + ?Sized,
            D::Error: Source,
        {
            fn deserialize(&self, _: &mut D) -> Result<$ty<T>, D::Error> {
                $import(self).map_err(D::Error::new)
            }
        }
    };
}

fd_handoff_impls!(FdSender, export_send, import_send);
fd_handoff_impls!(FdReceiver, export_recv, import_recv);
