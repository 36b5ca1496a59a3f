//! The io_uring backend: one ring per thread, bridged into the thread's tokio
//! runtime by registering the ring fd with the reactor (it becomes readable
//! when completions are waiting).
//!
//! Buffer lifetimes: an operation's buffer is moved into the ring's slot table
//! at submission and handed back only when its completion is reaped. A handle
//! that is dropped while its operation is in flight leaves the slot behind as
//! an orphan (reads are also cancelled with `AsyncCancel`); the buffer is
//! freed when the completion arrives, or leaked if the ring is torn down
//! first, so the kernel never writes into freed memory.
//!
//! Wake-ups: every poll of a pending operation stores its task's waker in the
//! slot, then registers one ring-wide waker with the reactor. That waker reaps
//! the completion queue, wakes exactly the tasks whose operations completed,
//! and re-arms itself while anything is still in flight.

use crate::framing::{Decoder, Encoder};
use crate::sys;
use io_uring::{IoUring, opcode, squeue, types};
use rkyv::util::AlignedVec;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker, ready};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::{Handle, Id};

/// Submission queue size of each thread's ring.
const RING_ENTRIES: u32 = 256;
/// user_data of cancellation requests, whose completions are ignored.
const CANCEL_TAG: u64 = u64::MAX;
/// The kernel caps one read or write at about 2 GiB; stay well below it.
const MAX_IO: usize = 1 << 30;

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

/// What an operation keeps alive until its completion is reaped.
enum Keep {
    None,
    Read(AlignedVec<16>),
    Write(Vec<u8>),
    SigInfo(Box<SigInfo>),
}

/// A `siginfo_t` for the kernel to fill.
struct SigInfo(libc::siginfo_t);

// SAFETY: siginfo_t is plain data; its raw pointer fields (si_addr, si_value)
// are never dereferenced here, only copied.
unsafe impl Send for SigInfo {}

enum SlotState {
    Free,
    Pending(Option<Waker>),
    Done(i32),
    /// The owner went away; free on completion.
    Orphan,
}

struct Slot {
    state: SlotState,
    keep: Keep,
}

struct State {
    /// The ring fd's registration with a runtime's reactor. Declared before
    /// `uring` so it is dropped (deregistered) before the fd closes.
    reg: Option<(Id, AsyncFd<RingFd>)>,
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots in `Pending` or `Orphan` state.
    in_flight: usize,
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(crate) struct Ring {
    state: Mutex<State>,
    /// The ring-wide waker registered with the reactor.
    waker: Waker,
}

struct RingWaker(Weak<Ring>);

impl Wake for RingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(ring) = self.0.upgrade() {
            let mut st = ring.lock();
            st.reap();
            st.rearm(&ring.waker);
        }
    }
}

thread_local! {
    static RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
    static ENTRIES: std::cell::Cell<u32> = const { std::cell::Cell::new(RING_ENTRIES) };
}

/// Sets the submission queue size of this thread's ring, if it has not been
/// created yet (the engine calls this on each core thread).
pub(crate) fn set_thread_ring_entries(entries: u32) {
    ENTRIES.with(|e| e.set(entries.clamp(8, 32768)));
}

impl Ring {
    /// This thread's ring, created on first use.
    fn current() -> io::Result<Arc<Ring>> {
        RING.with(|r| {
            let mut r = r.borrow_mut();
            if let Some(ring) = &*r {
                return Ok(ring.clone());
            }
            let uring = IoUring::new(ENTRIES.with(|e| e.get()))?;
            let ring = Arc::new_cyclic(|weak| Ring {
                state: Mutex::new(State {
                    uring,
                    slots: Vec::new(),
                    free: Vec::new(),
                    in_flight: 0,
                    reg: None,
                }),
                waker: Waker::from(Arc::new(RingWaker(weak.clone()))),
            });
            *r = Some(ring.clone());
            Ok(ring)
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Polls operation `id`; on completion returns its result and what it kept.
    fn poll(&self, id: usize, cx: &mut Context<'_>) -> Poll<io::Result<(i32, Keep)>> {
        let mut st = self.lock();
        loop {
            if let SlotState::Done(res) = st.slots[id].state {
                return Poll::Ready(Ok((res, st.release(id))));
            }
            st.reap();
            if matches!(st.slots[id].state, SlotState::Done(_)) {
                continue;
            }
            if let SlotState::Pending(w) = &mut st.slots[id].state {
                match w {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
            }
            let afd = st.registration()?;
            match afd.poll_read_ready(&mut Context::from_waker(&self.waker)) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Ring {
    /// Cancels operation `id` if it is still running and blocks until its
    /// completion has been reaped (used when a handle is handed to a child,
    /// so the parent's kernel operation can no longer touch the pipe).
    fn settle(&self, id: usize) -> io::Result<()> {
        let mut st = self.lock();
        st.reap();
        if matches!(st.slots[id].state, SlotState::Pending(_)) {
            let entry = opcode::AsyncCancel::new(id as u64)
                .build()
                .user_data(CANCEL_TAG);
            st.push(&entry)?;
        }
        loop {
            st.reap();
            if !matches!(st.slots[id].state, SlotState::Pending(_)) {
                return Ok(());
            }
            match st.uring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `f` on a completed operation's result and kept buffer, leaving
    /// both in place for the owner.
    fn peek<R>(&self, id: usize, f: impl FnOnce(i32, &Keep) -> R) -> R {
        let st = self.lock();
        let slot = &st.slots[id];
        let res = match slot.state {
            SlotState::Done(r) => r,
            _ => -libc::EINPROGRESS,
        };
        f(res, &slot.keep)
    }
}

impl State {
    /// The ring fd's registration with the current runtime's reactor.
    fn registration(&mut self) -> io::Result<&AsyncFd<RingFd>> {
        let id = Handle::try_current()
            .map_err(|_| super::epoll::no_runtime())?
            .id();
        if !matches!(&self.reg, Some((rid, _)) if *rid == id) {
            self.reg = None;
            // SAFETY: the ring fd stays open while `reg` exists: `reg` is
            // declared before `uring` in `State`, so it is dropped first.
            let afd = unsafe {
                AsyncFd::register_with_interest(RingFd(self.uring.as_raw_fd()), Interest::READABLE)
            }
            .map_err(|e| e.into_parts().1)?;
            self.reg = Some((id, afd));
        }
        Ok(&self.reg.as_ref().expect("registered above").1)
    }

    fn submit(&mut self, entry: squeue::Entry, keep: Keep) -> Result<usize, (io::Error, Keep)> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(Slot {
                    state: SlotState::Free,
                    keep: Keep::None,
                });
                self.slots.len() - 1
            }
        };
        let entry = entry.user_data(id as u64);
        // The slot is pending before the kernel sees the entry: entering may
        // reap (when the completion queue is full), and this operation's own
        // completion may be among what it reaps.
        self.slots[id] = Slot {
            state: SlotState::Pending(None),
            keep,
        };
        self.in_flight += 1;
        if let Err(e) = self.queue(&entry) {
            // Not queued: nothing will ever complete it.
            self.in_flight -= 1;
            let keep = self.release(id);
            return Err((e, keep));
        }
        if let Err(e) = self.enter() {
            // Queued but not submitted: the next enter will submit it, so its
            // buffer must outlive it; the slot becomes an orphan and the
            // caller's stream is broken (it gets the error, not the buffer).
            self.slots[id].state = SlotState::Orphan;
            return Err((e, Keep::None));
        }
        Ok(id)
    }

    /// Puts `entry` in the submission queue, entering the kernel first if
    /// the queue is full. On error the entry was not queued.
    fn queue(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at is owned by its slot's
            // `keep` (or by the caller for cancellations, which point at none)
            // and is only released when the completion has been reaped, or
            // leaked if the ring goes away first (see `Drop for State`).
            match unsafe { self.uring.submission().push(entry) } {
                Ok(()) => return Ok(()),
                Err(_full) => self.enter()?,
            }
        }
    }

    /// Queues `entry` and enters the kernel once; pipe reads and writes that
    /// can complete at once do so inside this call.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        self.queue(entry)?;
        self.enter()
    }

    fn enter(&mut self) -> io::Result<()> {
        loop {
            match self.uring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: make room, then try again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.reap(),
                Err(e) => return Err(e),
            }
        }
    }

    fn reap(&mut self) {
        let mut cq = self.uring.completion();
        cq.sync();
        for cqe in &mut cq {
            let ud = cqe.user_data();
            if ud == CANCEL_TAG {
                continue;
            }
            let id = ud as usize;
            let slot = &mut self.slots[id];
            match std::mem::replace(&mut slot.state, SlotState::Done(cqe.result())) {
                SlotState::Pending(w) => {
                    self.in_flight -= 1;
                    if let Some(w) = w {
                        w.wake();
                    }
                }
                SlotState::Orphan => {
                    self.in_flight -= 1;
                    slot.state = SlotState::Free;
                    slot.keep = Keep::None;
                    self.free.push(id);
                }
                other => slot.state = other,
            }
        }
    }

    /// Keeps the ring-wide waker registered while operations are in flight.
    fn rearm(&mut self, waker: &Waker) {
        while self.in_flight > 0 {
            let Some((_, afd)) = &self.reg else { return };
            match afd.poll_read_ready(&mut Context::from_waker(waker)) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                _ => return,
            }
            self.reap();
        }
    }

    fn release(&mut self, id: usize) -> Keep {
        let slot = &mut self.slots[id];
        slot.state = SlotState::Free;
        self.free.push(id);
        std::mem::replace(&mut slot.keep, Keep::None)
    }

    /// The owner of `id` went away. Reads are cancelled (an in-flight read
    /// holds the pipe's read end open and would swallow data); writes are left
    /// to finish, so bytes handed to the kernel are still delivered.
    fn orphan(&mut self, id: usize, cancel: bool) {
        match self.slots[id].state {
            SlotState::Done(_) => {
                self.release(id);
            }
            SlotState::Pending(_) => {
                self.slots[id].state = SlotState::Orphan;
                if cancel {
                    let entry = opcode::AsyncCancel::new(id as u64)
                        .build()
                        .user_data(CANCEL_TAG);
                    let _ = self.push(&entry);
                }
            }
            _ => {}
        }
    }
}

impl Drop for State {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        for id in 0..self.slots.len() {
            if matches!(
                self.slots[id].state,
                SlotState::Pending(_) | SlotState::Orphan
            ) {
                let entry = opcode::AsyncCancel::new(id as u64)
                    .build()
                    .user_data(CANCEL_TAG);
                let _ = self.push(&entry);
            }
        }
        for _ in 0..50 {
            self.reap();
            if self.in_flight == 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            let _ = self.enter();
        }
        // Still in flight: never free memory the kernel may write to.
        for slot in &mut self.slots {
            if matches!(slot.state, SlotState::Pending(_) | SlotState::Orphan) {
                std::mem::forget(std::mem::replace(&mut slot.keep, Keep::None));
            }
        }
    }
}

struct Op {
    ring: Arc<Ring>,
    id: usize,
    /// Cancel (rather than let finish) when the owner goes away.
    cancel_on_drop: bool,
}

/// At most one operation in flight, owned by a handle rather than by the
/// future that started it.
#[derive(Default)]
struct OpSlot {
    op: Option<Op>,
}

impl OpSlot {
    fn start(
        &mut self,
        entry: squeue::Entry,
        keep: Keep,
        cancel_on_drop: bool,
    ) -> Result<(), (io::Error, Keep)> {
        let ring = match Ring::current() {
            Ok(ring) => ring,
            Err(e) => return Err((e, keep)),
        };
        let id = ring.lock().submit(entry, keep)?;
        self.op = Some(Op {
            ring,
            id,
            cancel_on_drop,
        });
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(i32, Keep)>> {
        let op = self.op.as_ref().expect("an operation is in flight");
        let out = ready!(op.ring.poll(op.id, cx))?;
        self.op = None;
        Poll::Ready(Ok(out))
    }
}

impl Drop for OpSlot {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            op.ring.lock().orphan(op.id, op.cancel_on_drop);
        }
    }
}

/// A pipe end on the uring backend.
pub(crate) struct UringIo {
    fd: OwnedFd,
    slot: OpSlot,
}

impl UringIo {
    pub(crate) fn new(fd: OwnedFd) -> io::Result<UringIo> {
        // A nonblocking fd would make io_uring return EAGAIN instead of
        // waiting for the pipe, so uring ends are blocking.
        sys::set_nonblocking(fd.as_raw_fd(), false)?;
        Ok(UringIo {
            fd,
            slot: OpSlot::default(),
        })
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// For handing the fd to a child: stops the operation in flight, if any,
    /// and returns its result with the bytes of its buffer (for a read: the
    /// buffer up to what the kernel wrote; for a write: the whole buffer).
    pub(crate) fn settle(&self) -> io::Result<Option<(i32, Vec<u8>)>> {
        let Some(op) = &self.slot.op else {
            return Ok(None);
        };
        op.ring.settle(op.id)?;
        Ok(Some(op.ring.peek(op.id, |res, keep| {
            let bytes = match keep {
                Keep::Read(buf) => {
                    let extra = res.max(0) as usize;
                    // SAFETY: the kernel initialised `extra` bytes right after
                    // `buf.len()`, inside the capacity `reserve` made.
                    unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len() + extra) }.to_vec()
                }
                Keep::Write(buf) => buf.clone(),
                _ => Vec::new(),
            };
            (res, bytes)
        })))
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        dec: &mut Decoder,
    ) -> Poll<io::Result<usize>> {
        if self.slot.op.is_none() {
            let (ptr, len) = dec.reserve();
            let entry =
                opcode::Read::new(types::Fd(self.fd.as_raw_fd()), ptr, len.min(MAX_IO) as u32)
                    .offset(u64::MAX)
                    .build();
            // The buffer moves into the slot; its heap memory (where `ptr`
            // points) does not move with it.
            if let Err((e, keep)) = self.slot.start(entry, Keep::Read(dec.take_buf()), true) {
                if let Keep::Read(buf) = keep {
                    dec.put_buf(buf);
                }
                return Poll::Ready(Err(e));
            }
        }
        let (res, keep) = ready!(self.slot.poll(cx))?;
        if let Keep::Read(buf) = keep {
            dec.put_buf(buf);
        }
        if res < 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        // SAFETY: the kernel wrote `res` bytes into the region `reserve` returned.
        unsafe { dec.commit(res as usize) };
        Poll::Ready(Ok(res as usize))
    }

    pub(crate) fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        enc: &mut Encoder,
    ) -> Poll<io::Result<usize>> {
        if self.slot.op.is_none() {
            let (buf, pos) = enc.take_buf();
            let len = (buf.len() - pos).min(MAX_IO);
            // SAFETY: `pos <= buf.len()`, so the pointer stays inside the allocation.
            let ptr = unsafe { buf.as_ptr().add(pos) };
            let entry = opcode::Write::new(types::Fd(self.fd.as_raw_fd()), ptr, len as u32)
                .offset(u64::MAX)
                .build();
            // Writes are left to finish if the handle goes away: bytes handed
            // to the kernel are still delivered.
            if let Err((e, keep)) = self.slot.start(entry, Keep::Write(buf), false) {
                if let Keep::Write(buf) = keep {
                    enc.put_buf(buf);
                }
                return Poll::Ready(Err(e));
            }
        }
        let (res, keep) = ready!(self.slot.poll(cx))?;
        if let Keep::Write(buf) = keep {
            enc.put_buf(buf);
        }
        if res < 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        enc.advance(res as usize);
        Poll::Ready(Ok(res as usize))
    }

    /// For `Drop` of a sender: if nothing is in flight, write what the pipe
    /// takes without blocking (the fd is switched to nonblocking mode for
    /// good; it is about to be closed).
    pub(crate) fn write_now(&mut self, enc: &mut Encoder) {
        if self.slot.op.is_some() || enc.pending().is_empty() {
            return;
        }
        let fd = self.fd.as_raw_fd();
        if sys::set_nonblocking(fd, true).is_err() {
            return;
        }
        while !enc.pending().is_empty() {
            match sys::write(fd, enc.pending()) {
                Ok(n) => enc.advance(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    }
}

/// Waits for a child's exit with IORING_OP_WAITID on a pidfd (which also reaps it).
#[derive(Default)]
pub(crate) struct UringWait {
    slot: OpSlot,
}

impl UringWait {
    /// Whether a waitid is submitted and not yet reaped.
    pub(crate) fn in_flight(&self) -> bool {
        self.slot.op.is_some()
    }

    /// `(exited normally, code or signal)` once the process is gone.
    pub(crate) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        pidfd: RawFd,
    ) -> Poll<io::Result<(bool, i32)>> {
        if self.slot.op.is_none() {
            // SAFETY: a zeroed siginfo_t is a valid value for the kernel to fill.
            let info = Box::new(SigInfo(unsafe { std::mem::zeroed() }));
            let entry = opcode::WaitId::new(libc::P_PIDFD, pidfd as libc::id_t, libc::WEXITED)
                .infop(&info.0 as *const libc::siginfo_t)
                .build();
            if let Err((e, _)) = self.slot.start(entry, Keep::SigInfo(info), true) {
                return Poll::Ready(Err(e));
            }
        }
        let (res, keep) = ready!(self.slot.poll(cx))?;
        if res < 0 {
            return Poll::Ready(Err(io::Error::from_raw_os_error(-res)));
        }
        match keep {
            Keep::SigInfo(info) => Poll::Ready(Ok(sys::decode_siginfo(&info.0))),
            _ => Poll::Ready(Err(io::Error::other("waitid completion without siginfo"))),
        }
    }
}
