//! One datagram with file descriptors attached (`SCM_RIGHTS`), laid out for
//! `sendmsg`/`recvmsg` and for io_uring's `SENDMSG`/`RECVMSG`, which read
//! and write the same `msghdr` asynchronously.
//!
//! A [`MsgBuf`] is boxed, so the `msghdr`, the `iovec` and the buffers it
//! points at keep their addresses while the kernel may use them. Written by
//! hand because no crate offers an owned, movable-by-box msghdr whose
//! control buffer can be handed to io_uring (nix builds them on the stack
//! for synchronous calls only).

use rkyv::util::AlignedVec;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// The kernel's limit on fds in one `SCM_RIGHTS` message (`SCM_MAX_FD`).
pub(crate) const SCM_MAX_FD: usize = 253;

/// A datagram to send or a buffer to receive one into.
pub(crate) struct MsgBuf {
    hdr: libc::msghdr,
    iov: libc::iovec,
    /// Send: the datagram. Receive: room for one, 16-byte aligned so an
    /// archive inside it can be read in place.
    data: AlignedVec<16>,
    /// The control buffer, in u64 words (cmsghdr's alignment).
    control: Vec<u64>,
    /// Send only: the attached fds, open until the kernel is done with the
    /// message (it looks the numbers up when the send runs, which for a
    /// queued io_uring send may be after the caller moved on).
    fds: Vec<OwnedFd>,
    /// Receive only: the control buffer may hold fds the kernel installed
    /// that nobody took yet; they are closed on drop.
    receiving: bool,
}

// SAFETY: the raw pointers in `hdr` and `iov` point into this same value's
// heap buffers (and at its own `iov`), never at thread-local or borrowed
// memory; moving the box to another thread moves what they point at with it.
unsafe impl Send for MsgBuf {}

/// What `recvmsg` delivered.
pub(crate) struct Received {
    /// Bytes of the datagram.
    pub len: usize,
    /// `MSG_TRUNC`: the datagram was longer than the buffer.
    pub truncated: bool,
    /// `MSG_CTRUNC`: more fds came than the control buffer had room for
    /// (the kernel closed the rest).
    pub fds_truncated: bool,
    /// The fds installed in this process, in order.
    pub fds: Vec<OwnedFd>,
    /// A control message other than `SCM_RIGHTS` arrived.
    pub foreign_control: bool,
}

impl Received {
    /// No fds, no truncation, no other ancillary data.
    pub(crate) fn is_plain(&self) -> bool {
        self.fds.is_empty() && !self.truncated && !self.fds_truncated && !self.foreign_control
    }
}

fn control_words(max_fds: usize) -> usize {
    if max_fds == 0 {
        return 0;
    }
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((max_fds * size_of::<RawFd>()) as u32) } as usize;
    space.div_ceil(8)
}

impl MsgBuf {
    /// A datagram of `data` carrying `fds`.
    pub(crate) fn send(data: &[u8], fds: Vec<OwnedFd>) -> Box<MsgBuf> {
        let mut buf = AlignedVec::with_capacity(data.len());
        buf.extend_from_slice(data);
        let mut m = Box::new(MsgBuf {
            // SAFETY: a zeroed msghdr is a valid value (null pointers, zero lengths).
            hdr: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            data: buf,
            control: vec![0u64; control_words(fds.len())],
            fds,
            receiving: false,
        });
        m.arm(m.data.len());
        if !m.fds.is_empty() {
            let payload = m.fds.len() * size_of::<RawFd>();
            // SAFETY: `arm` pointed the header at a control buffer of
            // CMSG_SPACE(payload) bytes, so the first cmsghdr and its data
            // lie inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&m.hdr);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
                let mut p = libc::CMSG_DATA(c).cast::<RawFd>();
                for fd in &m.fds {
                    p.write_unaligned(std::os::fd::AsRawFd::as_raw_fd(fd));
                    p = p.add(1);
                }
            }
        }
        m
    }

    /// Room for a datagram of up to `cap` bytes with up to `max_fds` fds.
    pub(crate) fn recv(cap: usize, max_fds: usize) -> Box<MsgBuf> {
        let mut data = AlignedVec::with_capacity(cap);
        data.resize(cap, 0);
        let mut m = Box::new(MsgBuf {
            // SAFETY: a zeroed msghdr is a valid value.
            hdr: unsafe { std::mem::zeroed() },
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            data,
            control: vec![0u64; control_words(max_fds)],
            fds: Vec::new(),
            receiving: true,
        });
        m.arm(cap);
        m
    }

    /// Points the header at this value's own buffers (`len` data bytes).
    fn arm(&mut self, len: usize) {
        self.iov.iov_base = self.data.as_mut_ptr().cast();
        self.iov.iov_len = len;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        if self.control.is_empty() {
            self.hdr.msg_control = std::ptr::null_mut();
            self.hdr.msg_controllen = 0;
        } else {
            self.hdr.msg_control = self.control.as_mut_ptr().cast();
            self.hdr.msg_controllen = (self.control.len() * 8) as _;
        }
        self.hdr.msg_flags = 0;
    }

    /// Readies a receive buffer for the next `recvmsg` (the kernel rewrote
    /// the control length and flags of the last one).
    pub(crate) fn rearm_recv(&mut self) {
        debug_assert!(self.receiving);
        let cap = self.data.len();
        self.arm(cap);
    }

    /// The header, for `sendmsg`/`recvmsg` or an io_uring entry.
    pub(crate) fn hdr(&mut self) -> *mut libc::msghdr {
        &mut self.hdr
    }

    /// The datagram's bytes (after a receive: up to [`Received::len`]).
    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    /// A send buffer's datagram and fds, taken out (a hand-over carries a
    /// datagram the kernel never sent to the handle's next owner).
    pub(crate) fn into_unsent(mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        debug_assert!(!self.receiving);
        let bytes = self.data.to_vec();
        (bytes, std::mem::take(&mut self.fds))
    }

    /// Whether this is a receive buffer.
    pub(crate) fn is_recv(&self) -> bool {
        self.receiving
    }

    /// After a receive of `n` bytes: the datagram's length and flags, and
    /// the fds the kernel installed (taken: they are closed when dropped).
    pub(crate) fn take_received(&mut self, n: usize) -> Received {
        let flags = self.hdr.msg_flags;
        let (fds, foreign_control) = self.take_fds();
        Received {
            len: n.min(self.data.len()),
            truncated: flags & libc::MSG_TRUNC != 0,
            fds_truncated: flags & libc::MSG_CTRUNC != 0,
            fds,
            foreign_control,
        }
    }

    /// Takes every fd the control buffer names and clears it, so none is
    /// taken twice. Walks only cmsghdrs inside `msg_controllen` whose length
    /// fits there; a buffer the kernel never wrote is all zeros and yields
    /// nothing.
    fn take_fds(&mut self) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        let mut foreign = false;
        if self.control.is_empty() {
            return (fds, foreign);
        }
        let cap = self.control.len() * 8;
        // msg_controllen is a size_t with glibc, a socklen_t with musl.
        #[allow(clippy::unnecessary_cast)]
        let len = (self.hdr.msg_controllen as usize).min(cap);
        let base = self.control.as_ptr().cast::<u8>();
        let hdr_len = size_of::<libc::cmsghdr>();
        let mut off = 0usize;
        while off + hdr_len <= len {
            // SAFETY: `off + hdr_len <= len <= cap`, so the header lies in the
            // buffer; it is read unaligned-safe by copying it out.
            let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(base.add(off).cast()) };
            let clen = c.cmsg_len as usize;
            // SAFETY: CMSG_LEN is a pure size computation.
            let data_off = unsafe { libc::CMSG_LEN(0) } as usize;
            if clen < data_off || off + clen > len {
                break;
            }
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
                let n = (clen - data_off) / size_of::<RawFd>();
                for i in 0..n {
                    // SAFETY: inside the cmsg's data, which lies in the buffer.
                    let fd: RawFd = unsafe {
                        std::ptr::read_unaligned(
                            base.add(off + data_off + i * size_of::<RawFd>()).cast(),
                        )
                    };
                    if fd >= 0 {
                        // SAFETY: the kernel installed this fd in our table
                        // for this message; nothing else owns it, and the
                        // buffer is cleared below so it is taken once.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            } else if c.cmsg_level != 0 || c.cmsg_type != 0 {
                foreign = true;
            }
            // The next header starts at CMSG_ALIGN(cmsg_len).
            let align = size_of::<usize>();
            off += (clen + align - 1) & !(align - 1);
        }
        self.control.fill(0);
        self.hdr.msg_controllen = 0;
        (fds, foreign)
    }
}

impl Drop for MsgBuf {
    fn drop(&mut self) {
        if self.receiving {
            // A receive that completed but was never looked at (its handle
            // went away, or a cancellation lost the race with a datagram):
            // close the fds it brought.
            drop(self.take_fds());
        }
    }
}

/// What stopping a socket's operation in flight left behind.
pub(crate) enum Settled {
    /// A send the kernel had not done: the datagram, still to be sent.
    Unsent(Box<MsgBuf>),
    /// A send that was done, or failed: nothing to carry.
    Sent,
    /// A receive: its buffer, and the length of a datagram that arrived
    /// before the cancellation took hold (0 if none).
    Received(usize, Box<MsgBuf>),
}

impl Settled {
    /// The datagram and fds of a send that did not happen.
    pub(crate) fn unsent(self) -> Option<(Vec<u8>, Vec<OwnedFd>)> {
        match self {
            Settled::Unsent(m) => Some((*m).into_unsent()),
            _ => None,
        }
    }

    /// A receive's length and buffer.
    pub(crate) fn received(self) -> Option<(usize, Box<MsgBuf>)> {
        match self {
            Settled::Received(n, m) => Some((n, m)),
            _ => None,
        }
    }
}
