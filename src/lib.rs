//! ringipc: typed messages over pipes between tokio tasks, threads and
//! processes, on io_uring or epoll; child processes that run a Rust
//! function; a thread-per-core engine and a worker pool.
//!
//! # Channels
//!
//! [`pipe`] makes a typed one-way channel. Messages are rkyv archives:
//! [`Sender::send`] serializes into the channel's frame buffer, and
//! [`Receiver::recv`] hands out a [`Message`] that derefs to the archived
//! value in place, validated once (bytes from another process are untrusted).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let (mut tx, mut rx) = ringipc::pipe::<Vec<u32>>()?;
//! tx.send(&vec![1, 2, 3]).await?;
//! let msg = rx.recv().await?;          // validated, read in place
//! assert_eq!(msg.len(), 3);
//! assert_eq!(msg[2], 3);
//! drop(tx);                            // EOF for the receiver
//! assert_eq!(rx.recv().await.unwrap_err().kind(), ringipc::ErrorKind::Closed);
//! # Ok::<(), ringipc::Error>(())
//! # }).unwrap();
//! ```
//!
//! [`duplex`] pairs two pipes, [`bytes_pipe`] carries raw `&[u8]` frames, and
//! [`ChannelConfig`] picks the backend and the maximum frame size. Every
//! operation is cancellation-safe: a `recv` dropped by a timeout loses no
//! message, a dropped `send` leaves the stream intact.
//!
//! # Child processes
//!
//! [`Process::builder`] / [`Process::builder_async`] start a child that runs
//! a Rust function with typed arguments. Channel handles anywhere inside the
//! arguments move to the child; only their fds are inherited. The child is
//! this same binary, re-executed: **call [`init`] first in `main`**.
//!
//! ```
//! # #[allow(clippy::needless_doctest_main)]
//! async fn double(x: u64) -> u64 {
//!     x * 2
//! }
//!
//! fn main() -> ringipc::Result<()> {
//!     ringipc::init();
//!     let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//!     rt.block_on(async {
//!         let mut child = ringipc::Process::builder_async(double).arg(21).name("doubler").start()?;
//!         assert!(child.join().await?.success());
//!         assert_eq!(child.result()?.to_native(), 42);
//!         Ok(())
//!     })
//! }
//! ```
//!
//! # Engine and pool
//!
//! [`Engine`] runs one pinned thread per core, each with its own runtime and
//! ring. [`Pool`] keeps pinned worker children that run jobs with
//! backpressure and crash recovery. `examples/server.rs` combines them.
//!
//! # Backends
//!
//! [`Backend::Auto`] picks io_uring where the kernel allows it and epoll
//! otherwise; `RINGIPC_BACKEND=uring|epoll|auto` overrides it. See
//! `README.md` and `docs/` for the architecture, the wire format and tuning.

mod arena;
mod backend;
mod channel;
mod engine;
mod error;
mod fd_channel;
pub mod framing;
mod lane;
mod message;
mod pool;
mod prefork;
mod process;
mod sys;
mod wire;

#[doc(hidden)]
#[path = "fuzz_entry.rs"]
pub mod __fuzz;

pub use backend::{Backend, process_default as default_backend, uring_probe};
pub use channel::{
    BytesReceiver, BytesSender, ChannelConfig, Duplex, Receiver, Sender, bytes_pipe, duplex, pipe,
};
pub use engine::{Engine, EngineBuilder};
pub use error::{Error, ErrorKind, Result};
pub use fd_channel::{
    ArchivedFdChannelState, FdChannelConfig, FdChannelResolver, FdChannelState, FdReceiver,
    FdSender, fd_channel,
};
pub use lane::Lane;
pub use message::{Decode, Encode, Message, OwnedMessage};
pub use pool::{DeathCause, MapResults, Pool, PoolBuilder, WorkerDeath, WorkerStats};
pub use prefork::{Drain, Prefork, PreforkArgs, PreforkBuilder, PreforkChildStats};
pub use process::{
    Affinity, ArchivedFdIndex, ArchivedHandoffState, ChildStdio, EXIT_PANIC, EXIT_START_FAILED,
    ExitStatus, Fd, FdIndex, FdResolver, HandoffResolver, HandoffState, Inherit, InheritFd,
    InitOptions, OnDrop, Process, ProcessBuilder, StartMode, default_start_mode, fork_server_pid,
    init, init_with, join_all, join_any, set_default_start_mode, spawn, spawn_async,
};
pub use rkyv;
