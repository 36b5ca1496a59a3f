//! Channel throughput and latency on each backend, across two OS threads
//! that each run their own current-thread runtime: the shape a parent and a
//! child process have, without the process start-up in the numbers.
//!
//! - `one_way/<backend>/<size>`: the sender `feed`s a batch of messages and
//!   flushes once, the receiver counts them; one iteration is one message.
//! - `ping_pong/<backend>/64B`: one iteration is one round trip over a duplex.
//!
//! The threads live as long as a benchmark, so an iteration batch costs two
//! thread wake-ups on top of the messages, which criterion's linear sampling
//! separates from the per-message slope.
//!
//! `cargo bench --bench channel` for figures; `cargo test --benches` runs
//! each benchmark once as a smoke test.

// `criterion_group!` defines an undocumented `pub fn`.
#![allow(missing_docs)]

use criterion::{BenchmarkId, Criterion, Throughput, black_box, criterion_group, criterion_main};
use ringipc::{Backend, ChannelConfig, Receiver, Sender};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

type Payload = Vec<u8>;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The backends this machine can run, each with a printed reason if skipped.
fn backends() -> Vec<Backend> {
    let mut out = Vec::new();
    match ringipc::uring_probe() {
        Ok(()) => out.push(Backend::Uring),
        Err(why) => eprintln!("SKIPPED uring benchmarks: the kernel refuses io_uring here: {why}"),
    }
    out.push(Backend::Epoll);
    out
}

fn size_name(size: usize) -> String {
    if size >= 1 << 10 {
        format!("{}KiB", size >> 10)
    } else {
        format!("{size}B")
    }
}

/// A sender thread and a receiver thread joined by one channel. Each batch
/// is started by a command to both and ends when the receiver has counted
/// every message.
struct OneWay {
    to_sender: Option<mpsc::Sender<u64>>,
    to_receiver: Option<mpsc::Sender<u64>>,
    done: mpsc::Receiver<()>,
    threads: Vec<JoinHandle<()>>,
}

impl OneWay {
    fn start(backend: Backend, size: usize) -> OneWay {
        let (tx, rx) = ChannelConfig::new()
            .backend(backend)
            .pipe::<Payload>()
            .expect("pipe");
        let (to_sender, sender_cmds) = mpsc::channel::<u64>();
        let (to_receiver, receiver_cmds) = mpsc::channel::<u64>();
        let (done_tx, done) = mpsc::channel();
        let sender = std::thread::spawn(move || send_batches(tx, size, sender_cmds));
        let receiver = std::thread::spawn(move || count_batches(rx, receiver_cmds, done_tx));
        OneWay {
            to_sender: Some(to_sender),
            to_receiver: Some(to_receiver),
            done,
            threads: vec![sender, receiver],
        }
    }

    fn run(&self, messages: u64) -> Duration {
        let t0 = Instant::now();
        self.to_receiver.as_ref().unwrap().send(messages).unwrap();
        self.to_sender.as_ref().unwrap().send(messages).unwrap();
        self.done.recv().expect("receiver thread died");
        t0.elapsed()
    }
}

impl Drop for OneWay {
    fn drop(&mut self) {
        // Closing the command channels ends both loops; the sender's end
        // closes the pipe on its way out.
        self.to_sender.take();
        self.to_receiver.take();
        for t in self.threads.drain(..) {
            t.join().expect("bench thread panicked");
        }
    }
}

fn send_batches(mut tx: Sender<Payload>, size: usize, cmds: mpsc::Receiver<u64>) {
    let rt = runtime();
    let msg = vec![0xa5u8; size];
    for n in cmds {
        rt.block_on(async {
            for _ in 0..n {
                tx.feed(&msg).await.expect("feed");
            }
            tx.flush().await.expect("flush");
        });
    }
}

fn count_batches(mut rx: Receiver<Payload>, cmds: mpsc::Receiver<u64>, done: mpsc::Sender<()>) {
    let rt = runtime();
    for n in cmds {
        let bytes = rt.block_on(async {
            let mut bytes = 0usize;
            for _ in 0..n {
                bytes += rx.recv().await.expect("recv").len();
            }
            bytes
        });
        black_box(bytes);
        if done.send(()).is_err() {
            return;
        }
    }
}

fn one_way(c: &mut Criterion) {
    for backend in backends() {
        let mut g = c.benchmark_group(format!("one_way/{backend}"));
        g.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20);
        for size in [64, 64 << 10] {
            g.throughput(Throughput::Bytes(size as u64));
            let pair = OneWay::start(backend, size);
            g.bench_function(BenchmarkId::from_parameter(size_name(size)), |b| {
                b.iter_custom(|iters| pair.run(iters));
            });
        }
        g.finish();
    }
}

/// A pinger thread that times round trips and an echo thread, joined by a
/// duplex of 64-byte messages.
struct PingPong {
    to_pinger: Option<mpsc::Sender<u64>>,
    elapsed: mpsc::Receiver<Duration>,
    threads: Vec<JoinHandle<()>>,
}

impl PingPong {
    fn start(backend: Backend, size: usize) -> PingPong {
        let (ping, pong) = ChannelConfig::new()
            .backend(backend)
            .duplex::<Payload, Payload>()
            .expect("duplex");
        let (to_pinger, cmds) = mpsc::channel::<u64>();
        let (elapsed_tx, elapsed) = mpsc::channel();
        let pinger = std::thread::spawn(move || {
            let rt = runtime();
            let (mut tx, mut rx) = ping.split();
            let msg = vec![0x11u8; size];
            for n in cmds {
                let took = rt.block_on(async {
                    let t0 = Instant::now();
                    for _ in 0..n {
                        tx.send(&msg).await.expect("ping");
                        black_box(rx.recv().await.expect("pong").len());
                    }
                    t0.elapsed()
                });
                if elapsed_tx.send(took).is_err() {
                    return;
                }
            }
        });
        let echo = std::thread::spawn(move || {
            let rt = runtime();
            let (mut tx, mut rx) = pong.split();
            let msg = vec![0x22u8; size];
            rt.block_on(async {
                // Ends with `Closed` when the pinger thread drops its end.
                while let Ok(m) = rx.recv().await {
                    black_box(m.len());
                    if tx.send(&msg).await.is_err() {
                        break;
                    }
                }
            });
        });
        PingPong {
            to_pinger: Some(to_pinger),
            elapsed,
            threads: vec![pinger, echo],
        }
    }

    fn run(&self, round_trips: u64) -> Duration {
        self.to_pinger.as_ref().unwrap().send(round_trips).unwrap();
        self.elapsed.recv().expect("pinger thread died")
    }
}

impl Drop for PingPong {
    fn drop(&mut self) {
        self.to_pinger.take();
        for t in self.threads.drain(..) {
            t.join().expect("bench thread panicked");
        }
    }
}

fn ping_pong(c: &mut Criterion) {
    for backend in backends() {
        let mut g = c.benchmark_group(format!("ping_pong/{backend}"));
        g.warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2))
            .sample_size(20);
        let pair = PingPong::start(backend, 64);
        g.bench_function(BenchmarkId::from_parameter(size_name(64)), |b| {
            b.iter_custom(|iters| pair.run(iters));
        });
        g.finish();
    }
}

criterion_group!(benches, one_way, ping_pong);
criterion_main!(benches);
