//! Fuzzes the sans-I/O framing layer.
//!
//! Input layout:
//!
//! ```text
//! [0..3]  maximum payload size: u24 LE modulo 64 KiB + 1
//! [3..7]  chunk schedule: four chunk sizes, used in turn
//! [7]     hand-off mask: bit k hands the decoder over after chunk k
//! [8..]   body
//! ```
//!
//! The body is used twice:
//!
//! 1. As a raw byte stream from an untrusted peer. It is fed to a `Decoder` in
//!    the scheduled chunks, sometimes handing the decoder's state to a fresh
//!    one (`Decoder::resume`, as when a receiver moves to a child process).
//!    Every frame must lie inside the buffer at a 16-byte-aligned offset,
//!    memory must stay bounded by one frame plus one read rather than by the
//!    stream, and the outcome (frames, then the error or end of stream) must
//!    be the same as when the stream arrives in one piece.
//! 2. As a program for a writer: push messages, write part of the pending
//!    bytes, lend the buffer to a simulated kernel write and push while it is
//!    lent, or hand the encoder's state to a fresh one (`Encoder::resume`).
//!    The bytes written must decode, under the same chunking and hand-offs,
//!    to exactly the messages that were accepted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringipc::framing::{Decoder, Encoder, FrameError, HEADER_LEN, HELLO_LEN, READ_CHUNK, padded};

const MAX_FRAME_LIMIT: u32 = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut head = [0u8; 8];
    let n = data.len().min(head.len());
    head[..n].copy_from_slice(&data[..n]);
    let body = &data[n..];

    let max = (u32::from_le_bytes([head[0], head[1], head[2], 0]) % (MAX_FRAME_LIMIT + 1)) as usize;
    let schedule = Schedule {
        sizes: [head[3], head[4], head[5], head[6]],
        handoff: head[7],
    };

    let chunked = decode(body, max, &schedule);
    let whole = decode(body, max, &Schedule::WHOLE);
    // Not assert_eq: the frames can be megabytes of Debug output.
    assert!(
        chunked == whole,
        "outcome depends on how the stream was split: {} frames then {:?}, \
         but {} frames then {:?} in one piece",
        chunked.frames.len(),
        chunked.end,
        whole.frames.len(),
        whole.end,
    );

    round_trip(body, max, &schedule);
});

/// How many chunks follow the schedule.
const SCHEDULED_CHUNKS: usize = 512;

/// How a stream reaches the decoder: chunk sizes, cycled, and after which of
/// the first eight chunks the decoder is handed over. The size mapping covers
/// single bytes, sizes that straddle headers and frames, and reads larger
/// than `READ_CHUNK`.
struct Schedule {
    sizes: [u8; 4],
    handoff: u8,
}

impl Schedule {
    /// One chunk for any stream the fuzzer produces, no hand-off.
    const WHOLE: Schedule = Schedule {
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

#[derive(Debug, PartialEq)]
struct Outcome {
    frames: Vec<Vec<u8>>,
    end: FrameError,
}

/// Largest frame on the wire: header plus padded payload. The decoder accepts
/// a hello payload even when the data limit is smaller.
fn frame_bound(max: usize) -> usize {
    HEADER_LEN + padded(max.max(HELLO_LEN))
}

fn decode(stream: &[u8], max: usize, schedule: &Schedule) -> Outcome {
    let mut d = Decoder::new(max);
    assert_eq!(d.max_frame(), max);
    let mut frames = Vec::new();
    for (i, chunk) in schedule.chunks(stream).enumerate() {
        d.feed(chunk);
        if schedule.hand_off_after(i) {
            // Before draining, so whole frames travel with the state too.
            d = hand_off_decoder(&d, max);
        }
        // What is buffered after draining is less than one frame; a feed adds
        // at most `chunk`; a read asks for at most one frame or READ_CHUNK;
        // capacity rounds up to a power of two. Anything beyond that means
        // memory grows with the stream rather than with the frame size.
        let bound = 2 * (2 * frame_bound(max) + READ_CHUNK + chunk.len());
        assert!(
            d.buffer().len() <= bound,
            "decoder holds {} bytes, bound {bound}",
            d.buffer().len()
        );
        if let Err(e) = drain(&mut d, max, &mut frames) {
            assert!(d.is_done());
            assert_eq!(d.next_frame(), Err(e.clone()), "error is not sticky");
            assert_eq!(d.eof(), e, "eof after an error must report that error");
            return Outcome { frames, end: e };
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
    Outcome { frames, end }
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

fn drain(d: &mut Decoder, max: usize, out: &mut Vec<Vec<u8>>) -> Result<(), FrameError> {
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
        out.push(payload.to_vec());
    }
    Ok(())
}

/// Generated message bytes per input: enough to pass the encoder's 64 KiB
/// compaction threshold and several decoder reads, small enough to keep
/// thousands of runs a second.
const GENERATED_BUDGET: usize = 256 * 1024;

/// Reads the body as a writer's program.
struct Cursor<'a> {
    input: &'a [u8],
    /// Generated message bytes still allowed.
    budget: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.input.split_first()?;
        self.input = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.input.split_at(n.min(self.input.len()));
        self.input = b;
        a
    }

    /// A message: up to 239 literal bytes, or a generated one of up to
    /// 16 * 4099 bytes (so that large frames, frames over the limit and the
    /// buffers' compaction paths are reachable from small inputs).
    fn message(&mut self) -> Option<Vec<u8>> {
        let l = self.byte()?;
        if l < 0xf0 {
            return Some(self.take(l as usize).to_vec());
        }
        let len = ((l as usize - 0xef) * 4099).min(self.budget);
        self.budget -= len;
        let seed = self.byte().unwrap_or(0);
        Some(
            (0..len)
                .map(|i| (i as u8).wrapping_mul(seed | 1) ^ (i >> 8) as u8)
                .collect(),
        )
    }

    /// How many bytes a simulated write takes.
    fn write_len(&mut self) -> usize {
        self.byte().map_or(usize::MAX, |b| b as usize * 37)
    }
}

/// Hand-overs per input. Each copies every unsent byte (up to the whole
/// generated budget), so without a cap one input of a few KiB could copy
/// over 100 MB and the target ran at a few hundred inputs per second.
const MAX_HANDOFFS: usize = 16;

struct Writer {
    enc: Encoder,
    max: usize,
    /// Hand-overs done so far (at most `MAX_HANDOFFS`).
    handoffs: usize,
    /// What reached the "pipe".
    stream: Vec<u8>,
    /// Messages the encoder accepted, in order.
    accepted: Vec<Vec<u8>>,
}

impl Writer {
    fn push(&mut self, msg: Vec<u8>) {
        let queued = self.enc.queued();
        match self.enc.push(&msg) {
            Ok(()) => {
                assert!(
                    msg.len() <= self.max,
                    "accepted {} > {}",
                    msg.len(),
                    self.max
                );
                self.accepted.push(msg);
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, msg.len() as u64);
                assert_eq!(max, self.max);
                assert!(
                    msg.len() > self.max,
                    "rejected {} <= {}",
                    msg.len(),
                    self.max
                );
                assert_eq!(
                    self.enc.queued(),
                    queued,
                    "rejected push changed the buffer"
                );
            }
            Err(e) => panic!("push failed with {e:?}"),
        }
    }

    /// Moves the encoder's state to a new one, as a sender handed to a child
    /// process does. `lent` is a settled kernel write: the buffer it owned
    /// and how many bytes it wrote.
    fn hand_off(&mut self, lent: Option<(&[u8], usize)>) {
        self.handoffs += 1;
        let unsent = self.enc.unsent(lent);
        if lent.is_none() {
            assert_eq!(unsent.len(), self.enc.queued());
        }
        let resumed = Encoder::resume(self.max, self.enc.started(), &unsent);
        assert_eq!(resumed.max_frame(), self.max);
        assert_eq!(resumed.started(), self.enc.started());
        assert!(resumed.pending() == unsent, "resumed encoder lost bytes");
        self.enc = resumed;
    }

    fn write(&mut self, want: usize) {
        let pending = self.enc.pending();
        let n = want.min(pending.len());
        self.stream.extend_from_slice(&pending[..n]);
        self.enc.advance(n);
    }
}

fn round_trip(body: &[u8], max: usize, schedule: &Schedule) {
    let mut w = Writer {
        enc: Encoder::new(max),
        max,
        handoffs: 0,
        stream: Vec::new(),
        accepted: Vec::new(),
    };
    let mut cur = Cursor {
        input: body,
        budget: GENERATED_BUDGET,
    };
    while let Some(op) = cur.byte() {
        match op & 7 {
            0..=2 => {
                if let Some(m) = cur.message() {
                    w.push(m);
                }
            }
            3 | 4 => {
                let n = cur.write_len();
                w.write(n);
            }
            5 | 6 => {
                // A kernel write in flight: it owns the buffer and writes part
                // of it, while sends queue more frames behind it.
                let (buf, pos) = w.enc.take_buf();
                assert!(w.enc.has_pending());
                assert!(w.enc.pending().is_empty());
                let n = cur.write_len().min(buf.len() - pos);
                w.stream.extend_from_slice(&buf[pos..pos + n]);
                for _ in 0..(op >> 3) & 3 {
                    if let Some(m) = cur.message() {
                        w.push(m);
                    }
                }
                if op & 0x20 != 0 && w.handoffs < MAX_HANDOFFS {
                    // Handed over once the write settled, before the buffer
                    // came back.
                    w.hand_off(Some((&buf, n)));
                } else {
                    w.enc.put_buf(buf);
                    w.enc.advance(n);
                }
            }
            _ if w.handoffs < MAX_HANDOFFS => w.hand_off(None),
            _ => {}
        }
    }
    while w.enc.has_pending() {
        w.write(usize::MAX);
    }
    assert_eq!(w.enc.queued(), 0);

    // How the writes were interleaved must not show in the bytes.
    let mut reference = Encoder::new(max);
    for m in &w.accepted {
        reference.push(m).expect("accepted once, accepted again");
    }
    assert!(
        w.stream == reference.pending(),
        "stream depends on write pattern"
    );
    assert_eq!(w.stream.len() % 16, 0);

    let out = decode(&w.stream, max, schedule);
    assert_eq!(out.end, FrameError::Closed);
    assert!(
        out.frames == w.accepted,
        "decoded messages differ from sent"
    );
}
