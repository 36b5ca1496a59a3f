use super::*;
use proptest::prelude::*;

/// Naive oracle: the stream a correct encoder writes for `msgs`.
fn oracle_stream(msgs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    if !msgs.is_empty() {
        out.extend_from_slice(&hello_frame());
    }
    for m in msgs {
        out.extend_from_slice(&header(FrameKind::Data, m.len() as u32));
        out.extend_from_slice(m);
        while out.len() % 16 != 0 {
            out.push(0);
        }
    }
    out
}

/// A reader that takes whatever the pipe holds, as a kernel read would,
/// never takes bytes of the next frame with the end of a large one: the
/// buffer is empty once that frame is consumed, so nothing has to move.
#[test]
fn large_frame_reads_stop_at_its_end() {
    let msgs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 300 * 1024 + 5]).collect();
    let wire = oracle_stream(&msgs);
    let mut d = Decoder::new(1 << 20);
    let (mut off, mut got) = (0, Vec::new());
    while got.len() < msgs.len() {
        while let Some(r) = d.next_frame().unwrap() {
            got.push(d.buffer()[r].to_vec());
            assert!(
                d.unconsumed().is_empty(),
                "bytes of the next frame were read early"
            );
        }
        if off == wire.len() {
            break;
        }
        let (ptr, spare) = d.reserve();
        let n = spare.min(wire.len() - off);
        // SAFETY: `ptr` has `spare >= n` writable bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(wire[off..].as_ptr(), ptr, n);
            d.commit(n);
        }
        off += n;
    }
    assert_eq!(got, msgs);
}

fn drain(d: &mut Decoder, out: &mut Vec<Vec<u8>>) -> Result<(), FrameError> {
    while let Some(r) = d.next_frame()? {
        assert_eq!(
            d.buffer()[r.clone()].as_ptr() as usize % 16,
            0,
            "payload misaligned"
        );
        out.push(d.buffer()[r].to_vec());
    }
    Ok(())
}

/// Every frame and error `next_any` gives, in order, for `stream` fed in
/// `chunk`-byte pieces; `slow` takes only the full decoder's path.
fn decode_all(stream: &[u8], chunk: usize, max: usize, slow: bool) -> Vec<String> {
    let mut d = Decoder::new(max);
    let mut out = Vec::new();
    for c in stream.chunks(chunk) {
        d.feed(c);
        loop {
            let next = if slow {
                d.next_any_slow()
            } else {
                d.next_any()
            };
            match next {
                Ok(Some((kind, r))) => out.push(format!("{kind:?} {:?}", &d.buffer()[r])),
                Ok(None) => break,
                Err(e) => {
                    out.push(format!("error {e:?}"));
                    return out;
                }
            }
        }
    }
    out
}

proptest! {
    /// The inline fast path for data frames accepts exactly what the full
    /// decoder accepts: valid streams with header bytes flipped (kind,
    /// reserved bytes, magic, lengths over the limit) decode to the same
    /// frames and the same error either way.
    #[test]
    fn fast_path_agrees_with_the_full_decoder(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..20),
        flips in proptest::collection::vec((any::<usize>(), 0usize..16, 1u8..), 0..4),
        chunk in 1usize..300,
        max in 0usize..128,
    ) {
        let mut stream = oracle_stream(&msgs);
        // Where each frame's header starts (the hello's first).
        let mut starts = vec![0];
        let mut at = HEADER_LEN + 16;
        for m in &msgs {
            starts.push(at);
            at += HEADER_LEN + padded(m.len());
        }
        for (frame, byte, x) in flips {
            stream[starts[frame % starts.len()] + byte] ^= x;
        }
        prop_assert_eq!(
            decode_all(&stream, chunk, max, false),
            decode_all(&stream, chunk, max, true)
        );
    }

    #[test]
    fn any_split_decodes_the_same(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..40),
        chunk in 1usize..2000,
    ) {
        let mut enc = Encoder::new(1 << 20);
        for m in &msgs {
            enc.push(m).unwrap();
        }
        let stream = enc.pending().to_vec();
        prop_assert_eq!(&stream, &oracle_stream(&msgs));
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        for c in stream.chunks(chunk) {
            d.feed(c);
            drain(&mut d, &mut out).unwrap();
        }
        prop_assert_eq!(d.eof(), FrameError::Closed);
        prop_assert_eq!(out, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096), chunk in 1usize..512, max in 0usize..1024) {
        let mut d = Decoder::new(max);
        let mut out = Vec::new();
        let mut failed = false;
        for c in bytes.chunks(chunk) {
            d.feed(c);
            if drain(&mut d, &mut out).is_err() { failed = true; break; }
            // Never buffers more than one max frame plus a read chunk.
            prop_assert!(d.buffer().len() <= HEADER_LEN + padded(max.max(HELLO_LEN)) + 2 * READ_CHUNK);
        }
        if !failed {
            let e = d.eof();
            let ok = matches!(e, FrameError::Closed | FrameError::Truncated { .. });
            prop_assert!(ok, "unexpected {:?}", e);
        }
    }

    #[test]
    fn valid_prefix_then_garbage_keeps_prefix(
        msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 1..10),
        garbage in proptest::collection::vec(any::<u8>(), 1..64),
    ) {
        let mut stream = oracle_stream(&msgs);
        stream.extend_from_slice(&garbage);
        let mut d = Decoder::new(1024);
        d.feed(&stream);
        let mut out = Vec::new();
        let r = drain(&mut d, &mut out);
        // Every whole frame before the garbage is delivered.
        prop_assert_eq!(&out[..msgs.len()], &msgs[..]);
        if r.is_ok() {
            prop_assert!(d.eof() != FrameError::Closed || garbage.is_empty() || out.len() > msgs.len());
        }
    }
}

#[test]
fn oversized_header_is_rejected_before_allocation() {
    let mut s = hello_frame().to_vec();
    s.extend_from_slice(&header(FrameKind::Data, u32::MAX - 100));
    let mut d = Decoder::new(1024);
    d.feed(&s);
    assert!(matches!(d.next_frame(), Err(FrameError::TooLarge { .. })));
    assert!(d.buffer().len() < 1024);
}

#[test]
fn announced_frame_does_not_reserve_memory_before_it_arrives() {
    let mut s = hello_frame().to_vec();
    s.extend_from_slice(&header(FrameKind::Data, 200 << 20));
    s.extend_from_slice(&[7; 100]);
    let mut d = Decoder::new(256 << 20);
    d.feed(&s);
    assert_eq!(d.next_frame(), Ok(None));
    let _ = d.reserve();
    assert!(d.capacity() <= 4 * READ_CHUNK, "{}", d.capacity());
    // Room grows with what arrives, and the frame still decodes whole.
    let mut sent = 100;
    while sent < 8 << 20 {
        d.feed(&[7; 4096]);
        sent += 4096;
        assert!(d.capacity() <= 2 * (sent + HEADER_LEN) + 2 * READ_CHUNK);
    }
}

#[test]
fn large_frames_decode_through_growing_reads() {
    let payload: Vec<u8> = (0..(3 << 20) + 5).map(|i| i as u8).collect();
    let mut enc = Encoder::new(8 << 20);
    enc.push(&payload).unwrap();
    enc.push(b"after").unwrap();
    let stream = enc.pending().to_vec();
    let mut d = Decoder::new(8 << 20);
    let mut out = Vec::new();
    for c in stream.chunks(100_000) {
        d.feed(c);
        drain(&mut d, &mut out).unwrap();
    }
    assert_eq!(out, vec![payload, b"after".to_vec()]);
}

#[test]
fn unknown_version_is_a_protocol_error() {
    let mut s = hello_frame().to_vec();
    s[HEADER_LEN + 4] = 9;
    let mut d = Decoder::new(1024);
    d.feed(&s);
    assert_eq!(d.next_frame(), Err(FrameError::UnknownVersion(9)));
    // The failure sticks.
    assert_eq!(d.eof(), FrameError::UnknownVersion(9));
}

#[test]
fn data_before_hello_is_rejected() {
    let mut s = header(FrameKind::Data, 3).to_vec();
    s.extend_from_slice(&[1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut d = Decoder::new(1024);
    d.feed(&s);
    assert!(matches!(d.next_frame(), Err(FrameError::Protocol(_))));
}

#[test]
fn eof_mid_frame_is_truncated() {
    let mut enc = Encoder::new(1024);
    enc.push(b"hello world").unwrap();
    let s = enc.pending();
    let mut d = Decoder::new(1024);
    d.feed(&s[..s.len() - 3]);
    assert_eq!(d.next_frame(), Ok(None));
    assert!(matches!(d.eof(), FrameError::Truncated { .. }));
}

#[test]
fn encoder_rejects_oversized_and_keeps_buffer() {
    let mut enc = Encoder::new(8);
    enc.push(b"ok").unwrap();
    let before = enc.pending().to_vec();
    assert!(matches!(
        enc.push(&[0; 9]),
        Err(FrameError::TooLarge { .. })
    ));
    assert_eq!(enc.pending(), &before[..]);
}
