//! What a parent tells its child at start: which function to run, its
//! arguments, and which inherited fds are which. Sent through a memfd.

use crate::wire::Header;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Serialize};

/// Environment variable naming the fd that holds a child's start spec.
pub(crate) const CHILD_ENV: &str = "RINGIPC_CHILD";

#[derive(Archive, Serialize)]
pub(crate) struct Spec {
    /// Offset of a second function from the anchor, to catch a binary whose
    /// layout differs from the parent's.
    pub anchor_check: i64,
    /// Offset of the monomorphised trampoline from the anchor.
    pub trampoline: i64,
    /// Offset of the user's entry function from the anchor.
    pub entry: i64,
    /// The arguments, as an rkyv archive.
    pub args: Vec<u8>,
    /// Inherited handle fds, by handle index.
    pub fds: Vec<i32>,
    pub control_fd: i32,
    /// Largest value archive the child may send on the control pipe.
    pub max_result: u64,
    pub parent_pid: i32,
    pub die_with_parent: bool,
    pub name: String,
    /// Cores to pin to (empty: not pinned), applied before the entry runs.
    pub cpus: Vec<u32>,
    /// A child forked by the fork server gets the application's environment
    /// (as `KEY=VALUE`) as of its start here; a re-executed one through
    /// `execve` (`None`).
    pub env: Option<Vec<Vec<u8>>>,
    /// Likewise the working directory of a forked child (`None`: unchanged).
    pub cwd: Option<Vec<u8>>,
}

/// The reference point for code addresses. A static has exactly one address
/// in the program; a function would not do: small functions are inlined
/// across crates, and taking the address of an inlined copy gives a
/// different value depending on which crate's code takes it.
static ANCHOR: u8 = 0;

fn anchor() -> usize {
    &ANCHOR as *const u8 as usize
}

impl Spec {
    /// Code addresses travel as offsets from a static of this crate: the
    /// child is the same executable, so offsets agree even though ASLR moves
    /// the image.
    pub fn offset(addr: usize) -> i64 {
        addr.wrapping_sub(anchor()) as i64
    }

    pub fn resolve(offset: i64) -> usize {
        anchor().wrapping_add(offset as usize)
    }

    /// The offset of a non-inlined function, equal in parent and child only
    /// if both run the same binary.
    pub fn anchor_check() -> i64 {
        Spec::offset(super::child::init_marker as fn() -> u64 as usize)
    }
}

/// How a child's entry ended, sent back on the control pipe.
pub(crate) enum Outcome {
    /// The entry returned; its value as an rkyv archive.
    Value(AlignedVec<16>),
    /// The entry panicked, with this message.
    Panic(String),
    /// The entry could not be run (its arguments did not decode, say).
    Failed(String),
    /// The entry returned a value larger than the parent accepts.
    TooLarge(String),
}

const TAG_VALUE: u8 = 0;
const TAG_PANIC: u8 = 1;
const TAG_FAILED: u8 = 2;
const TAG_TOO_LARGE: u8 = 3;
/// The outcome's header (`wire::Header`, tag only); the value archive after
/// it stays 16-byte aligned.
pub(crate) const TAG_LEN: usize = Header::LEN;

impl Outcome {
    /// Encodes the outcome in at most `max + TAG_LEN` bytes (the parent's
    /// limit): a larger value becomes [`Outcome::TooLarge`], a longer
    /// message is cut.
    pub fn encode_into(&self, buf: &mut Vec<u8>, max: usize) {
        let (tag, data): (u8, &[u8]) = match self {
            Outcome::Value(v) if v.len() > max => {
                let msg = format!(
                    "the child's return value of {} bytes exceeds the limit of {max} bytes \
                     (ProcessBuilder::max_result_size)",
                    v.len()
                );
                return Outcome::TooLarge(msg).encode_into(buf, max);
            }
            Outcome::Value(v) => (TAG_VALUE, v),
            Outcome::Panic(m) => (TAG_PANIC, m.as_bytes()),
            Outcome::Failed(m) => (TAG_FAILED, m.as_bytes()),
            Outcome::TooLarge(m) => (TAG_TOO_LARGE, m.as_bytes()),
        };
        Header::new(tag).push(buf);
        buf.extend_from_slice(&data[..data.len().min(max)]);
    }

    pub fn decode(payload: &[u8]) -> Outcome {
        let Some((header, data)) = Header::read(payload) else {
            return Outcome::Failed("malformed outcome from child".into());
        };
        match header.tag {
            TAG_VALUE => {
                let mut v = AlignedVec::with_capacity(data.len());
                v.extend_from_slice(data);
                Outcome::Value(v)
            }
            TAG_PANIC => Outcome::Panic(String::from_utf8_lossy(data).into_owned()),
            TAG_FAILED => Outcome::Failed(String::from_utf8_lossy(data).into_owned()),
            TAG_TOO_LARGE => Outcome::TooLarge(String::from_utf8_lossy(data).into_owned()),
            _ => Outcome::Failed("malformed outcome from child".into()),
        }
    }
}
