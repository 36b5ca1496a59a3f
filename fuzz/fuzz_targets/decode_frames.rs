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
//!    The bytes written must be exactly the frames of the accepted messages
//!    (checked against the format, not against another encoder), and must
//!    decode, under the same chunking and hand-offs, to exactly those
//!    messages.
//!
//! Cost per input is kept small, since every run pays it: generated
//! messages are slices of one pseudo-random pattern (nothing is generated or
//! copied per input), most are at most 8 KiB in all, at most two per input
//! are large (60–68 KiB: the decoder's large-frame path, the encoder's
//! compaction), and hand-overs are capped. Profiled before: an input
//! generated, copied and compared up to 256 KiB of messages several times,
//! and under ASan most of the time went to growing and faulting in those
//! buffers.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringipc::framing::{
    Decoder, Encoder, FrameError, FrameKind, HEADER_LEN, HELLO_LEN, READ_CHUNK, header,
    hello_frame, padded,
};
use std::cell::Cell;
use std::sync::LazyLock;

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

    round_trip(body, max, &schedule);
});

/// How many chunks follow the schedule.
const SCHEDULED_CHUNKS: usize = 128;

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

/// Largest frame on the wire: header plus padded payload. The decoder accepts
/// a hello payload even when the data limit is smaller.
fn frame_bound(max: usize) -> usize {
    HEADER_LEN + padded(max.max(HELLO_LEN))
}

/// Feeds `stream` to a decoder as `schedule` says, passes every payload to
/// `on_frame` in order, and returns how the stream ended (an error, or
/// `Closed` / `Truncated` at its end).
fn decode(
    stream: &[u8],
    max: usize,
    schedule: &Schedule,
    on_frame: &mut dyn FnMut(&[u8]),
) -> FrameError {
    let mut d = Decoder::new(max);
    assert_eq!(d.max_frame(), max);
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

/// Generated messages are cut from this many pseudo-random bytes.
const PATTERN_LEN: usize = 256 * 257 + LARGE_MAX;

/// Pseudo-random bytes that generated messages are slices of (no per-input
/// generation or allocation). Each byte depends on its position, so a
/// payload that was moved, cut or mixed with another no longer compares
/// equal.
static PATTERN: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..PATTERN_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
});

/// Bytes of medium generated messages (1 to 15 KiB) allowed per input.
const MEDIUM_BUDGET: usize = 8 * 1024;
/// Large generated messages allowed per input. Two are enough to pass the
/// encoder's 64 KiB compaction threshold, to grow the decoder's read size to
/// `READ_CHUNK` and to reach its large-frame path (frames over `READ_CHUNK`),
/// and each costs tens of microseconds, so they stay rare.
const MAX_LARGE: usize = 2;
/// Sizes of large messages: around `READ_CHUNK`, and around the largest
/// data limit the header can choose (`MAX_FRAME_LIMIT`).
const LARGE_MIN: usize = READ_CHUNK - 4096;
const LARGE_MAX: usize = LARGE_MIN + 255 * 32;

/// Reads the body as a writer's program.
struct Cursor<'a> {
    input: &'a [u8],
    /// Medium generated bytes still allowed.
    budget: usize,
    /// Large generated messages still allowed.
    large: usize,
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

    /// A message: up to 239 literal bytes (`l < 0xf0`), a generated one of
    /// `(l - 0xef) * 1031` bytes (1 to 15 KiB: frames that straddle reads and
    /// the data limit), or for `l == 0xff` a large one of 60 to 68 KiB. The
    /// byte after a generated length picks its bytes in `PATTERN`. Past the
    /// per-input budgets, generated messages are empty.
    fn message(&mut self) -> Option<&'a [u8]> {
        let l = self.byte()?;
        if l < 0xf0 {
            return Some(self.take(l as usize));
        }
        let len = if l == 0xff {
            let k = self.byte().unwrap_or(0) as usize;
            if self.large == 0 {
                0
            } else {
                self.large -= 1;
                LARGE_MIN + k * 32
            }
        } else {
            let len = ((l as usize - 0xef) * 521).min(self.budget);
            self.budget -= len;
            len
        };
        let seed = self.byte().unwrap_or(0) as usize;
        let pattern: &'static [u8] = &PATTERN;
        Some(&pattern[seed * 257..][..len])
    }

    /// How many bytes a simulated write takes.
    fn write_len(&mut self) -> usize {
        self.byte().map_or(usize::MAX, |b| b as usize * 37)
    }
}

/// Hand-overs per input, and bytes they may copy. Each copies every unsent
/// byte (twice: out of the old encoder, into the new one), so without a cap
/// one input of a few KiB could copy over 100 MB. The byte cap still lets a
/// large frame be handed over unsent.
const MAX_HANDOFFS: usize = 8;
const HANDOFF_BYTES: usize = 160 * 1024;

struct Writer<'a> {
    enc: Encoder,
    max: usize,
    /// Hand-overs done so far (at most `MAX_HANDOFFS`).
    handoffs: usize,
    /// Bytes they copied (a hand-over starts only below `HANDOFF_BYTES`).
    handoff_bytes: usize,
    /// What reached the "pipe".
    stream: Vec<u8>,
    /// Messages the encoder accepted, in order.
    accepted: Vec<&'a [u8]>,
}

impl<'a> Writer<'a> {
    fn push(&mut self, msg: &'a [u8]) {
        let queued = self.enc.queued();
        match self.enc.push(msg) {
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

    fn may_hand_off(&self) -> bool {
        self.handoffs < MAX_HANDOFFS && self.handoff_bytes < HANDOFF_BYTES
    }

    /// Moves the encoder's state to a new one, as a sender handed to a child
    /// process does. `lent` is a settled kernel write: the buffer it owned
    /// and how many bytes it wrote.
    fn hand_off(&mut self, lent: Option<(&[u8], usize)>) {
        self.handoffs += 1;
        let unsent = self.enc.unsent(lent);
        self.handoff_bytes += unsent.len();
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
        handoff_bytes: 0,
        stream: STREAM.take(),
        accepted: Vec::new(),
    };
    let mut cur = Cursor {
        input: body,
        budget: MEDIUM_BUDGET,
        large: MAX_LARGE,
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
                if op & 0x20 != 0 && w.may_hand_off() {
                    // Handed over once the write settled, before the buffer
                    // came back.
                    w.hand_off(Some((&buf, n)));
                } else {
                    w.enc.put_buf(buf);
                    w.enc.advance(n);
                }
            }
            _ if w.may_hand_off() => w.hand_off(None),
            _ => {}
        }
    }
    while w.enc.has_pending() {
        w.write(usize::MAX);
    }
    assert_eq!(w.enc.queued(), 0);

    // How the writes were interleaved must not show in the bytes.
    check_stream(&w.stream, &w.accepted);
    assert_eq!(w.stream.len() % 16, 0);

    let mut sent = w.accepted.iter();
    let end = decode(&w.stream, max, schedule, &mut |frame| {
        let want = sent.next().expect("decoded more messages than were sent");
        assert!(frame == *want, "decoded message differs from sent");
    });
    assert_eq!(end, FrameError::Closed);
    assert!(
        sent.next().is_none(),
        "decoded fewer messages than were sent"
    );

    // Keep the stream's allocation for the next input.
    let mut stream = w.stream;
    stream.clear();
    STREAM.set(stream);
}

thread_local! {
    /// The written stream's buffer, reused from input to input: growing a
    /// fresh one to a few hundred KiB for every input cost more (under ASan)
    /// than the framing under test.
    static STREAM: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Checks a written stream against the format, independently of the
/// encoder: the hello frame (once anything was accepted), then for each
/// message a data header, the payload and zero padding, and nothing else.
fn check_stream(stream: &[u8], sent: &[&[u8]]) {
    let mut rest = stream;
    if !sent.is_empty() {
        let hello = hello_frame();
        assert!(rest.starts_with(&hello), "stream does not start with hello");
        rest = &rest[hello.len()..];
    }
    for (i, m) in sent.iter().enumerate() {
        let frame = HEADER_LEN + padded(m.len());
        assert!(rest.len() >= frame, "stream ends inside message {i}");
        assert!(
            rest[..HEADER_LEN] == header(FrameKind::Data, m.len() as u32),
            "header of message {i} is wrong"
        );
        let (payload, pad) = rest[HEADER_LEN..frame].split_at(m.len());
        assert!(payload == *m, "payload of message {i} differs from sent");
        assert!(
            pad.iter().all(|&b| b == 0),
            "padding of message {i} not zero"
        );
        rest = &rest[frame..];
    }
    assert!(
        rest.is_empty(),
        "{} bytes after the last message",
        rest.len()
    );
}
