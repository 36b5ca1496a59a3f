//! What a parent tells its child at start: which function to run, its
//! arguments, and which inherited fds are which. Sent through a memfd.

use crate::wire::Header;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Serialize};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

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

/// Validates a start spec (the bytes of the sealed memfd a child is given)
/// and checks what the child acts on before any code address is used:
/// handle fds non-negative and distinct, cores below `CPU_SETSIZE`,
/// environment entries free of NUL bytes (`set_var` would panic on one).
/// Hostile bytes give an error, never a panic. The code offsets are not
/// checkable here: the child trusts its parent's binary layout, confirmed
/// by `anchor_check` (see `child::run_spec`).
pub(crate) fn read(bytes: &[u8]) -> Result<&ArchivedSpec, String> {
    let spec = rkyv::access::<ArchivedSpec, rkyv::rancor::Error>(bytes)
        .map_err(|e| format!("invalid start spec: {e}"))?;
    let mut fds: Vec<i32> = spec.fds.iter().map(|f| f.to_native()).collect();
    fds.push(spec.control_fd.to_native());
    fds.sort_unstable();
    if fds[0] < 0 || fds.windows(2).any(|w| w[0] == w[1]) {
        return Err("invalid start spec: a negative or repeated fd".into());
    }
    if let Some(c) = spec
        .cpus
        .iter()
        .find(|c| c.to_native() as usize >= libc::CPU_SETSIZE as usize)
    {
        return Err(format!("invalid start spec: core {c} out of range"));
    }
    let has_nul = |b: &[u8]| b.contains(&0);
    if spec
        .env
        .as_ref()
        .is_some_and(|env| env.iter().any(|kv| has_nul(kv)))
    {
        return Err("invalid start spec: a NUL byte in the environment".into());
    }
    Ok(spec)
}

impl ArchivedSpec {
    /// The cores to pin to (empty: not pinned).
    pub fn cpu_list(&self) -> Vec<usize> {
        self.cpus.iter().map(|c| c.to_native() as usize).collect()
    }

    /// The environment a forked child takes, as (key, value) pairs; entries
    /// without a `=` after a non-empty key are skipped.
    pub fn env_vars(&self) -> Option<impl Iterator<Item = (&OsStr, &OsStr)>> {
        let env = self.env.as_ref()?;
        Some(env.iter().filter_map(|kv| {
            let kv: &[u8] = kv.as_slice();
            let eq = kv.iter().position(|&b| b == b'=').filter(|&eq| eq > 0)?;
            Some((
                OsStr::from_bytes(&kv[..eq]),
                OsStr::from_bytes(&kv[eq + 1..]),
            ))
        }))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(change: impl FnOnce(&mut Spec)) -> AlignedVec<16> {
        let mut s = Spec {
            anchor_check: 1,
            trampoline: 2,
            entry: 3,
            args: vec![],
            fds: vec![3, 4],
            control_fd: 5,
            max_result: 1024,
            parent_pid: 1,
            die_with_parent: false,
            name: "child".into(),
            cpus: vec![0, 1],
            env: Some(vec![b"A=1".to_vec()]),
            cwd: None,
        };
        change(&mut s);
        rkyv::to_bytes::<rkyv::rancor::Error>(&s).unwrap()
    }

    #[test]
    fn read_accepts_a_parents_spec() {
        let bytes = spec(|_| {});
        let s = read(&bytes).unwrap();
        assert_eq!(s.cpu_list(), [0, 1]);
        let env: Vec<_> = s.env_vars().unwrap().collect();
        assert_eq!(env, [(OsStr::new("A"), OsStr::new("1"))]);
    }

    /// Each of these was accepted, and the child then panicked (a core
    /// past CPU_SETSIZE indexes out of `cpu_set_t`, `set_var` panics on a
    /// NUL byte) or took one fd as two `OwnedFd`s (closed twice).
    #[test]
    fn read_refuses_what_the_child_cannot_act_on() {
        let refused = |change: fn(&mut Spec)| read(&spec(change)).err().unwrap_or_default();
        assert!(refused(|s| s.cpus = vec![0, libc::CPU_SETSIZE as u32]).contains("core"));
        assert!(refused(|s| s.env = Some(vec![b"A=b\0c".to_vec()])).contains("NUL"));
        assert!(refused(|s| s.env = Some(vec![b"A\0=1".to_vec()])).contains("NUL"));
        assert!(refused(|s| s.fds = vec![3, 3]).contains("fd"));
        assert!(refused(|s| s.fds = vec![-1]).contains("fd"));
        assert!(refused(|s| s.control_fd = 4).contains("fd"));
        assert!(refused(|s| s.control_fd = -1).contains("fd"));
    }
}
