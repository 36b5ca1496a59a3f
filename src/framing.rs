//! Sans-I/O framing: bytes in, frames out. No syscalls and no async here, so
//! property tests and fuzzers reach all of it. The format is specified byte by
//! byte in `docs/wire-format.md`.
//!
//! Every frame is a 16-byte header, the payload, and zero padding up to the next
//! multiple of 16. Because every frame starts at a stream offset that is a
//! multiple of 16 and the receive buffer is 16-byte aligned, every payload lands
//! at a 16-byte-aligned address without a copy (rkyv needs that alignment).

use rkyv::util::AlignedVec;
use std::ops::Range;

/// Size of a frame header in bytes.
pub const HEADER_LEN: usize = 16;
/// Frames (header + payload + padding) are multiples of this.
pub const FRAME_ALIGN: usize = 16;
/// The format version this crate writes in its hello frame and accepts.
pub const VERSION: u16 = 1;
/// Magic bytes at offset 8 of every header.
pub const MAGIC: [u8; 4] = *b"RIPC";
/// Magic bytes at the start of the hello payload.
pub const HELLO_MAGIC: [u8; 4] = *b"RNGI";
/// Length of the hello payload.
pub const HELLO_LEN: usize = 8;
/// Default maximum payload length: 256 MiB.
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;
/// Largest payload the header can express.
pub const ABSOLUTE_MAX_FRAME: usize = u32::MAX as usize - FRAME_ALIGN;

/// The kind byte of a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// First frame of every stream: carries the format version.
    Hello = 1,
    /// A message payload.
    Data = 2,
    /// A descriptor of a message that lives in the channel's shared arena
    /// (payload: [`DESCRIPTOR_LEN`] bytes, see docs/wire-format.md).
    Arena = 3,
}

/// Payload length of an [`FrameKind::Arena`] descriptor frame.
pub const DESCRIPTOR_LEN: usize = 32;

/// Why a stream could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The header announces a payload longer than the receiver's limit.
    TooLarge {
        /// Announced payload length.
        len: u64,
        /// The receiver's limit.
        max: usize,
    },
    /// A header or hello frame breaks the format.
    Protocol(&'static str),
    /// The peer speaks a format version this crate does not know.
    UnknownVersion(u16),
    /// End of stream inside a frame.
    Truncated {
        /// Bytes of the unfinished frame that had arrived.
        have: usize,
    },
    /// End of stream on a frame boundary: an orderly close.
    Closed,
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the limit of {max} bytes")
            }
            FrameError::Protocol(what) => write!(f, "bad frame: {what}"),
            FrameError::UnknownVersion(v) => {
                write!(
                    f,
                    "peer speaks format version {v}, this side knows {VERSION}"
                )
            }
            FrameError::Truncated { have } => {
                write!(f, "stream ended {have} bytes into a frame")
            }
            FrameError::Closed => f.write_str("stream closed"),
        }
    }
}

impl std::error::Error for FrameError {}

/// The payload of an [`FrameKind::Arena`] frame: where a message lies in
/// the channel's shared arena (see docs/wire-format.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    /// Offset of the slot from the start of the arena's data area.
    pub offset: u64,
    /// Length of the archive in the slot.
    pub len: u64,
    /// Sequence number: 0 for the first descriptor of a stream, then +1.
    pub seq: u64,
}

impl Descriptor {
    /// The [`DESCRIPTOR_LEN`]-byte wire form.
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut b = [0u8; DESCRIPTOR_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Parses the wire form. Only the layout is checked here; whether the
    /// slot is inside the arena, in sequence and not overlapping a held one
    /// is the receiver's check.
    pub fn decode(b: &[u8]) -> Result<Descriptor, FrameError> {
        if b.len() != DESCRIPTOR_LEN {
            return Err(FrameError::Protocol("arena descriptor of the wrong length"));
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if u(24) != 0 {
            return Err(FrameError::Protocol(
                "arena descriptor: reserved bytes are not zero",
            ));
        }
        Ok(Descriptor {
            offset: u(0),
            len: u(8),
            seq: u(16),
        })
    }
}

/// Slots of an arena start at multiples of this many bytes.
pub const SLOT_ALIGN: usize = 4096;

/// The receiver's check of untrusted descriptors (sans-I/O): which slots
/// messages still hold, and which sequence number is due.
#[derive(Debug, Clone, Default)]
pub struct HeldSlots {
    /// offset -> end of each held slot.
    held: std::collections::BTreeMap<u64, u64>,
    next_seq: u64,
}

impl HeldSlots {
    /// A table for an arena whose data area holds nothing yet, expecting
    /// sequence `next_seq` first.
    pub fn new(next_seq: u64) -> HeldSlots {
        HeldSlots {
            held: Default::default(),
            next_seq,
        }
    }

    /// The sequence number the next descriptor must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether no slot is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Checks a descriptor against an arena of `data_len` bytes and records
    /// its slot as held: it must carry the due sequence number, lie inside
    /// the arena, start on a slot boundary, be non-empty, and not overlap a
    /// held slot. On error nothing changes.
    pub fn accept(&mut self, d: &Descriptor, data_len: u64) -> Result<(), String> {
        if d.seq != self.next_seq {
            return Err(format!(
                "arena descriptor out of order or stale: sequence {} where {} was due",
                d.seq, self.next_seq
            ));
        }
        let end = d.offset.checked_add(d.len);
        if d.len == 0
            || !d.offset.is_multiple_of(SLOT_ALIGN as u64)
            || end.is_none_or(|e| e > data_len)
        {
            return Err(format!(
                "arena descriptor out of bounds: offset {} length {} in an arena of {data_len}",
                d.offset, d.len
            ));
        }
        let end = end.expect("checked above");
        let overlaps = self
            .held
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > d.offset);
        if overlaps {
            return Err("arena descriptor overlaps a slot a message still holds".into());
        }
        self.held.insert(d.offset, end);
        self.next_seq += 1;
        Ok(())
    }

    /// Forgets the slot at `offset`; false if it was not held.
    pub fn release(&mut self, offset: u64) -> bool {
        self.held.remove(&offset).is_some()
    }
}

/// Rounds `n` up to a multiple of [`FRAME_ALIGN`].
pub const fn padded(n: usize) -> usize {
    (n + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// Writes a header for a payload of `len` bytes.
pub fn header(kind: FrameKind, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4] = kind as u8;
    h[8..12].copy_from_slice(&MAGIC);
    h
}

fn parse_header(h: &[u8], max: usize) -> Result<(FrameKind, usize), FrameError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if h[8..12] != MAGIC {
        return Err(FrameError::Protocol("bad magic"));
    }
    let kind = match h[4] {
        1 => FrameKind::Hello,
        2 => FrameKind::Data,
        3 => FrameKind::Arena,
        _ => return Err(FrameError::Protocol("unknown frame kind")),
    };
    if h[5] != 0 || h[6] != 0 || h[7] != 0 || h[12..16] != [0; 4] {
        return Err(FrameError::Protocol("reserved header bytes are not zero"));
    }
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    Ok((kind, len))
}

/// The hello frame a writer puts at the start of every stream.
pub fn hello_frame() -> [u8; HEADER_LEN + 16] {
    let mut f = [0u8; HEADER_LEN + 16];
    f[..HEADER_LEN].copy_from_slice(&header(FrameKind::Hello, HELLO_LEN as u32));
    f[HEADER_LEN..HEADER_LEN + 4].copy_from_slice(&HELLO_MAGIC);
    f[HEADER_LEN + 4..HEADER_LEN + 6].copy_from_slice(&VERSION.to_le_bytes());
    f
}

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
    pub fn push_with<E>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
        too_large: impl FnOnce(usize, usize) -> E,
    ) -> Result<(), E> {
        self.push_kind_with(|b| fill(b).map(|()| FrameKind::Data), too_large)
    }

    /// Like [`Encoder::push_with`], but `fill` decides the frame's kind: it
    /// returns [`FrameKind::Data`] for a payload, or [`FrameKind::Arena`]
    /// after appending exactly [`DESCRIPTOR_LEN`] descriptor bytes.
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
    pub fn queued(&self) -> usize {
        if self.lent {
            // Never 0 while a write is in flight: callers read 0 as "idle".
            (self.lent_len + self.next.len()).max(1)
        } else {
            self.buf.len() - self.pos
        }
    }

    /// Whether anything is unwritten or in flight.
    pub fn has_pending(&self) -> bool {
        self.lent || self.pos < self.buf.len()
    }

    /// Records that `n` pending bytes were written.
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

    fn compact(&mut self) {
        // Dropping whole written frames keeps buffer and stream offsets equal mod 16.
        if self.pos >= 64 * 1024 && self.pos.is_multiple_of(FRAME_ALIGN) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > SHRINK_ABOVE {
            self.buf = Vec::new();
        }
    }
}

/// Buffers larger than this are released once empty, so one huge message does
/// not pin its memory for the life of the channel.
const SHRINK_ABOVE: usize = 4 << 20;
/// Smallest read the decoder asks for.
pub const READ_CHUNK: usize = 64 * 1024;

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
    /// doubles up to `READ_CHUNK` each time a read fills all it was offered,
    /// so a quiet channel holds a few KiB, a busy one reads 64 KiB at once.
    chunk: usize,
    /// The room the last `reserve` offered.
    offered: usize,
}

/// The first read size of a receiver (see `Decoder::chunk`).
const MIN_CHUNK: usize = 4 * 1024;

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
    pub fn next_any(&mut self) -> Result<Option<(FrameKind, Range<usize>)>, FrameError> {
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
    /// for the current read size (`chunk`: 4 KiB, growing to a read chunk
    /// while reads come back full), and at most a read chunk, so the start
    /// of a large frame read together
    /// with small ones, which must move to the front of the buffer once they
    /// are consumed, is at most that long. (Measured before this cap: 1 MiB
    /// frames back to back spent 12% of the receiver's time moving the next
    /// frame's first part, read along with the previous frame's tail.)
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
            return (rest.max(self.chunk), READ_CHUNK);
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
        if n >= self.offered && self.chunk < READ_CHUNK {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Naive oracle: the stream a correct encoder writes for `msgs`.
    fn oracle_stream(msgs: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        if !msgs.is_empty() {
            out.extend_from_slice(&hello_frame());
        }
        for m in msgs {
            out.extend_from_slice(&header(FrameKind::Data, m.len() as u32));
            out.extend_from_slice(m);
            while out.len() % 16 != 0 {
                out.push(0);
            }
        }
        out
    }

    /// A reader that takes whatever the pipe holds, as a kernel read would,
    /// never takes bytes of the next frame with the end of a large one: the
    /// buffer is empty once that frame is consumed, so nothing has to move.
    #[test]
    fn large_frame_reads_stop_at_its_end() {
        let msgs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 300 * 1024 + 5]).collect();
        let wire = oracle_stream(&msgs);
        let mut d = Decoder::new(1 << 20);
        let (mut off, mut got) = (0, Vec::new());
        while got.len() < msgs.len() {
            while let Some(r) = d.next_frame().unwrap() {
                got.push(d.buffer()[r].to_vec());
                assert_eq!(
                    d.start,
                    d.buf.len(),
                    "bytes of the next frame were read early"
                );
            }
            if off == wire.len() {
                break;
            }
            let (ptr, spare) = d.reserve();
            let n = spare.min(wire.len() - off);
            // SAFETY: `ptr` has `spare >= n` writable bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(wire[off..].as_ptr(), ptr, n);
                d.commit(n);
            }
            off += n;
        }
        assert_eq!(got, msgs);
    }

    fn drain(d: &mut Decoder, out: &mut Vec<Vec<u8>>) -> Result<(), FrameError> {
        while let Some(r) = d.next_frame()? {
            assert_eq!(
                d.buffer()[r.clone()].as_ptr() as usize % 16,
                0,
                "payload misaligned"
            );
            out.push(d.buffer()[r].to_vec());
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
            chunk in 1usize..2000,
        ) {
            let mut enc = Encoder::new(1 << 20);
            for m in &msgs {
                enc.push(m).unwrap();
            }
            let stream = enc.pending().to_vec();
            prop_assert_eq!(&stream, &oracle_stream(&msgs));
            let mut d = Decoder::new(1 << 20);
            let mut out = Vec::new();
            for c in stream.chunks(chunk) {
                d.feed(c);
                drain(&mut d, &mut out).unwrap();
            }
            prop_assert_eq!(d.eof(), FrameError::Closed);
            prop_assert_eq!(out, msgs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..512, max in 0usize..1024) {
            let mut d = Decoder::new(max);
            let mut out = Vec::new();
            let mut failed = false;
            for c in bytes.chunks(chunk) {
                d.feed(c);
                if drain(&mut d, &mut out).is_err() { failed = true; break; }
                // Never buffers more than one max frame plus a read chunk.
                prop_assert!(d.buffer().len() <= HEADER_LEN + padded(max.max(HELLO_LEN)) + 2 * READ_CHUNK);
            }
            if !failed {
                let e = d.eof();
                let ok = matches!(e, FrameError::Closed | FrameError::Truncated { .. });
                prop_assert!(ok, "unexpected {:?}", e);
            }
        }

        #[test]
        fn valid_prefix_then_garbage_keeps_prefix(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..10),
            garbage in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let mut stream = oracle_stream(&msgs);
            stream.extend_from_slice(&garbage);
            let mut d = Decoder::new(1024);
            d.feed(&stream);
            let mut out = Vec::new();
            let r = drain(&mut d, &mut out);
            // Every whole frame before the garbage is delivered.
            prop_assert_eq!(&out[..msgs.len()], &msgs[..]);
            if r.is_ok() {
                prop_assert!(d.eof() != FrameError::Closed || garbage.is_empty() || out.len() > msgs.len());
            }
        }
    }

    #[test]
    fn oversized_header_is_rejected_before_allocation() {
        let mut s = hello_frame().to_vec();
        s.extend_from_slice(&header(FrameKind::Data, u32::MAX - 100));
        let mut d = Decoder::new(1024);
        d.feed(&s);
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
        assert!(d.buffer().len() < 1024);
    }

    #[test]
    fn announced_frame_does_not_reserve_memory_before_it_arrives() {
        let mut s = hello_frame().to_vec();
        s.extend_from_slice(&header(FrameKind::Data, 200 << 20));
        s.extend_from_slice(&[7; 100]);
        let mut d = Decoder::new(256 << 20);
        d.feed(&s);
        assert_eq!(d.next_frame(), Ok(None));
        let _ = d.reserve();
        assert!(d.capacity() <= 4 * READ_CHUNK, "{}", d.capacity());
        // Room grows with what arrives, and the frame still decodes whole.
        let mut sent = 100;
        while sent < 8 << 20 {
            d.feed(&[7; 4096]);
            sent += 4096;
            assert!(d.capacity() <= 2 * (sent + HEADER_LEN) + 2 * READ_CHUNK);
        }
    }

    #[test]
    fn large_frames_decode_through_growing_reads() {
        let payload: Vec<u8> = (0..(3 << 20) + 5).map(|i| i as u8).collect();
        let mut enc = Encoder::new(8 << 20);
        enc.push(&payload).unwrap();
        enc.push(b"after").unwrap();
        let stream = enc.pending().to_vec();
        let mut d = Decoder::new(8 << 20);
        let mut out = Vec::new();
        for c in stream.chunks(100_000) {
            d.feed(c);
            drain(&mut d, &mut out).unwrap();
        }
        assert_eq!(out, vec![payload, b"after".to_vec()]);
    }

    #[test]
    fn unknown_version_is_a_protocol_error() {
        let mut s = hello_frame().to_vec();
        s[HEADER_LEN + 4] = 9;
        let mut d = Decoder::new(1024);
        d.feed(&s);
        assert_eq!(d.next_frame(), Err(FrameError::UnknownVersion(9)));
        // The failure sticks.
        assert_eq!(d.eof(), FrameError::UnknownVersion(9));
    }

    #[test]
    fn data_before_hello_is_rejected() {
        let mut s = header(FrameKind::Data, 3).to_vec();
        s.extend_from_slice(&[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut d = Decoder::new(1024);
        d.feed(&s);
        assert!(matches!(d.next_frame(), Err(FrameError::Protocol(_))));
    }

    #[test]
    fn eof_mid_frame_is_truncated() {
        let mut enc = Encoder::new(1024);
        enc.push(b"hello world").unwrap();
        let s = enc.pending();
        let mut d = Decoder::new(1024);
        d.feed(&s[..s.len() - 3]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(matches!(d.eof(), FrameError::Truncated { .. }));
    }

    #[test]
    fn encoder_rejects_oversized_and_keeps_buffer() {
        let mut enc = Encoder::new(8);
        enc.push(b"ok").unwrap();
        let before = enc.pending().to_vec();
        assert!(matches!(
            enc.push(&[0; 9]),
            Err(FrameError::TooLarge { .. })
        ));
        assert_eq!(enc.pending(), &before[..]);
    }
}
