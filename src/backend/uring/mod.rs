//! The io_uring backend.
//!
//! - [`probe`]: whether io_uring is usable here (ring creation and every
//!   opcode ringipc submits).
//! - [`ring`]: one ring per thread, its slot table (what each operation keeps
//!   alive until its completion), reaping, and the bridge into tokio's
//!   reactor.
//! - [`ops`]: the operations handles own: pipe reads and writes
//!   ([`UringIo`]), datagrams with fds ([`UringSock`]) and waiting for a
//!   child ([`UringWait`]), including moving
//!   an operation to the ring of the thread that now polls it.

mod ops;
mod probe;
mod ring;

pub(crate) use ops::{UringIo, UringSock, UringWait};
pub(crate) use probe::{probe, waitid_supported};
pub(crate) use ring::{set_thread_coop_taskrun, set_thread_ring_entries};
