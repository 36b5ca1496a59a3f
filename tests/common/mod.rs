//! Shared test support: every I/O test body runs once per backend.
#![allow(dead_code)]

use ringipc::{Backend, ChannelConfig};
use std::future::Future;

/// Runs `body` on a fresh current-thread runtime with channels on `backend`.
/// A uring test skips only when the kernel refuses io_uring, and says why.
pub fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(ChannelConfig) -> Fut,
    Fut: Future<Output = ()>,
{
    if backend == Backend::Uring
        && let Err(why) = ringipc::uring_probe()
    {
        eprintln!("SKIPPED on uring: the kernel refuses io_uring here: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(body(ChannelConfig::new().backend(backend)));
}

/// `both_backends!(name, ...)` expands each `async fn name(cfg: ChannelConfig)`
/// into `uring::name` and `epoll::name` tests.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $(#[test] fn $name() { $crate::common::run(ringipc::Backend::Uring, super::$name) })*
        }
        mod epoll {
            $(#[test] fn $name() { $crate::common::run(ringipc::Backend::Epoll, super::$name) })*
        }
    };
}
