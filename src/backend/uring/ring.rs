//! One io_uring instance per thread, and what keeps its operations sound.
//!
//! **Ownership.** A thread's ring is created on first use and lives as long
//! as the thread or the last operation on it, whichever is later. An
//! operation belongs to the ring it was submitted on; a handle that moves to
//! another thread moves its operation too (see `ops`): the old ring cancels
//! it and the new thread's ring runs it again, keeping any bytes it moved.
//! When a thread exits the kernel cancels what it submitted; those
//! completions still arrive (with `ECANCELED`) and are reaped by whichever
//! thread polls the ring next.
//!
//! **Buffer and fd lifetimes.** An operation's buffer, and the fd it names,
//! move into its slot at submission and leave only when its completion is
//! reaped. A handle dropped while its operation is in flight leaves the slot
//! behind as an orphan (reads are also cancelled); the slot is freed when the
//! completion arrives, or leaked if the ring is torn down first, so the
//! kernel never writes into freed memory nor reads an fd number that was
//! closed and reused.
//!
//! **Wake-ups.** Each poll of a pending operation stores its task's waker in
//! the slot and registers one ring-wide waker with the current runtime's
//! reactor (the ring fd is readable while completions wait). That waker reaps
//! the completion queue and wakes the tasks whose operations completed. A
//! ring may be polled from several runtimes (a handle moved to another
//! thread waits for its old ring's cancellation there), so it keeps one
//! registration per runtime. Task wakers are called only after the ring's
//! lock is released, and nothing blocks while holding it.
//!
//! **Overflow.** When more completions arrive than the completion queue
//! holds, the kernel keeps the rest on an overflow list (`IORING_FEAT_NODROP`)
//! and flags it; reaping flushes that list with `io_uring_enter(GETEVENTS)`,
//! so an overflow never stalls a task.

use io_uring::{IoUring, opcode, squeue};
use rkyv::util::AlignedVec;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::runtime::{Handle, Id};

/// Submission queue size of each thread's ring.
const RING_ENTRIES: u32 = 256;
/// Completion queue size as a multiple of the submission queue's: idle
/// channels each hold a read in flight, so completions can far outnumber
/// one tick's submissions.
const CQ_FACTOR: u32 = 8;
/// user_data of cancellation requests, whose completions are ignored.
const CANCEL_TAG: u64 = u64::MAX;
/// `IORING_ENTER_GETEVENTS` (the io-uring crate keeps its constants private).
const ENTER_GETEVENTS: libc::c_uint = 1;
/// How many registrations (one per runtime that polled the ring) are kept
/// before those of runtimes that have shut down are pruned.
const PRUNE_REGS_ABOVE: usize = 4;

/// What an operation keeps alive until its completion is reaped.
pub(super) enum Keep {
    None,
    Read(AlignedVec<16>),
    Write(Vec<u8>),
    SigInfo(Box<SigInfo>),
    /// A `SENDMSG`/`RECVMSG`: the header, its buffers and a sent message's fds.
    Msg(Box<crate::backend::msg::MsgBuf>),
}

/// A `siginfo_t` for the kernel to fill.
pub(super) struct SigInfo(pub(super) libc::siginfo_t);

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
    /// The fd the operation names, open until its completion is reaped.
    fd: Option<Arc<OwnedFd>>,
}

struct State {
    /// The ring fd's registrations, one per runtime that polled this ring.
    /// Declared before `uring` so they are dropped (deregistered) before the
    /// fd closes.
    regs: Vec<(Id, AsyncFd<RingFd>)>,
    uring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Slots in `Pending` or `Orphan` state.
    in_flight: usize,
    /// Entries queued but not yet taken by the kernel (an `io_uring_enter`
    /// failed for a transient reason); the next poll submits them.
    unsubmitted: bool,
    /// Task wakers collected under the lock, called after it is released.
    to_wake: Vec<Waker>,
}

struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

pub(super) struct Ring {
    state: Mutex<State>,
    /// The ring-wide waker registered with each reactor.
    waker: Waker,
    /// The ring fd, for waiting without the lock held.
    fd: RawFd,
}

struct RingWaker(Weak<Ring>);

impl Wake for RingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(ring) = self.0.upgrade() {
            ring.with(|st| {
                st.reap();
                st.rearm(&ring.waker);
            });
        }
    }
}

thread_local! {
    static RING: RefCell<Option<Arc<Ring>>> = const { RefCell::new(None) };
    static ENTRIES: Cell<u32> = const { Cell::new(RING_ENTRIES) };
    static COOP: Cell<bool> = const { Cell::new(false) };
}

/// Makes this thread's ring (if not created yet) a `COOP_TASKRUN` one. For
/// threads ringipc owns (engine cores, a child's runtime thread), which
/// enter the kernel whenever they park: a completion of an operation they
/// submitted then waits for that instead of interrupting them. Not for
/// threads of the application's own runtimes, which may run long without
/// a syscall while a handle moved elsewhere waits on their ring.
pub(crate) fn set_thread_coop_taskrun() {
    COOP.with(|c| c.set(true));
}

/// Sets the submission queue size of this thread's ring, if it has not been
/// created yet (the engine calls this on each core thread).
pub(crate) fn set_thread_ring_entries(entries: u32) {
    ENTRIES.with(|e| e.set(entries.clamp(8, 32768)));
}

/// Transient `io_uring_enter` failures: the entry stays queued and is
/// submitted by a later enter.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::ENOMEM | libc::EBUSY)
    )
}

impl Ring {
    /// This thread's ring, created on first use.
    pub(super) fn current() -> io::Result<Arc<Ring>> {
        RING.with(|r| {
            let mut r = r.borrow_mut();
            if let Some(ring) = &*r {
                return Ok(ring.clone());
            }
            let entries = ENTRIES.with(|e| e.get());
            // COOP_TASKRUN (threads ringipc owns, see
            // `set_thread_coop_taskrun`): a completion does not interrupt
            // this thread while it runs; its task work waits for the
            // thread's next entry into the kernel (tokio's `epoll_wait` when
            // it parks, or any syscall), and a thread asleep there is still
            // woken. A busy core thread serving many channels then takes its
            // completions in batches instead of one inter-processor
            // interrupt each (harness scenario 2c: about 1.4x the
            // messages/s). Kernels before 5.19 refuse the flag: the ring is
            // made without it.
            let plain = || {
                IoUring::builder()
                    .setup_cqsize(entries * CQ_FACTOR)
                    .build(entries)
            };
            let uring = if COOP.with(|c| c.get()) {
                IoUring::builder()
                    .setup_cqsize(entries * CQ_FACTOR)
                    .setup_coop_taskrun()
                    .build(entries)
                    .or_else(|e| match e.raw_os_error() {
                        Some(libc::EINVAL) => plain(),
                        _ => Err(e),
                    })?
            } else {
                plain()?
            };
            let fd = uring.as_raw_fd();
            let ring = Arc::new_cyclic(|weak| Ring {
                state: Mutex::new(State {
                    regs: Vec::new(),
                    uring,
                    slots: Vec::new(),
                    free: Vec::new(),
                    in_flight: 0,
                    unsubmitted: false,
                    to_wake: Vec::new(),
                }),
                waker: Waker::from(Arc::new(RingWaker(weak.clone()))),
                fd,
            });
            *r = Some(ring.clone());
            Ok(ring)
        })
    }

    /// Whether this is the ring of the calling thread. False on a thread
    /// that is exiting (its thread-locals are gone).
    pub(super) fn is_current(&self) -> bool {
        RING.try_with(|r| {
            r.try_borrow()
                .is_ok_and(|r| r.as_deref().is_some_and(|c| std::ptr::eq(c, self)))
        })
        .unwrap_or(false)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` under the lock, then wakes the tasks it found complete.
    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut st = self.lock();
        let out = f(&mut st);
        let wake = std::mem::take(&mut st.to_wake);
        drop(st);
        for w in wake {
            w.wake();
        }
        out
    }

    /// Submits `entry`, whose buffers `keep` owns and whose fd `fd` keeps
    /// open; returns the operation's id. On error nothing was queued and
    /// `keep` comes back.
    pub(super) fn submit(
        &self,
        entry: squeue::Entry,
        keep: Keep,
        fd: Option<Arc<OwnedFd>>,
    ) -> Result<usize, (io::Error, Keep)> {
        self.with(|st| st.submit(entry, keep, fd))
    }

    /// Polls operation `id`; on completion returns its result and what it kept.
    pub(super) fn poll(&self, id: usize, cx: &mut Context<'_>) -> Poll<io::Result<(i32, Keep)>> {
        self.with(|st| {
            loop {
                if let SlotState::Done(res) = st.slots[id].state {
                    return Poll::Ready(Ok((res, st.release(id))));
                }
                if st.unsubmitted {
                    match st.enter() {
                        Ok(()) => {}
                        Err(e) if transient(&e) => {
                            // Still not taken by the kernel: try again on the
                            // next poll rather than spinning under the lock.
                            st.set_waker(id, cx);
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                st.reap();
                if matches!(st.slots[id].state, SlotState::Done(_)) {
                    continue;
                }
                st.set_waker(id, cx);
                let afd = match st.registration() {
                    Ok(afd) => afd,
                    Err(e) => return Poll::Ready(Err(e)),
                };
                match afd.poll_read_ready(&mut Context::from_waker(&self.waker)) {
                    Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
    }

    /// Whether operation `id` has completed, reaping what the kernel posted.
    pub(super) fn is_done(&self, id: usize) -> bool {
        self.with(|st| {
            if !matches!(st.slots[id].state, SlotState::Done(_)) {
                st.reap();
            }
            matches!(st.slots[id].state, SlotState::Done(_))
        })
    }

    /// Asks the kernel to cancel operation `id` if it is still running; its
    /// completion (`ECANCELED`, or its result if it finished first) arrives
    /// as usual.
    pub(super) fn cancel(&self, id: usize) -> io::Result<()> {
        self.with(|st| {
            st.reap();
            if matches!(st.slots[id].state, SlotState::Pending(_)) {
                st.push_cancel(id)
            } else {
                Ok(())
            }
        })
    }

    /// Cancels operation `id` if it is still running and waits until its
    /// completion has been reaped (used when a handle is handed to a child,
    /// so the parent's kernel operation can no longer touch the pipe). The
    /// wait happens without the lock: other threads keep using the ring.
    pub(super) fn settle(&self, id: usize) -> io::Result<()> {
        self.cancel(id)?;
        for round in 0u32.. {
            let done = self.with(|st| {
                st.reap();
                !matches!(st.slots[id].state, SlotState::Pending(_))
            });
            if done {
                return Ok(());
            }
            // Run any task work that posts the completion, without waiting
            // for completions (another thread may reap ours meanwhile).
            // SAFETY: `self.fd` is this ring's fd, open while `self` lives;
            // no submission (to_submit = 0) and no argument pointers.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd,
                    0u32,
                    0u32,
                    ENTER_GETEVENTS,
                    std::ptr::null::<libc::c_void>(),
                    0usize,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if !transient(&e) {
                    return Err(e);
                }
            }
            if round < 16 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(std::time::Duration::from_micros(100));
            }
        }
        unreachable!("the loop returns")
    }

    /// Runs `f` on a completed operation's result and kept buffer, leaving
    /// both in place for the owner.
    pub(super) fn peek<R>(&self, id: usize, f: impl FnOnce(i32, &Keep) -> R) -> R {
        let st = self.lock();
        let slot = &st.slots[id];
        let res = match slot.state {
            SlotState::Done(r) => r,
            _ => -libc::EINPROGRESS,
        };
        f(res, &slot.keep)
    }

    /// Takes a completed operation's result and kept buffer, freeing its
    /// slot (after [`Ring::settle`]). One that is somehow still running is
    /// orphaned instead, and reported as `-EINPROGRESS` with nothing kept.
    pub(super) fn take(&self, id: usize) -> (i32, Keep) {
        self.with(|st| match st.slots[id].state {
            SlotState::Done(res) => (res, st.release(id)),
            _ => {
                st.orphan(id, true);
                (-libc::EINPROGRESS, Keep::None)
            }
        })
    }

    /// The owner of `id` went away; see [`State::orphan`].
    pub(super) fn orphan(&self, id: usize, cancel: bool) {
        self.with(|st| st.orphan(id, cancel));
    }
}

impl State {
    /// The ring fd's registration with the current runtime's reactor.
    fn registration(&mut self) -> io::Result<&AsyncFd<RingFd>> {
        let id = Handle::try_current()
            .map_err(|_| super::super::reactor::no_runtime())?
            .id();
        if let Some(i) = self.regs.iter().position(|(rid, _)| *rid == id) {
            return Ok(&self.regs[i].1);
        }
        if self.regs.len() >= PRUNE_REGS_ABOVE {
            // A runtime that has shut down answers a readiness poll with an
            // error; its registration is of no further use.
            let noop = Waker::noop();
            self.regs.retain(|(_, afd)| {
                !matches!(
                    afd.poll_read_ready(&mut Context::from_waker(noop)),
                    Poll::Ready(Err(_))
                )
            });
        }
        // SAFETY: the ring fd stays open while `regs` exists: `regs` is
        // declared before `uring` in `State`, so it is dropped first.
        let afd = unsafe {
            AsyncFd::register_with_interest(RingFd(self.uring.as_raw_fd()), Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        self.regs.push((id, afd));
        Ok(&self.regs.last().expect("pushed above").1)
    }

    fn set_waker(&mut self, id: usize, cx: &Context<'_>) {
        if let SlotState::Pending(w) = &mut self.slots[id].state {
            match w {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
    }

    fn submit(
        &mut self,
        entry: squeue::Entry,
        keep: Keep,
        fd: Option<Arc<OwnedFd>>,
    ) -> Result<usize, (io::Error, Keep)> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.slots.push(Slot {
                    state: SlotState::Free,
                    keep: Keep::None,
                    fd: None,
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
            fd,
        };
        self.in_flight += 1;
        if let Err(e) = self.queue(&entry) {
            // Not queued: nothing will ever complete it.
            self.in_flight -= 1;
            let keep = self.release(id);
            return Err((e, keep));
        }
        match self.enter() {
            Ok(()) => {}
            // Queued; a later enter (the next poll) submits it.
            Err(e) if transient(&e) => {}
            Err(e) => {
                // Queued but the ring refuses to enter: the entry may still
                // be taken by the kernel later, so its buffer and fd stay with
                // the slot (an orphan) until a completion arrives.
                self.slots[id].state = SlotState::Orphan;
                return Err((e, Keep::None));
            }
        }
        Ok(id)
    }

    /// Puts `entry` in the submission queue, entering the kernel first if
    /// the queue is full. On error the entry was not queued.
    fn queue(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points at is owned by its slot's
            // `keep` (or by nobody for cancellations, which point at none) and
            // is only released when the completion has been reaped, or leaked
            // if the ring goes away first (see `Drop for State`); the fd it
            // names is kept open by the slot's `fd` for as long.
            match unsafe { self.uring.submission().push(entry) } {
                Ok(()) => return Ok(()),
                Err(_full) => {
                    self.enter()?;
                    if self.uring.submission().is_full() {
                        // The kernel took nothing (a transient failure that
                        // `enter` reported as success cannot happen; this is
                        // a guard against spinning).
                        return Err(io::Error::from_raw_os_error(libc::EAGAIN));
                    }
                }
            }
        }
    }

    fn push_cancel(&mut self, id: usize) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(id as u64)
            .build()
            .user_data(CANCEL_TAG);
        self.queue(&entry)?;
        match self.enter() {
            Err(e) if !transient(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Submits what is queued. A full completion queue (`EBUSY`) is reaped
    /// and the enter retried; other transient failures are returned and
    /// leave the entries queued (`unsubmitted`) for the next attempt.
    fn enter(&mut self) -> io::Result<()> {
        let mut busy = 0;
        loop {
            match self.uring.submit() {
                Ok(_) => {
                    self.unsubmitted = !self.uring.submission().is_empty();
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && busy < 8 => {
                    busy += 1;
                    self.reap();
                }
                Err(e) => {
                    self.unsubmitted = true;
                    return Err(e);
                }
            }
        }
    }

    /// Moves every completion the kernel has posted into the slot table,
    /// flushing the overflow list when the kernel flagged one.
    fn reap(&mut self) {
        loop {
            let mut cq = self.uring.completion();
            cq.sync();
            let mut reaped = false;
            for cqe in &mut cq {
                reaped = true;
                let ud = cqe.user_data();
                if ud == CANCEL_TAG {
                    continue;
                }
                let id = ud as usize;
                let slot = &mut self.slots[id];
                match std::mem::replace(&mut slot.state, SlotState::Done(cqe.result())) {
                    SlotState::Pending(w) => {
                        self.in_flight -= 1;
                        slot.fd = None;
                        if let Some(w) = w {
                            self.to_wake.push(w);
                        }
                    }
                    SlotState::Orphan => {
                        self.in_flight -= 1;
                        slot.state = SlotState::Free;
                        slot.keep = Keep::None;
                        slot.fd = None;
                        self.free.push(id);
                    }
                    other => slot.state = other,
                }
            }
            drop(cq);
            if !self.uring.submission().cq_overflow() {
                return;
            }
            // Completions wait on the kernel's overflow list: entering with
            // GETEVENTS moves them into the (now drained) queue.
            match self.uring.submitter().submit_and_wait(0) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(_) => return,
            }
            if !reaped && self.uring.completion().is_empty() {
                // Nothing moved; the next reap tries again.
                return;
            }
        }
    }

    /// Keeps the ring-wide waker registered with every reactor while
    /// operations are in flight.
    fn rearm(&mut self, waker: &Waker) {
        let mut i = 0;
        while self.in_flight > 0 && i < self.regs.len() {
            let ready = match self.regs[i]
                .1
                .poll_read_ready(&mut Context::from_waker(waker))
            {
                Poll::Ready(Ok(mut guard)) => {
                    guard.clear_ready();
                    true
                }
                Poll::Ready(Err(_)) => {
                    // That runtime has shut down.
                    self.regs.swap_remove(i);
                    continue;
                }
                Poll::Pending => false,
            };
            if ready {
                self.reap();
            } else {
                i += 1;
            }
        }
    }

    fn release(&mut self, id: usize) -> Keep {
        let slot = &mut self.slots[id];
        slot.state = SlotState::Free;
        slot.fd = None;
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
                    let _ = self.push_cancel(id);
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
                let _ = self.push_cancel(id);
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
        // Still in flight: never free memory the kernel may write to, nor
        // close an fd it may still name.
        for slot in &mut self.slots {
            if matches!(slot.state, SlotState::Pending(_) | SlotState::Orphan) {
                std::mem::forget(std::mem::replace(&mut slot.keep, Keep::None));
                std::mem::forget(slot.fd.take());
            }
        }
    }
}
