//! The reading side: frames split out of an untrusted byte stream, in place.

use super::{
    ABSOLUTE_MAX_FRAME, DESCRIPTOR_LEN, FRAME_ALIGN, FrameError, FrameKind, HEADER_LEN, HELLO_LEN,
    HELLO_MAGIC, MAGIC, READ_CHUNK, SCALE, SHRINK_ABOVE, SMALL_READ_MAX, VERSION, padded,
    parse_header,
};
use rkyv::util::AlignedVec;
use std::ops::Range;

/// Splits frames out of a byte stream.
///
/// Feed it with [`Decoder::reserve`] + [`Decoder::commit`] (or
/// [`Decoder::feed`]), take frames with [`Decoder::next_frame`], and report end
/// of stream with [`Decoder::eof`].
#[derive(Debug)]
pub struct Decoder {
    buf: AlignedVec<FRAME_ALIGN>,
    /// Start of the first unconsumed frame; always a multiple of 16.
    start: usize,
    max_frame: usize,
    hello_seen: bool,
    /// Set once the stream is broken or closed; every later call returns it.
    failed: Option<FrameError>,
    /// The buffer is lent out to an in-flight kernel read.
    lent: bool,
    /// Capacity of the buffer while it is lent out.
    lent_capacity: usize,
    /// How much a read of small frames asks for: starts at `MIN_CHUNK` and
    /// doubles up to `SMALL_READ_MAX` each time a read fills all it was
    /// offered, so a quiet channel holds a few KiB, a busy one reads 256 KiB
    /// at once.
    chunk: usize,
    /// The room the last `reserve` offered.
    offered: usize,
}

/// The first read size of a receiver (see `Decoder::chunk`).
const MIN_CHUNK: usize = (4 * 1024) / SCALE;

impl Decoder {
    /// A decoder that rejects payloads longer than `max_frame` before
    /// allocating room for them.
    pub fn new(max_frame: usize) -> Decoder {
        Decoder {
            buf: AlignedVec::new(),
            start: 0,
            max_frame: max_frame.min(ABSOLUTE_MAX_FRAME),
            hello_seen: false,
            failed: None,
            lent: false,
            lent_capacity: 0,
            chunk: MIN_CHUNK,
            offered: 0,
        }
    }

    /// The payload limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Decodes the next data frame, returning the range of its payload in
    /// [`Decoder::buffer`]. `Ok(None)` means more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Range<usize>>, FrameError> {
        match self.next_any()? {
            None => Ok(None),
            Some((FrameKind::Data, r)) => Ok(Some(r)),
            Some(_) => Err(self.fail(FrameError::Protocol(
                "arena descriptor on a stream without an arena",
            ))),
        }
    }

    /// Decodes the next data or arena-descriptor frame: its kind and the
    /// range of its payload in [`Decoder::buffer`]. A descriptor frame's
    /// payload is exactly [`DESCRIPTOR_LEN`] bytes (else a protocol error).
    #[inline]
    pub fn next_any(&mut self) -> Result<Option<(FrameKind, Range<usize>)>, FrameError> {
        match self.next_data_fast() {
            Some(payload) => Ok(Some((FrameKind::Data, payload))),
            None => self.next_any_slow(),
        }
    }

    /// The common case of [`Decoder::next_any`], small enough to inline
    /// into the receive loop: a whole, valid data frame after the hello.
    /// Anything else (`None`) goes through `next_any_slow`, which accepts
    /// exactly the same frames, so this only saves time. (Measured on 64 B
    /// frames: the out-of-line call and its returned range, stored in two
    /// halves and loaded as one, were a tenth of the receiver's CPU.)
    #[inline]
    pub(crate) fn next_data_fast(&mut self) -> Option<Range<usize>> {
        if !self.hello_seen || self.lent || self.failed.is_some() {
            return None;
        }
        let h: &[u8; HEADER_LEN] = self
            .buf
            .get(self.start..self.start + HEADER_LEN)?
            .try_into()
            .ok()?;
        // A data header is `len: u32 LE`, kind 2, three zero bytes, the
        // magic, four zero bytes (`header`): two words to compare.
        let lo = u64::from_le_bytes(h[..8].try_into().ok()?);
        let hi = u64::from_le_bytes(h[8..].try_into().ok()?);
        if lo >> 32 != FrameKind::Data as u64 || hi != u64::from(u32::from_le_bytes(MAGIC)) {
            return None;
        }
        let len = lo as u32 as usize;
        let total = HEADER_LEN + padded(len);
        if len > self.max_frame || self.buf.len() - self.start < total {
            return None;
        }
        let payload = self.start + HEADER_LEN..self.start + HEADER_LEN + len;
        self.start += total;
        Some(payload)
    }

    pub(super) fn next_any_slow(
        &mut self,
    ) -> Result<Option<(FrameKind, Range<usize>)>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.lent {
            return Ok(None);
        }
        loop {
            let avail = &self.buf[self.start..];
            if avail.len() < HEADER_LEN {
                return Ok(None);
            }
            let (kind, len) =
                match parse_header(&avail[..HEADER_LEN], self.max_frame.max(HELLO_LEN)) {
                    Ok(h) => h,
                    Err(e) => return Err(self.fail(e)),
                };
            let total = HEADER_LEN + padded(len);
            if avail.len() < total {
                return Ok(None);
            }
            let payload = self.start + HEADER_LEN..self.start + HEADER_LEN + len;
            self.start += total;
            match (kind, self.hello_seen) {
                (FrameKind::Hello, false) => {
                    let p = &self.buf[payload];
                    if p.len() != HELLO_LEN || p[0..4] != HELLO_MAGIC {
                        return Err(self.fail(FrameError::Protocol("malformed hello frame")));
                    }
                    let version = u16::from_le_bytes([p[4], p[5]]);
                    if version != VERSION {
                        return Err(self.fail(FrameError::UnknownVersion(version)));
                    }
                    self.hello_seen = true;
                }
                (FrameKind::Hello, true) => {
                    return Err(self.fail(FrameError::Protocol("second hello frame")));
                }
                (FrameKind::Data | FrameKind::Arena, false) => {
                    return Err(self.fail(FrameError::Protocol("stream does not start with hello")));
                }
                (FrameKind::Arena, true) => {
                    if len != DESCRIPTOR_LEN {
                        return Err(
                            self.fail(FrameError::Protocol("arena descriptor of the wrong length"))
                        );
                    }
                    return Ok(Some((FrameKind::Arena, payload)));
                }
                (FrameKind::Data, true) => {
                    if len > self.max_frame {
                        return Err(self.fail(FrameError::TooLarge {
                            len: len as u64,
                            max: self.max_frame,
                        }));
                    }
                    return Ok(Some((FrameKind::Data, payload)));
                }
            }
        }
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e.clone());
        e
    }

    /// The decoder's buffer; ranges from [`Decoder::next_frame`] index into it
    /// and stay valid until the next `&mut` call.
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Reports end of stream: `Closed` on a frame boundary, `Truncated`
    /// inside a frame. Frames already buffered must be taken first.
    pub fn eof(&mut self) -> FrameError {
        if let Some(e) = &self.failed {
            return e.clone();
        }
        let have = self.buf.len() - self.start;
        let e = if have == 0 {
            FrameError::Closed
        } else {
            FrameError::Truncated { have }
        };
        self.fail(e)
    }

    /// Whether the hello frame has been received.
    pub fn started(&self) -> bool {
        self.hello_seen
    }

    /// Offset of the first unconsumed byte in the buffer.
    pub fn consumed(&self) -> usize {
        self.start
    }

    /// The bytes received but not yet decoded (empty while the buffer is lent).
    pub fn unconsumed(&self) -> &[u8] {
        if self.lent {
            &[]
        } else {
            &self.buf[self.start..]
        }
    }

    /// A decoder that continues a stream another decoder started.
    pub fn resume(max_frame: usize, started: bool, unconsumed: &[u8]) -> Decoder {
        let mut dec = Decoder::new(max_frame);
        dec.hello_seen = started;
        dec.feed(unconsumed);
        dec
    }

    /// Whether the stream has failed or closed.
    pub fn is_done(&self) -> bool {
        self.failed.is_some()
    }

    /// How many bytes the next read should make room for, and at most
    /// ask for. Inside a large frame (over a read chunk) whose header has
    /// arrived, the read asks for at most the rest of it, also for its last
    /// few bytes, so it ends on the frame boundary and the buffer empties
    /// without moving bytes; room grows with the bytes that arrived,
    /// doubling, never with what the header claims: a peer that announces
    /// 256 MiB and sends 100 bytes costs a read chunk. Otherwise a read asks
    /// for the current read size (`chunk`: 4 KiB, growing to 256 KiB while
    /// reads come back full), and at most that, so the start of a large
    /// frame read together with small ones, which must move to the front of
    /// the buffer once they are consumed, is at most that long. (Measured
    /// before a cap: 1 MiB frames back to back spent 12% of the receiver's
    /// time moving the next frame's first part, read along with the
    /// previous frame's tail.)
    fn wanted(&self) -> (usize, usize) {
        let avail = &self.buf[self.start..];
        if avail.len() >= HEADER_LEN
            && let Ok((_, len)) = parse_header(&avail[..HEADER_LEN], self.max_frame.max(HELLO_LEN))
        {
            let total = HEADER_LEN + padded(len);
            let rest = total.saturating_sub(avail.len());
            if total > READ_CHUNK && rest > 0 {
                return (rest.min(avail.len().max(READ_CHUNK)), rest);
            }
            return (rest.max(self.chunk), self.chunk.max(READ_CHUNK));
        }
        (self.chunk, self.chunk)
    }

    /// Makes room for a read and returns the writable region, which is
    /// uninitialised memory: write into it, then call [`Decoder::commit`].
    /// Never grows past one maximum frame plus a read chunk, nor past about
    /// twice the bytes buffered plus a read chunk.
    pub fn reserve(&mut self) -> (*mut u8, usize) {
        let (want, cap) = self.wanted();
        if self.start == self.buf.len() {
            // Everything consumed: start over at offset 0 (keeps alignment).
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > SHRINK_ABOVE {
                self.buf = AlignedVec::new();
            }
        } else if self.buf.capacity() - self.buf.len() < want && self.start > 0 {
            // Move the unconsumed tail to the front. `start` is a multiple of
            // 16, so payload alignment is preserved.
            let len = self.buf.len() - self.start;
            self.buf.copy_within(self.start.., 0);
            // SAFETY: shrinking; the first `len` bytes were just initialised by the copy.
            unsafe { self.buf.set_len(len) };
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < want {
            // `wanted` already doubles a large frame's room; growing exactly
            // keeps the last step from overshooting the frame.
            if want > READ_CHUNK {
                self.buf.reserve_exact(want);
            } else {
                self.buf.reserve(want);
            }
        }
        let len = self.buf.len();
        let spare = (self.buf.capacity() - len).min(cap);
        self.offered = spare;
        // SAFETY: `len <= capacity`, so the offset stays inside the allocation.
        let ptr = unsafe { self.buf.as_mut_ptr().add(len) };
        (ptr, spare)
    }

    /// Marks `n` bytes written into the region from [`Decoder::reserve`] as data.
    ///
    /// # Safety
    /// The first `n` bytes of the last reserved region must have been
    /// initialised, and `n` must not exceed its length.
    pub unsafe fn commit(&mut self, n: usize) {
        if n >= self.offered && self.chunk < SMALL_READ_MAX {
            // The read filled all it was offered: more was probably waiting.
            self.chunk *= 2;
        }
        let new_len = self.buf.len() + n;
        debug_assert!(new_len <= self.buf.capacity());
        // SAFETY: the caller promises the bytes up to `new_len` are initialised
        // and within capacity.
        unsafe { self.buf.set_len(new_len) };
    }

    /// Copies `bytes` in (the safe way to feed a decoder, used by tests and fuzzers).
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (ptr, spare) = self.reserve();
            let n = spare.min(bytes.len());
            // SAFETY: `ptr` points at `spare >= n` writable bytes that do not
            // overlap `bytes` (a distinct allocation owned by the caller).
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), ptr, n);
                self.commit(n);
            }
            bytes = &bytes[n..];
        }
    }

    /// Takes the buffer out for an in-flight kernel read, leaving an empty one.
    /// Until [`Decoder::put_buf`], [`Decoder::next_frame`] reports no frame.
    pub fn take_buf(&mut self) -> AlignedVec<FRAME_ALIGN> {
        debug_assert!(!self.lent);
        self.lent = true;
        self.lent_capacity = self.buf.capacity();
        std::mem::take(&mut self.buf)
    }

    /// Puts back a buffer taken with [`Decoder::take_buf`].
    pub fn put_buf(&mut self, buf: AlignedVec<FRAME_ALIGN>) {
        self.buf = buf;
        self.lent = false;
    }

    /// Bytes of memory the receive buffer holds (also while it is lent to a
    /// read in flight).
    pub fn capacity(&self) -> usize {
        if self.lent {
            self.lent_capacity
        } else {
            self.buf.capacity()
        }
    }
}
