//! The fixed header of the crate's own tagged frames: a child's outcome on
//! its control pipe, and a pool's job and result frames.
//!
//! Layout (32 bytes, little-endian): the id (u64), a duration in
//! nanoseconds (u64), the tag (u8), then zeros. Whatever follows (an rkyv
//! archive, an error text) starts 32 bytes in, so an archive read in place
//! stays 16-byte aligned. Each user gives the fields its own meaning and
//! leaves the others zero; `docs/wire-format.md` lists them.

use std::time::Duration;

/// One tagged header; see the module docs for its layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub id: u64,
    pub nanos: u64,
    pub tag: u8,
}

impl Header {
    /// Its length on the wire.
    pub const LEN: usize = 32;

    pub fn new(tag: u8) -> Header {
        Header {
            tag,
            ..Header::default()
        }
    }

    pub fn id(self, id: u64) -> Header {
        Header { id, ..self }
    }

    pub fn duration(self, d: Duration) -> Header {
        Header {
            nanos: u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            ..self
        }
    }

    pub fn elapsed(&self) -> Duration {
        Duration::from_nanos(self.nanos)
    }

    /// Writes the header over `dst[..LEN]` (a frame built with room for it).
    pub fn write_at(&self, dst: &mut [u8]) {
        let dst = &mut dst[..Self::LEN];
        dst[0..8].copy_from_slice(&self.id.to_le_bytes());
        dst[8..16].copy_from_slice(&self.nanos.to_le_bytes());
        dst[16] = self.tag;
        dst[17..].fill(0);
    }

    /// Appends the header to `buf`.
    pub fn push(&self, buf: &mut Vec<u8>) {
        let at = buf.len();
        buf.resize(at + Self::LEN, 0);
        self.write_at(&mut buf[at..]);
    }

    /// The header and the bytes after it, or `None` for a frame too short
    /// to hold one.
    pub fn read(frame: &[u8]) -> Option<(Header, &[u8])> {
        let (head, rest) = frame.split_at_checked(Self::LEN)?;
        let word = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
        Some((
            Header {
                id: word(0),
                nanos: word(8),
                tag: head[16],
            },
            rest,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_frames() {
        let h = Header::new(3)
            .id(u64::MAX - 1)
            .duration(Duration::from_micros(1500));
        let mut buf = vec![0xAA; 5];
        h.push(&mut buf);
        buf.extend_from_slice(b"text");
        let (back, rest) = Header::read(&buf[5..]).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.elapsed(), Duration::from_micros(1500));
        assert_eq!(rest, b"text");
        assert!(buf[5 + 17..5 + Header::LEN].iter().all(|&b| b == 0));
        assert_eq!(Header::read(&buf[5..5 + Header::LEN - 1]), None);
        // A duration too long for u64 nanoseconds saturates.
        assert_eq!(Header::new(0).duration(Duration::MAX).nanos, u64::MAX);
    }
}
