//! The one error type of ringipc: an opaque [`Error`] with a public [`ErrorKind`].

use std::borrow::Cow;
use std::fmt;
use std::io;

/// What went wrong, as a category a program can match on.
///
/// New kinds may be added in minor releases, so match with a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The peer closed the channel in an orderly way (end of stream on a frame
    /// boundary), or the channel was already closed by this side.
    Closed,
    /// An operation with a deadline did not finish in time. No data was lost:
    /// the channel is still usable. Also a pool job that ran past its
    /// timeout: its worker was killed and is restarted.
    TimedOut,
    /// A frame is longer than the channel's maximum frame size. On receive the
    /// channel is closed; on send nothing was written and the channel is still usable.
    /// Also a child's return value larger than its `max_result_size`.
    FrameTooLarge,
    /// The stream ended in the middle of a frame.
    Truncated,
    /// The byte stream does not follow the wire format (bad header, unknown
    /// version or frame kind). The channel is closed.
    Protocol,
    /// A frame arrived whole but its payload is not a valid archive of the
    /// expected type. [`std::error::Error::source`] holds rkyv's reason.
    InvalidMessage,
    /// A message could not be serialized; [`std::error::Error::source`]
    /// holds rkyv's reason.
    Serialize,
    /// A child process could not be started.
    Spawn,
    /// A child's entry function panicked; the message is in the error.
    Panicked,
    /// A child ended without returning a value (it exited early or was
    /// killed); the status is in the error.
    Exited,
    /// A pool worker died (panic outside a job, SIGKILL, OOM) while it held
    /// the job; the error names the worker and the cause. The job was not
    /// retried: it may or may not have run.
    WorkerDied,
    /// A non-waiting operation found no capacity (`Pool::try_call` on a
    /// saturated pool).
    Busy,
    /// The requested feature or backend is not available on this system, or
    /// the operation is not supported, e.g. a channel end sent inside a
    /// message rather than as a child's start argument (the error names the
    /// handle type; nothing was written).
    Unsupported,
    /// An argument is out of range, e.g. a pool worker index that does not
    /// exist.
    InvalidArgument,
    /// An operating-system error; [`std::error::Error::source`] holds the `io::Error`.
    Io,
}

impl ErrorKind {
    fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Closed => "channel closed",
            ErrorKind::TimedOut => "timed out",
            ErrorKind::FrameTooLarge => "frame too large",
            ErrorKind::Truncated => "stream truncated inside a frame",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::InvalidMessage => "invalid message",
            ErrorKind::Serialize => "serialization failed",
            ErrorKind::Spawn => "spawn failed",
            ErrorKind::Panicked => "child panicked",
            ErrorKind::Exited => "child ended without a result",
            ErrorKind::WorkerDied => "pool worker died",
            ErrorKind::Busy => "busy",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::Io => "I/O error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The error type of every fallible ringipc operation.
///
/// ```
/// use ringipc::{Error, ErrorKind};
/// let e = Error::new(ErrorKind::Closed, "recv");
/// assert_eq!(e.kind(), ErrorKind::Closed);
/// assert_eq!(e.to_string(), "recv: channel closed");
/// let io: std::io::Error = e.into();
/// assert_eq!(io.kind(), std::io::ErrorKind::BrokenPipe);
/// ```
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    context: Cow<'static, str>,
    source: Option<Source>,
}

/// `Result<T, ringipc::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` that happened while doing `context` (an operation
    /// name, optionally with the fd or pid involved).
    pub fn new(kind: ErrorKind, context: impl Into<Cow<'static, str>>) -> Error {
        Error {
            inner: Box::new(Inner {
                kind,
                context: context.into(),
                source: None,
            }),
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Error {
        self.inner.source = Some(source.into());
        self
    }

    /// An [`ErrorKind::Io`] error wrapping `err`; `EPIPE` becomes [`ErrorKind::Closed`].
    pub(crate) fn io(context: impl Into<Cow<'static, str>>, err: io::Error) -> Error {
        let kind = match err.raw_os_error() {
            Some(libc::EPIPE) => ErrorKind::Closed,
            _ => ErrorKind::Io,
        };
        Error::new(kind, context).with_source(err)
    }

    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The operation (and fd or pid) during which the error happened.
    pub fn context(&self) -> &str {
        &self.inner.context
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.inner.kind)
            .field("context", &self.inner.context);
        if let Some(s) = &self.inner.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.inner.context, self.inner.kind)?;
        if let Some(s) = &self.inner.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        let kind = match e.kind() {
            ErrorKind::Closed => io::ErrorKind::BrokenPipe,
            ErrorKind::TimedOut => io::ErrorKind::TimedOut,
            ErrorKind::Truncated => io::ErrorKind::UnexpectedEof,
            ErrorKind::FrameTooLarge | ErrorKind::Protocol | ErrorKind::InvalidMessage => {
                io::ErrorKind::InvalidData
            }
            ErrorKind::Unsupported => io::ErrorKind::Unsupported,
            ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
            ErrorKind::Io => {
                if let Some(k) = e
                    .inner
                    .source
                    .as_ref()
                    .and_then(|s| s.downcast_ref::<io::Error>())
                    .map(io::Error::kind)
                {
                    k
                } else {
                    io::ErrorKind::Other
                }
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
