//! What the two framing targets share: an input's header (data limit and
//! chunk schedule) and a checked decode of a stream under that schedule.
//!
//! Input header, read by [`setup`]:
//!
//! ```text
//! [0..3]  maximum payload size: u24 LE modulo MAX_FRAME_LIMIT + 1
//! [3..7]  chunk schedule: four chunk sizes, used in turn
//! [7]     hand-off mask: bit k hands the decoder over after chunk k
//! [8..]   body
//! ```
//!
//! Under `cfg(fuzzing)` the framing layer's size thresholds are 16× smaller
//! (`READ_CHUNK` is 4 KiB), so the paths they guard (compaction, read-size
//! growth, the large-frame path) are reached with small buffers: at the real
//! sizes, every input that reached them paid for buffers over 128 KiB, which
//! ASan's allocator maps and unmaps each time. Sizes in the targets are
//! relative to `READ_CHUNK`.

use ringipc::framing::{
    Decoder, FrameError, HEADER_LEN, HELLO_LEN, READ_CHUNK, SMALL_READ_MAX, padded,
};

/// Largest data limit an input can choose: frames around it also cross the
/// decoder's large-frame threshold.
pub const MAX_FRAME_LIMIT: u32 = READ_CHUNK as u32;

/// Splits an input into its data limit, its chunk schedule and its body.
pub fn setup(data: &[u8]) -> (usize, Schedule, &[u8]) {
    let mut head = [0u8; 8];
    let n = data.len().min(head.len());
    head[..n].copy_from_slice(&data[..n]);
    let max = (u32::from_le_bytes([head[0], head[1], head[2], 0]) % (MAX_FRAME_LIMIT + 1)) as usize;
    let schedule = Schedule {
        sizes: [head[3], head[4], head[5], head[6]],
        handoff: head[7],
    };
    (max, schedule, &data[n..])
}

/// How many chunks follow the schedule.
const SCHEDULED_CHUNKS: usize = 128;

/// How a stream reaches the decoder: chunk sizes, cycled, and after which of
/// the first eight chunks the decoder is handed over. The size mapping covers
/// single bytes, sizes that straddle headers and frames, and reads larger
/// than `READ_CHUNK`.
pub struct Schedule {
    sizes: [u8; 4],
    handoff: u8,
}

impl Schedule {
    /// One chunk for any stream the fuzzer produces, no hand-off.
    #[allow(dead_code)] // encode_frames does not compare with a whole-stream decode
    pub const WHOLE: Schedule = Schedule {
        sizes: [0xff; 4],
        handoff: 0,
    };

    fn size(b: u8) -> usize {
        match b {
            0xff => usize::MAX,
            0..=127 => b as usize + 1,
            128..=191 => (b as usize - 127) * 251,
            _ => (b as usize - 191) * 4099,
        }
    }

    fn chunks<'a>(&self, mut stream: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let sizes = self.sizes.map(Schedule::size);
        let mut i = 0;
        std::iter::from_fn(move || {
            if stream.is_empty() {
                return None;
            }
            // Past the first few hundred chunks, small ones only cost time:
            // continue in pipe-sized reads.
            let size = if i < SCHEDULED_CHUNKS {
                sizes[i % sizes.len()]
            } else {
                READ_CHUNK
            };
            let n = size.min(stream.len());
            i += 1;
            let (chunk, rest) = stream.split_at(n);
            stream = rest;
            Some(chunk)
        })
    }

    fn hand_off_after(&self, chunk: usize) -> bool {
        chunk < 8 && self.handoff & (1 << chunk) != 0
    }
}

/// Largest frame on the wire: header plus padded payload. The decoder accepts
/// a hello payload even when the data limit is smaller.
pub fn frame_bound(max: usize) -> usize {
    HEADER_LEN + padded(max.max(HELLO_LEN))
}

/// Feeds `stream` to a decoder as `schedule` says, passes every payload to
/// `on_frame` in order, and returns how the stream ended (an error, or
/// `Closed` / `Truncated` at its end).
pub fn decode(
    stream: &[u8],
    max: usize,
    schedule: &Schedule,
    on_frame: &mut dyn FnMut(&[u8]),
) -> FrameError {
    let mut d = Decoder::new(max);
    assert_eq!(d.max_frame(), max);
    let mut largest_chunk = 0;
    for (i, chunk) in schedule.chunks(stream).enumerate() {
        d.feed(chunk);
        largest_chunk = largest_chunk.max(chunk.len());
        if schedule.hand_off_after(i) {
            // Before draining, so whole frames travel with the state too.
            d = hand_off_decoder(&d, max);
        }
        // After draining, less than one frame is left unconsumed; a feed
        // adds one chunk.
        assert!(
            d.unconsumed().len() < frame_bound(max) + chunk.len(),
            "decoder holds {} unconsumed bytes after a chunk of {}",
            d.unconsumed().len(),
            chunk.len()
        );
        // A read asks for at most one frame or SMALL_READ_MAX, and capacity
        // rounds up to a power of two: memory grows with the largest frame
        // and read, never with the stream. (Consumed bytes may stay in the
        // buffer until its room runs out.)
        let bound = 2 * (2 * frame_bound(max) + SMALL_READ_MAX + largest_chunk);
        assert!(
            d.capacity() <= bound,
            "decoder has {} bytes of capacity, bound {bound}",
            d.capacity()
        );
        if let Err(e) = drain(&mut d, max, on_frame) {
            assert!(d.is_done());
            assert_eq!(d.next_frame(), Err(e.clone()), "error is not sticky");
            assert_eq!(d.eof(), e, "eof after an error must report that error");
            return e;
        }
    }
    let end = d.eof();
    match end {
        FrameError::Closed => {}
        FrameError::Truncated { have } => {
            assert!(have > 0, "truncated with nothing buffered");
            assert!(have < frame_bound(max), "truncated frame of {have} bytes");
        }
        ref other => panic!("eof() returned {other:?} for an unbroken stream"),
    }
    assert!(d.is_done());
    assert_eq!(d.next_frame(), Err(end.clone()), "eof is not sticky");
    end
}

/// Moves a decoder's state to a new one, as a receiver handed to a child
/// process does.
fn hand_off_decoder(d: &Decoder, max: usize) -> Decoder {
    let rest = d.unconsumed();
    assert_eq!(d.consumed() + rest.len(), d.buffer().len());
    assert_eq!(d.consumed() % 16, 0, "consumed up to a non-frame boundary");
    let resumed = Decoder::resume(max, d.started(), rest);
    assert_eq!(resumed.started(), d.started());
    assert_eq!(resumed.unconsumed(), rest);
    resumed
}

fn drain(d: &mut Decoder, max: usize, on_frame: &mut dyn FnMut(&[u8])) -> Result<(), FrameError> {
    while let Some(r) = d.next_frame()? {
        let buf = d.buffer();
        assert!(
            r.start <= r.end && r.end <= buf.len(),
            "payload {r:?} outside buffer of {} bytes",
            buf.len()
        );
        assert!(
            r.len() <= max,
            "payload of {} bytes over limit {max}",
            r.len()
        );
        assert_eq!(r.start % 16, 0, "payload offset {} misaligned", r.start);
        let payload = &buf[r];
        assert_eq!(
            payload.as_ptr() as usize % 16,
            0,
            "payload address misaligned"
        );
        on_frame(payload);
    }
    Ok(())
}
