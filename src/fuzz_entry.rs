//! Entry points for the fuzz targets in `fuzz/` and nothing else: not part
//! of the API, hidden from the docs, changed at will. They expose what a
//! child parses from the bytes its parent sends, which is otherwise private.

use crate::process::{handoff, spec};
use rkyv::util::AlignedVec;
use std::os::unix::ffi::OsStrExt;

/// Reads `bytes` as a child's start spec, as the child does before it acts
/// on it: `Err` for a spec the child refuses. Panics (a finding) if an
/// accepted spec would make the child panic or break I/O safety when it
/// acts on it: pinning to its cores, taking its fds, setting its
/// environment.
pub fn decode_spec(bytes: &[u8]) -> Result<(), String> {
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let spec = spec::read(&aligned)?;
    // Pinning: `cpu_set` requires every core below CPU_SETSIZE.
    let cpus = spec.cpu_list();
    assert!(
        cpus.iter().all(|&c| c < libc::CPU_SETSIZE as usize),
        "core out of range accepted: {cpus:?}"
    );
    crate::sys::cpu_set(&cpus);
    // The fds become `OwnedFd`s: each must be valid and owned once.
    let control = spec.control_fd.to_native();
    let mut fds: Vec<i32> = spec.fds.iter().map(|f| f.to_native()).collect();
    fds.push(control);
    fds.sort_unstable();
    assert!(
        fds.first().is_none_or(|&fd| fd >= 0) && fds.windows(2).all(|w| w[0] != w[1]),
        "negative or repeated fds accepted: {fds:?}"
    );
    // The environment goes to `set_var`, which panics on a NUL byte, an
    // empty key or a `=` in the key.
    if let Some(vars) = spec.env_vars() {
        for (key, value) in vars {
            let (k, v) = (key.as_bytes(), value.as_bytes());
            assert!(
                !k.is_empty() && !k.contains(&b'=') && !k.contains(&0) && !v.contains(&0),
                "set_var would panic on {key:?}={value:?}"
            );
        }
    }
    Ok(())
}

/// Reads `bytes` as the archived state of a channel end handed to a child
/// and rebuilds what it can without fds (the resumed encoder or decoder, a
/// sender's slot table): `Err` for a state the child refuses. Panics (a
/// finding) if an accepted slot table is inconsistent: lent slots must be
/// slot-aligned, non-empty, inside the arena and disjoint, and giving them
/// all back must leave the whole arena free.
pub fn decode_handoff(bytes: &[u8]) -> Result<(), String> {
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let state = rkyv::access::<crate::ArchivedHandoffState, rkyv::rancor::Error>(&aligned)
        .map_err(|e| e.to_string())?;
    match handoff::resume_without_fds(state).map_err(|e| e.to_string())? {
        handoff::ResumedState::Send(enc, slots) => {
            let _ = enc.pending();
            if let Some((mut slots, total)) = slots {
                let lent: Vec<_> = slots.lent().collect();
                let mut end = 0;
                for &(o, l, s) in &lent {
                    assert!(
                        o >= end && l > 0 && o.is_multiple_of(crate::framing::SLOT_ALIGN),
                        "lent slots overlap or are empty: {lent:?}"
                    );
                    end = o.checked_add(l).expect("slot end overflows");
                    assert!(end <= total, "lent slot outside the arena: {lent:?}");
                    slots
                        .give_back(o, s)
                        .expect("a lent slot cannot be given back");
                }
                assert_eq!(slots.largest(), Some((0, total)), "arena not whole again");
            }
        }
        handoff::ResumedState::Recv(mut dec) => {
            // Frames the state carried come out as from any stream.
            while let Ok(Some(_)) = dec.next_any() {}
        }
    }
    Ok(())
}

/// Decodes a child's outcome frame as the parent does.
pub fn decode_outcome(bytes: &[u8]) {
    let _ = crate::process::spec::Outcome::decode(bytes);
}

/// Valid inputs for the decoders above (start specs, hand-over states,
/// outcomes), tagged 0, 1 and 2 for `decode_spec`, `decode_handoff` and
/// `decode_outcome`: fuzzing seeds that pass validation, to mutate from.
pub fn samples() -> Vec<(u8, Vec<u8>)> {
    let plain = || spec::Spec {
        anchor_check: spec::Spec::anchor_check(),
        trampoline: 0x1234,
        entry: -0x5678,
        args: vec![1, 2, 3, 4, 5, 6, 7, 8],
        fds: vec![3, 4, 5],
        control_fd: 6,
        max_result: 1 << 20,
        parent_pid: 1,
        die_with_parent: true,
        name: "worker-1".into(),
        cpus: vec![0, 1],
        env: None,
        cwd: None,
    };
    let forked = spec::Spec {
        env: Some(vec![b"PATH=/bin".to_vec(), b"A=".to_vec(), b"=x".to_vec()]),
        cwd: Some(b"/tmp".to_vec()),
        cpus: vec![],
        ..plain()
    };
    let mut out: Vec<(u8, Vec<u8>)> = [plain(), forked]
        .iter()
        .map(|s| {
            (
                0,
                rkyv::to_bytes::<rkyv::rancor::Error>(s)
                    .expect("serializable")
                    .to_vec(),
            )
        })
        .collect();
    out.extend(
        handoff::sample_states()
            .into_iter()
            .map(|s| (1, s.to_vec())),
    );
    for outcome in [
        spec::Outcome::Value(AlignedVec::new()),
        spec::Outcome::Panic("boom".into()),
        spec::Outcome::TooLarge("big".into()),
    ] {
        let mut buf = Vec::new();
        outcome.encode_into(&mut buf, 64);
        out.push((2, buf));
    }
    out
}
