//! Typed ends: [`Sender`], [`Receiver`] and the [`Duplex`] pair, rkyv
//! messages over the shared send and receive halves.

use super::{BytesReceiver, BytesSender, RecvHalf, SendHalf};
use crate::backend::Backend;
use crate::error::Result;
use crate::message::{Decode, Encode, Message, OwnedMessage};
use std::marker::PhantomData;
use std::ops::Range;
use std::time::Duration;

#[cfg(doc)]
use super::ChannelConfig;
#[cfg(doc)]
use crate::error::ErrorKind;

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
    #[inline]
    pub async fn feed(&mut self, value: &T) -> Result<()> {
        if self.half.push_message(value).await? {
            // The message is already in shared memory: its descriptor goes
            // out now, so the receiver works while the sender serializes the
            // next one (holding descriptors back would serialize the two).
            return self.half.flush().await;
        }
        // `wait_room`, spelled out (see `SendHalf::push_payload`).
        if self.half.at_high_water() {
            self.half.flush().await?;
        }
        Ok(())
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
    #[inline]
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
    pub(super) tx: Sender<S>,
    pub(super) rx: Receiver<R>,
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
