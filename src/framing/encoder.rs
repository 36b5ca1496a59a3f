//! The writing side: frames appended to a buffer that a kernel write drains.

use super::{
    ABSOLUTE_MAX_FRAME, COMPACT_AT, FRAME_ALIGN, FrameError, FrameKind, HEADER_LEN, SHRINK_ABOVE,
    header, hello_frame, padded,
};

/// Appends frames to a byte buffer.
///
/// The buffer only ever holds whole frames (or the unwritten tail of them), so
/// stream offsets and buffer offsets agree modulo 16: a payload serialized in
/// place has the same alignment here as in the receiver.
///
/// While the buffer is lent to an in-flight kernel write
/// ([`Encoder::take_buf`]), new frames collect in a second buffer and are
/// appended when it comes back, so nothing is lost or reordered.
#[derive(Debug)]
pub struct Encoder {
    buf: Vec<u8>,
    /// Bytes before `pos` are already written to the stream.
    pos: usize,
    /// Frames encoded while `buf` is lent out.
    next: Vec<u8>,
    lent: bool,
    /// Unwritten bytes of the buffer while it is lent out.
    lent_len: usize,
    max_frame: usize,
    hello_sent: bool,
}

impl Encoder {
    /// An encoder whose frames may carry at most `max_frame` payload bytes.
    pub fn new(max_frame: usize) -> Encoder {
        Encoder {
            buf: Vec::new(),
            pos: 0,
            next: Vec::new(),
            lent: false,
            lent_len: 0,
            max_frame: max_frame.min(ABSOLUTE_MAX_FRAME),
            hello_sent: false,
        }
    }

    /// Appends one data frame whose payload is produced by `fill`, which must
    /// only append to the vector it is given. On error (from `fill` or for an
    /// oversized payload) the buffer is left exactly as it was.
    #[inline]
    pub fn push_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
        too_large: impl FnOnce(usize, usize) -> E,
    ) -> Result<(), E> {
        self.push_kind_with(|b| fill(b).map(|()| FrameKind::Data), too_large)
    }

    /// Like [`Encoder::push_with`], but `fill` decides the frame's kind: it
    /// returns [`FrameKind::Data`] for a payload, or [`FrameKind::Arena`]
    /// after appending exactly [`DESCRIPTOR_LEN`](super::DESCRIPTOR_LEN) descriptor bytes.
    #[inline]
    pub fn push_kind_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<FrameKind, E>,
        too_large: impl FnOnce(usize, usize) -> E,
    ) -> Result<(), E> {
        if !self.lent {
            self.compact();
        }
        let hello = !self.hello_sent;
        let max = self.max_frame;
        let out = if self.lent {
            &mut self.next
        } else {
            &mut self.buf
        };
        let restore = out.len();
        if hello {
            out.extend_from_slice(&hello_frame());
        }
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        let kind = match fill(out) {
            Ok(kind) => kind,
            Err(e) => {
                out.truncate(restore);
                return Err(e);
            }
        };
        let len = out.len() - start - HEADER_LEN;
        if len > max && kind != FrameKind::Arena {
            out.truncate(restore);
            return Err(too_large(len, max));
        }
        out[start..start + HEADER_LEN].copy_from_slice(&header(kind, len as u32));
        out.resize(padded(out.len()), 0);
        self.hello_sent = true;
        Ok(())
    }

    /// Appends one data frame carrying `payload`.
    pub fn push(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        self.push_with(
            |b| {
                b.extend_from_slice(payload);
                Ok(())
            },
            |len, max| FrameError::TooLarge {
                len: len as u64,
                max,
            },
        )
    }

    /// Bytes encoded but not yet written (empty while the buffer is lent).
    #[inline]
    pub fn pending(&self) -> &[u8] {
        if self.lent {
            &[]
        } else {
            &self.buf[self.pos..]
        }
    }

    /// The payload limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Whether the stream's hello frame has been encoded.
    pub fn started(&self) -> bool {
        self.hello_sent
    }

    /// The bytes not yet written, for handing the stream to another process.
    /// `lent` is the buffer of a settled in-flight write and how many of its
    /// pending bytes the kernel wrote (required while the buffer is lent).
    pub fn unsent(&self, lent: Option<(&[u8], usize)>) -> Vec<u8> {
        let mut out = match lent {
            Some((buf, written)) if self.lent => {
                buf[(self.pos + written).min(buf.len())..].to_vec()
            }
            _ => self.buf[self.pos..].to_vec(),
        };
        out.extend_from_slice(&self.next);
        out
    }

    /// An encoder that continues a stream another encoder started: `started`
    /// says whether the hello frame went out, `unsent` holds the bytes that
    /// did not (possibly starting inside a frame).
    pub fn resume(max_frame: usize, started: bool, unsent: &[u8]) -> Encoder {
        let mut enc = Encoder::new(max_frame);
        enc.hello_sent = started;
        // The unsent bytes end on a frame boundary, a multiple of 16 into the
        // stream; pad their front so buffer offsets stay congruent to stream
        // offsets mod 16 (rkyv aligns relative to the buffer).
        let pad = (FRAME_ALIGN - unsent.len() % FRAME_ALIGN) % FRAME_ALIGN;
        enc.buf = Vec::with_capacity(pad + unsent.len());
        enc.buf.resize(pad, 0);
        enc.buf.extend_from_slice(unsent);
        enc.pos = pad;
        if enc.pos == enc.buf.len() {
            enc.buf.clear();
            enc.pos = 0;
        }
        enc
    }

    /// Bytes unwritten or in flight (what this encoder holds on to until
    /// the kernel takes it).
    #[inline]
    pub fn queued(&self) -> usize {
        if self.lent {
            // Never 0 while a write is in flight: callers read 0 as "idle".
            (self.lent_len + self.next.len()).max(1)
        } else {
            self.buf.len() - self.pos
        }
    }

    /// Whether anything is unwritten or in flight.
    #[inline]
    pub fn has_pending(&self) -> bool {
        self.lent || self.pos < self.buf.len()
    }

    /// Records that `n` pending bytes were written.
    #[inline]
    pub fn advance(&mut self, n: usize) {
        debug_assert!(!self.lent);
        self.pos += n;
        debug_assert!(self.pos <= self.buf.len());
        if self.pos == self.buf.len() {
            self.pos = 0;
            self.buf.clear();
        }
    }

    /// Lends the buffer to an in-flight kernel write: returns it and the
    /// offset of its first unwritten byte.
    pub fn take_buf(&mut self) -> (Vec<u8>, usize) {
        debug_assert!(!self.lent);
        self.lent = true;
        self.lent_len = self.buf.len() - self.pos;
        (std::mem::take(&mut self.buf), self.pos)
    }

    /// Puts back a buffer taken with [`Encoder::take_buf`], with frames
    /// encoded meanwhile appended.
    pub fn put_buf(&mut self, buf: Vec<u8>) {
        debug_assert!(self.lent);
        self.buf = buf;
        self.lent = false;
        self.lent_len = 0;
        if !self.next.is_empty() {
            // `buf` holds whole padded frames, so its length is a multiple of
            // 16 and appended frames keep their alignment.
            self.buf.extend_from_slice(&self.next);
            self.next.clear();
        }
    }

    #[inline]
    fn compact(&mut self) {
        // Dropping whole written frames keeps buffer and stream offsets equal mod 16.
        if self.pos >= COMPACT_AT && self.pos.is_multiple_of(FRAME_ALIGN) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
            self.buf = Vec::new();
        }
    }
}
