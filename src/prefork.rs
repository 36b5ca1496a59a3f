//! A prefork server: N pinned children accept on one listening socket.
//!
//! The parent binds (or is given) a `TcpListener`; every child inherits it
//! (the kernel hands each connection to one of the children blocked in
//! `accept`) and runs an accept loop that serves each connection with the
//! application's async handler as a task of its own. The parent supervises:
//! a child that dies is replaced. Shutdown drains: each child stops
//! accepting, finishes the connections it accepted, and exits; one still
//! busy at the deadline is killed. A child sent SIGTERM drains the same way
//! (and is then replaced, unless the server is shutting down).

use crate::backend::Backend;
use crate::backend::reactor::RuntimeFd;
use crate::channel::{Receiver, Sender};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{Decode, Encode};
use crate::process::spec::Spec;
use crate::process::{Affinity, ExitStatus, Fd, Process};
use crate::sys;
use rkyv::Deserialize;
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a prefork child is started with.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
#[doc(hidden)]
pub struct PreforkArgs<S> {
    listener: Fd<TcpListener>,
    /// A message (or the parent going away) means: drain and exit.
    drain: Receiver<u8>,
    /// The handler's code address, as an offset (see `Spec::offset`).
    handler: i64,
    /// The application's state, cloned for each connection.
    state: S,
    /// With one shared socket: the children's load counters and this
    /// child's index in them.
    loads: Option<(Fd<OwnedFd>, u32)>,
}

/// How many connections each child holds, in shared memory (one sealed
/// memfd, mapped by the parent and by every child). With one shared
/// socket, a child accepts only while it holds no more connections than
/// the least-loaded child that accepts, so a burst of connections is spread
/// over the children instead of going to the first one to wake. `NOT_ACCEPTING`
/// marks a child that is starting, draining or dead.
struct Loads {
    base: *mut u8,
    n: usize,
}

/// One counter per cache line.
const LOAD_STRIDE: usize = 64;
const NOT_ACCEPTING: u32 = u32::MAX;
/// A child's loop refreshes its heartbeat at least this often...
const BEAT_MS: u64 = 20;
/// ...and one whose heartbeat is older than this is not waited for.
const STALE_MS: u32 = 100;

/// CLOCK_MONOTONIC in milliseconds, wrapping: the same clock in every process.
fn now_ms() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32
}

// SAFETY: the mapping is shared memory accessed only through atomics, and
// lives (unmapped only in Drop) as long as the value.
unsafe impl Send for Loads {}
// SAFETY: as above: every access is an atomic operation.
unsafe impl Sync for Loads {}

impl Loads {
    fn create(n: usize) -> Result<(Loads, OwnedFd)> {
        let fd = sys::memfd_sealed(c"ringipc-prefork-loads", n * LOAD_STRIDE)
            .map_err(|e| Error::io("prefork: load counters", e))?;
        let loads = Loads::map(&fd, n)?;
        for i in 0..n {
            loads.at(i).store(NOT_ACCEPTING, Ordering::Relaxed);
        }
        Ok((loads, fd))
    }

    fn map(fd: &OwnedFd, n: usize) -> Result<Loads> {
        let (size, sealed) =
            sys::sealed_size(fd.as_raw_fd()).map_err(|e| Error::io("prefork: load counters", e))?;
        if n == 0 || size != n * LOAD_STRIDE || !sealed {
            return Err(Error::new(
                ErrorKind::Protocol,
                "prefork: the load counters are not what the parent made",
            ));
        }
        let base = sys::mmap_shared(fd.as_raw_fd(), size)
            .map_err(|e| Error::io("prefork: map the load counters", e))?;
        Ok(Loads { base, n })
    }

    /// Child `i`'s connection count (`word` 0) or heartbeat (`word` 1).
    fn word(&self, i: usize, word: usize) -> &AtomicU32 {
        assert!(i < self.n && word < 2);
        // SAFETY: `i < n` and `word < 2`, so the u32 lies inside the
        // mapping, which is page aligned (so each 64-byte slot, and a u32 at
        // offset 0 or 4 in it, is aligned) and lives as long as `self`; it
        // is only ever accessed atomically.
        unsafe {
            &*self
                .base
                .add(i * LOAD_STRIDE + word * 4)
                .cast::<AtomicU32>()
        }
    }

    fn at(&self, i: usize) -> &AtomicU32 {
        self.word(i, 0)
    }

    /// Child `i` is running its accept loop now.
    fn beat(&self, i: usize) {
        self.word(i, 1).store(now_ms(), Ordering::Relaxed);
    }

    /// Whether child `i` holds more connections than some child that
    /// accepts and is responsive. A child whose loop has not run for
    /// `STALE_MS` (a handler blocking its runtime, say) is left out, so one
    /// stuck child cannot stop the others from accepting.
    fn ahead(&self, i: usize) -> bool {
        let mine = self.at(i).load(Ordering::Relaxed);
        let now = now_ms();
        (0..self.n).any(|j| {
            j != i
                && self.at(j).load(Ordering::Relaxed) < mine
                && now.wrapping_sub(self.word(j, 1).load(Ordering::Relaxed)) < STALE_MS
        })
    }
}

impl Drop for Loads {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made; no reference into it
        // outlives `self` (`at` borrows `self`).
        unsafe { sys::munmap(self.base, self.n * LOAD_STRIDE) };
    }
}

type Launcher<S> = fn(PreforkArgs<S>, &ChildOptions) -> Result<Process<()>>;

#[derive(Clone)]
struct ChildOptions {
    name: String,
    affinity: Affinity,
    backend: Backend,
}

/// Tells a connection handler that its child is draining: finish the
/// request in progress, take no new one on this connection, and return.
///
/// A handler that serves one request per connection can ignore it. One that
/// keeps connections open (keep-alive) waits for the next request and for
/// [`Drain::wait`] together, so an idle connection does not hold the drain
/// up until the deadline.
#[derive(Clone, Debug)]
pub struct Drain(watch::Receiver<bool>);

impl Drain {
    /// Whether the child is draining.
    pub fn requested(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes once the child is draining.
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|d| *d).await;
    }
}

/// The accept loop of a child: serves each connection with `handler`
/// until told to drain (a message or EOF on `drain`, or SIGTERM), then
/// stops accepting, tells the handlers ([`Drain`]) and waits for them.
async fn child_main<S, Fut>(args: PreforkArgs<S>)
where
    S: Clone,
    Fut: Future<Output = ()> + Send + 'static,
{
    // SAFETY: `handler` is the offset of a `fn(tokio::net::TcpStream, Drain,
    // S) -> Fut` in this same binary, taken by `Prefork::builder` for exactly
    // these S and Fut.
    let handler = unsafe {
        std::mem::transmute::<usize, fn(tokio::net::TcpStream, Drain, S) -> Fut>(Spec::resolve(
            args.handler,
        ))
    };
    let PreforkArgs {
        listener,
        mut drain,
        state,
        loads,
        ..
    } = args;
    let loads = match loads {
        Some((fd, i)) => {
            let n = sys::sealed_size(fd.0.as_raw_fd()).map_or(0, |(size, _)| size / LOAD_STRIDE);
            match Loads::map(&fd.0, n) {
                Ok(l) if (i as usize) < n => Some((Arc::new(l), i as usize)),
                Ok(_) => {
                    eprintln!("ringipc prefork child: index {i} outside the load counters");
                    std::process::exit(1);
                }
                Err(e) => {
                    eprintln!("ringipc prefork child: {e}");
                    std::process::exit(1);
                }
            }
        }
        None => None,
    };
    let listener = listener
        .0
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpListener::from_std(listener.0));
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ringipc prefork child: cannot use the listener: {e}");
            std::process::exit(1);
        }
    };
    // SIGTERM drains too: its handler writes to a pipe the loop watches.
    let mut sigterm = sys::on_sigterm_write()
        .map(|fd| RuntimeFd::new(fd, tokio::io::Interest::READABLE))
        .ok();
    let mut tasks = tokio::task::JoinSet::new();
    let (draining, drain_rx) = watch::channel(false);
    if let Some((l, i)) = &loads {
        l.beat(*i);
        l.at(*i).store(0, Ordering::Relaxed);
    }
    let mut heartbeat = tokio::time::interval(Duration::from_millis(BEAT_MS));
    loop {
        // Ahead of another child: let it take the next connection, and look
        // again shortly (a connection waits in the backlog meanwhile).
        let ahead = loads.as_ref().is_some_and(|(l, i)| {
            l.beat(*i);
            l.ahead(*i)
        });
        tokio::select! {
            _ = heartbeat.tick(), if loads.is_some() => {}
            r = listener.accept(), if !ahead => {
                if let Ok((conn, _)) = r {
                    let served = handler(conn, Drain(drain_rx.clone()), state.clone());
                    match &loads {
                        Some((l, i)) => {
                            let (l, i) = (l.clone(), *i);
                            l.at(i).fetch_add(1, Ordering::Relaxed);
                            tasks.spawn(async move {
                                served.await;
                                l.at(i).fetch_sub(1, Ordering::Relaxed);
                            });
                        }
                        None => drop(tasks.spawn(served)),
                    }
                }
            }
            _ = tokio::time::sleep(Duration::from_micros(500)), if ahead => {}
            _ = drain.recv() => break,
            _ = async {
                match sigterm.as_mut().map(RuntimeFd::registered) {
                    Some(Ok(fd)) => fd.readable().await.map(drop),
                    _ => std::future::pending().await,
                }
            } => break,
            Some(_) = tasks.join_next() => {}
        }
    }
    // Stop accepting: connections still in the backlog go to the children
    // that still accept (or are refused once the last listener closes).
    if let Some((l, i)) = &loads {
        l.at(*i).store(NOT_ACCEPTING, Ordering::Relaxed);
    }
    drop(listener);
    let _ = draining.send(true);
    while tasks.join_next().await.is_some() {}
}

/// How a [`Prefork`] server's child stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PreforkChildStats {
    /// The child's index.
    pub child: usize,
    /// Its current process id (0 while it is being replaced).
    pub pid: u32,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    /// How many times it was replaced after dying.
    pub restarts: u64,
    /// How its last process ended, if one did.
    pub last_exit: Option<ExitStatus>,
}

/// A builder for a [`Prefork`] server whose handler takes state `S`.
pub struct PreforkBuilder<S> {
    handler: usize,
    launcher: Launcher<S>,
    state: S,
    children: Option<usize>,
    pin: bool,
    name: String,
    backend: Backend,
}

/// A prefork server: children that accept on one listening socket and
/// serve each connection with the application's handler.
///
/// ```no_run
/// use ringipc::Prefork;
/// use std::time::Duration;
/// use tokio::io::AsyncWriteExt;
///
/// async fn hello(mut conn: tokio::net::TcpStream, _: ringipc::Drain, greeting: String) {
///     let _ = conn.write_all(greeting.as_bytes()).await;
/// }
///
/// fn main() -> ringipc::Result<()> {
///     ringipc::init();
///     tokio::runtime::Runtime::new().unwrap().block_on(async {
///         let listener = std::net::TcpListener::bind("127.0.0.1:8080").unwrap();
///         let server = Prefork::builder(hello, "hello\n".to_string())
///             .start(listener)
///             .await?;
///         tokio::time::sleep(Duration::from_secs(60)).await; // serve a minute
///         // Stop accepting, finish what was accepted, at most 10 s.
///         server.shutdown(Duration::from_secs(10)).await
///     })
/// }
/// ```
///
/// The handler runs in the children, one task per connection, on each
/// child's own (current-thread) runtime. Connections are spread by the
/// kernel over the children waiting in `accept`. A child that dies is
/// replaced (after a back-off if it dies at once), so a crash loses only the
/// connections that child held.
///
/// A handler that computes does so on its child's one thread, and the
/// child's other connections wait meanwhile. Compute through a [`Lane`]
/// (a `static` one: one per child process) so that they take turns in the
/// order their requests came; computed inline, tokio's order lets some
/// requests wait two rounds of the others (p99 about 2× p50 in
/// `examples/server.rs`).
///
/// [`Lane`]: crate::Lane
pub struct Prefork {
    addr: SocketAddr,
    state: Arc<Mutex<Vec<PreforkChildStats>>>,
    /// `Some(deadline)` once shutdown began.
    stop: watch::Sender<Option<Instant>>,
    supervisors: Vec<JoinHandle<bool>>,
}

impl Prefork {
    /// A builder for a server whose children serve each connection with
    /// the async `handler`, given a [`Drain`] that says when to stop taking
    /// requests on it and a clone of `state`. The state travels to each
    /// child in its start arguments (so it may hold `Fd`s and channel ends,
    /// like any child argument), and is cloned for each connection there;
    /// use `()` for none.
    pub fn builder<S, Fut>(
        handler: fn(tokio::net::TcpStream, Drain, S) -> Fut,
        state: S,
    ) -> PreforkBuilder<S>
    where
        S: Encode + Decode + Clone + Send + 'static,
        S::Archived: Deserialize<S, HighDeserializer<rancor::Error>>,
        Fut: Future<Output = ()> + Send + 'static,
    {
        PreforkBuilder {
            handler: handler as usize,
            state,
            launcher: |args, o| {
                Process::builder_async(child_main::<S, Fut>)
                    .arg(args)
                    .name(o.name.clone())
                    .pin(o.affinity.clone())
                    .backend(o.backend)
                    .start()
            },
            children: None,
            pin: true,
            name: "ringipc-prefork".to_string(),
            backend: Backend::Auto,
        }
    }
}

impl<S: Clone + Send + 'static> PreforkBuilder<S>
where
    PreforkArgs<S>: Encode,
{
    /// Number of children (default: one per core this process may use).
    ///
    /// A child computing a job cannot read its other connections. With
    /// large requests (hundreds of KiB and up), two children per core
    /// read while others compute, at a cost in p99 for small requests; see
    /// docs/tuning.md, "Servers".
    pub fn children(mut self, n: usize) -> Self {
        self.children = Some(n);
        self
    }

    /// Pins child `i` to the `i`-th core this process may use (default: on).
    ///
    /// Pinning suits cores that belong to the server. Where other busy
    /// threads share them (a load generator on the same machine, other
    /// services), a pinned child waits for its core while another core may
    /// idle: in `examples/server.rs` on two cores, with the load generator
    /// beside the server, 1 MiB requests with 50 µs jobs ran at about 0.75x
    /// spawn_blocking's req/s pinned and 0.9–1.0x unpinned.
    pub fn pin(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    /// The children's process name (`comm`), suffixed with their index.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The backend of the children's channels to the parent.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Starts the children on `listener` (bound and listening), which they
    /// share, and their supervisors on the current tokio runtime, which must
    /// keep running until [`Prefork::shutdown`]. Returns once every child
    /// accepts (or after 10 s, or when one failed at once).
    ///
    /// A connection goes to a child in `accept`; a child that holds more
    /// connections than another stops accepting until the other catches up
    /// (counters in shared memory), so a burst of connections that stay
    /// open is spread over the children rather than taken by the first one
    /// to wake.
    pub async fn start(self, listener: TcpListener) -> Result<Prefork> {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("prefork: listener address", e))?;
        let listener = Arc::new(listener);
        let n = self.child_count()?;
        let (loads, fd) = Loads::create(n)?;
        let shared = Arc::new(SharedLoads { loads, fd });
        self.launch(addr, vec![listener; n], Some(shared)).await
    }

    /// Binds one listening socket per child on `addr`, all with
    /// `SO_REUSEPORT` (port 0: the first picks a port, the others share
    /// it), and starts the children and their supervisors as
    /// [`PreforkBuilder::start`] does. The kernel spreads connections over
    /// the sockets by a hash of their addresses (roughly: 16 connections
    /// over 2 children are rarely 8 and 8); a child's socket (and its
    /// backlog) outlives the child, for its replacement.
    pub async fn bind(self, addr: SocketAddr) -> Result<Prefork> {
        let n = self.child_count()?;
        let listen = |addr: SocketAddr| -> std::io::Result<TcpListener> {
            let sock = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            sock.set_reuseport(true)?;
            sock.set_reuseaddr(true)?;
            sock.bind(addr)?;
            sock.listen(1024)?.into_std()
        };
        let first = listen(addr).map_err(|e| Error::io(format!("prefork: bind {addr}"), e))?;
        let addr = first
            .local_addr()
            .map_err(|e| Error::io("prefork: listener address", e))?;
        let mut listeners = vec![Arc::new(first)];
        for _ in 1..n {
            let l = listen(addr).map_err(|e| Error::io(format!("prefork: bind {addr}"), e))?;
            listeners.push(Arc::new(l));
        }
        self.launch(addr, listeners, None).await
    }

    fn child_count(&self) -> Result<usize> {
        let cores = sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?;
        Ok(self.children.unwrap_or(cores.len()).max(1))
    }

    /// Starts child `i` on `listeners[i]`, and its supervisor.
    async fn launch(
        self,
        addr: SocketAddr,
        listeners: Vec<Arc<TcpListener>>,
        loads: Option<Arc<SharedLoads>>,
    ) -> Result<Prefork> {
        let cores = sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?;
        let n = listeners.len();
        let (stop, _) = watch::channel(None);
        let state = Arc::new(Mutex::new(Vec::with_capacity(n)));
        let mut started = Vec::with_capacity(n);
        for (i, listener) in listeners.iter().enumerate() {
            let core = self.pin.then(|| cores[i % cores.len()]);
            let opts = ChildOptions {
                name: format!("{}-{i}", self.name),
                affinity: core.map_or(Affinity::Any, Affinity::Core),
                backend: self.backend,
            };
            // On error, the children started so far are killed as they drop.
            let child = start_child(
                self.launcher,
                self.handler,
                listener,
                &opts,
                self.state.clone(),
                loads.as_deref().map(|l| (l, i)),
            )?;
            lock(&state).push(PreforkChildStats {
                child: i,
                pid: child.0.pid(),
                core,
                ..Default::default()
            });
            started.push((child, opts));
        }
        // With one shared socket, return once every child accepts: a child
        // not accepting yet is left out of the balance, and a burst of
        // connections right after `start` would all go to the first one.
        if let Some(shared) = &loads {
            let until = Instant::now() + Duration::from_secs(10);
            while (0..n).any(|i| shared.loads.at(i).load(Ordering::Relaxed) == NOT_ACCEPTING)
                && Instant::now() < until
                && started.iter_mut().all(|((p, _), _)| p.is_alive())
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        let supervisors = started
            .into_iter()
            .zip(listeners)
            .enumerate()
            .map(|(i, ((child, opts), listener))| {
                tokio::spawn(supervise(
                    i,
                    child,
                    Respawn {
                        i,
                        opts,
                        launcher: self.launcher,
                        handler: self.handler,
                        listener,
                        state: self.state.clone(),
                        loads: loads.clone(),
                    },
                    state.clone(),
                    stop.subscribe(),
                ))
            })
            .collect();
        Ok(Prefork {
            addr,
            state,
            stop,
            supervisors,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The load counters of a shared socket, and their memfd (for children).
struct SharedLoads {
    loads: Loads,
    fd: OwnedFd,
}

fn start_child<S>(
    launcher: Launcher<S>,
    handler: usize,
    listener: &TcpListener,
    opts: &ChildOptions,
    state: S,
    loads: Option<(&SharedLoads, usize)>,
) -> Result<(Process<()>, Sender<u8>)> {
    let listener = listener
        .try_clone()
        .map_err(|e| Error::io("prefork: duplicate the listener", e))?;
    let loads = match loads {
        Some((shared, i)) => {
            // Not accepting until the child says it is.
            shared.loads.at(i).store(NOT_ACCEPTING, Ordering::Relaxed);
            let fd = shared
                .fd
                .try_clone()
                .map_err(|e| Error::io("prefork: duplicate the load counters", e))?;
            Some((Fd(fd), i as u32))
        }
        None => None,
    };
    let (drain_tx, drain_rx) = crate::channel::ChannelConfig::new()
        .backend(opts.backend)
        .pipe::<u8>()?;
    let args = PreforkArgs {
        listener: Fd(listener),
        drain: drain_rx,
        handler: Spec::offset(handler),
        state,
        loads,
    };
    Ok((launcher(args, opts)?, drain_tx))
}

/// What it takes to start a replacement child.
struct Respawn<S> {
    i: usize,
    opts: ChildOptions,
    launcher: Launcher<S>,
    handler: usize,
    listener: Arc<TcpListener>,
    state: S,
    loads: Option<Arc<SharedLoads>>,
}

impl<S: Clone> Respawn<S> {
    fn start(&self) -> Result<(Process<()>, Sender<u8>)> {
        start_child(
            self.launcher,
            self.handler,
            &self.listener,
            &self.opts,
            self.state.clone(),
            self.loads.as_deref().map(|l| (l, self.i)),
        )
    }

    /// The child died: it holds no connections and takes none.
    fn gone(&self) {
        if let Some(l) = &self.loads {
            l.loads.at(self.i).store(NOT_ACCEPTING, Ordering::Relaxed);
        }
    }
}

/// Keeps child `i` running until shutdown; returns whether it had to be
/// killed at the shutdown deadline.
async fn supervise<S: Clone>(
    i: usize,
    mut child: (Process<()>, Sender<u8>),
    respawn: Respawn<S>,
    state: Arc<Mutex<Vec<PreforkChildStats>>>,
    mut stop: watch::Receiver<Option<Instant>>,
) -> bool {
    let mut quick_deaths = 0u32;
    loop {
        let born = Instant::now();
        let exited = tokio::select! {
            r = child.0.join() => Some(r),
            _ = stop.wait_for(Option::is_some) => None,
        };
        let Some(exited) = exited else {
            // Shutdown: ask for a drain, wait until the deadline, then kill.
            // (A `Prefork` dropped without `shutdown` stops at once.)
            let deadline = stop.borrow().unwrap_or_else(Instant::now);
            let _ = child.1.send(&1).await;
            let left = deadline.saturating_duration_since(Instant::now());
            let killed = match child.0.join_timeout(left).await {
                Ok(_) => false,
                Err(_) => {
                    let _ = child.0.kill();
                    let _ = child.0.join().await;
                    true
                }
            };
            lock(&state)[i].pid = 0;
            return killed;
        };
        respawn.gone();
        {
            let mut st = lock(&state);
            st[i].last_exit = exited.ok();
            st[i].pid = 0;
        }
        if stop.borrow().is_some() || stop.has_changed().is_err() {
            return false;
        }
        // Replace it; a child that dies at once is retried after a back-off.
        if born.elapsed() < Duration::from_secs(1) {
            quick_deaths += 1;
            let pause = Duration::from_millis(50 << quick_deaths.min(5));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.wait_for(Option::is_some) => return false,
            }
        } else {
            quick_deaths = 0;
        }
        match respawn.start() {
            Ok(new) => {
                let mut st = lock(&state);
                st[i].pid = new.0.pid();
                st[i].restarts += 1;
                child = new;
            }
            Err(e) => {
                tracing::warn!(child = i, error = %e, "prefork child could not be replaced; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.wait_for(Option::is_some) => return false,
                }
                // The loop joins the old (exited) child again, which returns
                // at once, and retries the start.
            }
        }
    }
}

impl Prefork {
    /// The address the children accept on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Per-child counters.
    pub fn stats(&self) -> Vec<PreforkChildStats> {
        lock(&self.state).clone()
    }

    /// Drains and stops: every child stops accepting, finishes the
    /// connections it accepted and exits. A child still busy after
    /// `deadline` is killed, and the result is [`ErrorKind::TimedOut`]
    /// (the server is stopped either way). The listening socket closes with
    /// the last child: connections still in its backlog are refused.
    pub async fn shutdown(self, deadline: Duration) -> Result<()> {
        let _ = self.stop.send(Some(Instant::now() + deadline));
        let mut killed = 0;
        for s in self.supervisors {
            if s.await.unwrap_or(true) {
                killed += 1;
            }
        }
        if killed > 0 {
            return Err(Error::new(
                ErrorKind::TimedOut,
                format!(
                    "prefork shutdown: {killed} children were still serving after {deadline:?} and were killed"
                ),
            ));
        }
        Ok(())
    }
}
