//! Arena descriptor frames: where a message lies in a channel's shared
//! arena, and the receiver's check of the descriptors a peer sends.

use super::{DESCRIPTOR_LEN, FrameError};

/// The payload of an [`FrameKind::Arena`](super::FrameKind::Arena) frame: where a message lies in
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
