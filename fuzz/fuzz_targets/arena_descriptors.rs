//! Fuzzes the receiver's checks of arena descriptor frames, which come from
//! an untrusted peer.
//!
//! Input layout:
//!
//! ```text
//! [0]     arena size in slots (1..=64)
//! [1..]   a stream of frames for a `Decoder` (data, hello, kind-3
//!         descriptors or garbage); after it is decoded, the same bytes are
//!         read as 33-byte records (op, 32-byte descriptor) that drive a
//!         `HeldSlots` table against a naive model
//! ```
//!
//! Properties: the decoder hands out a descriptor payload only when it is
//! exactly `DESCRIPTOR_LEN` bytes; `Descriptor::decode` round-trips what it
//! accepts; `HeldSlots::accept` accepts exactly what the model accepts (due
//! sequence, inside the arena, slot aligned, non-empty, no overlap with a
//! held slot), never changes on error, and `release` frees only what is held.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringipc::framing::{DESCRIPTOR_LEN, Decoder, Descriptor, FrameKind, HeldSlots, SLOT_ALIGN};

fuzz_target!(|data: &[u8]| {
    let Some((&slots, body)) = data.split_first() else {
        return;
    };
    let data_len = (slots as u64 % 64 + 1) * SLOT_ALIGN as u64;

    // 1. As a stream.
    let mut d = Decoder::new(1 << 16);
    d.feed(body);
    while let Ok(Some((kind, r))) = d.next_any() {
        if kind == FrameKind::Arena {
            assert_eq!(r.len(), DESCRIPTOR_LEN);
            let p = &d.buffer()[r];
            if let Ok(desc) = Descriptor::decode(p) {
                assert_eq!(&desc.encode()[..], p, "descriptor does not round-trip");
            }
        }
    }

    // 2. As operations on the held-slot table.
    let mut table = HeldSlots::new(0);
    let mut model: Vec<(u64, u64)> = Vec::new();
    let mut next = 0u64;
    for rec in body.chunks_exact(1 + DESCRIPTOR_LEN) {
        let (op, raw) = (rec[0], &rec[1..]);
        let Ok(mut desc) = Descriptor::decode(raw) else {
            continue;
        };
        if op & 1 == 1 {
            // Release a held slot (or a made-up offset).
            let offset = if op & 2 == 2 && !model.is_empty() {
                model[(op as usize >> 2) % model.len()].0
            } else {
                desc.offset
            };
            let was = model.iter().position(|&(o, _)| o == offset);
            assert_eq!(table.release(offset), was.is_some());
            if let Some(i) = was {
                model.remove(i);
            }
            continue;
        }
        // Mostly keep the sequence right, so the other checks get reached.
        if op & 2 == 0 {
            desc.seq = next;
        }
        // Mostly small offsets and lengths, so they land inside the arena.
        if op & 4 == 0 {
            desc.offset %= data_len + SLOT_ALIGN as u64;
            desc.len %= 4 * SLOT_ALIGN as u64;
        }
        let end = desc.offset.checked_add(desc.len);
        let ok = desc.seq == next
            && desc.len > 0
            && desc.offset % SLOT_ALIGN as u64 == 0
            && end.is_some_and(|e| e <= data_len)
            && model
                .iter()
                .all(|&(o, e)| e <= desc.offset || o >= end.unwrap_or(u64::MAX));
        let before = table.next_seq();
        let got = table.accept(&desc, data_len);
        assert_eq!(got.is_ok(), ok, "{desc:?}: table says {got:?}, model {ok}");
        if ok {
            model.push((desc.offset, end.expect("checked")));
            next += 1;
        } else {
            assert_eq!(
                table.next_seq(),
                before,
                "a refused descriptor changed the table"
            );
        }
        assert_eq!(table.is_empty(), model.is_empty());
    }
});
