//! A CPU-heavy TCP server: accept on the engine, compute in the pool, answer
//! on the engine. A load generator on loopback drives it and reports.
//!
//! ```text
//! cargo run --release --example server                  # server + load, then a report
//! cargo run --release --example server -- --connections 32 --requests 200 --rounds 20000
//! ```
//!
//! Protocol: a request is a little-endian u32 length and that many bytes;
//! the answer is the 8-byte digest of the payload after `rounds` rounds of
//! hashing (about 1 ms of CPU per request by default).

use clap::Parser;
use ringipc::{Engine, Pool};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Requests per connection.
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Hashing rounds per request (the CPU work).
    #[arg(long, default_value_t = 500)]
    rounds: u32,
    /// Request payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    payload: usize,
    /// Only serve, on this port, until killed.
    #[arg(long)]
    serve: Option<u16>,
}

/// The job a worker runs: hash `data` `rounds` times (FNV-1a, chained).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct HashJob {
    rounds: u32,
    data: Vec<u8>,
}

fn hash_job(job: HashJob) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for r in 0..job.rounds {
        h ^= r as u64;
        for &b in &job.data {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

async fn handle(
    mut conn: tokio::net::TcpStream,
    pool: Pool<HashJob, u64>,
    rounds: u32,
) -> std::io::Result<()> {
    let mut len = [0u8; 4];
    let mut buf = Vec::new();
    loop {
        if conn.read_exact(&mut len).await.is_err() {
            return Ok(()); // client closed
        }
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        conn.read_exact(&mut buf).await?;
        let job = HashJob {
            rounds,
            data: std::mem::take(&mut buf),
        };
        let digest = match pool.call(job).await {
            Ok(d) => d.to_native(),
            Err(e) => {
                eprintln!("job failed: {e}");
                0
            }
        };
        conn.write_all(&digest.to_le_bytes()).await?;
    }
}

/// Every core listens on the same port (SO_REUSEPORT: the kernel spreads
/// connections over the cores) and serves its connections as local tasks.
fn serve(
    engine: &Engine,
    pool: Pool<HashJob, u64>,
    port: u16,
    rounds: u32,
) -> ringipc::Result<SocketAddr> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let bound = engine.block_on(move || async move {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseport(true)?;
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.local_addr()
    })?;
    let addr =
        bound.map_err(|e| ringipc::Error::new(ringipc::ErrorKind::Io, "bind").with_source(e))?;
    for core in engine.cores() {
        let pool = pool.clone();
        // Fire and forget: the accept loop lives as long as the engine.
        drop(engine.run_on(core, move || async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.set_reuseport(true).unwrap();
            sock.set_reuseaddr(true).unwrap();
            sock.bind(addr).unwrap();
            let listener = sock.listen(1024).unwrap();
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                tokio::task::spawn_local(handle(conn, pool.clone(), rounds));
            }
        }));
    }
    Ok(addr)
}

/// Drives the server from a separate thread: `connections` clients, each
/// sending `requests` requests one after another. Bounded in count.
fn load(addr: SocketAddr, args: &Args) -> (Duration, Vec<Duration>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (conns, reqs, size) = (args.connections, args.requests, args.payload);
    rt.block_on(async move {
        // Give the accept loops a moment to start listening.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let start = Instant::now();
        let clients: Vec<_> = (0..conns)
            .map(|c| {
                tokio::spawn(async move {
                    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
                    s.set_nodelay(true).unwrap();
                    let payload: Vec<u8> = (0..size).map(|i| (i * 7 + c) as u8).collect();
                    let mut lat = Vec::with_capacity(reqs);
                    let mut digest = [0u8; 8];
                    for _ in 0..reqs {
                        let t = Instant::now();
                        s.write_all(&(size as u32).to_le_bytes()).await.unwrap();
                        s.write_all(&payload).await.unwrap();
                        s.read_exact(&mut digest).await.unwrap();
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect();
        let mut all = Vec::new();
        for c in clients {
            all.extend(c.await.unwrap());
        }
        (start.elapsed(), all)
    })
}

fn main() -> ringipc::Result<()> {
    ringipc::init();
    let args = Args::parse();
    let engine = Engine::builder().build()?;
    // The pool's result readers run on core 0's runtime.
    let pool = engine
        .block_on(|| async { Pool::builder(hash_job).name("hash-worker").build().await })??;
    println!(
        "engine: {} cores on {}; pool: {} workers",
        engine.cores().len(),
        engine.backend(),
        pool.workers()
    );
    if let Some(port) = args.serve {
        let addr = serve(&engine, pool, port, args.rounds)?;
        println!("serving on {addr}; Ctrl-C to stop");
        loop {
            std::thread::park();
        }
    }
    let addr = serve(&engine, pool.clone(), 0, args.rounds)?;
    let (elapsed, mut lat) = load(addr, &args);
    lat.sort();
    let n = lat.len();
    println!(
        "{n} requests over {} connections in {elapsed:.2?}: {:.0} req/s, latency p50 {:.2?} p99 {:.2?}",
        args.connections,
        n as f64 / elapsed.as_secs_f64(),
        lat[n / 2],
        lat[(n * 99 / 100).min(n - 1)]
    );
    for s in pool.stats() {
        println!(
            "  worker {} (pid {}, core {:?}): {} jobs, {} failed, {} restarts, busy {:.2?}",
            s.worker, s.pid, s.core, s.jobs_done, s.jobs_failed, s.restarts, s.busy
        );
    }
    engine.block_on(move || async move { pool.shutdown().await })??;
    Ok(())
}
