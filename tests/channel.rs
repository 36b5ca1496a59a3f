//! Channel behaviour, on both backends: round trips, ordering, close and EOF,
//! timeouts, cancellation safety, frame limits and corrupt input.

mod common;

use ringipc::{ChannelConfig, ErrorKind, Message};
use rkyv::{Archive, Deserialize, Serialize};
use std::time::Duration;

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Inner {
    id: u64,
    tags: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
enum Shape {
    Empty,
    Point(i32, i32),
    Named { name: String, inner: Box<Inner> },
}

#[derive(Archive, Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Nested {
    name: String,
    values: Vec<f64>,
    shapes: Vec<Shape>,
    maybe: Option<Inner>,
}

async fn round_trip<T>(cfg: ChannelConfig, value: T)
where
    T: ringipc::Encode + ringipc::Decode + PartialEq + std::fmt::Debug,
    T::Archived: rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let (mut tx, mut rx) = cfg.pipe::<T>().unwrap();
    let (sent, got) = tokio::join!(tx.send(&value), async {
        let m = rx.recv().await.unwrap();
        assert_eq!(
            m.bytes().as_ptr() as usize % 16,
            0,
            "payload must be 16-byte aligned"
        );
        m.deserialize().unwrap()
    });
    sent.unwrap();
    assert_eq!(got, value);
}

async fn round_trips_many_types(cfg: ChannelConfig) {
    round_trip(cfg, 42u32).await;
    round_trip(cfg, String::from("héllo wörld")).await;
    round_trip(cfg, String::new()).await;
    round_trip(cfg, ()).await; // a zero-byte payload
    round_trip(cfg, Vec::<u8>::new()).await;
    round_trip(cfg, vec![1u64, 2, 3, u64::MAX]).await;
    round_trip(cfg, Shape::Empty).await;
    round_trip(cfg, Shape::Point(-1, 7)).await;
    round_trip(
        cfg,
        Nested {
            name: "n".repeat(100),
            values: vec![1.5, -2.25, f64::MAX],
            shapes: vec![
                Shape::Empty,
                Shape::Named {
                    name: "deep".into(),
                    inner: Box::new(Inner {
                        id: 9,
                        tags: vec!["a".into(), "".into()],
                    }),
                },
            ],
            maybe: Some(Inner {
                id: 1,
                tags: vec![],
            }),
        },
    )
    .await;
    round_trip(cfg, (1u8, String::from("tuple"), Some(3i64))).await;
}

async fn round_trips_64_mib(cfg: ChannelConfig) {
    let big: Vec<u8> = (0..64usize << 20).map(|i| (i * 31 % 251) as u8).collect();
    let (mut tx, mut rx) = cfg.pipe::<Vec<u8>>().unwrap();
    let (sent, ok) = tokio::join!(tx.send(&big), async {
        let m = rx.recv().await.unwrap();
        m.as_slice() == big.as_slice()
    });
    sent.unwrap();
    assert!(ok, "64 MiB payload differs");
}

async fn million_messages_in_order(cfg: ChannelConfig) {
    const N: u64 = 1_000_000;
    let (mut tx, mut rx) = cfg.pipe::<u64>().unwrap();
    let send = async move {
        for i in 0..N {
            tx.feed(&i).await.unwrap();
        }
        tx.close().await.unwrap();
    };
    let recv = async move {
        let mut next = 0u64;
        loop {
            match rx.recv().await {
                Ok(m) => {
                    assert_eq!(m.to_native(), next);
                    next += 1;
                }
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
                    break;
                }
            }
        }
        next
    };
    let ((), got) = tokio::join!(send, recv);
    assert_eq!(got, N);
}

async fn duplex_interleaved(cfg: ChannelConfig) {
    let (mut a, mut b) = cfg.duplex::<String, u32>().unwrap();
    let left = async move {
        for i in 0..2000u32 {
            a.send(&format!("ping {i}")).await.unwrap();
            assert_eq!(a.recv().await.unwrap().to_native(), i);
        }
    };
    let right = async move {
        for i in 0..2000u32 {
            let m = b.recv().await.unwrap();
            assert_eq!(m.as_str(), format!("ping {i}"));
            b.send(&i).await.unwrap();
        }
    };
    tokio::join!(left, right);
}

async fn eof_after_all_messages(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<u32>().unwrap();
    for i in 0..10 {
        tx.send(&i).await.unwrap();
    }
    drop(tx);
    for i in 0..10 {
        assert_eq!(rx.recv().await.unwrap().to_native(), i);
    }
    for _ in 0..3 {
        assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
    }
}

async fn closed_before_any_message(cfg: ChannelConfig) {
    let (tx, mut rx) = cfg.pipe::<u32>().unwrap();
    drop(tx);
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
}

async fn send_to_dropped_receiver_is_closed(cfg: ChannelConfig) {
    let (mut tx, rx) = cfg.pipe::<Vec<u8>>().unwrap();
    rx.close();
    let e = tx.send(&vec![0u8; 100]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    assert_eq!(
        tx.send(&vec![1u8]).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

async fn recv_timeout_then_message(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<u32>().unwrap();
    let e = rx
        .recv_timeout(Duration::from_millis(20))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::TimedOut);
    tx.send(&5).await.unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .to_native(),
        5
    );
}

async fn try_recv_empty_then_some(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<u32>().unwrap();
    assert!(rx.try_recv().unwrap().is_none());
    tx.send(&1).await.unwrap();
    tx.send(&2).await.unwrap();
    // The read may complete asynchronously on uring: poll until it lands.
    let mut got = Vec::new();
    for _ in 0..1000 {
        if let Some(m) = rx.try_recv().unwrap() {
            got.push(m.to_native());
            if got.len() == 2 {
                break;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(got, vec![1, 2]);
}

/// Receives with tiny timeouts while large messages arrive in pieces: every
/// timeout abandons a recv mid-frame, and still nothing is lost or reordered.
async fn abandoned_recv_loses_nothing(cfg: ChannelConfig) {
    const N: usize = 20;
    let (mut tx, mut rx) = cfg.arena(false).pipe::<Vec<u8>>().unwrap();
    let send = async move {
        for i in 0..N {
            tx.send(&vec![i as u8; 3 << 20]).await.unwrap();
        }
    };
    let recv = async move {
        let mut got = 0;
        let mut timeouts = 0;
        while got < N {
            match rx.recv_timeout(Duration::from_micros(50)).await {
                Ok(m) => {
                    assert_eq!(m.len(), 3 << 20);
                    assert!(m.iter().all(|&b| b == got as u8), "message {got} corrupted");
                    got += 1;
                }
                Err(e) if e.kind() == ErrorKind::TimedOut => timeouts += 1,
                Err(e) => panic!("{e}"),
            }
        }
        timeouts
    };
    let ((), timeouts) = tokio::join!(send, recv);
    assert!(timeouts > 0, "the test never abandoned a recv");
}

/// A send abandoned while the pipe is full leaves its frame queued; the next
/// send completes it first, so the reader sees both messages whole.
async fn abandoned_send_keeps_stream_intact(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.arena(false).pipe::<Vec<u8>>().unwrap();
    let big = vec![7u8; 8 << 20];
    let r = tokio::time::timeout(Duration::from_millis(30), tx.send(&big)).await;
    assert!(
        r.is_err(),
        "an 8 MiB send into an unread pipe should not finish"
    );
    let small = vec![9u8; 10];
    let (sent, ()) = tokio::join!(tx.send(&small), async {
        let m = rx.recv().await.unwrap();
        assert_eq!(m.len(), 8 << 20);
        assert!(m.iter().all(|&b| b == 7));
        assert_eq!(rx.recv().await.unwrap().as_slice(), &[9u8; 10]);
    });
    sent.unwrap();
}

async fn frame_limit_on_send_keeps_channel(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.max_frame_size(1024).pipe::<Vec<u8>>().unwrap();
    let e = tx.send(&vec![0u8; 4096]).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::FrameTooLarge);
    tx.send(&vec![1u8; 10]).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().as_slice(), &[1u8; 10]);
}

async fn frame_limit_on_recv_closes(cfg: ChannelConfig) {
    let (r, w) = std::io::pipe().unwrap();
    let mut tx = cfg.bytes_sender(w.into()).unwrap();
    let mut rx = cfg.max_frame_size(64).bytes_receiver(r.into()).unwrap();
    tx.send(&[1u8; 64]).await.unwrap();
    tx.send(&[2u8; 65]).await.unwrap();
    assert_eq!(rx.recv().await.unwrap(), &[1u8; 64]);
    assert_eq!(
        rx.recv().await.unwrap_err().kind(),
        ErrorKind::FrameTooLarge
    );
    assert_eq!(
        rx.recv().await.unwrap_err().kind(),
        ErrorKind::FrameTooLarge
    );
}

async fn corrupted_payload_is_invalid_message(cfg: ChannelConfig) {
    let (tx, rx) = cfg.bytes_pipe().unwrap();
    let mut tx = tx;
    let mut rx = rx.into_typed::<Nested>();
    tx.send(&[0xAB; 40]).await.unwrap();
    let e = rx.recv().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidMessage);
    // The stream itself is intact: the next valid message gets through.
    let mut tx = tx.into_typed::<Nested>();
    let v = Nested {
        name: "ok".into(),
        values: vec![],
        shapes: vec![],
        maybe: None,
    };
    tx.send(&v).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().deserialize().unwrap(), v);
}

/// A validation error keeps rkyv's cause (its default error type drops it
/// in release builds: run `cargo test --release` to see the old message).
async fn invalid_message_keeps_its_cause(cfg: ChannelConfig) {
    let (mut tx, rx) = cfg.bytes_pipe().unwrap();
    let mut rx = rx.into_typed::<Nested>();
    tx.send(&[0xAB; 40]).await.unwrap();
    let e = rx.recv().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidMessage);
    let source = std::error::Error::source(&e).expect("the cause is kept");
    let text = format!("{e} / {source}");
    assert!(!text.contains("without error information"), "{text}");
    assert!(!source.to_string().is_empty(), "{text}");
}

#[derive(Archive, Serialize, Deserialize)]
struct Carrier {
    n: u64,
    tx: Option<ringipc::Sender<u64>>,
}

/// A channel end inside a message (not a child's start argument) is
/// refused with `Unsupported`, naming the handle, and nothing is written.
async fn handle_in_message_is_unsupported(cfg: ChannelConfig) {
    let (inner, _inner_rx) = cfg.pipe::<u64>().unwrap();
    let (mut tx, mut rx) = cfg.pipe::<Carrier>().unwrap();
    let refused = Carrier {
        n: 1,
        tx: Some(inner),
    };
    let e = tx.send(&refused).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    let text = e.to_string();
    assert!(text.contains("Sender<u64>"), "{text}");
    assert!(text.contains("start arguments"), "{text}");
    assert!(!text.contains("without error information"), "{text}");
    // Same for a raw-bytes end, and the channel is untouched.
    let (_bytes_tx, bytes_rx) = cfg.bytes_pipe().unwrap();
    let (mut btx, _brx) = cfg.pipe::<ringipc::BytesReceiver>().unwrap();
    let e = btx.send(&bytes_rx).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("BytesReceiver"), "{e}");
    tx.send(&Carrier { n: 2, tx: None }).await.unwrap();
    assert_eq!(rx.recv().await.unwrap().n, 2);
}

async fn garbage_stream_is_protocol_error(cfg: ChannelConfig) {
    use std::io::Write;
    let (r, mut w) = std::io::pipe().unwrap();
    let mut rx = cfg.bytes_receiver(r.into()).unwrap();
    w.write_all(&[0x55; 100]).unwrap();
    drop(w);
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Protocol);
}

async fn unknown_version_is_protocol_error(cfg: ChannelConfig) {
    use std::io::Write;
    let (r, mut w) = std::io::pipe().unwrap();
    let mut rx = cfg.bytes_receiver(r.into()).unwrap();
    let mut hello = ringipc::framing::hello_frame();
    hello[ringipc::framing::HEADER_LEN + 4] = 99;
    w.write_all(&hello).unwrap();
    let e = rx.recv().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(e.to_string().contains("version 99"), "{e}");
}

async fn eof_inside_frame_is_truncated(cfg: ChannelConfig) {
    use std::io::Write;
    let (r, mut w) = std::io::pipe().unwrap();
    let mut rx = cfg.bytes_receiver(r.into()).unwrap();
    let mut enc = ringipc::framing::Encoder::new(1 << 20);
    enc.push(b"first").unwrap();
    enc.push(&[3u8; 1000]).unwrap();
    let stream = enc.pending();
    w.write_all(&stream[..stream.len() - 100]).unwrap();
    drop(w);
    assert_eq!(rx.recv().await.unwrap(), b"first");
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Truncated);
}

async fn across_threads(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<String>().unwrap();
    let t = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            for i in 0..1000 {
                tx.send(&i.to_string()).await.unwrap();
            }
        });
    });
    for i in 0..1000 {
        assert_eq!(rx.recv().await.unwrap().as_str(), i.to_string());
    }
    assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
    t.join().unwrap();
}

async fn validate_rejects_misaligned(_cfg: ChannelConfig) {
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&7u64).unwrap();
    let mut shifted = vec![0u8; bytes.len() + 1];
    shifted[1..].copy_from_slice(&bytes);
    let e = Message::<u64>::validate(&shifted[1..]).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidMessage);
}

/// `recv_unchecked` skips validation, but a payload too short for the root
/// or one whose root would be misaligned is an error, never a reference.
async fn recv_unchecked_checks_the_root(cfg: ChannelConfig) {
    let (mut tx, rx) = cfg.bytes_pipe().unwrap();
    let mut rx = rx.into_typed::<u64>();
    let good = rkyv::to_bytes::<rkyv::rancor::Error>(&41u64).unwrap();
    tx.feed(&good).await.unwrap();
    tx.feed(&[1, 2, 3]).await.unwrap(); // shorter than a u64 root
    tx.feed(&[0u8; 12]).await.unwrap(); // root at offset 4: misaligned
    tx.feed(&good).await.unwrap();
    tx.flush().await.unwrap();
    // SAFETY: the valid payloads are archives of u64 made by rkyv; the
    // others must be refused before anything is read through them.
    unsafe {
        assert_eq!(rx.recv_unchecked().await.unwrap().to_native(), 41);
        let e = rx.recv_unchecked().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
        let e = rx.recv_unchecked().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidMessage, "{e}");
        assert!(e.to_string().contains("aligned"), "{e}");
        assert_eq!(rx.recv_unchecked().await.unwrap().to_native(), 41);
    }
}

/// Received messages are Send and Sync for ordinary types.
#[test]
fn owned_messages_are_send_and_sync() {
    fn assert_send_sync<S: Send + Sync>() {}
    assert_send_sync::<ringipc::OwnedMessage<Vec<String>>>();
    assert_send_sync::<ringipc::OwnedMessage<u64>>();
}

both_backends!(
    round_trips_many_types,
    round_trips_64_mib,
    million_messages_in_order,
    duplex_interleaved,
    eof_after_all_messages,
    closed_before_any_message,
    send_to_dropped_receiver_is_closed,
    recv_timeout_then_message,
    try_recv_empty_then_some,
    abandoned_recv_loses_nothing,
    abandoned_send_keeps_stream_intact,
    frame_limit_on_send_keeps_channel,
    frame_limit_on_recv_closes,
    corrupted_payload_is_invalid_message,
    invalid_message_keeps_its_cause,
    handle_in_message_is_unsupported,
    garbage_stream_is_protocol_error,
    unknown_version_is_protocol_error,
    eof_inside_frame_is_truncated,
    across_threads,
    validate_rejects_misaligned,
    recv_unchecked_checks_the_root,
);

/// ringipc handles inside a tokio-uring runtime (a tokio current-thread
/// runtime with its own ring underneath), on both ringipc backends.
fn inside_tokio_uring(backend: ringipc::Backend) {
    if let Err(why) = ringipc::uring_probe() {
        eprintln!("SKIPPED: tokio-uring needs io_uring, which the kernel refuses: {why}");
        return;
    }
    tokio_uring::start(async move {
        let cfg = ChannelConfig::new().backend(backend);
        let (mut a, mut b) = cfg.duplex::<String, u64>().unwrap();
        let peer = tokio_uring::spawn(async move {
            for i in 0..500u64 {
                let m = b.recv().await.unwrap();
                assert_eq!(m.as_str(), i.to_string());
                b.send(&(i * 2)).await.unwrap();
            }
        });
        for i in 0..500u64 {
            a.send(&i.to_string()).await.unwrap();
            assert_eq!(
                a.recv_timeout(Duration::from_secs(5))
                    .await
                    .unwrap()
                    .to_native(),
                i * 2
            );
        }
        peer.await.unwrap();
    });
}

#[test]
fn uring_inside_tokio_uring_runtime() {
    inside_tokio_uring(ringipc::Backend::Uring);
}

#[test]
fn epoll_inside_tokio_uring_runtime() {
    inside_tokio_uring(ringipc::Backend::Epoll);
}
