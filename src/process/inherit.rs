//! Sockets, files and other fds handed to a child inside its arguments.
//!
//! [`Fd<T>`] wraps an fd-owning value (a `File`, a `TcpListener`, an
//! `OwnedFd`, ...) so that it can sit anywhere in a child's start arguments;
//! the `#[rkyv(with = Inherit)]` attribute does the same for a field of a
//! struct of your own. The fd goes to that child only, through the same path
//! as channel ends (see [`handoff`](super::handoff)): serializing registers
//! the fd, the child inherits it, and deserializing takes it back by index
//! and rebuilds the same type. The same path carries them inside messages
//! on an fd channel (`crate::fd_channel`), which sends the fds with each
//! datagram. Inside a message on a pipe, serialization fails with
//! `ErrorKind::Unsupported`: a pipe cannot carry file descriptors.

use super::handoff::{name_handle, register, take_inherited};
use crate::error::Error;
use rkyv::rancor::{Fallible, Source};
use rkyv::with::{ArchiveWith, DeserializeWith, SerializeWith};
use rkyv::{Archive, Deserialize, Place, Serialize};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Types whose fd can be inherited by a child and rebuilt there.
///
/// Implemented for `OwnedFd`, `File`, std's `TcpListener`, `TcpStream`,
/// `UdpSocket`, `UnixListener`, `UnixStream` and `UnixDatagram`, and for
/// tokio's `TcpListener`, `TcpStream`, `UdpSocket`, `UnixListener` and
/// `UnixStream` (rebuilt in the child's runtime, so the arguments that hold
/// them must be taken inside an async entry).
pub trait InheritFd: Sized {
    /// The fd to hand over; the value keeps owning it.
    fn inherit_fd(&self) -> BorrowedFd<'_>;
    /// Rebuilds the value in the child from the inherited fd.
    fn from_inherited(fd: OwnedFd) -> io::Result<Self>;
}

macro_rules! inherit_std {
    ($($ty:ty),* $(,)?) => {$(
        impl InheritFd for $ty {
            fn inherit_fd(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
            fn from_inherited(fd: OwnedFd) -> io::Result<Self> {
                Ok(<$ty>::from(fd))
            }
        }
    )*};
}

inherit_std!(
    OwnedFd,
    std::fs::File,
    std::net::TcpListener,
    std::net::TcpStream,
    std::net::UdpSocket,
    std::os::unix::net::UnixListener,
    std::os::unix::net::UnixStream,
    std::os::unix::net::UnixDatagram,
);

/// A tokio type: registered with the child's runtime, which must be
/// running on this thread (an async entry), else a clear error.
fn in_runtime(what: &str) -> io::Result<()> {
    match tokio::runtime::Handle::try_current() {
        Ok(_) => Ok(()),
        Err(_) => Err(io::Error::other(format!(
            "a tokio {what} can only be received by an async child entry (no runtime here)"
        ))),
    }
}

macro_rules! inherit_tokio {
    ($($ty:ty => $std:ty, $what:literal);* $(;)?) => {$(
        impl InheritFd for $ty {
            fn inherit_fd(&self) -> BorrowedFd<'_> {
                self.as_fd()
            }
            fn from_inherited(fd: OwnedFd) -> io::Result<Self> {
                in_runtime($what)?;
                let std = <$std>::from(fd);
                std.set_nonblocking(true)?;
                <$ty>::from_std(std)
            }
        }
    )*};
}

inherit_tokio!(
    tokio::net::TcpListener => std::net::TcpListener, "TcpListener";
    tokio::net::TcpStream => std::net::TcpStream, "TcpStream";
    tokio::net::UdpSocket => std::net::UdpSocket, "UdpSocket";
    tokio::net::UnixListener => std::os::unix::net::UnixListener, "UnixListener";
    tokio::net::UnixStream => std::os::unix::net::UnixStream, "UnixStream";
);

/// The archived form of an inherited fd: its index in the list of fds the
/// child inherits.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy)]
#[rkyv(archived = ArchivedFdIndex)]
pub struct FdIndex {
    index: u32,
}

/// The resolver of an inherited fd (an rkyv detail).
pub struct FdResolver {
    index: FdIndex,
    inner: FdIndexResolver,
}

fn serialize_fd<S>(
    fd: BorrowedFd<'_>,
    what: &str,
    serializer: &mut S,
) -> Result<FdResolver, S::Error>
where
    S: Fallible + rkyv::ser::Writer + ?Sized,
    S::Error: Source,
{
    let index = FdIndex {
        index: register(fd.as_raw_fd()).map_err(|e| S::Error::new(name_handle(e, what)))?,
    };
    let inner = index.serialize(serializer)?;
    Ok(FdResolver { index, inner })
}

fn deserialize_fd<T: InheritFd, E: Source>(archived: &ArchivedFdIndex) -> Result<T, E> {
    let fd = take_inherited(archived.index.to_native()).map_err(E::new)?;
    T::from_inherited(fd).map_err(|e| E::new(Error::io("inheriting an fd", e)))
}

/// An fd-owning value that a child inherits when it is part of the child's
/// start arguments (at any depth: in a `Vec`, an `Option`, a struct).
///
/// ```no_run
/// use ringipc::{Fd, Process};
/// use std::io::Write;
/// use std::net::TcpListener;
///
/// // The child accepts on a listener the parent bound.
/// fn serve(listener: Fd<TcpListener>) {
///     let (mut conn, _) = listener.0.accept().unwrap();
///     conn.write_all(b"hello from the child").unwrap();
/// }
///
/// # async fn demo() -> ringipc::Result<()> {
/// let listener = TcpListener::bind("127.0.0.1:0").unwrap();
/// let mut child = Process::builder(serve).arg(Fd(listener)).start()?;
/// child.join().await?;
/// # Ok(()) }
/// ```
///
/// The parent's own value is dropped with the builder's arguments once the
/// child has started (the child has its own copy of the fd); give each child
/// a `try_clone()` to keep serving on the same socket. An `Fd` also travels
/// inside messages on an [fd channel](crate::fd_channel); inside a message
/// on a pipe, serialization fails with
/// [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported).
#[derive(Debug)]
pub struct Fd<T>(pub T);

impl<T: InheritFd> Archive for Fd<T> {
    type Archived = ArchivedFdIndex;
    type Resolver = FdResolver;

    fn resolve(&self, resolver: FdResolver, out: Place<ArchivedFdIndex>) {
        resolver.index.resolve(resolver.inner, out);
    }
}

impl<T: InheritFd, S> Serialize<S> for Fd<T>
where
    S: Fallible + rkyv::ser::Writer + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<FdResolver, S::Error> {
        serialize_fd(
            self.0.inherit_fd(),
            std::any::type_name::<Self>(),
            serializer,
        )
    }
}

impl<T: InheritFd, D> Deserialize<Fd<T>, D> for ArchivedFdIndex
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize(&self, _: &mut D) -> Result<Fd<T>, D::Error> {
        deserialize_fd(self).map(Fd)
    }
}

/// An rkyv wrapper for a field that holds an fd-owning value, so a struct of
/// your own can carry one to a child: `#[rkyv(with = Inherit)]`.
///
/// ```no_run
/// use ringipc::{Inherit, rkyv};
/// use std::fs::File;
///
/// #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
/// #[rkyv(crate = rkyv)]
/// struct Job {
///     name: String,
///     #[rkyv(with = Inherit)]
///     log: File,
/// }
/// ```
pub struct Inherit;

impl<T: InheritFd> ArchiveWith<T> for Inherit {
    type Archived = ArchivedFdIndex;
    type Resolver = FdResolver;

    fn resolve_with(_: &T, resolver: FdResolver, out: Place<ArchivedFdIndex>) {
        resolver.index.resolve(resolver.inner, out);
    }
}

impl<T: InheritFd, S> SerializeWith<T, S> for Inherit
where
    S: Fallible + rkyv::ser::Writer + ?Sized,
    S::Error: Source,
{
    fn serialize_with(field: &T, serializer: &mut S) -> Result<FdResolver, S::Error> {
        serialize_fd(field.inherit_fd(), std::any::type_name::<T>(), serializer)
    }
}

impl<T: InheritFd, D> DeserializeWith<ArchivedFdIndex, T, D> for Inherit
where
    D: Fallible + ?Sized,
    D::Error: Source,
{
    fn deserialize_with(field: &ArchivedFdIndex, _: &mut D) -> Result<T, D::Error> {
        deserialize_fd(field)
    }
}
