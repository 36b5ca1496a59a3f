//! The shared-memory data plane of a channel: an arena that large messages
//! are serialized into once and read from in place (or copied out of once).
//!
//! Layout of the mapping (a sealed memfd, `MAP_SHARED` by both ends):
//!
//! ```text
//! 0      magic "RIPCAREN" (u64), data length (u64), ring capacity (u64)
//! 64     free-ring head: written by the receiver only
//! 128    free-ring tail: written by the sender only
//! 192    "sender waits" flag: set by the sender, cleared by the receiver
//! 256    free ring: `cap` entries of (offset u64, sequence u64)
//! data   slots, each starting at a multiple of SLOT_ALIGN from `data`
//! ```
//!
//! The sender alone allocates (its allocator is private memory); the pipe
//! carries a descriptor (offset, length, sequence) per message, in order.
//! The receiver gives a slot back by pushing (offset, sequence) on the free
//! ring and, if the sender said it waits, writing one byte on a notify pipe
//! the sender polls. The notify pipe is also how a waiting sender learns that
//! every receiver is gone (end of file). Everything the peer can write (the
//! ring, the flag, descriptors) is checked before use; see docs/architecture.md
//! ("Arena") for the trust model.

use crate::backend::reactor::RuntimeFd;
use crate::error::{Error, ErrorKind, Result};
pub(crate) use crate::framing::Descriptor;
use crate::framing::HeldSlots;
use crate::sys;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use tokio::io::Interest;

/// Slots start at multiples of this many bytes from the data area.
pub(crate) use crate::framing::SLOT_ALIGN;
const MAGIC: u64 = u64::from_le_bytes(*b"RIPCAREN");
const OFF_HEAD: usize = 64;
const OFF_TAIL: usize = 128;
const OFF_WAITING: usize = 192;
const OFF_RING: usize = 256;

/// Default arena size: room for a few large messages in flight.
pub(crate) const DEFAULT_ARENA: usize = 16 << 20;
/// Default threshold: messages whose archive reaches this size use the arena.
pub(crate) const DEFAULT_THRESHOLD: usize = 32 << 10;

fn protocol(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol, what.into())
}

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access to it goes
// through atomics or through slices whose ownership the slot protocol
// decides, so it may be used from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` is the mapping made in `Arena::map`; the last
        // reference to it (the Arc<Arena>) is going away.
        unsafe { sys::munmap(self.ptr, self.len) };
    }
}

/// One mapping of a channel's arena, shared by everything in this process
/// that uses it (the ends and the messages that borrow slots).
pub(crate) struct Arena {
    map: Mapping,
    memfd: OwnedFd,
    data_off: usize,
    data_len: usize,
    cap: usize,
    /// Set once an end of this channel has been handed to another process:
    /// from then on the peer may be a process that rewrites arena bytes.
    /// Process-local memory, so the peer cannot clear it.
    crossed: AtomicBool,
}

fn layout(data_len: usize) -> (usize, usize) {
    let cap = data_len / SLOT_ALIGN;
    let data_off = (OFF_RING + cap * 16).next_multiple_of(SLOT_ALIGN);
    (cap, data_off)
}

/// The size check of an inherited arena's data area.
fn check_data_len(data_len: usize) -> Result<()> {
    if data_len == 0 || !data_len.is_multiple_of(SLOT_ALIGN) || data_len > 1 << 40 {
        return Err(protocol("inherited arena has an invalid size"));
    }
    Ok(())
}

impl Arena {
    /// A new arena with `data_len` bytes of slots (rounded to whole slots).
    pub(crate) fn create(data_len: usize) -> Result<Arc<Arena>> {
        let data_len = data_len.next_multiple_of(SLOT_ALIGN).max(SLOT_ALIGN);
        let (cap, data_off) = layout(data_len);
        let total = data_off + data_len;
        let memfd = sys::memfd_sealed(c"ringipc-arena", total)
            .map_err(|e| Error::io("arena memfd_create", e))?;
        let arena = Arena::map(memfd, total, data_off, data_len, cap, false)?;
        let h = arena.map.ptr;
        // SAFETY: the mapping is at least 256 bytes, page aligned, and nobody
        // else has it yet.
        unsafe {
            h.cast::<u64>().write(MAGIC);
            h.cast::<u64>().add(1).write(data_len as u64);
            h.cast::<u64>().add(2).write(cap as u64);
        }
        Ok(Arc::new(arena))
    }

    fn map(
        memfd: OwnedFd,
        total: usize,
        data_off: usize,
        data_len: usize,
        cap: usize,
        crossed: bool,
    ) -> Result<Arena> {
        let ptr =
            sys::mmap_shared(memfd.as_raw_fd(), total).map_err(|e| Error::io("arena mmap", e))?;
        Ok(Arena {
            map: Mapping { ptr, len: total },
            memfd,
            data_off,
            data_len,
            cap,
            crossed: AtomicBool::new(crossed),
        })
    }

    /// Maps an arena inherited from another process. Its size must match
    /// what the handle's state says and be sealed, so the peer cannot shrink
    /// it under the mapping (an access past the end would be SIGBUS).
    pub(crate) fn import(memfd: OwnedFd, data_len: usize) -> Result<Arc<Arena>> {
        check_data_len(data_len)?;
        let (cap, data_off) = layout(data_len);
        let total = data_off + data_len;
        let (size, sealed) =
            sys::sealed_size(memfd.as_raw_fd()).map_err(|e| Error::io("arena fstat", e))?;
        if size != total || !sealed {
            return Err(protocol(
                "inherited arena is not a sealed memfd of the announced size",
            ));
        }
        let arena = Arena::map(memfd, total, data_off, data_len, cap, true)?;
        // SAFETY: the mapping holds at least 256 bytes.
        let magic = unsafe { arena.map.ptr.cast::<u64>().read_volatile() };
        if magic != MAGIC {
            return Err(protocol("inherited arena has a bad magic"));
        }
        Ok(Arc::new(arena))
    }

    /// Bytes available for slots.
    pub(crate) fn data_len(&self) -> usize {
        self.data_len
    }

    pub(crate) fn memfd(&self) -> RawFd {
        self.memfd.as_raw_fd()
    }

    /// Whether an end has left this process (or this mapping was inherited).
    pub(crate) fn crossed(&self) -> bool {
        self.crossed.load(Ordering::Acquire)
    }

    pub(crate) fn set_crossed(&self) {
        self.crossed.store(true, Ordering::Release);
    }

    /// The whole mapping, for tests that check where a payload lives.
    pub(crate) fn range(&self) -> std::ops::Range<usize> {
        let start = self.map.ptr as usize;
        start..start + self.map.len
    }

    fn atomic(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off + 8 <= self.data_off && off.is_multiple_of(8));
        // SAFETY: `off` is an 8-aligned offset inside the header, which lives
        // as long as `self`; shared memory is only accessed atomically here.
        unsafe { &*self.map.ptr.add(off).cast::<AtomicU64>() }
    }

    fn ring_entry(&self, i: usize) -> (&AtomicU64, &AtomicU64) {
        let off = OFF_RING + (i % self.cap) * 16;
        (self.atomic(off), self.atomic(off + 8))
    }

    /// Pointer to `offset` in the data area. The caller checked bounds.
    pub(crate) fn data_ptr(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset <= self.data_len);
        // SAFETY: `offset` is within the data area of the mapping.
        unsafe { self.map.ptr.add(self.data_off + offset) }
    }
}

// ---------------------------------------------------------------- allocator

/// The sender's slot allocator: free extents and the slots lent to the
/// receiver. Pure bookkeeping (no shared memory), so it can be tested
/// against a model.
#[derive(Debug, Clone)]
pub struct Slots {
    /// offset -> length of each free extent; adjacent extents are merged.
    free: BTreeMap<usize, usize>,
    /// offset -> (allocated length, sequence) of each slot the receiver holds.
    lent: BTreeMap<usize, (usize, u64)>,
    /// The largest free extent, kept up to date by every change: the sender
    /// asks for it on every message, small ones included.
    largest: Option<(usize, usize)>,
}

impl Slots {
    /// An allocator over `total` bytes (a multiple of the slot alignment).
    pub fn new(total: usize) -> Slots {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        let mut s = Slots {
            free,
            lent: BTreeMap::new(),
            largest: None,
        };
        s.update_largest();
        s
    }

    /// The largest free extent, as (offset, length).
    pub fn largest(&self) -> Option<(usize, usize)> {
        self.largest
    }

    fn update_largest(&mut self) {
        self.largest = self
            .free
            .iter()
            .max_by_key(|(o, l)| (**l, std::cmp::Reverse(**o)))
            .map(|(o, l)| (*o, *l));
    }

    /// Whether nothing is lent: the whole arena is one free extent.
    pub fn all_free(&self) -> bool {
        self.lent.is_empty()
    }

    /// Takes `len` bytes (rounded up to the slot alignment) from the start
    /// of the free extent at `offset` and records them as lent under `seq`.
    /// Returns false if that extent does not exist or is too small.
    pub fn take(&mut self, offset: usize, len: usize, seq: u64) -> bool {
        let need = len.max(1).next_multiple_of(SLOT_ALIGN);
        let Some(&have) = self.free.get(&offset) else {
            return false;
        };
        if have < need {
            return false;
        }
        self.free.remove(&offset);
        if have > need {
            self.free.insert(offset + need, have - need);
        }
        self.lent.insert(offset, (need, seq));
        self.update_largest();
        true
    }

    /// Gives back the slot at `offset` lent under `seq`. Anything else (a
    /// slot not lent, a stale sequence, a second free) is refused.
    pub fn give_back(&mut self, offset: usize, seq: u64) -> std::result::Result<(), &'static str> {
        match self.lent.get(&offset) {
            Some(&(_, s)) if s == seq => {}
            Some(_) => return Err("free of a slot with a stale sequence"),
            None => return Err("free of a slot that is not lent (double free?)"),
        }
        let (len, _) = self.lent.remove(&offset).expect("checked above");
        let mut start = offset;
        let mut len = len;
        if let Some(next) = self.free.remove(&(offset + len)) {
            len += next;
        }
        if let Some((&po, &pl)) = self.free.range(..offset).next_back()
            && po + pl == offset
        {
            self.free.remove(&po);
            start = po;
            len += pl;
        }
        self.free.insert(start, len);
        self.update_largest();
        Ok(())
    }

    /// Slots currently lent, as (offset, length, sequence).
    pub fn lent(&self) -> impl Iterator<Item = (usize, usize, u64)> + '_ {
        self.lent.iter().map(|(o, (l, s))| (*o, *l, *s))
    }

    /// Free bytes in total.
    #[cfg(test)]
    pub fn free_bytes(&self) -> usize {
        self.free.values().sum()
    }
}

// ------------------------------------------------------------- notify pipe

/// The read end of the notify pipe, registered with the tokio reactor of
/// whichever runtime polls it (re-registered when the handle moves).
struct Notify {
    fd: RuntimeFd,
}

impl Notify {
    fn new(fd: OwnedFd) -> io::Result<Notify> {
        sys::set_nonblocking(fd.as_raw_fd(), true)?;
        Ok(Notify {
            fd: RuntimeFd::new(fd, Interest::READABLE),
        })
    }

    fn raw(&self) -> RawFd {
        self.fd.raw().unwrap_or(-1)
    }

    /// Ready when a byte has arrived since the last call (drained) or the
    /// writers are all gone (`Ok(false)`).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let afd = self.fd.registered()?;
        loop {
            let mut guard = ready!(afd.poll_read_ready(cx))?;
            let mut buf = [0u8; 64];
            let mut got = false;
            loop {
                // SAFETY: `buf` is writable for its length.
                match unsafe { sys::read(afd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) } {
                    Ok(0) => return Poll::Ready(Ok(false)),
                    Ok(_) => got = true,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if got {
                return Poll::Ready(Ok(true));
            }
        }
    }
}

// ------------------------------------------------------------------ sender

/// The sender's side of an arena.
pub(crate) struct SendArena {
    pub(crate) arena: Arc<Arena>,
    notify: Notify,
    pub(crate) slots: Slots,
    pub(crate) next_seq: u64,
    /// Our copy of the free-ring tail (the shared one is only written).
    tail: u64,
    pub(crate) threshold: usize,
    /// The last archive stayed below the threshold: the next one is
    /// serialized with the plain frame-buffer writer (see
    /// `SendHalf::try_push_arena`).
    pub(crate) small: bool,
}

/// What a hand-over carries for a sender's arena.
pub(crate) struct SendExport {
    pub(crate) data_len: u64,
    pub(crate) threshold: u64,
    pub(crate) next_seq: u64,
    pub(crate) tail: u64,
    pub(crate) lent: Vec<(u64, u64, u64)>,
}

impl SendArena {
    pub(crate) fn notify_fd(&self) -> RawFd {
        self.notify.raw()
    }

    pub(crate) fn export(&self) -> SendExport {
        self.arena.set_crossed();
        SendExport {
            data_len: self.arena.data_len as u64,
            threshold: self.threshold as u64,
            next_seq: self.next_seq,
            tail: self.tail,
            lent: self
                .slots
                .lent()
                .map(|(o, l, s)| (o as u64, l as u64, s))
                .collect(),
        }
    }

    pub(crate) fn import(memfd: OwnedFd, notify: OwnedFd, st: &SendExport) -> Result<SendArena> {
        // The state is checked before the memfd is mapped.
        let slots = SendArena::lent_slots(st)?;
        let arena = Arena::import(memfd, st.data_len as usize)?;
        Ok(SendArena {
            arena,
            notify: Notify::new(notify).map_err(|e| Error::io("arena notify", e))?,
            slots,
            next_seq: st.next_seq,
            tail: st.tail,
            threshold: st.threshold as usize,
            small: true,
        })
    }

    /// The slot table an inherited sender state describes: its whole data
    /// area, less the slots lent to the receiver.
    pub(crate) fn lent_slots(st: &SendExport) -> Result<Slots> {
        let data_len = usize::try_from(st.data_len).unwrap_or(usize::MAX);
        check_data_len(data_len)?;
        let mut slots = Slots::new(data_len);
        for &(o, l, s) in &st.lent {
            let (Ok(o), Ok(l)) = (usize::try_from(o), usize::try_from(l)) else {
                return Err(protocol("inherited arena state has a slot out of range"));
            };
            if !slots.take_at(o, l, s) {
                return Err(protocol("inherited arena state has overlapping slots"));
            }
        }
        Ok(slots)
    }

    /// Takes every slot the receiver gave back since the last call.
    pub(crate) fn reclaim(&mut self) -> Result<()> {
        let head = self.arena.atomic(OFF_HEAD).load(Ordering::Acquire);
        if head == self.tail {
            // Nothing freed: the common case for a stream of small messages,
            // which must not touch the shared tail's cache line.
            return Ok(());
        }
        let pending = head.wrapping_sub(self.tail);
        if pending > self.arena.cap as u64 {
            return Err(protocol("arena free ring overrun by the receiver"));
        }
        while self.tail != head {
            let (o, s) = self.arena.ring_entry(self.tail as usize);
            let (offset, seq) = (o.load(Ordering::Relaxed), s.load(Ordering::Relaxed));
            self.tail = self.tail.wrapping_add(1);
            if let Err(what) = self.slots.give_back(offset as usize, seq) {
                return Err(protocol(format!("arena: receiver sent a bad free: {what}")));
            }
        }
        self.arena
            .atomic(OFF_TAIL)
            .store(self.tail, Ordering::Release);
        Ok(())
    }

    /// Waits until the largest free extent is larger than `tried` bytes or
    /// nothing is lent. Cancellation-safe: it only reads shared state and
    /// drains the notify pipe; a wake-up that arrives after the future is
    /// dropped leaves a byte in the pipe, which only causes a spurious check.
    pub(crate) fn poll_space(&mut self, cx: &mut Context<'_>, tried: usize) -> Poll<Result<()>> {
        let arena = self.arena.clone();
        let waiting = arena.atomic(OFF_WAITING);
        loop {
            self.reclaim()?;
            if self.enough(tried) {
                return Poll::Ready(Ok(()));
            }
            waiting.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            self.reclaim()?;
            if self.enough(tried) {
                waiting.store(0, Ordering::Relaxed);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.notify.poll(cx)) {
                Ok(true) => {}
                Ok(false) => {
                    // Every receiver is gone. Take what it freed last.
                    self.reclaim()?;
                    if self.enough(tried) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(Error::new(
                        ErrorKind::Closed,
                        "send: the receiver is gone while the arena is full",
                    )));
                }
                Err(e) => return Poll::Ready(Err(Error::io("arena notify", e))),
            }
        }
    }

    fn enough(&self, tried: usize) -> bool {
        self.slots.all_free() || self.slots.largest().is_some_and(|(_, l)| l > tried)
    }
}

impl Slots {
    /// Records `[offset, offset+len)` (rounded) as lent wherever it lies in a
    /// free extent. Used to rebuild a handed-over sender's allocator.
    pub fn take_at(&mut self, offset: usize, len: usize, seq: u64) -> bool {
        // The table comes from another process: a slot off the slot grid
        // or of a length that overflows is refused, not taken.
        let Some(need) = len.max(1).checked_next_multiple_of(SLOT_ALIGN) else {
            return false;
        };
        if !offset.is_multiple_of(SLOT_ALIGN) {
            return false;
        }
        let Some((&fo, &fl)) = self.free.range(..=offset).next_back() else {
            return false;
        };
        if offset.checked_add(need).is_none_or(|end| end > fo + fl) {
            return false;
        }
        self.free.remove(&fo);
        if offset > fo {
            self.free.insert(fo, offset - fo);
        }
        if fo + fl > offset + need {
            self.free.insert(offset + need, fo + fl - offset - need);
        }
        self.lent.insert(offset, (need, seq));
        self.update_largest();
        true
    }
}

// ---------------------------------------------------------------- receiver

struct RecvState {
    /// The slots messages of this process still hold, and the due sequence.
    held: HeldSlots,
    /// The slot lent to the `Message` of the last `recv` (freed on the next).
    current: Option<Held>,
    /// Our copy of the free-ring head (the shared one is only written).
    head: u64,
}

/// The receiver's side of an arena, shared with the messages that hold
/// slots (they give them back when dropped, from any thread).
pub(crate) struct RecvArena {
    pub(crate) arena: Arc<Arena>,
    /// Write end of the notify pipe; closed when the receiver handle goes
    /// (messages that outlive it still give slots back, without waking).
    notify: Mutex<Option<OwnedFd>>,
    state: Mutex<RecvState>,
    /// Read in place even across processes (the user vouched for the peer).
    pub(crate) trusted: bool,
}

/// A slot the receiver accepted: where its bytes are.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Held {
    pub(crate) offset: u64,
    pub(crate) len: usize,
    pub(crate) seq: u64,
}

impl RecvArena {
    pub(crate) fn new(
        arena: Arc<Arena>,
        notify: OwnedFd,
        next_seq: u64,
        head: u64,
        trusted: bool,
    ) -> RecvArena {
        RecvArena {
            arena,
            notify: Mutex::new(Some(notify)),
            state: Mutex::new(RecvState {
                held: HeldSlots::new(next_seq),
                current: None,
                head,
            }),
            trusted,
        }
    }

    fn lock(&self) -> MutexGuard<'_, RecvState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn notify_fd(&self) -> RawFd {
        let n = self.notify.lock().unwrap_or_else(|p| p.into_inner());
        n.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }

    /// The receiver handle is gone: a waiting sender sees end of file.
    pub(crate) fn close_notify(&self) {
        self.notify.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// State for a hand-over: (next sequence, ring head). Refused while
    /// messages of this process still hold slots: after the move they would
    /// be given back by two processes at once.
    pub(crate) fn export(&self) -> Result<(u64, u64)> {
        self.release_current();
        let st = self.lock();
        if !st.held.is_empty() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "cannot hand over a receiver while messages it received still hold arena slots",
            ));
        }
        self.arena.set_crossed();
        Ok((st.held.next_seq(), st.head))
    }

    /// Whether messages are read in place (else copied out first).
    pub(crate) fn in_place(&self) -> bool {
        self.trusted || !self.arena.crossed()
    }

    /// Checks an untrusted descriptor and records its slot as held.
    pub(crate) fn accept(&self, d: &Descriptor) -> Result<Held> {
        let mut st = self.lock();
        st.held
            .accept(d, self.arena.data_len as u64)
            .map_err(protocol)?;
        Ok(Held {
            offset: d.offset,
            len: d.len as usize,
            seq: d.seq,
        })
    }

    /// The bytes of a held slot.
    ///
    /// # Safety
    /// `h` must be held (accepted and not yet released), and the returned
    /// slice must not outlive the release. The bytes may be changed by a
    /// misbehaving peer process: only validate them in place when
    /// [`RecvArena::in_place`] says so.
    pub(crate) unsafe fn bytes(&self, h: &Held) -> &[u8] {
        // SAFETY: `accept` checked that the slot lies inside the data area;
        // the slot is ours until released (the caller's contract).
        unsafe { std::slice::from_raw_parts(self.arena.data_ptr(h.offset as usize), h.len) }
    }

    pub(crate) fn set_current(&self, h: Held) {
        let old = self.lock().current.replace(h);
        if let Some(old) = old {
            self.release(&old);
        }
    }

    pub(crate) fn release_current(&self) {
        let cur = self.lock().current.take();
        if let Some(h) = cur {
            self.release(&h);
        }
    }

    /// Copies a held slot's bytes into `out` (replacing its contents) with a
    /// plain memcpy: no reference to shared memory is formed, so a peer that
    /// writes the slot meanwhile only garbles the copy, which is validated
    /// afterwards like any untrusted bytes.
    pub(crate) fn copy_out(&self, h: &Held, out: &mut rkyv::util::AlignedVec<16>) {
        out.clear();
        out.reserve(h.len);
        let src = self.arena.data_ptr(h.offset as usize);
        // SAFETY: `accept` checked the slot lies inside the data area; `out`
        // has room for `h.len` bytes after `reserve`, and private memory
        // cannot overlap the shared mapping. `set_len` covers exactly the
        // bytes just written.
        unsafe {
            std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), h.len);
            out.set_len(h.len);
        }
    }

    /// Gives a slot back to the sender (wakes it if it waits).
    pub(crate) fn release(&self, h: &Held) {
        let mut st = self.lock();
        if !st.held.release(h.offset) {
            return;
        }
        let tail = self.arena.atomic(OFF_TAIL).load(Ordering::Acquire);
        if st.head.wrapping_sub(tail) >= self.arena.cap as u64 {
            // Only a sender that rewrote its tail makes the ring look full;
            // its slot stays lent, which costs only the peer.
            return;
        }
        let (o, s) = self.arena.ring_entry(st.head as usize);
        o.store(h.offset, Ordering::Relaxed);
        s.store(h.seq, Ordering::Relaxed);
        st.head = st.head.wrapping_add(1);
        self.arena
            .atomic(OFF_HEAD)
            .store(st.head, Ordering::Release);
        drop(st);
        fence(Ordering::SeqCst);
        let waiting = self.arena.atomic(OFF_WAITING);
        if waiting.load(Ordering::Relaxed) != 0 && waiting.swap(0, Ordering::SeqCst) != 0 {
            // A full pipe (EAGAIN) means the sender has wake-ups pending
            // already; an error means it is gone. Either way nothing to do.
            let n = self.notify.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(fd) = n.as_ref() {
                let _ = sys::write(fd.as_raw_fd(), &[1]);
            }
        }
    }
}

// ---------------------------------------------------------------- creation

/// Options for a channel's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ArenaConfig {
    pub(crate) size: usize,
    pub(crate) threshold: usize,
    pub(crate) trusted: bool,
}

/// A new arena and its two sides.
pub(crate) fn pair(cfg: &ArenaConfig) -> Result<(SendArena, Arc<RecvArena>)> {
    let arena = Arena::create(cfg.size)?;
    let (r, w) = sys::pipe().map_err(|e| Error::io("arena notify pipe", e))?;
    sys::set_nonblocking(w.as_raw_fd(), true).map_err(|e| Error::io("arena notify pipe", e))?;
    let slots = Slots::new(arena.data_len);
    Ok((
        SendArena {
            arena: arena.clone(),
            notify: Notify::new(r).map_err(|e| Error::io("arena notify", e))?,
            slots,
            next_seq: 0,
            tail: 0,
            threshold: cfg.threshold,
            small: true,
        },
        Arc::new(RecvArena::new(arena, w, 0, 0, cfg.trusted)),
    ))
}

/// Imports a receiver's arena side in a child.
pub(crate) fn import_recv(
    memfd: OwnedFd,
    notify: OwnedFd,
    data_len: usize,
    next_seq: u64,
    head: u64,
    trusted: bool,
) -> Result<Arc<RecvArena>> {
    let arena = Arena::import(memfd, data_len)?;
    sys::set_nonblocking(notify.as_raw_fd(), true).map_err(|e| Error::io("arena notify", e))?;
    Ok(Arc::new(RecvArena::new(
        arena, notify, next_seq, head, trusted,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: one bool per slot-sized page.
    #[derive(Debug, Clone, Copy)]
    enum Op {
        Take(usize),
        Free(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1usize..5 * SLOT_ALIGN).prop_map(Op::Take),
            (0usize..64).prop_map(Op::Free),
        ]
    }

    proptest! {
        #[test]
        fn allocator_matches_model(ops in proptest::collection::vec(op(), 1..200)) {
            let pages = 16;
            let mut s = Slots::new(pages * SLOT_ALIGN);
            let mut model = vec![false; pages];
            let mut lent: Vec<(usize, usize, u64)> = Vec::new();
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Take(len) => {
                        let need = len.div_ceil(SLOT_ALIGN);
                        let largest = s.largest();
                        // The largest extent is a maximal run of free pages in the model.
                        let mut best = 0;
                        let mut run = 0;
                        for &used in &model {
                            run = if used { 0 } else { run + 1 };
                            best = best.max(run);
                        }
                        prop_assert_eq!(largest.map_or(0, |(_, l)| l / SLOT_ALIGN), best);
                        if let Some((o, l)) = largest && l >= need * SLOT_ALIGN {
                            prop_assert!(s.take(o, len, seq));
                            for p in &mut model[o / SLOT_ALIGN..o / SLOT_ALIGN + need] {
                                prop_assert!(!*p, "handed out a page twice");
                                *p = true;
                            }
                            lent.push((o, need, seq));
                            seq += 1;
                        } else if let Some((o, _)) = largest {
                            prop_assert!(!s.take(o, len, seq));
                        }
                    }
                    Op::Free(i) => {
                        if lent.is_empty() {
                            prop_assert!(s.give_back(0, 999).is_err());
                            continue;
                        }
                        let (o, n, sq) = lent.remove(i % lent.len());
                        // A stale sequence is refused and changes nothing.
                        prop_assert!(s.give_back(o, sq + 1000).is_err());
                        prop_assert!(s.give_back(o, sq).is_ok());
                        prop_assert!(s.give_back(o, sq).is_err(), "double free accepted");
                        for p in &mut model[o / SLOT_ALIGN..o / SLOT_ALIGN + n] {
                            *p = false;
                        }
                    }
                }
                let free_pages = model.iter().filter(|p| !**p).count();
                prop_assert_eq!(s.free_bytes(), free_pages * SLOT_ALIGN);
                // Free extents are maximal: no two touch.
                let ext: Vec<_> = s.free.iter().map(|(o, l)| (*o, *l)).collect();
                for w in ext.windows(2) {
                    prop_assert!(w[0].0 + w[0].1 < w[1].0, "unmerged extents {:?}", w);
                }
            }
            for (o, _, sq) in lent {
                prop_assert!(s.give_back(o, sq).is_ok());
            }
            prop_assert_eq!(s.largest(), Some((0, pages * SLOT_ALIGN)));
        }

        #[test]
        fn take_at_rebuilds_what_take_made(lens in proptest::collection::vec(1usize..3 * SLOT_ALIGN, 1..10)) {
            let mut a = Slots::new(64 * SLOT_ALIGN);
            for (i, len) in lens.iter().enumerate() {
                let (o, _) = a.largest().unwrap();
                prop_assert!(a.take(o, *len, i as u64));
            }
            // Free every other one, then rebuild from the lent list.
            let lent: Vec<_> = a.lent().collect();
            for (o, _, s) in lent.iter().step_by(2) {
                a.give_back(*o, *s).unwrap();
            }
            let mut b = Slots::new(64 * SLOT_ALIGN);
            for (o, l, s) in a.lent() {
                prop_assert!(b.take_at(o, l, s));
            }
            prop_assert_eq!(&a.free, &b.free);
            prop_assert_eq!(&a.lent, &b.lent);
        }
    }

    /// Found by fuzz/child_spec: an inherited sender state lending a slot
    /// off the slot grid was accepted (the table then handed out unaligned
    /// slots the receiver refuses), and a length near `usize::MAX`
    /// overflowed.
    #[test]
    fn take_at_refuses_unaligned_and_overflowing_slots() {
        let mut s = Slots::new(16 * SLOT_ALIGN);
        assert!(!s.take_at(SLOT_ALIGN + 1024, 10, 0));
        assert!(!s.take_at(0, usize::MAX - 10, 0));
        assert_eq!(s.largest(), Some((0, 16 * SLOT_ALIGN)));
        assert!(s.take_at(SLOT_ALIGN, 10, 0));
    }

    #[test]
    fn descriptor_roundtrip_and_reserved() {
        let d = Descriptor {
            offset: 4096,
            len: 77,
            seq: 3,
        };
        assert_eq!(Descriptor::decode(&d.encode()).unwrap(), d);
        let mut b = d.encode();
        b[31] = 1;
        assert!(Descriptor::decode(&b).is_err());
        assert!(Descriptor::decode(&b[..31]).is_err());
    }
}
