//! Fd channels: fds, sockets and ringipc's own channel ends inside typed
//! messages (`SCM_RIGHTS`), hostile ancillary data, cancellation, handles
//! that move across threads and into children. Every case runs on both
//! backends and both start modes. `harness = false` so children can
//! re-execute this binary.

mod common;

use ringipc::{
    Backend, BytesReceiver, ChannelConfig, ErrorKind, Fd, FdChannelConfig, FdReceiver, FdSender,
    Inherit, Process, Sender,
};
use rkyv::{Archive, Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// An anonymous file (memfd) holding `content`, positioned at its start.
fn memfile(content: &[u8]) -> File {
    // SAFETY: a valid C string, no flags beyond close-on-exec.
    let fd = unsafe { libc::memfd_create(c"ringipc-fd-channel-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.write_all(content).unwrap();
    f.rewind().unwrap();
    f
}

fn read_all(mut f: File) -> String {
    let mut s = String::new();
    f.rewind().unwrap();
    f.read_to_string(&mut s).unwrap();
    s
}

fn cfg(b: Backend) -> FdChannelConfig {
    FdChannelConfig::new().backend(b)
}

#[derive(Archive, Serialize, Deserialize)]
struct Bundle {
    name: String,
    files: Vec<Fd<File>>,
    maybe: Option<Fd<OwnedFd>>,
    #[rkyv(with = Inherit)]
    stream: UnixStream,
    tcp: Fd<TcpStream>,
}

/// Files, raw fds, Unix and TCP sockets, nested in a Vec, an Option and a
/// struct, arrive as working values of the same types.
fn fds_of_every_kind_nested(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = cfg(b).channel::<Bundle>().unwrap();
        assert_eq!((tx.backend(), rx.backend()), (b, b));
        let (pipe_r, pipe_w) = std::io::pipe().unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        tx.send(Bundle {
            name: "bundle".into(),
            files: vec![Fd(memfile(b"one")), Fd(memfile(b"two"))],
            maybe: Some(Fd(OwnedFd::from(pipe_w))),
            stream: theirs,
            tcp: Fd(server),
        })
        .await
        .unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(got.name, "bundle");
        let texts: Vec<String> = got.files.into_iter().map(|f| read_all(f.0)).collect();
        assert_eq!(texts, ["one", "two"]);
        let mut w = File::from(got.maybe.unwrap().0);
        w.write_all(b"through the pipe").unwrap();
        drop(w);
        let mut s = String::new();
        let mut pipe_r = pipe_r;
        pipe_r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the pipe");
        let mut stream = got.stream;
        stream.write_all(b"unix").unwrap();
        let mut buf = [0u8; 4];
        let mut ours = ours;
        ours.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"unix");
        let mut tcp = got.tcp.0;
        tcp.write_all(b"tcp!").unwrap();
        let mut client = client;
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"tcp!");
    });
}

#[derive(Archive, Serialize, Deserialize)]
struct Ends {
    data: Sender<u64>,
    bytes: BytesReceiver,
    back: FdSender<Fd<File>>,
}

/// ringipc's own channel ends travel inside messages: a typed sender, a
/// bytes receiver and another fd channel's sender, each working after the
/// move (the pipe channels carry on from where they were).
fn channel_ends_inside_messages(b: Backend) {
    common::block_on(async {
        let ch = ChannelConfig::new().backend(b);
        let (data_tx, mut data_rx) = ch.pipe::<u64>().unwrap();
        let (mut bytes_tx, bytes_rx) = ch.bytes_pipe().unwrap();
        let (back_tx, mut back_rx) = cfg(b).channel::<Fd<File>>().unwrap();
        bytes_tx.send(b"queued before the move").await.unwrap();
        let (mut tx, mut rx) = cfg(b).channel::<Ends>().unwrap();
        tx.send(Ends {
            data: data_tx,
            bytes: bytes_rx,
            back: back_tx,
        })
        .await
        .unwrap();
        let mut ends = rx.recv().await.unwrap();
        ends.data.send(&7).await.unwrap();
        assert_eq!(data_rx.recv().await.unwrap().to_native(), 7);
        assert_eq!(ends.bytes.recv().await.unwrap(), b"queued before the move");
        bytes_tx.send(b"after").await.unwrap();
        assert_eq!(ends.bytes.recv().await.unwrap(), b"after");
        ends.back.send(Fd(memfile(b"returned"))).await.unwrap();
        assert_eq!(read_all(back_rx.recv().await.unwrap().0), "returned");
        drop(ends);
        let e = back_rx.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    });
}

/// Thousands of messages with fds leave the fd count where it was, and a
/// closed sender ends the stream with `Closed`.
fn fd_counts_stay_flat(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = cfg(b).channel::<(u32, Fd<File>)>().unwrap();
        let f = memfile(b"x");
        // Warm up what the backend keeps per thread and runtime.
        tx.send((0, Fd(f.try_clone().unwrap()))).await.unwrap();
        drop(rx.recv().await.unwrap());
        let before = open_fds();
        for i in 1..=2_000u32 {
            tx.send((i, Fd(f.try_clone().unwrap()))).await.unwrap();
            let (n, file) = rx.recv().await.unwrap();
            assert_eq!(n, i);
            drop(file);
        }
        assert_eq!(open_fds(), before, "fds leaked over 2,000 messages");
        drop(tx);
        let e = rx.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        let e = rx.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    });
}

/// Over the fd or size limit: a typed error before anything is sent, and
/// the channel goes on. Bad settings are refused.
fn limits_are_errors_and_lose_nothing(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = cfg(b)
            .max_fds(2)
            .max_message(1024)
            .channel::<(Vec<Fd<File>>, Vec<u8>)>()
            .unwrap();
        let before = open_fds();
        let three = (0..3).map(|_| Fd(memfile(b"f"))).collect();
        let e = tx.send((three, vec![])).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        let e = tx.send((vec![], vec![0; 4096])).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FrameTooLarge, "{e}");
        assert_eq!(open_fds(), before, "a refused message leaked its fds");
        tx.send((vec![Fd(memfile(b"ok"))], vec![1])).await.unwrap();
        let (files, data) = rx.recv().await.unwrap();
        assert_eq!((files.len(), data), (1, vec![1]));
        // A receiver gone with a message unread: the next send is Closed.
        tx.send((vec![], vec![2])).await.unwrap();
        drop(rx);
        let e = tx.send((vec![], vec![3])).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
        for bad in [
            FdChannelConfig::new().max_fds(254),
            FdChannelConfig::new().max_message(8),
            FdChannelConfig::new().max_message(1 << 20),
        ] {
            let e = bad.channel::<u8>().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        }
        let (pipe_r, _w) = std::io::pipe().unwrap();
        let e = cfg(b)
            .receiver_from::<u8>(OwnedFd::from(pipe_r))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    });
}

/// Sends one raw datagram with `fds` attached, as a hostile peer would.
fn raw_send(sock: RawFd, data: &[u8], fds: &[RawFd]) {
    let space = if fds.is_empty() {
        0
    } else {
        // SAFETY: a pure size computation.
        unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) as usize }
    };
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; every pointer set below is live.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsghdr with room for `fds`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                std::mem::size_of_val(fds),
            );
        }
    }
    // SAFETY: `msg` describes live buffers.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    assert_eq!(
        n,
        data.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

/// A datagram as ringipc writes it: header, then `archive`.
fn datagram(fds: u32, archive: &[u8]) -> Vec<u8> {
    let mut d = b"RIFD".to_vec();
    d.extend_from_slice(&fds.to_le_bytes());
    d.extend_from_slice(&(archive.len() as u32).to_le_bytes());
    d.extend_from_slice(&[0; 4]);
    d.extend_from_slice(archive);
    d
}

/// Hostile datagrams: each is a typed error for that `recv`, every fd it
/// brought is closed, and the next datagram is read as usual.
fn hostile_datagrams_are_refused_without_leaks(b: Backend) {
    common::block_on(async {
        let (peer, mine) = seqpacket_pair();
        let mut rx: FdReceiver<(u32, Option<Fd<File>>)> = cfg(b)
            .max_fds(2)
            .max_message(256)
            .receiver_from(mine)
            .unwrap();
        let plain = rkyv::to_bytes::<rkyv::rancor::Error>(&(7u32, None::<Fd<File>>)).unwrap();
        let one = memfile(b"1");
        let two = memfile(b"2");
        let many: Vec<File> = (0..5).map(|_| memfile(b"m")).collect();
        let many_raw: Vec<RawFd> = many.iter().map(|f| f.as_raw_fd()).collect();
        // Warm up: a valid message, so per-runtime state exists.
        raw_send(peer.as_raw_fd(), &datagram(0, &plain), &[]);
        assert_eq!(rx.recv().await.unwrap().0, 7);
        let before = open_fds();

        let cases: Vec<(&str, Vec<u8>, Vec<RawFd>, ErrorKind)> = vec![
            (
                "more fds than announced",
                datagram(0, &plain),
                vec![one.as_raw_fd()],
                ErrorKind::Protocol,
            ),
            (
                "fds with a message that holds none",
                datagram(2, &plain),
                vec![one.as_raw_fd(), two.as_raw_fd()],
                ErrorKind::Protocol,
            ),
            (
                "more fds than max_fds (MSG_CTRUNC)",
                datagram(5, &plain),
                many_raw.clone(),
                ErrorKind::Protocol,
            ),
            (
                "longer than max_message (MSG_TRUNC)",
                datagram(1, &vec![0u8; 1024]),
                vec![one.as_raw_fd()],
                ErrorKind::Protocol,
            ),
            (
                "bad magic",
                {
                    let mut d = datagram(1, &plain);
                    d[0] = b'X';
                    d
                },
                vec![one.as_raw_fd()],
                ErrorKind::Protocol,
            ),
            (
                "shorter than a header",
                b"RIFD".to_vec(),
                vec![one.as_raw_fd()],
                ErrorKind::Protocol,
            ),
            (
                "an empty datagram (not the end of the stream)",
                Vec::new(),
                vec![],
                ErrorKind::Protocol,
            ),
            (
                "garbage archive",
                datagram(1, &[0xff; 64]),
                vec![one.as_raw_fd()],
                ErrorKind::InvalidMessage,
            ),
        ];
        for (what, data, fds, kind) in cases {
            raw_send(peer.as_raw_fd(), &data, &fds);
            let e = rx.recv().await.unwrap_err();
            assert_eq!(e.kind(), kind, "{what}: {e}");
            assert_eq!(open_fds(), before, "{what}: fds leaked");
            // The channel goes on.
            raw_send(peer.as_raw_fd(), &datagram(0, &plain), &[]);
            assert_eq!(rx.recv().await.unwrap().0, 7, "{what}: next message");
        }
        // The control buffer has room for whole words: with max_fds 1 a
        // second fd fits, and is refused all the same.
        let (peer1, mine1) = seqpacket_pair();
        let mut rx1: FdReceiver<(u32, Option<Fd<File>>)> =
            cfg(b).max_fds(1).receiver_from(mine1).unwrap();
        let with_one = rkyv::to_bytes::<rkyv::rancor::Error>(&(1u32, None::<Fd<File>>)).unwrap();
        raw_send(
            peer1.as_raw_fd(),
            &datagram(2, &with_one),
            &[one.as_raw_fd(), two.as_raw_fd()],
        );
        let e = rx1.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.to_string().contains("max_fds"), "{e}");
        drop((peer1, rx1));
        assert_eq!(open_fds(), before, "fds leaked");

        drop(peer);
        let e = rx.recv().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    });
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two fds.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: socketpair made two fds owned by nothing else.
    unsafe {
        (
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[0]),
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]),
        )
    }
}

/// A receive cancelled by a timeout loses nothing; a receive left pending
/// on a thread that then exits is taken over by the next thread.
fn cancel_and_move_lose_nothing(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = cfg(b).channel::<(u32, Fd<File>)>().unwrap();
        let e = rx
            .recv_timeout(Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
        tx.send((1, Fd(memfile(b"a")))).await.unwrap();
        let (n, f) = rx.recv().await.unwrap();
        assert_eq!((n, read_all(f.0).as_str()), (1, "a"));

        // Pending on a short-lived thread's runtime, then moved.
        let rx = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let e = rx
                    .recv_timeout(Duration::from_millis(20))
                    .await
                    .unwrap_err();
                assert_eq!(e.kind(), ErrorKind::TimedOut, "{e}");
            });
            rx
        })
        .join()
        .unwrap();
        let mut rx = rx;
        for i in 2..5u32 {
            tx.send((i, Fd(memfile(b"b")))).await.unwrap();
            let (n, f) = rx.recv().await.unwrap();
            assert_eq!((n, read_all(f.0).as_str()), (i, "b"));
        }

        // A sender bounced across threads, each sending once.
        let mut tx = tx;
        for i in 5..25u32 {
            tx = std::thread::spawn(move || {
                common::block_on(async {
                    tx.send((i, Fd(memfile(b"c")))).await.unwrap();
                });
                tx
            })
            .join()
            .unwrap();
            assert_eq!(rx.recv().await.unwrap().0, i);
        }
    });
}

// ---- child entries ----

/// Receives `count` files and returns their contents, joined.
async fn read_files(mut rx: FdReceiver<Fd<File>>) -> String {
    let mut out = String::new();
    while let Ok(f) = rx.recv().await {
        out.push_str(&read_all(f.0));
    }
    out
}

/// Sends a file back and a channel end that the parent then uses.
async fn send_back(mut tx: FdSender<(Fd<File>, Option<Sender<u32>>)>) {
    let (pipe_tx, mut pipe_rx) = ringipc::pipe::<u32>().unwrap();
    tx.send((Fd(memfile(b"from the child")), Some(pipe_tx)))
        .await
        .unwrap();
    let n = pipe_rx.recv().await.unwrap().to_native();
    tx.send((Fd(memfile(&n.to_le_bytes())), None))
        .await
        .unwrap();
}

/// Fd channel ends as a child's start arguments, in both directions, with a
/// channel end travelling back from the child.
fn ends_handed_to_children(b: Backend) {
    common::block_on(async {
        let (mut tx, rx) = cfg(b).channel::<Fd<File>>().unwrap();
        // Queued before the hand-over: travels with the socket.
        tx.send(Fd(memfile(b"early "))).await.unwrap();
        let mut child = Process::builder_async(read_files)
            .arg(rx)
            .backend(b)
            .start()
            .unwrap();
        tx.send(Fd(memfile(b"late"))).await.unwrap();
        drop(tx);
        assert_eq!(child.join_value().await.unwrap(), "early late");

        let (tx, mut rx) = cfg(b).channel::<(Fd<File>, Option<Sender<u32>>)>().unwrap();
        let mut child = Process::builder_async(send_back)
            .arg(tx)
            .backend(b)
            .start()
            .unwrap();
        let (f, back) = rx.recv().await.unwrap();
        assert_eq!(read_all(f.0), "from the child");
        back.unwrap().send(&41).await.unwrap();
        let (f, _) = rx.recv().await.unwrap();
        let mut n = [0u8; 4];
        let mut f = f.0;
        f.rewind().unwrap();
        f.read_exact(&mut n).unwrap();
        assert_eq!(u32::from_le_bytes(n), 41);
        child.join().await.unwrap();
        match rx.recv().await {
            Err(e) => assert_eq!(e.kind(), ErrorKind::Closed, "{e}"),
            Ok(_) => panic!("a message after the child exited"),
        }
    });
}

fn main() {
    ringipc::init();
    common::harness(&[
        ("fds_of_every_kind_nested", fds_of_every_kind_nested),
        ("channel_ends_inside_messages", channel_ends_inside_messages),
        ("fd_counts_stay_flat", fd_counts_stay_flat),
        (
            "limits_are_errors_and_lose_nothing",
            limits_are_errors_and_lose_nothing,
        ),
        (
            "hostile_datagrams_are_refused_without_leaks",
            hostile_datagrams_are_refused_without_leaks,
        ),
        ("cancel_and_move_lose_nothing", cancel_and_move_lose_nothing),
        ("ends_handed_to_children", ends_handed_to_children),
    ]);
}
