//! Raw-bytes ends: [`BytesSender`] and [`BytesReceiver`], frames with no
//! rkyv, for peers in other languages and for the library's own control
//! and pool pipes.

use super::{OwnedFrame, Receiver, RecvHalf, SendHalf, Sender};
use crate::backend::Backend;
use crate::error::{Error, ErrorKind, Result};
use crate::framing::FrameKind;
use crate::message::Encode;
use std::time::Duration;

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
        self.half.wait_room().await
    }

    /// Queues `bytes` (serialized already, meant to be read 16-byte
    /// aligned) as one frame, through the arena when the channel has one
    /// and they reach its threshold. Fails with nothing queued.
    pub(crate) async fn feed_frame(&mut self, bytes: &[u8]) -> Result<()> {
        if self.half.push_bytes(bytes).await? {
            return self.half.flush().await;
        }
        self.half.wait_room().await
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
    #[inline]
    pub async fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        // `wait_room`, spelled out (as in `SendHalf::push_payload`): an
        // awaited call of that small async fn is not inlined, and cost this
        // loop of 64 B frames a tenth of its CPU.
        if self.half.at_high_water() {
            self.half.flush().await?;
        }
        self.half.push(|buf| {
            buf.extend_from_slice(bytes);
            Ok(())
        })?;
        if self.half.at_high_water() {
            self.half.flush().await?;
        }
        Ok(())
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
