//! The channel's CPU cost without any I/O: frame encoding, frame decoding,
//! and the rkyv serialize + validate + read path a message takes.
//!
//! When a channel number looks slow, these say whether the time goes to the
//! framing layer, to rkyv, or to the syscalls and wake-ups around them.
//!
//! `cargo bench --bench framing` for figures; `cargo test --benches` runs
//! each benchmark once as a smoke test.

// `criterion_group!` defines an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use ringipc::Message;
use ringipc::framing::{DEFAULT_MAX_FRAME, Decoder, Encoder, READ_CHUNK};
use ringipc::rkyv::{self, rancor, util::AlignedVec};
use std::time::Duration;

const SIZES: [usize; 3] = [64, 4 << 10, 64 << 10];

/// Bytes of payload in each pre-encoded stream the decoder splits.
const STREAM_PAYLOAD: usize = 4 << 20;

fn size_name(size: usize) -> String {
    if size >= 1 << 10 {
        format!("{}KiB", size >> 10)
    } else {
        format!("{size}B")
    }
}

fn quick_group<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    g
}

fn encoder_push(c: &mut Criterion) {
    let mut g = quick_group(c, "encoder_push");
    for size in SIZES {
        let payload = vec![0xa5u8; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(size_name(size)),
            &payload,
            |b, p| {
                let mut enc = Encoder::new(DEFAULT_MAX_FRAME);
                b.iter(|| {
                    enc.push(black_box(p)).unwrap();
                    // Pretend the kernel took it all: the buffer empties but keeps
                    // its capacity, as it does on a channel that keeps up.
                    let n = enc.pending().len();
                    enc.advance(n);
                });
            },
        );
    }
    g.finish();
}

/// A whole stream (hello frame included) carrying about `STREAM_PAYLOAD`
/// bytes in frames of `size` bytes.
fn encoded_stream(size: usize) -> (Vec<u8>, usize) {
    let frames = (STREAM_PAYLOAD / size).max(1);
    let payload = vec![0x5au8; size];
    let mut enc = Encoder::new(DEFAULT_MAX_FRAME);
    for _ in 0..frames {
        enc.push(&payload).unwrap();
    }
    (enc.pending().to_vec(), frames)
}

fn decoder_decode(c: &mut Criterion) {
    let mut g = quick_group(c, "decoder_decode");
    for size in SIZES {
        let (stream, frames) = encoded_stream(size);
        g.throughput(Throughput::Bytes((frames * size) as u64));
        g.bench_with_input(
            BenchmarkId::from_parameter(size_name(size)),
            &stream,
            |b, s| {
                b.iter(|| {
                    // A decoder accepts one stream (it checks the hello frame
                    // once), so each iteration starts a fresh one; its buffer
                    // allocation is amortised over megabytes of frames.
                    let mut dec = Decoder::new(DEFAULT_MAX_FRAME);
                    let mut seen = 0usize;
                    for chunk in s.chunks(READ_CHUNK) {
                        dec.feed(chunk);
                        while let Some(r) = dec.next_frame().unwrap() {
                            seen += dec.buffer()[r].len();
                        }
                    }
                    assert_eq!(seen, frames * size);
                    black_box(seen)
                });
            },
        );
    }
    g.finish();
}

/// A typical small job message.
#[derive(rkyv::Archive, rkyv::Serialize)]
struct Job {
    id: u64,
    shard: u32,
    weight: f64,
    name: String,
    args: Vec<u32>,
}

fn job() -> Job {
    Job {
        id: 42,
        shard: 7,
        weight: 0.5,
        name: "resize-thumbnail".to_string(),
        args: vec![640, 480, 90, 1],
    }
}

fn read_fields(msg: &Message<'_, Job>) -> u64 {
    msg.id.to_native()
        + u64::from(msg.shard.to_native())
        + msg.weight.to_native() as u64
        + msg.name.len() as u64
        + msg
            .args
            .iter()
            .map(|a| u64::from(a.to_native()))
            .sum::<u64>()
}

fn rkyv_path(c: &mut Criterion) {
    let mut g = quick_group(c, "rkyv_small_struct");
    g.throughput(Throughput::Elements(1));
    let value = job();

    // What `Sender::send` does before any I/O: serialize onto the end of a
    // reused byte buffer (rkyv's arena keeps scratch memory warm).
    g.bench_function("serialize", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            rkyv::api::high::to_bytes_in::<_, rancor::Error>(black_box(&value), &mut out).unwrap();
            black_box(out.len())
        });
    });

    // What `Receiver::recv` does once a frame is in: bytecheck validation,
    // then reading fields in place.
    let archived = rkyv::to_bytes::<rancor::Error>(&value).unwrap();
    g.bench_function("validate_read", |b| {
        b.iter(|| {
            let msg = Message::<Job>::validate(black_box(&archived)).unwrap();
            black_box(read_fields(&msg))
        });
    });

    // Both ends back to back, into an aligned buffer as the receiver has.
    g.bench_function("roundtrip", |b| {
        let mut buf = AlignedVec::<16>::with_capacity(256);
        b.iter(|| {
            buf.clear();
            rkyv::api::high::to_bytes_in::<_, rancor::Error>(black_box(&value), &mut buf).unwrap();
            let msg = Message::<Job>::validate(&buf).unwrap();
            black_box(read_fields(&msg))
        });
    });
    g.finish();
}

criterion_group!(benches, encoder_push, decoder_decode, rkyv_path);
criterion_main!(benches);
