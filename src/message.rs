//! rkyv messages: serialization into the frame buffer and validated,
//! zero-copy access on receive.

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

/// Types that can be sent: anything `#[derive(rkyv::Archive, rkyv::Serialize)]`.
///
/// Implemented automatically; you never implement it by hand.
pub trait Encode:
    for<'a, 'b> Serialize<HighSerializer<&'b mut Vec<u8>, ArenaHandle<'a>, rancor::Error>>
{
}

impl<T> Encode for T where
    T: ?Sized
        + for<'a, 'b> Serialize<HighSerializer<&'b mut Vec<u8>, ArenaHandle<'a>, rancor::Error>>
{
}

/// Types that can be received: their archived form can be validated.
///
/// Implemented automatically for `#[derive(rkyv::Archive)]` types (rkyv's
/// derive implements `CheckBytes` for the archived type).
pub trait Decode:
    Archive<Archived: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>>
{
}

impl<T> Decode for T where
    T: Archive<Archived: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>>
{
}

/// Serializes `value` onto the end of `out` (rkyv's thread-local arena
/// provides reused scratch memory, so this does not allocate per message once
/// warm).
pub(crate) fn encode_into<T: Encode>(value: &T, out: &mut Vec<u8>) -> Result<()> {
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, out)
        .map(|_| ())
        .map_err(|e| Error::new(ErrorKind::Serialize, "send").with_source(e))
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
        let archived = rkyv::access::<T::Archived, rancor::Error>(bytes).map_err(|e| {
            Error::new(ErrorKind::InvalidMessage, "recv: payload failed validation").with_source(e)
        })?;
        Ok(Message { bytes, archived })
    }
}

impl<'a, T: Archive> Message<'a, T> {
    /// # Safety
    /// `bytes` must hold a valid archive of `T` (see `Receiver::recv_unchecked`).
    pub(crate) unsafe fn unchecked(bytes: &'a [u8]) -> Message<'a, T> {
        // SAFETY: the caller promises `bytes` holds a valid archived `T`, and
        // the framing layer placed it at a 16-byte-aligned address.
        let archived = unsafe { rkyv::access_unchecked::<T::Archived>(bytes) };
        Message { bytes, archived }
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
            .field("len", &self.bytes.len())
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
pub struct OwnedMessage<T: Archive> {
    bytes: AlignedVec<16>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Decode> OwnedMessage<T> {
    /// Validates `bytes` as an archived `T`.
    pub fn new(bytes: AlignedVec<16>) -> Result<OwnedMessage<T>> {
        Message::<T>::validate(&bytes)?;
        Ok(OwnedMessage {
            bytes,
            _t: PhantomData,
        })
    }
}

impl<T: Archive> OwnedMessage<T> {
    /// The archived value, in place.
    pub fn archived(&self) -> &T::Archived {
        // SAFETY: `bytes` was validated as an archived `T` in `new` and is
        // never mutated afterwards; AlignedVec keeps it 16-byte aligned.
        unsafe { rkyv::access_unchecked::<T::Archived>(&self.bytes) }
    }

    /// The raw archive bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
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
            .field("len", &self.bytes.len())
            .finish()
    }
}
