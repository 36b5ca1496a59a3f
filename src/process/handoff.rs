//! Handing channel ends to a child process inside its rkyv-encoded arguments.
//!
//! A handle serializes to a [`HandoffState`]: the index of its fd in the list
//! the child inherits, plus the stream state that must survive the move
//! (whether the hello frame has passed, bytes read but not yet decoded, bytes
//! encoded but not yet written). Serialization only works while
//! [`collect_fds`] is running (inside `Process` start, or an fd channel's
//! send); deserialization only while the child's inherited fds are installed
//! ([`install_inherited`]) or a received message's fds are ([`with_inherited`],
//! an fd channel's receive). Anywhere else (a handle inside a message on a
//! pipe, say) it is a typed error: pipes cannot carry file descriptors.

use crate::arena::{self, SendArena, SendExport};
use crate::backend::{Backend, Io};
use crate::channel::{BytesReceiver, BytesSender, Receiver, RecvHalf, SendHalf, Sender};
use crate::error::{Error, ErrorKind, Result};
use crate::framing::{Decoder, Encoder};
use rkyv::rancor::{Fallible, Source};
use rkyv::ser::{Allocator, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Place, Serialize};
use std::cell::RefCell;
use std::os::fd::{OwnedFd, RawFd};
use std::sync::atomic::Ordering;

const ROLE_SEND: u8 = 1;
const ROLE_RECV: u8 = 2;

/// The archived form of a channel end passed to a child.
#[derive(Archive, Serialize, Deserialize, Debug)]
#[rkyv(archived = ArchivedHandoffState)]
pub struct HandoffState {
    index: u32,
    role: u8,
    max_frame: u64,
    started: bool,
    bytes: Vec<u8>,
    /// The channel's arena, if it has one.
    arena: Option<ArenaHandoff>,
}

/// The arena part of a handed-over channel end: its memfd and notify pipe
/// (as indices into the inherited fds) and the state of the slot protocol.
#[derive(Archive, Serialize, Deserialize, Debug)]
pub(crate) struct ArenaHandoff {
    memfd: u32,
    notify: u32,
    data_len: u64,
    threshold: u64,
    next_seq: u64,
    /// The free ring position this side keeps (tail for a sender, head for
    /// a receiver).
    ring: u64,
    trusted: bool,
    /// Slots lent to the receiver: (offset, length, sequence). Sender only.
    lent: Vec<(u64, u64, u64)>,
}

/// The resolver of a handed-over channel end (an rkyv detail).
pub struct HandoffResolver {
    state: HandoffState,
    inner: HandoffStateResolver,
}

thread_local! {
    static COLLECT: RefCell<Option<Vec<RawFd>>> = const { RefCell::new(None) };
    static INHERITED: RefCell<Option<Vec<Option<OwnedFd>>>> = const { RefCell::new(None) };
}

/// Runs `f` (which serializes a child's arguments) and returns the fds of
/// every handle it serialized, in index order.
pub(crate) fn collect_fds<T>(f: impl FnOnce() -> T) -> (T, Vec<RawFd>) {
    // Whatever was collecting before (nothing, in practice) resumes after.
    let outer = COLLECT.with(|c| c.borrow_mut().replace(Vec::new()));
    let out = f();
    let fds = COLLECT
        .with(|c| std::mem::replace(&mut *c.borrow_mut(), outer))
        .unwrap_or_default();
    (out, fds)
}

/// Runs `f` (which deserializes a message received with `fds`) with the
/// fds available by index, as a child's arguments have theirs. Returns what
/// `f` returned and how many fds it left unclaimed (those are closed).
pub(crate) fn with_inherited<T>(fds: Vec<OwnedFd>, f: impl FnOnce() -> T) -> (T, usize) {
    let outer = INHERITED.with(|c| c.borrow_mut().replace(fds.into_iter().map(Some).collect()));
    let out = f();
    let left = INHERITED
        .with(|c| std::mem::replace(&mut *c.borrow_mut(), outer))
        .map_or(0, |fds| fds.iter().filter(|fd| fd.is_some()).count());
    (out, left)
}

/// Makes the inherited fds available by index to the deserialization of
/// the child's arguments (on this thread).
pub(crate) fn install_inherited(fds: Vec<OwnedFd>) {
    INHERITED.with(|c| *c.borrow_mut() = Some(fds.into_iter().map(Some).collect()));
}

/// Ends the hand-over: fds no argument claimed are closed.
pub(crate) fn clear_inherited() {
    INHERITED.with(|c| c.borrow_mut().take());
}

pub(crate) fn register(fd: RawFd) -> Result<u32> {
    if fd < 0 {
        return Err(Error::new(
            ErrorKind::Closed,
            "cannot hand over a closed channel end (or an invalid fd)",
        ));
    }
    COLLECT.with(|c| match c.borrow_mut().as_mut() {
        Some(fds) => {
            fds.push(fd);
            Ok((fds.len() - 1) as u32)
        }
        None => Err(Error::new(
            ErrorKind::Unsupported,
            "channel ends and inherited fds (`Fd`, `Inherit`) can only be passed to a child process as start arguments or in a message on an fd channel (`fd_channel`), not inside a message on a pipe",
        )),
    })
}

pub(crate) fn take_inherited(index: u32) -> Result<OwnedFd> {
    INHERITED.with(|c| {
        let mut c = c.borrow_mut();
        let Some(fds) = c.as_mut() else {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "channel ends and inherited fds can only be received as a child's start arguments",
            ));
        };
        fds.get_mut(index as usize)
            .and_then(Option::take)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("inherited handle {index} missing or used twice"),
                )
            })
    })
}

/// Says which handle an error of its hand-over is about.
pub(crate) fn name_handle(e: Error, handle: &str) -> Error {
    if e.kind() == ErrorKind::Unsupported {
        return Error::new(
            e.kind(),
            format!(
                "cannot send a {handle} inside a message on a pipe: channel handles and \
                 fds can only be passed to a child process as start arguments, or in a \
                 message on an fd channel (`fd_channel`)"
            ),
        );
    }
    Error::new(e.kind(), format!("handing over a {handle}")).with_source(e)
}

fn export_send(half: &SendHalf) -> Result<HandoffState> {
    let index = register(half.io.raw_fd())?;
    let settled = half
        .io
        .settle()
        .map_err(|e| Error::io("hand over sender", e))?;
    let bytes = match &settled {
        Some((res, buf)) => half.enc.unsent(Some((buf, (*res).max(0) as usize))),
        None => half.enc.unsent(None),
    };
    let arena = match &half.arena {
        Some(a) => {
            let st = a.export();
            Some(ArenaHandoff {
                memfd: register(a.arena.memfd())?,
                notify: register(a.notify_fd())?,
                data_len: st.data_len,
                threshold: st.threshold,
                next_seq: st.next_seq,
                ring: st.tail,
                trusted: false,
                lent: st.lent,
            })
        }
        None => None,
    };
    half.moved.store(true, Ordering::Relaxed);
    Ok(HandoffState {
        index,
        role: ROLE_SEND,
        max_frame: half_max_frame_send(half),
        started: half.enc.started(),
        bytes,
        arena,
    })
}

fn half_max_frame_send(half: &SendHalf) -> u64 {
    half.enc.max_frame() as u64
}

fn export_recv(half: &RecvHalf) -> Result<HandoffState> {
    let index = register(half.io.raw_fd())?;
    let settled = half
        .io
        .settle()
        .map_err(|e| Error::io("hand over receiver", e))?;
    let bytes = match &settled {
        // The read's buffer holds everything up to what the kernel wrote.
        Some((_, buf)) => buf.get(half.dec.consumed()..).unwrap_or_default().to_vec(),
        None => half.dec.unconsumed().to_vec(),
    };
    let arena = match &half.arena {
        Some(a) => {
            let (next_seq, head) = a.export()?;
            Some(ArenaHandoff {
                memfd: register(a.arena.memfd())?,
                notify: register(a.notify_fd())?,
                data_len: a.arena.data_len() as u64,
                threshold: 0,
                next_seq,
                ring: head,
                trusted: a.trusted,
                lent: Vec::new(),
            })
        }
        None => None,
    };
    Ok(HandoffState {
        index,
        role: ROLE_RECV,
        max_frame: half.dec.max_frame() as u64,
        started: half.dec.started(),
        bytes,
        arena,
    })
}

fn import(state: &ArchivedHandoffState, role: u8) -> Result<(Io, usize)> {
    if state.role != role {
        return Err(Error::new(
            ErrorKind::Protocol,
            "inherited handle has the wrong direction",
        ));
    }
    let fd = take_inherited(state.index.to_native())?;
    let io = Io::new(fd, Backend::Auto)?;
    Ok((io, state.max_frame.to_native() as usize))
}

/// A sender's arena state as the child reads it.
fn send_export(a: &ArchivedArenaHandoff) -> SendExport {
    SendExport {
        data_len: a.data_len.to_native(),
        threshold: a.threshold.to_native(),
        next_seq: a.next_seq.to_native(),
        tail: a.ring.to_native(),
        lent: a
            .lent
            .iter()
            .map(|t| (t.0.to_native(), t.1.to_native(), t.2.to_native()))
            .collect(),
    }
}

fn import_send(state: &ArchivedHandoffState) -> Result<SendHalf> {
    let (io, max) = import(state, ROLE_SEND)?;
    let mut half = SendHalf::resumed(io, Encoder::resume(max, state.started, &state.bytes));
    if let Some(a) = state.arena.as_ref() {
        let memfd = take_inherited(a.memfd.to_native())?;
        let notify = take_inherited(a.notify.to_native())?;
        half.arena = Some(SendArena::import(memfd, notify, &send_export(a))?);
    }
    Ok(half)
}

/// What a child rebuilds from a handed-over state without taking an fd:
/// the encoder or decoder resumed from the stream state, and a sender's
/// table of slots lent to the receiver, which is checked before any fd is
/// taken or mapped (`SendArena::import`). For the fuzz target
/// (`crate::__fuzz::decode_handoff`).
pub(crate) fn resume_without_fds(state: &ArchivedHandoffState) -> Result<ResumedState> {
    let max = state.max_frame.to_native() as usize;
    match state.role {
        ROLE_SEND => {
            let enc = Encoder::resume(max, state.started, &state.bytes);
            let slots = match state.arena.as_ref() {
                Some(a) => {
                    let st = send_export(a);
                    Some((SendArena::lent_slots(&st)?, st.data_len as usize))
                }
                None => None,
            };
            Ok(ResumedState::Send(enc, slots))
        }
        ROLE_RECV => Ok(ResumedState::Recv(Decoder::resume(
            max,
            state.started,
            &state.bytes,
        ))),
        _ => Err(Error::new(
            ErrorKind::Protocol,
            "inherited handle has an unknown direction",
        )),
    }
}

/// Archived states like those a parent sends (a sender with bytes unsent
/// and slots lent, a receiver with bytes undecoded), as fuzzing seeds.
pub(crate) fn sample_states() -> Vec<AlignedVec<16>> {
    let mut enc = Encoder::new(1 << 16);
    for len in [0, 5, 100] {
        enc.push(&vec![7; len]).expect("small frame");
    }
    let stream = enc.pending().to_vec();
    let send = HandoffState {
        index: 0,
        role: ROLE_SEND,
        max_frame: 1 << 16,
        started: true,
        bytes: stream[40..].to_vec(),
        arena: Some(ArenaHandoff {
            memfd: 1,
            notify: 2,
            data_len: 64 * 4096,
            threshold: 32 << 10,
            next_seq: 3,
            ring: 1,
            trusted: false,
            lent: vec![(0, 5000, 1), (8192, 4096, 2), (40960, 100_000, 0)],
        }),
    };
    let recv = HandoffState {
        index: 3,
        role: ROLE_RECV,
        max_frame: 1 << 16,
        started: false,
        bytes: stream,
        arena: None,
    };
    [send, recv]
        .iter()
        .map(|s| rkyv::to_bytes::<rkyv::rancor::Error>(s).expect("serializable"))
        .collect()
}

/// See [`resume_without_fds`].
pub(crate) enum ResumedState {
    /// The encoder, and the slot table with the arena's data length.
    Send(Encoder, Option<(arena::Slots, usize)>),
    Recv(Decoder),
}

fn import_recv(state: &ArchivedHandoffState) -> Result<RecvHalf> {
    let (io, max) = import(state, ROLE_RECV)?;
    let mut half = RecvHalf::resumed(io, Decoder::resume(max, state.started, &state.bytes));
    if let Some(a) = state.arena.as_ref() {
        let memfd = take_inherited(a.memfd.to_native())?;
        let notify = take_inherited(a.notify.to_native())?;
        half.arena = Some(arena::import_recv(
            memfd,
            notify,
            a.data_len.to_native() as usize,
            a.next_seq.to_native(),
            a.ring.to_native(),
            a.trusted,
        )?);
    }
    Ok(half)
}

macro_rules! handoff_impls {
    ($ty:ty, [$($g:ident)?], $export:ident, $import:ident, $wrap:expr, $half:ident) => {
        impl<$($g)?> Archive for $ty {
            type Archived = ArchivedHandoffState;
            type Resolver = HandoffResolver;

            fn resolve(&self, resolver: HandoffResolver, out: Place<ArchivedHandoffState>) {
                resolver.state.resolve(resolver.inner, out);
            }
        }

        impl<$($g,)? S> Serialize<S> for $ty
        where
            S: Fallible + Writer + Allocator + ?Sized,
            S::Error: Source,
        {
            fn serialize(&self, serializer: &mut S) -> Result<HandoffResolver, S::Error> {
                let state = $export(&self.$half)
                    .map_err(|e| S::Error::new(name_handle(e, std::any::type_name::<Self>())))?;
                let inner = state.serialize(serializer)?;
                Ok(HandoffResolver { state, inner })
            }
        }

        impl<$($g,)? D> Deserialize<$ty, D> for ArchivedHandoffState
        where
            D: Fallible + ?Sized,
            D::Error: Source,
        {
            fn deserialize(&self, _: &mut D) -> Result<$ty, D::Error> {
                $import(self).map($wrap).map_err(D::Error::new)
            }
        }
    };
}

handoff_impls!(
    Sender<T>,
    [T],
    export_send,
    import_send,
    Sender::from_half,
    half
);
handoff_impls!(
    Receiver<T>,
    [T],
    export_recv,
    import_recv,
    Receiver::from_half,
    half
);
handoff_impls!(
    BytesSender,
    [],
    export_send,
    import_send,
    |half| BytesSender { half },
    half
);
handoff_impls!(
    BytesReceiver,
    [],
    export_recv,
    import_recv,
    |half| BytesReceiver { half },
    half
);
