//! rkyv messages: serialization into the frame buffer and validated,
//! zero-copy access on receive.

use crate::arena::{Held, RecvArena};
use crate::error::{Error, ErrorKind, Result};
use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

/// Types that can be sent: anything `#[derive(rkyv::Archive, rkyv::Serialize)]`.
///
/// Implemented automatically; you never implement it by hand.
pub trait Encode:
    for<'a, 'b> Serialize<HighSerializer<&'b mut Vec<u8>, ArenaHandle<'a>, rancor::BoxedError>>
    + for<'a, 'b> Serialize<HighSerializer<SlotWriter<'b>, ArenaHandle<'a>, rancor::BoxedError>>
{
}

impl<T> Encode for T where
    T: ?Sized
        + for<'a, 'b> Serialize<HighSerializer<&'b mut Vec<u8>, ArenaHandle<'a>, rancor::BoxedError>>
        + for<'a, 'b> Serialize<HighSerializer<SlotWriter<'b>, ArenaHandle<'a>, rancor::BoxedError>>
{
}

/// Where a large message spills: the data area of the sender's arena and
/// the free extent it may use.
pub(crate) struct Spill {
    /// Start of the arena's data area in this process.
    pub(crate) data: *mut u8,
    /// The extent to use once the archive reaches `threshold`: (offset, length).
    pub(crate) extent: Option<(usize, usize)>,
    pub(crate) threshold: usize,
    /// Bytes written so far in the arena.
    pub(crate) written: usize,
    /// Set once the archive moved to the arena.
    pub(crate) spilled: bool,
    /// Set when the archive outgrew the extent: at least this many bytes
    /// were needed.
    pub(crate) overflow: Option<usize>,
}

impl Spill {
    /// Moves the archive begun at `vec[base..]` into the free extent, if
    /// the extent holds `need` bytes (at least what is there), and marks
    /// it spilled: the caller then writes on in the arena, or sends the
    /// descriptor. Otherwise records `need` as the overflow and leaves
    /// `vec` alone.
    pub(crate) fn move_in(&mut self, vec: &mut Vec<u8>, base: usize, need: usize) -> bool {
        let have = vec.len() - base;
        match self.extent {
            Some((off, len)) if len >= need.max(have) => {
                // SAFETY: the extent lies inside the data area and is free
                // (the sender alone allocates, and nobody else holds it),
                // `have <= len`, and the frame buffer does not overlap
                // shared memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(vec.as_ptr().add(base), self.data.add(off), have);
                }
                vec.truncate(base);
                self.written = have;
                self.spilled = true;
                true
            }
            _ => {
                self.overflow = Some(need.max(have));
                false
            }
        }
    }
}

#[derive(Debug)]
struct SlotFull;

impl fmt::Display for SlotFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("message does not fit in the free arena space")
    }
}

impl std::error::Error for SlotFull {}

/// The rkyv writer a [`Sender`](crate::Sender) serializes with: it writes
/// into the frame buffer and, once an archive reaches the channel's arena
/// threshold, moves what it wrote into a slot of the shared arena and
/// continues there, so a large message is written exactly once, in place.
///
/// It only appears in the bound of [`Encode`]; rkyv's derives implement
/// `Serialize` for it (and every other writer) automatically.
pub struct SlotWriter<'b> {
    vec: &'b mut Vec<u8>,
    base: usize,
    /// Writes that keep `vec.len()` below this stay in the frame buffer
    /// without a look at `spill`: the hot path of every small message is one
    /// compare and an append.
    fast_limit: usize,
    spill: Option<&'b mut Spill>,
}

impl<'b> SlotWriter<'b> {
    #[inline]
    pub(crate) fn new(vec: &'b mut Vec<u8>, spill: Option<&'b mut Spill>) -> SlotWriter<'b> {
        let base = vec.len();
        let fast_limit = match &spill {
            None => usize::MAX,
            Some(s) => base.saturating_add(s.threshold),
        };
        SlotWriter {
            vec,
            base,
            fast_limit,
            spill,
        }
    }

    /// Every write that does not stay under `fast_limit`: the first one to
    /// reach the threshold (which moves the archive into the arena), and
    /// every write after that.
    #[cold]
    #[inline(never)]
    fn write_slow(&mut self, bytes: &[u8]) -> std::result::Result<(), SlotFull> {
        let Some(s) = self.spill.as_deref_mut() else {
            self.vec.extend_from_slice(bytes);
            return Ok(());
        };
        if !s.spilled {
            let have = self.vec.len() - self.base;
            let need = have + bytes.len();
            if need < s.threshold || s.overflow.is_some() {
                self.vec.extend_from_slice(bytes);
                return Ok(());
            }
            if s.move_in(self.vec, self.base, need) {
                // From now on every write goes to the arena.
                self.fast_limit = 0;
            } else {
                // Inline from now on; the caller retries or sends inline.
                self.fast_limit = usize::MAX;
                return Err(SlotFull);
            }
        }
        let (off, len) = s.extent.expect("spilled into an extent");
        if s.written + bytes.len() > len {
            s.overflow = Some(s.written + bytes.len());
            return Err(SlotFull);
        }
        // SAFETY: `written + bytes.len() <= len`, so the copy stays inside the
        // free extent, which only this writer uses until it is sent.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), s.data.add(off + s.written), bytes.len());
        }
        s.written += bytes.len();
        Ok(())
    }
}

impl rkyv::ser::Positional for SlotWriter<'_> {
    #[inline]
    fn pos(&self) -> usize {
        match &self.spill {
            Some(s) if s.spilled => s.written,
            _ => self.vec.len() - self.base,
        }
    }
}

impl<E: rancor::Source> rkyv::ser::Writer<E> for SlotWriter<'_> {
    #[inline(always)]
    fn write(&mut self, bytes: &[u8]) -> std::result::Result<(), E> {
        if self.vec.len() + bytes.len() < self.fast_limit {
            self.vec.extend_from_slice(bytes);
            return Ok(());
        }
        self.write_slow(bytes).map_err(E::new)
    }
}

/// Types that can be received: their archived form can be validated.
///
/// Implemented automatically for `#[derive(rkyv::Archive)]` types (rkyv's
/// derive implements `CheckBytes` for the archived type). The archived type
/// must be `Send + Sync`, as archives of plain data are, so that received
/// messages ([`OwnedMessage`], pool results) can move between threads.
pub trait Decode:
    Archive<
    Archived: Portable
                  + Send
                  + Sync
                  + for<'a> CheckBytes<HighValidator<'a, rancor::Failure>>
                  + for<'a> CheckBytes<HighValidator<'a, rancor::BoxedError>>,
>
{
}

impl<T> Decode for T where
    T: Archive<
        Archived: Portable
                      + Send
                      + Sync
                      + for<'a> CheckBytes<HighValidator<'a, rancor::Failure>>
                      + for<'a> CheckBytes<HighValidator<'a, rancor::BoxedError>>,
    >
{
}

/// Serializes `value` onto the end of `out` (rkyv's thread-local arena
/// provides reused scratch memory, so this does not allocate per message once
/// warm).
#[inline]
pub(crate) fn encode_into<T: Encode>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    rkyv::api::high::to_bytes_in::<_, rancor::BoxedError>(value, out)
        .map(|_| ())
        .map_err(serialize_error)
}

/// Scratch memory for rkyv's serializer, kept by a sender. rkyv's
/// `to_bytes_in` borrows a thread-local arena per call instead; a sender
/// that owns its own skips that thread-local access and the extra shrink
/// (together about a tenth of a 64 B message's sending CPU, by perf). The
/// arena is made on first use: bytes senders never need one.
#[derive(Default)]
pub(crate) struct Scratch(Option<rkyv::ser::allocator::Arena>);

impl Scratch {
    #[inline]
    pub(crate) fn handle(&mut self) -> ArenaHandle<'_> {
        self.0.get_or_insert_with(Default::default).acquire()
    }
}

/// [`encode_into`] with the sender's own scratch memory, into any writer
/// (the send buffer, or a `SlotWriter` that spills into the arena).
#[inline]
pub(crate) fn encode_with<T, W>(value: &T, out: W, scratch: &mut Scratch) -> Result<()>
where
    T: for<'a> Serialize<HighSerializer<W, ArenaHandle<'a>, rancor::BoxedError>>,
    W: rkyv::ser::Writer<rancor::BoxedError>,
{
    rkyv::api::high::to_bytes_in_with_alloc::<_, _, rancor::BoxedError>(
        value,
        out,
        scratch.handle(),
    )
    .map(drop)
    .map_err(serialize_error)
}

/// A serializer error as a ringipc error. rkyv's `BoxedError` keeps the
/// cause (its `rancor::Error` drops it in release builds); a ringipc error
/// raised inside serialization (a channel handle refused) keeps its kind.
pub(crate) fn serialize_error(e: rancor::BoxedError) -> Error {
    match rancor::BoxedError::inner(&e).downcast_ref::<Error>() {
        Some(inner) => Error::new(inner.kind(), "send").with_source(e),
        None => Error::new(ErrorKind::Serialize, "send").with_source(e),
    }
}

/// A received message, borrowed in place from the receiver's buffer.
///
/// It derefs to `T::Archived` (validated once when it was received), so
/// reading fields copies nothing. Call [`Message::deserialize`] for an owned
/// `T`. The borrow ends before the next `recv` on the same receiver.
pub struct Message<'a, T: Archive> {
    bytes: &'a [u8],
    archived: &'a T::Archived,
}

impl<'a, T: Decode> Message<'a, T> {
    /// Validates `bytes` as an archived `T` (as `recv` does). `bytes` must
    /// start at a 16-byte-aligned address, as every payload a receiver hands
    /// out does; a misaligned or invalid archive is [`ErrorKind::InvalidMessage`].
    ///
    /// ```
    /// use ringipc::{Message, rkyv};
    /// let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&vec![1u16, 2]).unwrap();
    /// let msg = Message::<Vec<u16>>::validate(&bytes)?;
    /// assert_eq!(msg[1], 2);
    /// assert!(Message::<Vec<u16>>::validate(&[0xff; 3]).is_err());
    /// # Ok::<(), ringipc::Error>(())
    /// ```
    pub fn validate(bytes: &'a [u8]) -> Result<Message<'a, T>> {
        if let Ok(archived) = rkyv::access::<T::Archived, rancor::Failure>(bytes) {
            return Ok(Message { bytes, archived });
        }
        let archived = rkyv::access::<T::Archived, rancor::BoxedError>(bytes).map_err(|e| {
            Error::new(ErrorKind::InvalidMessage, "recv: payload failed validation").with_source(e)
        })?;
        Ok(Message { bytes, archived })
    }
}

impl<'a, T: Archive> Message<'a, T> {
    /// # Safety
    /// `bytes` must hold a valid archive of `T` (see `Receiver::recv_unchecked`).
    /// Checks what costs nothing: that the root (the last
    /// `size_of::<T::Archived>()` bytes) exists and is aligned.
    pub(crate) unsafe fn unchecked(bytes: &'a [u8]) -> Result<Message<'a, T>> {
        let size = std::mem::size_of::<T::Archived>();
        let align = std::mem::align_of::<T::Archived>();
        let root = bytes.len().checked_sub(size).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidMessage,
                format!(
                    "recv_unchecked: a payload of {} bytes cannot hold an archived root of {size} bytes",
                    bytes.len()
                ),
            )
        })?;
        if !(bytes.as_ptr() as usize + root).is_multiple_of(align) {
            return Err(Error::new(
                ErrorKind::InvalidMessage,
                format!("recv_unchecked: the archived root would not be aligned to {align} bytes"),
            ));
        }
        // SAFETY: the caller promises `bytes` holds a valid archived `T`; the
        // root was just checked to lie inside `bytes` and to be aligned.
        let archived = unsafe { rkyv::access_unchecked::<T::Archived>(bytes) };
        Ok(Message { bytes, archived })
    }

    /// The archived value, in place.
    pub fn archived(&self) -> &'a T::Archived {
        self.archived
    }

    /// The raw payload bytes (the rkyv archive).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Deserializes into an owned `T`.
    pub fn deserialize(&self) -> Result<T>
    where
        T::Archived: Deserialize<T, HighDeserializer<rancor::Error>>,
    {
        rkyv::deserialize::<T, rancor::Error>(self.archived)
            .map_err(|e| Error::new(ErrorKind::InvalidMessage, "deserialize").with_source(e))
    }
}

impl<T: Archive> Deref for Message<'_, T> {
    type Target = T::Archived;

    fn deref(&self) -> &T::Archived {
        self.archived
    }
}

impl<T: Archive> fmt::Debug for Message<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.bytes().len())
            .finish()
    }
}

/// A validated message that owns its bytes (a [`Message`] that can be kept,
/// moved to another task or thread, and outlive the channel it came from).
///
/// ```
/// use ringipc::{OwnedMessage, rkyv};
/// let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&"owned".to_string()).unwrap();
/// let msg = OwnedMessage::<String>::new(bytes)?;
/// assert_eq!(msg.as_str(), "owned");
/// # Ok::<(), ringipc::Error>(())
/// ```
///
/// It is `Send` and `Sync` exactly when `T::Archived` is, as a value that
/// owns a `T::Archived` would be (it hands out `&T::Archived` through
/// `Deref`):
///
/// ```compile_fail
/// // An archive that is neither Send nor Sync cannot cross threads.
/// fn assert_send<S: Send>() {}
/// assert_send::<ringipc::OwnedMessage<std::marker::PhantomData<*const u8>>>();
/// ```
pub struct OwnedMessage<T: Archive> {
    bytes: Storage,
    _t: PhantomData<fn() -> T>,
    /// Ties the auto traits to the archived type the bytes hold.
    _archived: PhantomData<T::Archived>,
}

/// Where an owned message's bytes live.
pub(crate) enum Storage {
    Heap(AlignedVec<16>),
    /// A slot of a channel's arena, given back to the sender on drop.
    Slot(SlotGuard),
}

/// Holds an arena slot; gives it back when dropped.
pub(crate) struct SlotGuard {
    pub(crate) arena: Arc<RecvArena>,
    pub(crate) held: Held,
}

impl SlotGuard {
    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: the slot is held until this guard drops, and guards are
        // only made for arenas read in place (`RecvArena::in_place`).
        unsafe { self.arena.bytes(&self.held) }
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.arena.release(&self.held);
    }
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Heap(v) => v,
            Storage::Slot(g) => g.bytes(),
        }
    }
}

impl<T: Decode> OwnedMessage<T> {
    /// Validates `bytes` as an archived `T`.
    pub fn new(bytes: AlignedVec<16>) -> Result<OwnedMessage<T>> {
        OwnedMessage::from_storage(Storage::Heap(bytes))
    }

    pub(crate) fn from_storage(bytes: Storage) -> Result<OwnedMessage<T>> {
        Message::<T>::validate(bytes.bytes())?;
        Ok(OwnedMessage {
            bytes,
            _t: PhantomData,
            _archived: PhantomData,
        })
    }
}

impl<T: Archive> OwnedMessage<T> {
    /// The archived value, in place.
    pub fn archived(&self) -> &T::Archived {
        // SAFETY: `bytes` was validated as an archived `T` in `new` and is
        // never mutated afterwards (an arena slot is held until drop and only
        // read in place when no other process can write it); both storages
        // are 16-byte aligned.
        unsafe { rkyv::access_unchecked::<T::Archived>(self.bytes.bytes()) }
    }

    /// The raw archive bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.bytes()
    }

    /// Deserializes into an owned `T`.
    pub fn deserialize(&self) -> Result<T>
    where
        T::Archived: Deserialize<T, HighDeserializer<rancor::Error>>,
    {
        rkyv::deserialize::<T, rancor::Error>(self.archived())
            .map_err(|e| Error::new(ErrorKind::InvalidMessage, "deserialize").with_source(e))
    }
}

impl<T: Archive> Deref for OwnedMessage<T> {
    type Target = T::Archived;

    fn deref(&self) -> &T::Archived {
        self.archived()
    }
}

impl<T: Archive> fmt::Debug for OwnedMessage<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedMessage")
            .field("type", &std::any::type_name::<T>())
            .field("len", &self.bytes().len())
            .finish()
    }
}
