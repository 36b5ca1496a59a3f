//! Thread-per-core: one pinned thread per core, each running its own
//! current-thread tokio runtime (with a `LocalSet`, so `spawn_local` works)
//! and, on the uring backend, its own ring.
//!
//! ```
//! let engine = ringipc::Engine::builder().build()?;
//! // One future per core, each on its own pinned thread; results in core order.
//! let cores = engine.block_on_all(|core| async move { core * 10 })?;
//! assert_eq!(cores.len(), engine.cores().len());
//! # Ok::<(), ringipc::Error>(())
//! ```

use crate::backend::{self, Backend};
use crate::error::{Error, ErrorKind, Result};
use crate::process::Affinity;
use crate::sys;
use std::future::Future;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send>;

/// Options for an [`Engine`].
#[derive(Clone, Debug)]
#[must_use]
pub struct EngineBuilder {
    cores: Option<Vec<usize>>,
    backend: Backend,
    ring_entries: u32,
    busy_poll: Option<std::time::Duration>,
}

impl EngineBuilder {
    /// Which cores get a thread (default: every core this process may use).
    pub fn cores(mut self, cores: impl IntoIterator<Item = usize>) -> Self {
        self.cores = Some(cores.into_iter().collect());
        self
    }

    /// The backend of every core (default: the process default).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// Submission queue entries of each core's ring (default 256).
    pub fn ring_entries(mut self, entries: u32) -> Self {
        self.ring_entries = entries;
        self
    }

    /// Busy polling on every core: a receiver polled there that sets no
    /// budget of its own spins for up to `budget` before its task parks
    /// (see [`ChannelConfig::busy_poll`](crate::ChannelConfig::busy_poll)).
    /// Off by default: a spinning core burns CPU while it waits.
    pub fn busy_poll(mut self, budget: std::time::Duration) -> Self {
        self.busy_poll = (!budget.is_zero()).then_some(budget);
        self
    }

    /// Starts the core threads. An unknown core or an unusable backend is an
    /// error, and no thread is left running.
    pub fn build(self) -> Result<Engine> {
        let cores = match self.cores {
            Some(c) => c,
            None => sys::process_cpus().map_err(|e| Error::io("sched_getaffinity", e))?,
        };
        let mut seen = cores.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != cores.len() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("engine cores repeat: {cores:?}"),
            ));
        }
        Affinity::Set(cores.clone())
            .checked_cores()
            .map_err(|e| Error::new(ErrorKind::Unsupported, format!("engine: {}", e.context())))?;
        let backend = self.backend.resolve()?;
        let mut engine = Engine {
            cores: Vec::new(),
            threads: Vec::new(),
            backend,
        };
        for &core in &cores {
            let (tx, rx) = mpsc::unbounded_channel::<Job>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
            let entries = self.ring_entries;
            let busy_poll = self.busy_poll;
            let thread = std::thread::Builder::new()
                .name(format!("ringipc-core-{core}"))
                .spawn(move || core_main(core, backend, entries, busy_poll, rx, ready_tx))
                .map_err(|e| Error::io(format!("start core thread {core}"), e))?;
            engine.cores.push(CoreHandle { core, tx });
            engine.threads.push(thread);
            // On error, dropping `engine` stops the threads already started.
            ready_rx.recv().map_err(|_| {
                Error::new(ErrorKind::Io, format!("core thread {core} died at start"))
            })??;
        }
        Ok(engine)
    }
}

fn core_main(
    core: usize,
    backend: Backend,
    ring_entries: u32,
    busy_poll: Option<std::time::Duration>,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let setup = || -> Result<tokio::runtime::Runtime> {
        sys::set_affinity(&sys::cpu_set(&[core]))
            .map_err(|e| Error::io(format!("pin to core {core}"), e))?;
        backend::set_thread_default(backend);
        backend::uring::set_thread_ring_entries(ring_entries);
        backend::uring::set_thread_coop_taskrun();
        backend::set_thread_busy_poll(busy_poll);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::io("core runtime", e))
    };
    let rt = match setup() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        while let Some(job) = jobs.recv().await {
            job();
        }
    });
    // Tasks still running are cancelled; blocking work (spawn_blocking,
    // tokio::fs) gets a moment, not a chance to hold shutdown forever. The
    // thread-local ring goes when the thread ends.
    drop(local);
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
}

/// What a task on `core` came back with: its output, its panic, or nothing
/// because the core stopped.
fn outcome<T>(
    core: usize,
    r: std::result::Result<std::result::Result<T, String>, oneshot::error::RecvError>,
) -> Result<T> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(msg)) => Err(Error::new(
            ErrorKind::Panicked,
            format!("task on core {core} panicked: {msg}"),
        )),
        Err(_) => Err(Error::new(
            ErrorKind::Closed,
            format!("core {core} stopped"),
        )),
    }
}

struct CoreHandle {
    core: usize,
    tx: mpsc::UnboundedSender<Job>,
}

/// A set of pinned core threads, one per core, each with its own runtime
/// and (on uring) its own ring.
///
/// Dropping it stops every core: tasks still running are cancelled, threads
/// are joined, rings are closed.
pub struct Engine {
    cores: Vec<CoreHandle>,
    threads: Vec<JoinHandle<()>>,
    backend: Backend,
}

impl Engine {
    /// A builder with every core, the process-default backend and 256 ring entries.
    pub fn builder() -> EngineBuilder {
        EngineBuilder {
            cores: None,
            backend: Backend::Auto,
            ring_entries: 256,
            busy_poll: None,
        }
    }

    /// The cores, in the order `*_all` methods use.
    pub fn cores(&self) -> Vec<usize> {
        self.cores.iter().map(|c| c.core).collect()
    }

    /// The backend every core runs.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs the future made by `f` on `core` (as a local task there) and
    /// returns its output. A panic on that core comes back as
    /// [`ErrorKind::Panicked`]; the core keeps running.
    pub fn run_on<F, Fut, T>(
        &self,
        core: usize,
        f: F,
    ) -> impl Future<Output = Result<T>> + Send + 'static
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let sent = self.submit(core, f);
        async move {
            let rx = sent?;
            outcome(core, rx.await)
        }
    }

    fn submit<F, Fut, T>(
        &self,
        core: usize,
        f: F,
    ) -> Result<oneshot::Receiver<std::result::Result<T, String>>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let handle = self.cores.iter().find(|c| c.core == core).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                format!("core {core} is not part of this engine"),
            )
        })?;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // `f` itself runs inside the task, so a panic while it builds
            // its future is caught like one inside the future.
            let task = tokio::task::spawn_local(async move { f().await });
            tokio::task::spawn_local(async move {
                let r = task.await.map_err(|e| match e.try_into_panic() {
                    Ok(p) => crate::process::panic_message(p),
                    Err(e) => e.to_string(),
                });
                let _ = tx.send(r);
            });
        });
        handle
            .tx
            .send(job)
            .map_err(|_| Error::new(ErrorKind::Closed, format!("core {core} stopped")))?;
        Ok(rx)
    }

    /// Runs `f(core)` on every core concurrently; outputs in core order.
    pub fn run_on_all<F, Fut, T>(
        &self,
        f: F,
    ) -> impl Future<Output = Result<Vec<T>>> + Send + 'static
    where
        F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let futs: Vec<_> = self
            .cores
            .iter()
            .map(|c| {
                let f = f.clone();
                let core = c.core;
                self.run_on(core, move || f(core))
            })
            .collect();
        async move {
            let mut out = Vec::with_capacity(futs.len());
            for fut in futs {
                out.push(fut.await?);
            }
            Ok(out)
        }
    }

    /// Runs `f` on the first core and blocks the calling thread until it is
    /// done. Do not call it from inside an async task.
    pub fn block_on<F, Fut, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        Self::not_in_runtime("block_on")?;
        let core = self.cores[0].core;
        let rx = self.submit(core, f)?;
        outcome(core, rx.blocking_recv())
    }

    /// [`Engine::run_on_all`], blocking the calling thread.
    pub fn block_on_all<F, Fut, T>(&self, f: F) -> Result<Vec<T>>
    where
        F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        Self::not_in_runtime("block_on_all")?;
        let rxs: Vec<_> = self
            .cores
            .iter()
            .map(|c| {
                let f = f.clone();
                let core = c.core;
                self.submit(core, move || f(core)).map(|rx| (core, rx))
            })
            .collect::<Result<_>>()?;
        rxs.into_iter()
            .map(|(core, rx)| outcome(core, rx.blocking_recv()))
            .collect()
    }

    /// Blocking the thread that drives a runtime would stall it (and, on a
    /// core thread, deadlock the engine): refuse before submitting anything.
    fn not_in_runtime(op: &str) -> Result<()> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "Engine::{op} blocks the thread; inside async code use run_on / run_on_all"
                ),
            ));
        }
        Ok(())
    }

    /// Stops every core and waits for the threads to end (what `Drop` does).
    pub fn shutdown(self) {}
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cores.clear();
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // Dropped on one of its own cores: that thread cannot join
            // itself; it ends when the task that dropped the engine returns.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}
