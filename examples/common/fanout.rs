//! Harness scenario 2c: one engine core in request/response with 64 child
//! processes at once, small messages. Reports messages per second and the
//! core thread's syscalls per message, counted by the kernel: a
//! `perf_event_open` counter on the `raw_syscalls:sys_enter` tracepoint for
//! that one thread (needs tracefs, e.g. `mount -t tracefs nodev
//! /sys/kernel/tracing`, and root or `perf_event_paranoid` <= 1; without it
//! the count says why it is missing).

use ringipc::{Affinity, Backend, Duplex, Engine, ErrorKind, Process};
use serde::Serialize;
use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Children served at once.
pub const PEERS: usize = 64;
/// Payload bytes of each request and reply.
pub const SIZE: usize = 64;

/// One row of the scenario.
#[derive(Serialize, Clone)]
pub struct FanoutRow {
    pub contender: &'static str,
    pub peers: usize,
    /// Round trips completed (each one request and one reply).
    pub round_trips: u64,
    /// Messages (requests plus replies) per second through the core.
    pub msgs_per_sec: f64,
    /// The core thread's syscalls per message, or why they were not counted.
    pub syscalls_per_msg: Result<f64, String>,
}

/// The child: answers every request with a reply of the same size.
async fn echo(mut d: Duplex<Vec<u8>, Vec<u8>>) {
    let reply = vec![0x33u8; SIZE];
    loop {
        match d.recv().await {
            Ok(m) => std::hint::black_box(m.len()),
            Err(_) => return,
        };
        if d.send(&reply).await.is_err() {
            return;
        }
    }
}

/// Counts the calling thread's syscalls.
struct SyscallCounter(OwnedFd);

impl SyscallCounter {
    fn for_current_thread() -> Result<SyscallCounter, String> {
        let id = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|root| {
                std::fs::read_to_string(format!("{root}/events/raw_syscalls/sys_enter/id")).ok()
            })
            .ok_or("tracefs not mounted (mount -t tracefs nodev /sys/kernel/tracing)")?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|e| format!("tracepoint id: {e}"))?;
        // perf_event_attr, first version (64 bytes): type, size, config;
        // the rest zero (counting, enabled, this thread only).
        let mut attr = [0u8; 64];
        attr[0..4].copy_from_slice(&2u32.to_ne_bytes()); // PERF_TYPE_TRACEPOINT
        attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&id.to_ne_bytes());
        // SAFETY: `attr` is a valid 64-byte perf_event_attr; pid 0 and cpu
        // -1 mean this thread on any CPU; no group fd.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                0 as libc::pid_t,
                -1 as libc::c_int,
                -1 as libc::c_int,
                8 as libc::c_ulong, // PERF_FLAG_FD_CLOEXEC
            )
        };
        if fd < 0 {
            return Err(format!(
                "perf_event_open: {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: perf_event_open returned a new fd that nothing else owns.
        Ok(SyscallCounter(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    fn count(&self) -> Result<u64, String> {
        let mut buf = [0u8; 8];
        // SAFETY: `buf` is 8 writable bytes; the fd is a perf counter we own.
        let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        if n != 8 {
            return Err(format!(
                "reading the counter: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(u64::from_ne_bytes(buf))
    }
}

/// Runs the scenario on `backend` for `duration`: the engine core on
/// `cores[0]`, the children pinned to `cores[1]` (when given).
pub fn run(
    backend: Backend,
    duration: Duration,
    cores: Option<[usize; 2]>,
) -> Result<FanoutRow, String> {
    let name = match backend {
        Backend::Uring => "ringipc-uring",
        _ => "ringipc-epoll",
    };
    let engine = Engine::builder()
        .cores([cores.map_or(0, |c| c[0])])
        .backend(backend)
        .build()
        .map_err(|e| e.to_string())?;
    let mut core_ends = Vec::with_capacity(PEERS);
    let mut children = Vec::with_capacity(PEERS);
    for _ in 0..PEERS {
        let (ours, theirs) = ringipc::ChannelConfig::new()
            .backend(backend)
            .duplex::<Vec<u8>, Vec<u8>>()
            .map_err(|e| e.to_string())?;
        let mut b = Process::builder_async(echo).arg(theirs).backend(backend);
        if let Some(c) = cores {
            b = b.pin(Affinity::Core(c[1]));
        }
        children.push(b.start().map_err(|e| e.to_string())?);
        core_ends.push(ours);
    }
    let outcome = engine.block_on(move || async move {
        let counter = SyscallCounter::for_current_thread();
        let stop = Rc::new(Cell::new(false));
        let trips = Rc::new(Cell::new(0u64));
        let err = |e: ringipc::Error| e.to_string();
        // Every child answers once before the clock starts.
        for d in &mut core_ends {
            d.send(&vec![0x11u8; SIZE]).await.map_err(err)?;
            d.recv().await.map_err(err)?;
        }
        let before = counter.as_ref().map(SyscallCounter::count);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for mut d in core_ends {
            let (stop, trips) = (stop.clone(), trips.clone());
            tasks.push(tokio::task::spawn_local(async move {
                let req = vec![0x11u8; SIZE];
                while !stop.get() {
                    d.send(&req).await?;
                    std::hint::black_box(d.recv().await?.len());
                    trips.set(trips.get() + 1);
                }
                Ok::<_, ringipc::Error>(())
            }));
        }
        tokio::time::sleep(duration).await;
        stop.set(true);
        for t in tasks {
            t.await.map_err(|e| e.to_string())?.map_err(err)?;
        }
        let elapsed = t0.elapsed();
        let after = counter.as_ref().map(SyscallCounter::count);
        let syscalls = match (before, after) {
            (Ok(Ok(b)), Ok(Ok(a))) => Ok(a - b),
            (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(e),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        Ok::<_, String>((trips.get(), elapsed, syscalls))
    });
    let (trips, elapsed, syscalls) = outcome.map_err(|e| e.to_string())??;
    // The core's ends are gone: every child sees EOF and exits.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        for c in &mut children {
            match c.join().await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Closed => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    })?;
    let msgs = 2 * trips;
    Ok(FanoutRow {
        contender: name,
        peers: PEERS,
        round_trips: trips,
        msgs_per_sec: msgs as f64 / elapsed.as_secs_f64(),
        syscalls_per_msg: syscalls.map(|s| s as f64 / msgs.max(1) as f64),
    })
}

/// Prints the scenario's table.
pub fn print(rows: &[FanoutRow]) {
    println!();
    println!(
        "2c. many channels: one engine core in request/response with {PEERS} child processes at once, {SIZE} B messages"
    );
    println!("   syscalls: the core thread's, counted by the kernel (raw_syscalls:sys_enter)");
    println!(
        "  {:<17} {:>12} {:>14} {:>12}",
        "contender", "msgs/s", "syscalls/msg", "round trips"
    );
    for r in rows {
        let sc = match &r.syscalls_per_msg {
            Ok(x) => format!("{x:.3}"),
            Err(why) => format!("- ({why})"),
        };
        println!(
            "  {:<17} {:>12.0} {:>14} {:>12}",
            r.contender, r.msgs_per_sec, sc, r.round_trips
        );
    }
}
