//! An fd on tokio's reactor of whichever runtime polls it.
//!
//! A handle may be made on one runtime and polled on another (created in a
//! parent thread and used on an engine core, say), and an `AsyncFd` belongs
//! to the reactor it was registered with. [`RuntimeFd`] registers its fd
//! lazily with the runtime that first polls it, and registers it again when
//! a different runtime polls it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::{Handle, Id};

#[derive(Debug)]
struct NoRuntime;

impl std::fmt::Display for NoRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ringipc channels must be used inside a tokio runtime")
    }
}

impl std::error::Error for NoRuntime {}

/// The error of a poll made outside any tokio runtime.
pub(crate) fn no_runtime() -> io::Error {
    io::Error::other(NoRuntime)
}

/// Whether `e` is [`no_runtime`]'s error: nothing was read or written, so
/// the stream is as it was and the call can be retried inside a runtime.
pub(crate) fn is_no_runtime(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NoRuntime>())
}

/// An fd registered with the reactor of the runtime that last polled it.
pub(crate) struct RuntimeFd<T: AsRawFd = OwnedFd> {
    /// Set while not registered with any runtime.
    fd: Option<T>,
    reg: Option<(Id, AsyncFd<T>)>,
    interest: Interest,
}

impl RuntimeFd<OwnedFd> {
    /// Takes `fd`, to be registered with `interest` when first polled.
    pub(crate) fn new(fd: OwnedFd, interest: Interest) -> Self {
        // SAFETY: an OwnedFd keeps its fd open, naming the same file, for as
        // long as it exists, and this value owns it.
        unsafe { RuntimeFd::new_unchecked(fd, interest) }
    }
}

impl<T: AsRawFd> RuntimeFd<T> {
    /// Takes `fd`, to be registered with `interest` when first polled.
    ///
    /// # Safety
    ///
    /// `fd.as_raw_fd()` must stay open, name the same file and return the
    /// same number for as long as this value exists (tokio's contract for
    /// `AsyncFd::register_with_interest`).
    pub(crate) unsafe fn new_unchecked(fd: T, interest: Interest) -> Self {
        RuntimeFd {
            fd: Some(fd),
            reg: None,
            interest,
        }
    }

    /// The fd, registered with the current runtime's reactor (registered
    /// now if this is a runtime other than the one that polled it last).
    /// Outside any runtime, [`no_runtime`]'s error.
    pub(crate) fn registered(&mut self) -> io::Result<&AsyncFd<T>> {
        let handle = Handle::try_current().map_err(|_| no_runtime())?;
        let id = handle.id();
        if !matches!(&self.reg, Some((rid, _)) if *rid == id) {
            let fd = match self.reg.take() {
                Some((_, afd)) => afd.into_inner(),
                None => self.fd.take().ok_or_else(|| io::Error::other("fd lost"))?,
            };
            // SAFETY: `new_unchecked`'s caller promised that the fd stays
            // open and names the same file while this value holds it; the
            // AsyncFd holds it until `into_inner` gives it back.
            match unsafe { AsyncFd::register_with_interest(fd, self.interest) } {
                Ok(afd) => self.reg = Some((id, afd)),
                Err(e) => {
                    let (fd, err) = e.into_parts();
                    self.fd = Some(fd);
                    return Err(err);
                }
            }
        }
        Ok(&self.reg.as_ref().expect("registered above").1)
    }

    /// The fd's number, registered or not. (`None` is not expected: a
    /// failed registration gives the fd back.)
    pub(crate) fn raw(&self) -> Option<RawFd> {
        match (&self.fd, &self.reg) {
            (Some(fd), _) => Some(fd.as_raw_fd()),
            (None, Some((_, afd))) => Some(afd.as_raw_fd()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys;

    /// A pipe end polled on one runtime, then on another after the first
    /// has shut down (its reactor, and the first registration, are gone):
    /// without a new registration the second wait would fail.
    #[test]
    fn follows_the_runtime_that_polls_it() {
        let (r, w) = sys::pipe().unwrap();
        sys::set_nonblocking(r.as_raw_fd(), true).unwrap();
        let raw = r.as_raw_fd();
        let mut fd = RuntimeFd::new(r, Interest::READABLE);
        let outside = fd.registered().expect_err("no runtime here");
        assert!(is_no_runtime(&outside), "{outside}");
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                sys::write(w.as_raw_fd(), b"x").unwrap();
                let afd = fd.registered().unwrap();
                let mut guard = afd.readable().await.unwrap();
                let mut byte = [0u8; 1];
                // SAFETY: `byte` is writable for its length.
                let n = unsafe { sys::read(raw, byte.as_mut_ptr(), 1) }.unwrap();
                assert_eq!(n, 1);
                guard.clear_ready();
            });
            drop(rt);
            assert_eq!(fd.raw(), Some(raw));
        }
    }
}
