//! Whether io_uring is usable here: ring creation and every opcode ringipc
//! submits, probed once per process by the caller.

use io_uring::{IoUring, opcode};

/// Checks that a ring can be created and supports every opcode ringipc
/// submits; the error says why not.
pub(crate) fn probe() -> Result<(), String> {
    if let Some((major, minor)) = kernel_version()
        && (major, minor) < (5, 11)
    {
        return Err(format!(
            "kernel {major}.{minor} is below ringipc's io_uring floor of 5.11"
        ));
    }
    let ring = IoUring::new(8).map_err(|e| format!("io_uring_setup failed: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("IORING_REGISTER_PROBE failed: {e}"))?;
    for (code, name) in [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::RecvMsg::CODE, "RECVMSG"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("kernel lacks IORING_OP_{name}"));
        }
    }
    Ok(())
}

/// The running kernel's `(major, minor)`, from uname.
fn kernel_version() -> Option<(u32, u32)> {
    // SAFETY: a zeroed utsname is a valid buffer for uname to fill.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    // SAFETY: uname NUL-terminates `release`.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_str()
        .ok()?;
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the kernel has IORING_OP_WAITID (6.7+); probed once.
pub(crate) fn waitid_supported() -> bool {
    static WAITID: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WAITID.get_or_init(|| {
        let Ok(ring) = IoUring::new(2) else {
            return false;
        };
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe).is_ok()
            && probe.is_supported(opcode::WaitId::CODE)
    })
}
