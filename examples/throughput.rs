//! A quick side-by-side of ringipc against a hand-written blocking pipe.
//!
//! ```text
//! cargo run --release --example throughput            # about 20-30 s
//! cargo run --release --example throughput -- --quick # a few seconds, noisier
//! cargo run --release --example throughput -- --ping-pong ringipc-uring  # one cell, e.g. under perf
//! ```
//!
//! Contenders: ringipc on io_uring, ringipc on epoll, and a raw blocking
//! `std::io::pipe()` with hand-written framing (a 16-byte header, then the
//! payload; small messages are gathered in a 256 KiB userspace buffer and
//! written in one `write`: the raw batched-write rate). Every pipe is grown
//! to 1 MiB the way ringipc grows its own.
//!
//! Scenarios, each across two OS threads (the shape of a parent and a child
//! process, without process start-up in the numbers):
//! - one-way throughput of 64 B, 4 KiB, 64 KiB and 1 MiB messages. ringipc
//!   sends `Vec<u8>` rkyv messages with `feed` and one `flush` at the end,
//!   as a user moving bulk data would; MB/s counts payload bytes (10^6).
//! - 64 B ping-pong: round-trip latency, p50 and p99.
//!
//! The `measure` module (`examples/common/measure.rs`, shared with the
//! `harness` example) holds one function per scenario and contender and
//! returns plain data; `main` only formats. The harness's other contenders
//! (tokio pipe + codec, tokio-uring, ipc-channel) can be named here too.

use std::time::Duration;

/// Measuring functions: one per scenario and contender, plain data out.
#[path = "common/measure.rs"]
pub mod measure;

use measure::{Contender, Latency, Settings, Throughput};

const USAGE: &str = "usage: throughput [--quick] [--one-way | --ping-pong] [CONTENDER...]
  CONTENDER: ringipc-uring, ringipc-epoll, raw-pipe (the default), or
             tokio-pipe+codec, tokio-uring, ipc-channel
  --quick      shorter runs, one per cell (noisier)
  --one-way    only the one-way throughput table
  --ping-pong  only the ping-pong latency table
  --size N     one-way with N-byte messages only
  --no-arena   ringipc's channels without the shared-memory arena";

const SIZES: [usize; 4] = [64, 4 << 10, 64 << 10, 1 << 20];
const PING_SIZE: usize = 64;

fn size_name(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s if s >= 1 << 10 => format!("{} KiB", s >> 10),
        s => format!("{s} B"),
    }
}

fn si(x: f64) -> String {
    match x {
        x if x >= 1e9 => format!("{:.2} G", x / 1e9),
        x if x >= 1e6 => format!("{:.2} M", x / 1e6),
        x if x >= 1e3 => format!("{:.1} k", x / 1e3),
        x => format!("{x:.0}  "),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Everything measured, for the report and the target checks.
struct Report {
    contenders: Vec<Contender>,
    one_way: Vec<(Contender, Throughput)>,
    ping: Vec<(Contender, Latency)>,
    /// Share of the machine other processes used while each cell ran, keyed
    /// by message size (ping-pong under `PING_KEY`).
    foreign_load: Vec<(usize, f64)>,
}

/// `Report::foreign_load` key of the ping-pong cell.
const PING_KEY: usize = 0;
/// Above this much foreign CPU load a cell's figures are flagged.
const NOISY: f64 = 0.05;

impl Report {
    fn throughput(&self, c: Contender, size: usize) -> Option<&Throughput> {
        self.one_way
            .iter()
            .find(|(k, t)| *k == c && t.size == size)
            .map(|(_, t)| t)
    }

    /// Message sizes measured one way, in the order measured.
    fn sizes(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = Vec::new();
        for (_, t) in &self.one_way {
            if !sizes.contains(&t.size) {
                sizes.push(t.size);
            }
        }
        sizes
    }

    fn load(&self, key: usize) -> Option<f64> {
        self.foreign_load
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, l)| *l)
    }

    fn latency(&self, c: Contender) -> Option<&Latency> {
        self.ping.iter().find(|(k, _)| *k == c).map(|(_, l)| l)
    }

    /// ringipc's message rate as a fraction of raw's, per backend.
    fn rate_ratio(&self, c: Contender, size: usize) -> Option<f64> {
        let raw = self.throughput(Contender::RawPipe, size)?;
        Some(self.throughput(c, size)?.msgs_per_sec() / raw.msgs_per_sec())
    }
}

/// What to run: every contender and scenario unless narrowed on the command line.
struct Selection {
    contenders: Vec<Contender>,
    sizes: Vec<usize>,
    one_way: bool,
    ping_pong: bool,
}

fn measure_all(settings: &Settings, sel: &Selection) -> measure::Result<Report> {
    let mut contenders = Vec::new();
    for &c in &sel.contenders {
        match c.available() {
            Ok(()) => contenders.push(c),
            Err(why) => println!("SKIPPED {}: {why}", c.name()),
        }
    }
    let mut report = Report {
        contenders,
        one_way: Vec::new(),
        ping: Vec::new(),
        foreign_load: Vec::new(),
    };
    for &size in sel.sizes.iter().filter(|_| sel.one_way) {
        let cpu = measure::CpuSnapshot::now();
        let results = measure::one_way(&report.contenders, size, settings)?;
        if let Some(load) = cpu.and_then(|c| c.foreign_load_since()) {
            report.foreign_load.push((size, load));
        }
        for (&c, t) in report.contenders.iter().zip(results) {
            eprintln!(
                "  one-way {:>7} {:<14} {:>10} msg/s",
                size_name(size),
                c.name(),
                si(t.msgs_per_sec())
            );
            report.one_way.push((c, t));
        }
    }
    if sel.ping_pong {
        let cpu = measure::CpuSnapshot::now();
        let results = measure::ping_pong(&report.contenders, PING_SIZE, settings)?;
        if let Some(load) = cpu.and_then(|c| c.foreign_load_since()) {
            report.foreign_load.push((PING_KEY, load));
        }
        for (&c, l) in report.contenders.iter().zip(results) {
            eprintln!("  ping-pong {:<14} p50 {:.1} us", c.name(), us(l.p50));
            report.ping.push((c, l));
        }
    }
    Ok(report)
}

fn print_tables(r: &Report) {
    if !r.one_way.is_empty() {
        print_one_way(r);
    }
    if !r.ping.is_empty() {
        print_ping_pong(r);
    }
}

fn print_one_way(r: &Report) {
    println!();
    println!("one-way throughput (MB = 10^6 payload bytes; ratio = msgs/s vs raw-pipe)");
    println!(
        "{:>8}  {:<14} {:>12} {:>10} {:>9} {:>10}",
        "size", "contender", "msgs/s", "MB/s", "vs raw", "messages"
    );
    for size in r.sizes() {
        print_load(r.load(size));
        for &c in &r.contenders {
            let Some(t) = r.throughput(c, size) else {
                continue;
            };
            let ratio = r
                .rate_ratio(c, size)
                .map_or("-".to_string(), |x| format!("{x:.2}x"));
            println!(
                "{:>8}  {:<14} {:>12} {:>10.1} {:>9} {:>10}",
                size_name(size),
                c.name(),
                si(t.msgs_per_sec()),
                t.mb_per_sec(),
                ratio,
                t.messages
            );
        }
    }
}

/// Flags a cell during which other processes kept the cores busy.
fn print_load(load: Option<f64>) {
    if let Some(load) = load.filter(|&l| l > NOISY) {
        println!(
            "  (other processes used {:.0}% of the machine during the next rows)",
            load * 100.0
        );
    }
}

fn print_ping_pong(r: &Report) {
    println!();
    println!(
        "ping-pong round trip, {} messages (microseconds)",
        size_name(PING_SIZE)
    );
    println!(
        "{:<14} {:>9} {:>9} {:>12} {:>8}",
        "contender", "p50", "p99", "p50 vs raw", "rounds"
    );
    print_load(r.load(PING_KEY));
    let raw = r.latency(Contender::RawPipe).copied();
    for &c in &r.contenders {
        let Some(l) = r.latency(c) else { continue };
        let ratio = raw.map_or("-".to_string(), |raw| {
            format!("{:.2}x", us(l.p50) / us(raw.p50))
        });
        println!(
            "{:<14} {:>9.1} {:>9.1} {:>12} {:>8}",
            c.name(),
            us(l.p50),
            us(l.p99),
            ratio,
            l.rounds
        );
    }
}

/// The issue's targets, each checked on this run's numbers.
fn print_targets(r: &Report) {
    let ringipc: Vec<Contender> = r
        .contenders
        .iter()
        .copied()
        .filter(|c| c.backend().is_some())
        .collect();
    let verdict = |ok: bool| if ok { "MET " } else { "MISS" };
    println!();
    println!("targets (ratios within this run)");
    let worst = r.foreign_load.iter().map(|(_, l)| *l).fold(0.0, f64::max);
    if worst > NOISY {
        println!(
            "(other processes used up to {:.0}% of the machine during this run: treat misses with care)",
            worst * 100.0
        );
    }

    for (size, floor, what) in [
        (64, 0.25, "64 B one-way >= 25% of raw batched-write rate"),
        (1 << 20, 0.80, "1 MiB one-way >= 80% of raw pipe bandwidth"),
    ] {
        let ratios: Vec<(Contender, f64)> = ringipc
            .iter()
            .filter_map(|&c| Some((c, r.rate_ratio(c, size)?)))
            .collect();
        if ratios.is_empty() {
            continue;
        }
        let ok = ratios.iter().all(|(_, x)| *x >= floor);
        let detail: Vec<String> = ratios
            .iter()
            .map(|(c, x)| format!("{} {x:.2}x", c.name()))
            .collect();
        println!("[{}] {what}: {}", verdict(ok), detail.join(", "));
    }

    if let Some(raw) = r
        .latency(Contender::RawPipe)
        .filter(|_| !ringipc.is_empty())
    {
        let ratios: Vec<(Contender, f64)> = ringipc
            .iter()
            .filter_map(|&c| Some((c, us(r.latency(c)?.p50) / us(raw.p50))))
            .collect();
        let ok = ratios.iter().all(|(_, x)| *x <= 1.3);
        let detail: Vec<String> = ratios
            .iter()
            .map(|(c, x)| format!("{} {x:.2}x", c.name()))
            .collect();
        println!(
            "[{}] 64 B ping-pong p50 within 1.3x of raw blocking pipe: {}",
            verdict(ok),
            detail.join(", ")
        );
    }

    let (u, e) = (Contender::RingipcUring, Contender::RingipcEpoll);
    if r.contenders.contains(&u) && r.contenders.contains(&e) {
        let mut worst: Vec<String> = Vec::new();
        let mut ok = true;
        for size in r.sizes() {
            if let (Some(tu), Some(te)) = (r.throughput(u, size), r.throughput(e, size)) {
                let x = tu.msgs_per_sec() / te.msgs_per_sec();
                ok &= x >= 0.9;
                worst.push(format!("{} {x:.2}x", size_name(size)));
            }
        }
        if let (Some(lu), Some(le)) = (r.latency(u), r.latency(e)) {
            // Latency: uring slower means a larger p50.
            let x = us(le.p50) / us(lu.p50);
            ok &= x >= 0.9;
            worst.push(format!("ping p50 {x:.2}x"));
        }
        if worst.is_empty() {
            return;
        }
        println!(
            "[{}] uring never >10% slower than epoll (uring speed / epoll speed): {}",
            verdict(ok),
            worst.join(", ")
        );
    }
}

fn main() -> measure::Result<()> {
    let mut settings = Settings::standard();
    let mut only: Vec<Contender> = Vec::new();
    let mut sel = Selection {
        contenders: Vec::new(),
        sizes: SIZES.to_vec(),
        one_way: true,
        ping_pong: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => settings = Settings::quick(),
            "--size" => {
                let size = args.next().and_then(|s| s.parse().ok()).filter(|&n| n > 0);
                sel.sizes = vec![size.ok_or("--size takes a message size in bytes")?];
            }
            "--no-arena" => ringipc::ChannelConfig::new()
                .arena(false)
                .set_process_default(),
            "--one-way" => sel.ping_pong = false,
            "--ping-pong" => sel.one_way = false,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            name => match Contender::ALL.into_iter().find(|c| c.name() == name) {
                Some(c) => only.push(c),
                None => return Err(format!("unknown argument {name:?}\n{USAGE}").into()),
            },
        }
    }
    if !sel.one_way && !sel.ping_pong {
        sel.one_way = true;
        sel.ping_pong = true;
    }
    sel.contenders = if only.is_empty() {
        Contender::RINGIPC_AND_RAW.to_vec()
    } else {
        only
    };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "ringipc throughput: kernel {}, {cores} cores, pipe size {} KiB, {} ms x {} runs per cell (median), ping-pong about {} ms per contender",
        kernel.trim(),
        measure::raw_pipe_size()? >> 10,
        settings.run_time.as_millis(),
        settings.reps,
        settings.ping_time.as_millis()
    );
    let t0 = std::time::Instant::now();
    let report = measure_all(&settings, &sel)?;
    print_tables(&report);
    print_targets(&report);
    println!();
    println!("total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
