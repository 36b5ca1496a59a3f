//! Channels over pipes: typed [`Sender`]/[`Receiver`], [`Duplex`] pairs and
//! raw-bytes [`BytesSender`]/[`BytesReceiver`].
//!
//! Every handle is `Send` (it can move to another thread or into a child
//! process) and every operation takes `&mut self`, so two tasks can never
//! interleave frames on one handle: the compiler enforces what gipc checks at
//! run time with `GIPCLocked`.

mod bytes;
mod config;
mod recv;
mod send;
mod typed;

pub use bytes::{BytesReceiver, BytesSender};
pub use config::ChannelConfig;
pub(crate) use recv::{OwnedFrame, RecvHalf};
pub(crate) use send::SendHalf;
pub use typed::{Duplex, Receiver, Sender};

use crate::error::Result;

/// A typed one-way channel on the process-default backend.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, PartialEq)]
/// struct Job { id: u32, name: String }
///
/// let (mut tx, mut rx) = ringipc::pipe::<Job>()?;
/// tx.send(&Job { id: 7, name: "seven".into() }).await?;
/// let msg = rx.recv().await?;
/// assert_eq!(msg.id, 7);               // read in place, no copy
/// assert_eq!(msg.name.as_str(), "seven");
/// assert_eq!(msg.deserialize()?, Job { id: 7, name: "seven".into() });
/// # Ok::<(), ringipc::Error>(())
/// # }).unwrap();
/// ```
pub fn pipe<T>() -> Result<(Sender<T>, Receiver<T>)> {
    ChannelConfig::new().pipe()
}

/// Two typed pipes, one each way, on the process-default backend.
pub fn duplex<A, B>() -> Result<(Duplex<A, B>, Duplex<B, A>)> {
    ChannelConfig::new().duplex()
}

/// A raw-bytes pipe on the process-default backend.
pub fn bytes_pipe() -> Result<(BytesSender, BytesReceiver)> {
    ChannelConfig::new().bytes_pipe()
}
