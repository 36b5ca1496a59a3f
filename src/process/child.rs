//! The child side: `ringipc::init()` recognises a process started by
//! `Process::start`, runs the requested entry and exits with its outcome.

use super::forkserver::{self, StartMode};
use super::handoff;
use super::spec::{self, ArchivedSpec, CHILD_ENV, Outcome, Spec};
use crate::framing::Encoder;
use crate::sys;
use rkyv::util::AlignedVec;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once `init` has run in this process.
pub(crate) static INIT_CALLED: AtomicBool = AtomicBool::new(false);

/// Exit code of a child whose entry panicked.
pub const EXIT_PANIC: i32 = 101;
/// Exit code of a child that could not run its entry at all.
pub const EXIT_START_FAILED: i32 = 102;

/// Takes over a process started by [`Process`](crate::Process): call it as the
/// first line of `main` in every binary that starts children.
///
/// In an ordinary process it forks the fork server that later forks
/// children (while the process is still single-threaded; with threads
/// already running it starts none and children are re-executed, see
/// [`StartMode`]) and returns. In a re-executed child it never returns: it
/// runs the requested entry function on a fresh tokio runtime and exits.
/// Code placed before `init()` runs again in every re-executed child (it
/// runs before ringipc knows it is a child), and its state is shared by
/// every forked one, so keep `main`'s first line for `init()`: anything
/// earlier — logging set-up, opened files, spawned threads, seeded random
/// generators — would happen again in each child or be shared by all.
///
/// ```no_run
/// # #[allow(clippy::needless_doctest_main)]
/// fn main() {
///     ringipc::init();
///     // ... the program, which may start children ...
/// }
/// ```
pub fn init() {
    init_with(InitOptions::default());
}

/// [`init`] with options: how this process will start its children.
///
/// `RINGIPC_START=fork|exec` in the environment overrides
/// [`InitOptions::start_mode`], as `RINGIPC_BACKEND` overrides the backend.
///
/// ```no_run
/// # #[allow(clippy::needless_doctest_main)]
/// fn main() {
///     ringipc::init_with(ringipc::InitOptions::new().start_mode(ringipc::StartMode::Exec));
///     // ... the program, whose children are re-executed, never forked ...
/// }
/// ```
pub fn init_with(options: InitOptions) {
    if INIT_CALLED.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(spec_fd) = child_spec_fd(std::env::var_os(CHILD_ENV), sys::secure_execution()) else {
        let mode = match std::env::var("RINGIPC_START").as_deref() {
            Ok("fork") => StartMode::Fork,
            Ok("exec") => StartMode::Exec,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "RINGIPC_START is neither fork nor exec; ignored"
                );
                options.start_mode
            }
            Err(_) => options.start_mode,
        };
        forkserver::set_default_start_mode(mode);
        if mode == StartMode::Fork {
            forkserver::start_server();
        }
        return;
    };
    // The marker is removed from the environment, so the entry does not see
    // it, only while this process is single-threaded: changing the
    // environment could race with threads a `#[tokio::main]` already
    // started. Where it stays, a program this child starts that calls
    // `init` finds it stale (the fd it names is no sealed spec there) and
    // runs as an ordinary process.
    if forkserver::single_threaded() {
        // SAFETY: no other thread exists that could read the environment.
        unsafe { std::env::remove_var(CHILD_ENV) };
    }
    let code = match run(spec_fd) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("ringipc child: {msg}");
            EXIT_START_FAILED
        }
    };
    std::process::exit(code);
}

/// Options for [`init_with`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct InitOptions {
    start_mode: StartMode,
}

impl InitOptions {
    /// The defaults: [`StartMode::Fork`].
    pub fn new() -> Self {
        Self::default()
    }

    /// How children are started by default. [`StartMode::Exec`] starts no
    /// fork server at all.
    pub fn start_mode(mut self, mode: StartMode) -> Self {
        self.start_mode = mode;
        self
    }
}

pub(super) fn read_spec(fd: RawFd) -> Result<AlignedVec<16>, String> {
    // SAFETY: the parent passed this fd for us alone; we take ownership once.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut raw = Vec::new();
    f.read_to_end(&mut raw)
        .map_err(|e| format!("reading start spec: {e}"))?;
    let mut bytes = AlignedVec::<16>::with_capacity(raw.len());
    bytes.extend_from_slice(&raw);
    Ok(bytes)
}

/// Whether this process is a re-executed ringipc child, and its spec's fd.
///
/// Only if `RINGIPC_CHILD` names an fd that holds a sealed spec memfd (as
/// the parent made it): a value inherited from an ancestor names an fd that
/// is closed or something else here. Never in secure execution (`AT_SECURE`:
/// setuid, setgid, file capabilities): the spec turns offsets into code
/// addresses, so whoever sets the environment of a privileged program must
/// not get to choose them; such a process runs as an ordinary one.
pub(crate) fn child_spec_fd(value: Option<std::ffi::OsString>, secure: bool) -> Option<RawFd> {
    let value = value?;
    if secure {
        tracing::warn!("RINGIPC_CHILD is set in a setuid/setgid process: ignored");
        return None;
    }
    let fd = value.to_str()?.parse::<RawFd>().ok()?;
    match sys::seals(fd) {
        Ok(seals) if seals & sys::SPEC_SEALS == sys::SPEC_SEALS => Some(fd),
        _ => {
            tracing::debug!(
                fd,
                "RINGIPC_CHILD names no start spec here: a stale value, ignored"
            );
            None
        }
    }
}

fn run(spec_fd: RawFd) -> Result<i32, String> {
    let bytes = read_spec(spec_fd)?;
    let spec = spec::read(&bytes)?;

    let control_fd = spec.control_fd.to_native();
    let fds: Vec<RawFd> = spec.fds.iter().map(|f| f.to_native()).collect();
    let mut keep = fds.clone();
    keep.push(control_fd);
    // Only the handles passed stay open: fds the parent opened with
    // close-on-exec (all of Rust's and ringipc's) are gone already, and
    // whatever else leaked across exec is closed here, unless `init` was
    // called inside a runtime whose own fds must not be closed under it.
    let in_runtime = tokio::runtime::Handle::try_current().is_ok();
    if !in_runtime {
        sys::close_fds_except(&keep);
    }
    run_spec(spec, control_fd, fds, in_runtime)
}

/// The child's side once its fds are in place, shared by re-executed and
/// forked children: `control_fd` and `fds` (the handles, by index) are open
/// and everything else is closed.
pub(super) fn run_spec(
    spec: &ArchivedSpec,
    control_fd: RawFd,
    fds: Vec<RawFd>,
    in_runtime: bool,
) -> Result<i32, String> {
    for &fd in fds.iter().chain(std::iter::once(&control_fd)) {
        // Our own children must not inherit these.
        sys::set_cloexec(fd, true).map_err(|e| format!("fd {fd}: {e}"))?;
    }
    // SAFETY: the parent passed these fds for this process alone; each is
    // taken into ownership exactly once.
    let control = unsafe { OwnedFd::from_raw_fd(control_fd) };
    // SAFETY: as above, for every handle fd.
    let inherited: Vec<OwnedFd> = fds
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();

    if spec.die_with_parent {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
        // If the parent died before that, we were already reparented and
        // the signal will never come: do not run on.
        // SAFETY: getppid has no preconditions.
        if unsafe { libc::getppid() } != spec.parent_pid.to_native() {
            return Ok(EXIT_START_FAILED);
        }
    }
    if !spec.cpus.is_empty() {
        let cpus = spec.cpu_list();
        sys::set_affinity(&sys::cpu_set(&cpus))
            .map_err(|e| format!("pinning to cores {cpus:?}: {e}"))?;
    }
    if !spec.name.is_empty() {
        sys::set_thread_name(&spec.name);
    }
    if spec.anchor_check.to_native() != Spec::anchor_check() {
        return Err("the child binary differs from the parent's".into());
    }
    let trampoline = Spec::resolve(spec.trampoline.to_native());
    // SAFETY: `trampoline` is the address of a `Trampoline` in this very
    // binary (the parent re-executed its own /proc/self/exe, and the anchor
    // check above confirms the layout), computed from the parent's offset.
    let trampoline: super::Trampoline =
        unsafe { std::mem::transmute::<usize, super::Trampoline>(trampoline) };
    let mut args = AlignedVec::<16>::with_capacity(spec.args.len());
    args.extend_from_slice(&spec.args);
    let entry = Spec::resolve(spec.entry.to_native());

    let run_entry = move || {
        handoff::install_inherited(inherited);
        let outcome = trampoline(entry, &args);
        handoff::clear_inherited();
        outcome
    };
    // `init` inside `#[tokio::main]`: a runtime cannot start inside another
    // on the same thread, so the entry gets a thread of its own.
    let outcome = if in_runtime {
        std::thread::scope(|s| {
            s.spawn(run_entry)
                .join()
                .unwrap_or_else(|p| Outcome::Panic(super::panic_message(p)))
        })
    } else {
        run_entry()
    };
    let code = match &outcome {
        Outcome::Value(_) => 0,
        Outcome::Panic(_) => EXIT_PANIC,
        Outcome::Failed(_) | Outcome::TooLarge(_) => EXIT_START_FAILED,
    };
    write_outcome(control, &outcome, spec.max_result.to_native() as usize);
    Ok(code)
}

/// Writes the outcome as one frame on the control pipe, blocking: the
/// runtime is gone by now.
fn write_outcome(control: OwnedFd, outcome: &Outcome, max: usize) {
    let mut enc = Encoder::new(usize::MAX);
    let pushed = enc.push_with::<()>(
        |buf| {
            outcome.encode_into(buf, max);
            Ok(())
        },
        |_, _| (),
    );
    if pushed.is_err() {
        return;
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&control);
    let _ = sys::set_nonblocking(fd, false);
    while !enc.pending().is_empty() {
        match sys::write(fd, enc.pending()) {
            Ok(n) => enc.advance(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A code address for the binary-layout check; never called. Not inlined
/// and not empty, so it has one address (identical empty functions could be
/// merged).
#[inline(never)]
pub(crate) fn init_marker() -> u64 {
    std::hint::black_box(0x72_69_6e_67_69_70_63)
}

#[cfg(test)]
mod tests {
    use super::child_spec_fd;
    use crate::sys;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_a_sealed_spec_makes_a_child() {
        let spec = sys::memfd_spec(c"ringipc-spec", b"spec bytes").unwrap();
        let named = |fd: i32| Some(fd.to_string().into());
        assert_eq!(
            child_spec_fd(named(spec.as_raw_fd()), false),
            Some(spec.as_raw_fd())
        );
        // Never in a setuid/setgid process.
        assert_eq!(child_spec_fd(named(spec.as_raw_fd()), true), None);
        // A stale value: a pipe, a closed fd, garbage, nothing.
        let (r, _w) = sys::pipe().unwrap();
        assert_eq!(child_spec_fd(named(r.as_raw_fd()), false), None);
        assert_eq!(child_spec_fd(named(1_000_000), false), None);
        assert_eq!(child_spec_fd(Some("not a number".into()), false), None);
        assert_eq!(child_spec_fd(None, false), None);
    }
}
