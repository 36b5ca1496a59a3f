//! Fuzzes the frame decoder with a byte stream from an untrusted peer.
//!
//! An input is a header (data limit and chunk schedule, see
//! `shared/stream.rs`) and a body. The body is fed to a `Decoder` in the
//! scheduled chunks, sometimes handing the decoder's state to a fresh one
//! (`Decoder::resume`, as when a receiver moves to a child process). Every
//! frame must lie inside the buffer at a 16-byte-aligned offset, memory must
//! grow with the largest frame and read rather than with the stream, and the
//! outcome (frames, then the error or end of stream) must be the same as
//! when the stream arrives in one piece.
//!
//! The writer side is `encode_frames`: the two were one target, which ran
//! every input through both and was several times slower per input.

#![no_main]

#[path = "shared/stream.rs"]
mod stream;

use libfuzzer_sys::fuzz_target;
use stream::{Schedule, decode, setup};

fuzz_target!(|data: &[u8]| {
    let (max, schedule, body) = setup(data);
    let mut chunked = Vec::new();
    let chunked_end = decode(body, max, &schedule, &mut |f| chunked.push(f.to_vec()));
    let mut whole = Vec::new();
    let whole_end = decode(body, max, &Schedule::WHOLE, &mut |f| whole.push(f.to_vec()));
    // Not assert_eq: the frames can be kilobytes of Debug output.
    assert!(
        chunked == whole && chunked_end == whole_end,
        "outcome depends on how the stream was split: {} frames then {chunked_end:?}, \
         but {} frames then {whole_end:?} in one piece",
        chunked.len(),
        whole.len(),
    );
});
