//! Sans-I/O framing: bytes in, frames out. No syscalls and no async here, so
//! property tests and fuzzers reach all of it. The format is specified byte by
//! byte in `docs/wire-format.md`.
//!
//! Every frame is a 16-byte header, the payload, and zero padding up to the next
//! multiple of 16. Because every frame starts at a stream offset that is a
//! multiple of 16 and the receive buffer is 16-byte aligned, every payload lands
//! at a 16-byte-aligned address without a copy (rkyv needs that alignment).
//!
//! This file holds the header and its constants; [`Encoder`] (writing) lives
//! in `encoder.rs`, [`Decoder`] (reading) in `decoder.rs`, and the arena's
//! descriptor frames and the receiver's check of them in `descriptor.rs`.

mod decoder;
mod descriptor;
mod encoder;
#[cfg(test)]
mod tests;

pub use decoder::Decoder;
pub use descriptor::{Descriptor, HeldSlots, SLOT_ALIGN};
pub use encoder::Encoder;

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

/// Rounds `n` up to a multiple of [`FRAME_ALIGN`].
pub const fn padded(n: usize) -> usize {
    (n + FRAME_ALIGN - 1) & !(FRAME_ALIGN - 1)
}

/// Writes a header for a payload of `len` bytes.
#[inline]
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

// Under `cfg(fuzzing)` (set by cargo-fuzz) the size thresholds below shrink
// by 16×, so that the paths they guard (compaction, read-size growth, the
// large-frame path, releasing a big buffer) are reached by frames of a few
// KiB. At the real sizes every fuzz input that reaches them pays for buffers
// over 128 KiB, which ASan maps and unmaps per allocation: that alone made
// the framing target several times slower. Only the sizes change, not the
// code paths; unit tests and proptests run with the real values.
#[cfg(not(fuzzing))]
const SCALE: usize = 1;
#[cfg(fuzzing)]
const SCALE: usize = 16;

/// Buffers larger than this are released once empty, so one huge message does
/// not pin its memory for the life of the channel.
const SHRINK_ABOVE: usize = (4 << 20) / SCALE;
/// An encoder drops the written frames at the front of its buffer once they
/// add up to this much.
const COMPACT_AT: usize = (64 * 1024) / SCALE;
/// The frame size above which the decoder reads a frame's remainder in one
/// go (64 KiB).
pub const READ_CHUNK: usize = (64 * 1024) / SCALE;
/// Largest read the decoder asks for when frames are small (256 KiB): as
/// much as a sender writes at once (its high-water mark). Each read takes
/// the pipe's lock, which the writer then waits for: 256 KiB reads instead
/// of 64 KiB made 64 B one-way 9-13% faster (docs/performance.md, "Small
/// messages").
pub const SMALL_READ_MAX: usize = (256 * 1024) / SCALE;
/// Queued bytes above which a write asks for at most `WRITE_PIECE`.
const PIECEWISE_ABOVE: usize = 512 * 1024;
/// The size of one write while a large frame goes out.
const WRITE_PIECE: usize = 128 * 1024;

/// How many of `pending` queued bytes one write should ask for: all of
/// them, unless a large frame is queued, which goes out in 128 KiB pieces.
/// A pipe write holds the pipe's lock while it copies, so a whole-frame
/// write makes the writer's and the reader's copies take turns; in pieces,
/// the reader copies one out while the writer copies the next in (1 MiB
/// frames with the arena off: 1.3-1.5x the bandwidth, docs/performance.md).
/// Batches of small frames (at most the 256 KiB high-water mark plus a
/// frame) still go in one write: in pieces they cost more wake-ups than
/// they gain (4 KiB frames lost a fifth of their rate).
pub(crate) fn write_len(pending: usize) -> usize {
    if pending > PIECEWISE_ABOVE {
        WRITE_PIECE
    } else {
        pending
    }
}
