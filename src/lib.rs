//! ringipc: typed messages over pipes between tokio tasks, threads and
//! processes, on io_uring or epoll.
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
//! See `README.md` and `docs/` for the architecture, the wire format and
//! backend selection.

mod backend;
mod channel;
mod engine;
mod error;
pub mod framing;
mod message;
mod pool;
mod process;
mod sys;

pub use backend::{Backend, process_default as default_backend, uring_probe};
pub use channel::{
    BytesReceiver, BytesSender, ChannelConfig, Duplex, Receiver, Sender, bytes_pipe, duplex, pipe,
};
pub use engine::{Engine, EngineBuilder};
pub use error::{Error, ErrorKind, Result};
pub use message::{Decode, Encode, Message, OwnedMessage};
pub use pool::{MapResults, Pool, PoolBuilder, WorkerStats};
pub use process::{
    Affinity, ArchivedHandoffState, EXIT_PANIC, EXIT_START_FAILED, ExitStatus, HandoffResolver,
    HandoffState, OnDrop, Process, ProcessBuilder, init, join_all, join_any, spawn, spawn_async,
};
pub use rkyv;
