//! What a child runs: the monomorphised trampolines that decode the
//! arguments, call the entry on a fresh tokio runtime and encode its
//! outcome (value, panic message or failure) for the parent.

use super::handoff;
use super::spec::Outcome;
use crate::message::{Decode, Encode, encode_into};
use rkyv::api::high::HighDeserializer;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use std::future::Future;
use std::time::Duration;

/// The monomorphised function a child runs: it decodes the arguments, calls
/// the entry (whose address it is given) and encodes the outcome.
pub(crate) type Trampoline = fn(usize, &[u8]) -> Outcome;

fn child_runtime() -> std::result::Result<tokio::runtime::Runtime, String> {
    // The child's runtime thread is ringipc's: its ring need not be
    // interrupted by completions (see `set_thread_coop_taskrun`).
    crate::backend::uring::set_thread_coop_taskrun();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the child's runtime: {e}"))
}

fn decode_args<A>(args: &[u8]) -> std::result::Result<A, String>
where
    A: Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
{
    let archived = rkyv::access::<A::Archived, rancor::BoxedError>(args)
        .map_err(|e| format!("invalid arguments: {e}"));
    let decoded = archived.and_then(|a| {
        rkyv::deserialize::<A, rancor::Error>(a)
            .map_err(|e| format!("cannot decode arguments: {e}"))
    });
    // Inherited fds that no argument claimed are closed now, not when the
    // entry returns.
    handoff::clear_inherited();
    decoded
}

/// Drops the child's runtime without waiting for blocking tasks (tokio's
/// stdin reader, say) that would keep the outcome from being reported.
fn finish(rt: tokio::runtime::Runtime) {
    rt.shutdown_timeout(Duration::from_millis(100));
}

fn encode_value<R: Encode>(value: &R) -> Outcome {
    let mut v = Vec::new();
    match encode_into(value, &mut v) {
        Ok(()) => {
            let mut a = AlignedVec::with_capacity(v.len());
            a.extend_from_slice(&v);
            Outcome::Value(a)
        }
        Err(e) => Outcome::Failed(format!("cannot encode the return value: {e}")),
    }
}

pub(crate) fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    match p.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => match p.downcast::<&'static str>() {
            Ok(s) => s.to_string(),
            Err(_) => "panic with a non-string payload".into(),
        },
    }
}

pub(super) fn trampoline_sync<A, R>(entry: usize, args: &[u8]) -> Outcome
where
    A: Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
    R: Encode,
{
    // SAFETY: `entry` was computed from a `fn(A) -> R` in the parent (the
    // builder stores it next to this trampoline, instantiated for the same
    // A and R) and resolved in the same binary.
    let f = unsafe { std::mem::transmute::<usize, fn(A) -> R>(entry) };
    let rt = match child_runtime() {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(e),
    };
    let outcome = {
        let _guard = rt.enter();
        match decode_args::<A>(args) {
            Ok(args) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(args))) {
                Ok(r) => encode_value(&r),
                Err(p) => Outcome::Panic(panic_message(p)),
            },
            Err(e) => Outcome::Failed(e),
        }
    };
    finish(rt);
    outcome
}

pub(super) fn trampoline_async<A, R, F>(entry: usize, args: &[u8]) -> Outcome
where
    A: Decode,
    A::Archived: rkyv::Deserialize<A, HighDeserializer<rancor::Error>>,
    R: Encode,
    F: Future<Output = R>,
{
    // SAFETY: as in `trampoline_sync`, for a `fn(A) -> F`.
    let f = unsafe { std::mem::transmute::<usize, fn(A) -> F>(entry) };
    let rt = match child_runtime() {
        Ok(rt) => rt,
        Err(e) => return Outcome::Failed(e),
    };
    let args = {
        let _guard = rt.enter();
        decode_args::<A>(args)
    };
    let outcome = match args {
        Ok(args) => {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rt.block_on(f(args)))) {
                Ok(r) => encode_value(&r),
                Err(p) => Outcome::Panic(panic_message(p)),
            }
        }
        Err(e) => Outcome::Failed(e),
    };
    finish(rt);
    outcome
}
