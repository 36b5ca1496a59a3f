//! A CPU-heavy TCP server in the modes a user would choose between, measured
//! side by side in one run by a load generator on loopback:
//!
//! - `pool`: the engine accepts and reads each request, a [`Pool`] worker
//!   computes it (the payload is copied to the worker), the engine answers;
//! - `handoff`: the engine accepts, and for each request hands a copy of
//!   the connection to a pool worker inside the job (`Fd<TcpStream>`); the
//!   worker reads the request, computes and answers on it (the parent
//!   copies no request or answer bytes);
//! - `handoff-conn`: the job is the whole connection, handed over once:
//!   the worker serves it until the client closes it, beside its other
//!   connections (an async handler, `concurrency`);
//! - `prefork`: a [`Prefork`] server: one child per core (pinned with
//!   `--pin`) accepts on one listening socket and reads, computes and
//!   answers in place (no engine, no copy through a parent);
//! - `spawn-blocking`: a tokio multi-thread runtime, compute in
//!   `spawn_blocking` (no ringipc);
//! - `rayon`: a tokio multi-thread runtime for I/O, compute on a rayon pool.
//!
//! ```text
//! cargo run --release --example server                  # the whole matrix, then a table
//! cargo run --release --example server -- --modes pool,handoff --payloads 1048576 --job-us 1000
//! cargo run --release --example server -- --quick       # a few seconds, for CI
//! cargo run --release --example server -- --repeat 5    # medians of five runs, modes taking turns
//! cargo run --release --example server -- --serve 7000  # pool mode only, until killed
//! ```
//!
//! Protocol: a request is a little-endian u32 length and that many bytes,
//! whose first 8 are the request's id; the answer is 16 bytes, the id and a
//! digest that costs `--job-us` microseconds of CPU to compute whatever the
//! payload size (see [`work`]). The load generator checks both: a wrong
//! answer stops the run with an error.
//!
//! A mode is one function from a [`Case`] to its measurements, listed in
//! [`MODES`]; another server is one more function and one more line there.

use clap::Parser;
use ringipc::{Drain, Engine, Fd, Lane, Pool, Prefork};
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

#[derive(Parser, Debug, Clone)]
struct Args {
    /// Server modes to compare, in this order (names from the list in
    /// `MODES`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "pool,handoff,handoff-conn,prefork,spawn-blocking,rayon"
    )]
    modes: Vec<String>,
    /// Request payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,1048576")]
    payloads: Vec<usize>,
    /// CPU time per request, in microseconds.
    #[arg(long, value_delimiter = ',', default_value = "1000,50")]
    job_us: Vec<u64>,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Seconds each mode serves load in each case. Every client sends
    /// requests until then, and req/s counts the requests answered within
    /// that window, while every connection is busy.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// A fixed number of requests per connection instead of `--seconds`
    /// (req/s is then over the whole run, including its tail, when some
    /// connections are done and others still wait for answers).
    #[arg(long)]
    requests: Option<usize>,
    /// Tiny runs (a few seconds in all), to check that every mode works.
    #[arg(long)]
    quick: bool,
    /// Pin the processes that serve connections themselves (`prefork`
    /// children, `handoff-conn` workers) one per core. Off by default: the
    /// load generator runs on the same cores, and a pinned server process
    /// then shares its core with the client's thread while the other core
    /// may idle (1 MiB requests, 50 µs jobs: about 0.75x spawn_blocking's
    /// req/s pinned, 0.9-1.0x unpinned; see docs/performance.md, "Servers").
    #[arg(long)]
    pin: bool,
    /// Processes per core that serve connections themselves (`prefork`
    /// children, `handoff-conn` workers). Two per core let one read its
    /// connections while the other computes, at a cost in p99 (see
    /// docs/performance.md, "Servers").
    #[arg(long, default_value_t = 1)]
    per_core: usize,
    /// Run every case this many times, the modes taking turns, and print
    /// medians instead of single runs: req/s and latencies are the medians
    /// of the runs, "vs s-b" and "vs rayon" the medians of the per-run
    /// ratios, with their lowest and highest in brackets. On a shared
    /// machine single runs move by 5-10%.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Only serve in `pool` mode, on this port, with the first `--job-us`,
    /// until killed.
    #[arg(long)]
    serve: Option<u16>,
}

/// One cell of the matrix: a server mode serves `connections` clients, each
/// sending requests of `payload` bytes that cost `rounds` rounds of
/// [`work`], one after another, for `duration` (or `requests` of them).
#[derive(Clone, Debug)]
struct Case {
    payload: usize,
    job_us: u64,
    rounds: u64,
    connections: usize,
    duration: Duration,
    requests: Option<usize>,
    /// `--pin`.
    pin: bool,
    /// `--per-core`.
    per_core: usize,
}

/// What the load generator saw in one case.
struct Measured {
    /// Requests answered within `elapsed`.
    answered: usize,
    elapsed: Duration,
    /// Per-request latencies (write of the request to the end of the
    /// answer) of every request, sorted.
    latencies: Vec<Duration>,
}

/// One mode's figures in one run of a case.
#[derive(Clone)]
struct Row {
    rate: f64,
    /// Latencies in seconds.
    p50: f64,
    p99: f64,
    max: f64,
    /// req/s over each of [`BASELINES`]' in the same run.
    ratios: [Option<f64>; 2],
}

impl Row {
    fn new(m: &Measured) -> Row {
        Row {
            rate: m.answered as f64 / m.elapsed.as_secs_f64(),
            p50: percentile(&m.latencies, 50).as_secs_f64(),
            p99: percentile(&m.latencies, 99).as_secs_f64(),
            max: m.latencies.last().map_or(0.0, Duration::as_secs_f64),
            ratios: [None; 2],
        }
    }
}

/// The median of per-run ratios, with their lowest and highest when there
/// is more than one run.
fn ratio_cell(ratios: Vec<f64>) -> String {
    let (Some(lo), Some(hi)) = (
        ratios.iter().copied().reduce(f64::min),
        ratios.iter().copied().reduce(f64::max),
    ) else {
        return "-".to_string();
    };
    let m = median(ratios.clone());
    if ratios.len() > 1 {
        format!("{m:.2}× ({lo:.2}-{hi:.2})")
    } else {
        format!("{m:.2}×")
    }
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

struct Mode {
    name: &'static str,
    run: fn(&Case) -> Result<Measured>,
}

/// The modes, in table order.
const MODES: &[Mode] = &[
    Mode {
        name: "pool",
        run: pool_mode,
    },
    Mode {
        name: "handoff",
        run: handoff_mode,
    },
    Mode {
        name: "handoff-conn",
        run: handoff_conn_mode,
    },
    Mode {
        name: "prefork",
        run: prefork_mode,
    },
    Mode {
        name: "spawn-blocking",
        run: spawn_blocking_mode,
    },
    Mode {
        name: "rayon",
        run: rayon_mode,
    },
];

/// The contenders every row is compared with (the last row of each name: a
/// first `rayon` can be a warm-up).
const BASELINES: [&str; 2] = ["spawn-blocking", "rayon"];

// ---------------------------------------------------------------------------
// The work and the protocol, shared by every mode.

/// The request's CPU work: a digest of the payload (bytes sampled every
/// 4 KiB, so reading it costs little at any size) chained through `rounds`
/// serial multiply-xorshift rounds. The rounds are calibrated at start to
/// the requested CPU time, so a job costs the same at 1 KiB and at 1 MiB.
/// The first 8 bytes (the request id) are left out, so a client computes
/// its expected digest once.
fn work(payload: &[u8], rounds: u64) -> u64 {
    let body = payload.get(8..).unwrap_or(&[]);
    let mut h = 0xcbf29ce484222325u64 ^ body.len() as u64;
    for &b in body.iter().step_by(4096).chain(body.last()) {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    for r in 0..rounds {
        h = (h ^ r).wrapping_mul(0x9e3779b97f4a7c15);
        h ^= h >> 29;
    }
    h
}

/// Rounds of [`work`] per microsecond on this machine: the best of a few
/// timed runs (the fastest is the least disturbed by other load).
fn calibrate() -> f64 {
    let rounds = 500_000u64;
    let best = (0..20)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(work(std::hint::black_box(&[0u8; 16]), rounds));
            t.elapsed()
        })
        .min()
        .unwrap();
    rounds as f64 / best.as_secs_f64() / 1e6
}

fn request_id(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()))
}

fn answer(payload: &[u8], digest: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&request_id(payload).to_le_bytes());
    a[8..].copy_from_slice(&digest.to_le_bytes());
    a
}

/// Reads one request into `buf`; `false` when the client closed.
async fn read_request(
    conn: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    if conn.read_exact(&mut len).await.is_err() {
        return Ok(false);
    }
    buf.resize(u32::from_le_bytes(len) as usize, 0);
    conn.read_exact(buf).await?;
    Ok(true)
}

// ---------------------------------------------------------------------------
// Modes on ringipc: the engine accepts.

/// Turns for CPU work in the processes that serve connections themselves
/// (a `handoff-conn` worker, a `prefork` child): one per process, whose
/// runtime has one thread.
static LANE: Lane = Lane::new();

/// Every engine core listens on one port (SO_REUSEPORT: the kernel spreads
/// connections over the cores) and runs `on_conn` for each connection as a
/// local task. The accept loops end when the engine is dropped.
fn serve_on_engine<F, Fut>(engine: &Engine, port: u16, on_conn: F) -> Result<SocketAddr>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Clone + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let listen = |addr: SocketAddr| -> std::io::Result<tokio::net::TcpListener> {
        let sock = tokio::net::TcpSocket::new_v4()?;
        sock.set_reuseport(true)?;
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.listen(1024)
    };
    // The first bind picks the port the others share; it stays open until
    // every core listens, so no other socket can take the port meanwhile.
    let first = engine.block_on(move || async move {
        listen(([127, 0, 0, 1], port).into()).and_then(|l| l.into_std())
    })??;
    let addr = first.local_addr()?;
    let (ready, listening) = std::sync::mpsc::channel();
    for core in engine.cores() {
        let on_conn = on_conn.clone();
        let ready = ready.clone();
        drop(engine.run_on(core, move || async move {
            let listener = match listen(addr) {
                Ok(l) => l,
                Err(e) => return drop(ready.send(Err(e))),
            };
            let _ = ready.send(Ok(()));
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    continue;
                };
                let _ = conn.set_nodelay(true);
                tokio::task::spawn_local(on_conn(conn));
            }
        }));
    }
    // Clients connect only once every core listens.
    for _ in engine.cores() {
        listening.recv()??;
    }
    drop(first);
    Ok(addr)
}

/// The `pool` job: the request's payload travels to the worker.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct HashJob {
    rounds: u64,
    data: Vec<u8>,
}

fn hash_job(job: HashJob) -> u64 {
    work(&job.data, job.rounds)
}

async fn pool_conn(mut conn: tokio::net::TcpStream, pool: Pool<HashJob, u64>, rounds: u64) {
    let mut buf = Vec::new();
    loop {
        match read_request(&mut conn, &mut buf).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return eprintln!("pool: reading a request: {e}"),
        }
        let id = request_id(&buf);
        let job = HashJob {
            rounds,
            data: std::mem::take(&mut buf),
        };
        let digest = match pool.call(job).await {
            Ok(d) => d.to_native(),
            // The client sees its connection end without an answer.
            Err(e) => return eprintln!("pool: job failed: {e}"),
        };
        let mut a = answer(&[], digest);
        a[..8].copy_from_slice(&id.to_le_bytes());
        if conn.write_all(&a).await.is_err() {
            return;
        }
    }
}

/// A pool on core 0's runtime, which also runs its supervisors.
fn start_pool<J, R>(engine: &Engine, builder: ringipc::PoolBuilder<J, R>) -> Result<Pool<J, R>>
where
    J: ringipc::Encode + Send + 'static,
    R: ringipc::Decode + Send + 'static,
    R: rkyv::Archive,
{
    Ok(engine.block_on(move || async move { builder.build().await })??)
}

/// Runs the load against a server on `engine` backed by `pool`, then stops
/// the pool (on the engine, whose runtime its supervisors run on) and the
/// engine, in that order.
fn load_then_stop<J, R>(
    engine: Engine,
    pool: Pool<J, R>,
    addr: SocketAddr,
    case: &Case,
) -> Result<Measured>
where
    J: ringipc::Encode + Send + 'static,
    R: ringipc::Decode + Send + 'static,
{
    let measured = load(addr, case);
    engine.block_on(move || async move { pool.shutdown().await })??;
    drop(engine);
    measured
}

fn pool_mode(case: &Case) -> Result<Measured> {
    let engine = Engine::builder().build()?;
    let pool = start_pool(&engine, Pool::builder(hash_job).name("hash-worker"))?;
    let rounds = case.rounds;
    let p = pool.clone();
    let addr = serve_on_engine(&engine, 0, move |conn| pool_conn(conn, p.clone(), rounds))?;
    load_then_stop(engine, pool, addr, case)
}

/// The `handoff-conn` job: the connection itself, served by the worker
/// until the client closes it, as one of many jobs the worker runs side by
/// side (`concurrency`); their CPU work takes turns through the worker's
/// lane, as in a prefork child. Returns how many requests it answered.
async fn serve_connection((rounds, conn): (u64, Fd<std::net::TcpStream>)) -> u64 {
    // The engine's socket was non-blocking (tokio's), and that belongs to
    // the open file, which the worker's copy shares.
    let Ok(mut conn) = tokio::net::TcpStream::from_std(conn.0) else {
        return 0;
    };
    let mut buf = Vec::new();
    let mut served = 0;
    // An idle client ends its connection after `CLIENT_STALL`, so it does
    // not hold one of the worker's places for good.
    while let Ok(Ok(true)) =
        tokio::time::timeout(CLIENT_STALL, read_request(&mut conn, &mut buf)).await
    {
        let digest = LANE.run(|| work(&buf, rounds)).await;
        if conn.write_all(&answer(&buf, digest)).await.is_err() {
            break;
        }
        served += 1;
    }
    served
}

/// Connections one `handoff-conn` worker serves at once; more wait in the
/// engine for a place.
const CONNS_PER_WORKER: usize = 256;

/// The engine accepts and hands each connection to the least-loaded worker
/// once; the worker serves it to the end beside its other connections. Per
/// request, nothing crosses the parent.
fn handoff_conn_mode(case: &Case) -> Result<Measured> {
    let engine = Engine::builder().build()?;
    let pool = start_pool(
        &engine,
        Pool::builder_async(serve_connection)
            .name("conn-worker")
            .pin(case.pin)
            .workers(cores() * case.per_core)
            .concurrency(CONNS_PER_WORKER),
    )?;
    let rounds = case.rounds;
    let p = pool.clone();
    let addr = serve_on_engine(&engine, 0, move |conn| {
        let pool = p.clone();
        async move {
            let conn = match conn.into_std() {
                Ok(c) => c,
                Err(e) => return eprintln!("handoff-conn: {e}"),
            };
            if let Err(e) = pool.call((rounds, Fd(conn))).await {
                eprintln!("handoff-conn: connection failed: {e}");
            }
        }
    })?;
    load_then_stop(engine, pool, addr, case)
}

/// The `handoff` job: a copy of the connection (a dup of its fd) with one
/// request waiting on it, which the worker reads, computes and answers.
/// Returns whether it did.
fn serve_request((rounds, conn): (u64, Fd<std::net::TcpStream>)) -> bool {
    use std::io::Write;
    let mut conn = conn.0;
    let mut len = [0u8; 4];
    if read_all(&mut conn, &mut len).is_err() {
        return false;
    }
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    if read_all(&mut conn, &mut buf).is_err() {
        return false;
    }
    let a = answer(&buf, work(&buf, rounds));
    let mut sent = 0;
    while sent < a.len() {
        match conn.write(&a[sent..]) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if wait_for(&conn, libc::POLLOUT).is_err() {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
    true
}

/// `read_exact` on a socket in non-blocking mode (the worker's copy shares
/// the engine's open file, and with it tokio's `O_NONBLOCK`).
fn read_all(conn: &mut std::net::TcpStream, mut buf: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    while !buf.is_empty() {
        match conn.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => wait_for(conn, libc::POLLIN)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `conn` is ready for `events`. A client that stalls in the
/// middle of a request would hold the worker (and every job queued behind
/// it); past `CLIENT_STALL` its request fails instead.
fn wait_for(conn: &std::net::TcpStream, events: libc::c_short) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: conn.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd, and the count passed is 1.
    match unsafe { libc::poll(&mut p, 1, CLIENT_STALL.as_millis() as libc::c_int) } {
        0 => Err(std::io::ErrorKind::TimedOut.into()),
        // EINTR: the caller tries again.
        n if n < 0 => match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            e => Err(e),
        },
        _ => Ok(()),
    }
}

const CLIENT_STALL: Duration = Duration::from_secs(10);

/// One request per job: the engine keeps the connection, waits until a
/// request starts to arrive (a peek, which consumes nothing), and hands the
/// worker a dup of the fd with that request. Workers take requests from
/// every connection in turn, like the other modes, and never wait for a
/// client between requests; the price is an fd passed (and closed) per
/// request. The default in-flight window (4 per worker) keeps each worker's
/// queue full; calls beyond it wait in the engine, and since a job never
/// waits for another connection, nothing can deadlock.
///
/// The engine gets one core: its share of the work is a peek, a dup and a
/// job frame per request. The workers are not pinned, so the kernel can
/// move a worker away from the engine's core instead of making the engine
/// wait for that worker's time slice (pinned, and with an engine thread on
/// every core, handoff ran at 0.84–0.89× spawn_blocking's req/s for 1 ms
/// jobs; like this, 0.91–0.97× across runs).
fn handoff_mode(case: &Case) -> Result<Measured> {
    let engine = Engine::builder().cores([first_core()?]).build()?;
    let pool = start_pool(
        &engine,
        Pool::builder(serve_request)
            .name("request-worker")
            .pin(false),
    )?;
    let rounds = case.rounds;
    let p = pool.clone();
    let addr = serve_on_engine(&engine, 0, move |conn| {
        let pool = p.clone();
        async move {
            use std::os::fd::AsFd;
            let mut peek = [0u8; 1];
            // Ends when the client closes (a peek of 0 bytes) or on error.
            while let Ok(1..) = conn.peek(&mut peek).await {
                let copy = match conn.as_fd().try_clone_to_owned() {
                    Ok(fd) => std::net::TcpStream::from(fd),
                    Err(e) => return eprintln!("handoff: dup: {e}"),
                };
                match pool.call((rounds, Fd(copy))).await {
                    Ok(done) if *done => {}
                    Ok(_) => return,
                    Err(e) => return eprintln!("handoff: job failed: {e}"),
                }
            }
        }
    })?;
    load_then_stop(engine, pool, addr, case)
}

/// A `prefork` child's connection: read, compute and answer in place, on
/// the child's own runtime, until the client closes or the child drains.
async fn prefork_conn(mut conn: tokio::net::TcpStream, mut drain: Drain, rounds: u64) {
    let _ = conn.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        tokio::select! {
            r = read_request(&mut conn, &mut buf) => match r {
                Ok(true) => {}
                _ => return,
            },
            // Between requests only: this server drains after the load.
            _ = drain.wait() => return,
        }
        // The child is a process of its own: computing on its thread
        // is what it is for. Its other connections wait meanwhile, and the
        // lane makes them take turns in the order their requests came, as a
        // thread pool's queue would (inline, tokio's order would let some
        // requests wait twice as long as others).
        let digest = LANE.run(|| work(&buf, rounds)).await;
        if conn.write_all(&answer(&buf, digest)).await.is_err() {
            return;
        }
    }
}

fn prefork_mode(case: &Case) -> Result<Measured> {
    // The supervisors' runtime keeps running beside the load generator.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // One shared socket: a child ahead of another stops accepting, so the
    // clients' connections, opened at once and kept, are spread evenly
    // (`bind`, one SO_REUSEPORT socket per child, spreads them by hash,
    // rarely evenly).
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let server = rt.block_on(
        Prefork::builder(prefork_conn, case.rounds)
            .name("prefork")
            .pin(case.pin)
            .children(cores() * case.per_core)
            .start(listener),
    )?;
    let measured = load(server.local_addr(), case);
    rt.block_on(server.shutdown(Duration::from_secs(5)))?;
    measured
}

// ---------------------------------------------------------------------------
// The contenders: tokio's multi-thread runtime, no ringipc.

/// A tokio multi-thread runtime with one worker per core, accepting on
/// loopback and running `on_conn` for each connection.
fn serve_on_tokio<F, Fut>(on_conn: F) -> Result<(tokio::runtime::Runtime, SocketAddr)>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores())
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    rt.spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let _ = conn.set_nodelay(true);
            tokio::spawn(on_conn(conn));
        }
    });
    Ok((rt, addr))
}

/// Serves one connection on tokio, computing each request with `compute`.
async fn tokio_conn<F, Fut>(mut conn: tokio::net::TcpStream, compute: F)
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: Future<Output = Option<(Vec<u8>, u64)>>,
{
    let mut buf = Vec::new();
    loop {
        match read_request(&mut conn, &mut buf).await {
            Ok(true) => {}
            _ => return,
        }
        let Some((back, digest)) = compute(std::mem::take(&mut buf)).await else {
            return;
        };
        buf = back;
        if conn.write_all(&answer(&buf, digest)).await.is_err() {
            return;
        }
    }
}

fn spawn_blocking_mode(case: &Case) -> Result<Measured> {
    let rounds = case.rounds;
    let (rt, addr) = serve_on_tokio(move |conn| {
        tokio_conn(conn, move |buf| async move {
            tokio::task::spawn_blocking(move || {
                let d = work(&buf, rounds);
                (buf, d)
            })
            .await
            .ok()
        })
    })?;
    let measured = load(addr, case);
    rt.shutdown_timeout(Duration::from_secs(1));
    measured
}

fn rayon_mode(case: &Case) -> Result<Measured> {
    let rounds = case.rounds;
    let rayon = std::sync::Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores())
            .thread_name(|i| format!("rayon-{i}"))
            .build()?,
    );
    let (rt, addr) = serve_on_tokio(move |conn| {
        let rayon = rayon.clone();
        tokio_conn(conn, move |buf| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            rayon.spawn(move || {
                let d = work(&buf, rounds);
                let _ = tx.send((buf, d));
            });
            async move { rx.await.ok() }
        })
    })?;
    let measured = load(addr, case);
    // The rayon pool goes with the last connection task.
    rt.shutdown_timeout(Duration::from_secs(1));
    measured
}

/// The first core this process may run on.
fn first_core() -> Result<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, and the size passed
    // is its own.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        set
    };
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, the set's size in bits.
        .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .ok_or_else(|| "no core in this process's affinity mask".into())
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

// ---------------------------------------------------------------------------
// The load generator.

/// Drives the server from its own runtime (one thread): `connections`
/// clients, each sending requests one after another and checking every
/// answer.
///
/// Timed (the default), every client keeps sending until the deadline and
/// req/s counts the answers that came before it: a steady load, as a
/// server sees it. With a fixed number of requests per connection, the
/// run ends with a tail in which connections that are done leave the
/// server partly idle.
fn load(addr: SocketAddr, case: &Case) -> Result<Measured> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let case = case.clone();
    rt.block_on(async move {
        let start = Instant::now();
        let deadline = start + case.duration;
        let clients: Vec<_> = (0..case.connections)
            .map(|c| tokio::spawn(client(addr, c, case.clone(), deadline)))
            .collect();
        let mut answers = Vec::new();
        for c in clients {
            answers.extend(c.await??);
        }
        let (answered, elapsed) = match case.requests {
            Some(_) => (answers.len(), start.elapsed()),
            None => (
                answers.iter().filter(|(_, at)| *at <= deadline).count(),
                case.duration,
            ),
        };
        let mut latencies: Vec<Duration> = answers.into_iter().map(|(l, _)| l).collect();
        latencies.sort();
        Ok(Measured {
            answered,
            elapsed,
            latencies,
        })
    })
}

/// One connection's requests, each answer checked; returns each request's
/// latency and when its answer came. Sends at least one request.
async fn client(
    addr: SocketAddr,
    c: usize,
    case: Case,
    deadline: Instant,
) -> Result<Vec<(Duration, Instant)>> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let size = case.payload.max(8);
    let mut request: Vec<u8> = (size as u32).to_le_bytes().to_vec();
    request.extend((0..size).map(|i| (i * 7 + c) as u8));
    // The digest does not depend on the id, so it is the same for every
    // request on this connection.
    let expected = work(&request[4..], case.rounds);
    let mut answers = Vec::new();
    let mut got = [0u8; 16];
    for r in 0.. {
        let more = match case.requests {
            Some(n) => r < n,
            None => r == 0 || Instant::now() < deadline,
        };
        if !more {
            break;
        }
        let id = ((c as u64) << 32) | r as u64;
        request[4..12].copy_from_slice(&id.to_le_bytes());
        let t = Instant::now();
        s.write_all(&request).await?;
        s.read_exact(&mut got)
            .await
            .map_err(|e| format!("connection {c}, request {r}: no answer ({e})"))?;
        let done = Instant::now();
        answers.push((done - t, done));
        let (got_id, digest) = (
            u64::from_le_bytes(got[..8].try_into().unwrap()),
            u64::from_le_bytes(got[8..].try_into().unwrap()),
        );
        if got_id != id || digest != expected {
            return Err(format!(
                "connection {c}, request {r}: wrong answer (id {got_id:#x}, digest {digest:#x}; \
                 expected id {id:#x}, digest {expected:#x})"
            )
            .into());
        }
    }
    Ok(answers)
}

// ---------------------------------------------------------------------------

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let Some(last) = sorted.len().checked_sub(1) else {
        return Duration::ZERO;
    };
    sorted[(sorted.len() * p / 100).min(last)]
}

fn size_name(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn main() -> Result<()> {
    ringipc::init();
    let args = Args::parse();
    let modes: Vec<&Mode> = args
        .modes
        .iter()
        .map(|m| {
            MODES.iter().find(|x| x.name == m).ok_or_else(|| {
                let known: Vec<_> = MODES.iter().map(|x| x.name).collect();
                format!("unknown mode {m:?}; known: {}", known.join(", "))
            })
        })
        .collect::<Result<_, _>>()?;
    if args.connections == 0 || args.requests == Some(0) || args.per_core == 0 || args.repeat == 0 {
        return Err("--connections, --requests, --per-core and --repeat must be above zero".into());
    }
    let duration = Duration::try_from_secs_f64(args.seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("--seconds {}: must be above zero", args.seconds))?;
    // A quick run only checks that every mode answers.
    let requests = if args.quick {
        args.requests.or(Some(4))
    } else {
        args.requests
    };
    let per_us = calibrate();

    if let Some(port) = args.serve {
        let job_us = args.job_us.first().copied().unwrap_or(1000);
        let rounds = (job_us as f64 * per_us) as u64;
        let engine = Engine::builder().build()?;
        let pool = start_pool(&engine, Pool::builder(hash_job).name("hash-worker"))?;
        let p = pool.clone();
        let addr = serve_on_engine(&engine, port, move |conn| {
            pool_conn(conn, p.clone(), rounds)
        })?;
        println!("pool mode serving on {addr} ({job_us} µs jobs); Ctrl-C to stop");
        loop {
            std::thread::park();
        }
    }

    let backend = ringipc::default_backend()?;
    println!(
        "{} cores, ringipc backend {backend}, {:.0} work rounds/µs, {} connections",
        cores(),
        per_us,
        args.connections
    );
    let repeat = args.repeat;
    let w = if repeat > 1 { 18 } else { 9 };
    println!(
        "{:<15} {:>8} {:>7} {:>9} {:>10} {:>10} {:>10} {:>w$} {:>w$}",
        "mode", "payload", "job", "req/s", "p50", "p99", "max", "vs s-b", "vs rayon"
    );
    for &payload in &args.payloads {
        for &job_us in &args.job_us {
            let case = Case {
                payload,
                job_us,
                rounds: (job_us as f64 * per_us) as u64,
                connections: args.connections,
                duration,
                requests,
                pin: args.pin,
                per_core: args.per_core,
            };
            // Every mode runs first, so each row can show its ratios to the
            // contenders whatever the order on the command line; with
            // `--repeat`, the modes take turns, so that a slow spell of the
            // machine falls on all of them.
            let mut runs: Vec<Vec<Row>> = vec![Vec::new(); modes.len()];
            for _ in 0..repeat {
                let mut this_run = Vec::new();
                for mode in &modes {
                    let m = (mode.run)(&case).map_err(|e| format!("{} mode: {e}", mode.name))?;
                    this_run.push(Row::new(&m));
                }
                let base_rates = BASELINES.map(|name| {
                    let b = modes.iter().rposition(|m| m.name == name)?;
                    Some(this_run[b].rate)
                });
                for (mode_runs, mut row) in runs.iter_mut().zip(this_run) {
                    row.ratios = base_rates.map(|b| b.filter(|&b| b > 0.0).map(|b| row.rate / b));
                    mode_runs.push(row);
                }
            }
            for (mode, rows) in modes.iter().zip(&runs) {
                let med = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
                let secs = |f: fn(&Row) -> f64| Duration::from_secs_f64(med(f));
                let [vs_sb, vs_rayon] = [0, 1].map(|i| {
                    let ratios: Vec<f64> = rows.iter().filter_map(|r| r.ratios[i]).collect();
                    ratio_cell(ratios)
                });
                println!(
                    "{:<15} {:>8} {:>7} {:>9.0} {:>10.2?} {:>10.2?} {:>10.2?} {:>w$} {:>w$}",
                    mode.name,
                    size_name(case.payload),
                    format!("{} µs", case.job_us),
                    med(|r| r.rate),
                    secs(|r| r.p50),
                    secs(|r| r.p99),
                    secs(|r| r.max),
                    vs_sb,
                    vs_rayon
                );
            }
        }
    }
    Ok(())
}
