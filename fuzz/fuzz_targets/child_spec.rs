//! Fuzzes what a child parses from the bytes its parent sends: the start
//! spec (`Spec`, from a sealed memfd), the state of each channel end handed
//! over in its arguments (`HandoffState`), and the outcome frame it sends
//! back (`Outcome::decode`, parsed by the parent). Hostile bytes must give
//! an error, never a panic or undefined behaviour, and whatever is accepted
//! must be safe to act on (see `ringipc::__fuzz`).
//!
//! Input layout:
//!
//! ```text
//! [0]     mode: bits 0-1 pick the decoder (0 and 3 spec, 1 hand-over,
//!         2 outcome); with bit 7 set, bits 2-6 pick a valid sample for
//!         that decoder, else the rest is the input as it is
//! [1..]   raw mode: the bytes to decode
//!         sample mode: edits of 3 bytes (offset u16 LE modulo the length,
//!         byte to XOR in); 1 or 2 bytes left over cut that many bytes
//!         (times 8) off the end
//! ```
//!
//! Random bytes seldom pass rkyv's validation; the sample mode starts from
//! valid archives, so the checks behind validation are reached at once.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringipc::__fuzz;
use std::sync::LazyLock;

static SAMPLES: LazyLock<Vec<(u8, Vec<u8>)>> = LazyLock::new(__fuzz::samples);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let which = match mode & 3 {
        3 => 0,
        w => w,
    };
    let owned;
    let input = if mode & 0x80 != 0 {
        let of_kind: Vec<&Vec<u8>> = SAMPLES
            .iter()
            .filter(|(k, _)| *k == which)
            .map(|(_, s)| s)
            .collect();
        let mut bytes = of_kind[((mode >> 2) & 0x1f) as usize % of_kind.len()].clone();
        let mut edits = rest.chunks_exact(3);
        for e in &mut edits {
            if !bytes.is_empty() {
                let at = u16::from_le_bytes([e[0], e[1]]) as usize % bytes.len();
                bytes[at] ^= e[2];
            }
        }
        let cut = edits
            .remainder()
            .iter()
            .map(|&b| b as usize * 8)
            .sum::<usize>();
        bytes.truncate(bytes.len().saturating_sub(cut));
        owned = bytes;
        &owned[..]
    } else {
        rest
    };
    match which {
        0 => {
            let _ = __fuzz::decode_spec(input);
        }
        1 => {
            let _ = __fuzz::decode_handoff(input);
        }
        _ => __fuzz::decode_outcome(input),
    }
});
