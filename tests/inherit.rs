//! Sockets, files and raw fds handed to children in their start arguments
//! (`Fd<T>`, `#[rkyv(with = Inherit)]`), on both backends and in both start
//! modes. `harness = false` so children can re-execute this binary.

mod common;

use ringipc::{Backend, ChannelConfig, ErrorKind, Fd, Inherit, Process};
use rkyv::{Archive, Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn temp_file(content: &[u8]) -> File {
    let mut f = tempfile();
    f.write_all(content).unwrap();
    f.rewind().unwrap();
    f
}

/// An anonymous file (memfd), so no path is left behind.
fn tempfile() -> File {
    let name = c"ringipc-inherit-test";
    // SAFETY: a valid C string, no flags beyond close-on-exec.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

// ---- child entries ----

fn read_file(f: Fd<File>) -> String {
    let mut s = String::new();
    let mut f = f.0;
    f.read_to_string(&mut s).unwrap();
    s
}

fn write_to(fd: Fd<OwnedFd>) {
    let mut f = File::from(fd.0);
    f.write_all(b"written by the child").unwrap();
}

/// Accepts one connection and answers each line upper-cased, once.
fn serve_std(listener: Fd<TcpListener>) {
    let (mut conn, _) = listener.0.accept().unwrap();
    let mut buf = [0u8; 64];
    let n = loop {
        match conn.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.unwrap(),
        }
    };
    conn.write_all(&buf[..n].to_ascii_uppercase()).unwrap();
}

async fn serve_tokio(listener: Fd<tokio::net::TcpListener>) {
    let (mut conn, _) = listener.0.accept().await.unwrap();
    let mut buf = [0u8; 64];
    let n = conn.read(&mut buf).await.unwrap();
    conn.write_all(&buf[..n].to_ascii_uppercase())
        .await
        .unwrap();
}

fn udp_echo(sock: Fd<UdpSocket>) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let (n, from) = loop {
        match sock.0.recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => break r.unwrap(),
        }
    };
    sock.0.send_to(&buf[..n], from).unwrap();
    buf[..n].to_vec()
}

#[derive(Archive, Serialize, Deserialize)]
struct Bundle {
    label: String,
    #[rkyv(with = Inherit)]
    main: UnixStream,
    extra: Vec<Fd<UnixStream>>,
    log: Option<Fd<File>>,
    none: Option<Fd<File>>,
}

fn use_bundle(b: Bundle) -> usize {
    // Everything this child has open: stdio, its control pipe, the fds it
    // was given, and what its runtime opened.
    let open = open_fds();
    let mut main = b.main;
    main.write_all(format!("{} main", b.label).as_bytes())
        .unwrap();
    for (i, s) in b.extra.into_iter().enumerate() {
        let mut s = s.0;
        s.write_all(format!("extra {i}").as_bytes()).unwrap();
    }
    let mut log = b.log.expect("the log file").0;
    log.write_all(b"logged").unwrap();
    assert!(b.none.is_none());
    open
}

fn count_fds(_: ()) -> usize {
    open_fds()
}

fn count_fds_with(f: Fd<File>) -> usize {
    let n = open_fds();
    drop(f);
    n
}

fn sync_takes_tokio(_: Fd<tokio::net::TcpListener>) {}

// ---- tests ----

fn file_and_owned_fd(b: Backend) {
    common::block_on(async {
        let f = temp_file(b"a file for the child");
        let mut p = Process::builder(read_file)
            .arg(Fd(f))
            .backend(b)
            .start()
            .unwrap();
        assert_eq!(p.join_value().await.unwrap(), "a file for the child");

        let (r, w) = std::io::pipe().unwrap();
        let mut p = Process::builder(write_to)
            .arg(Fd(OwnedFd::from(w)))
            .backend(b)
            .start()
            .unwrap();
        p.join().await.unwrap();
        let mut got = String::new();
        // EOF only once the parent's copy is gone too: the builder dropped
        // its arguments when the child started.
        let mut r = r;
        r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "written by the child");
    });
}

fn tcp_listener_std_and_tokio(b: Backend) {
    common::block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = Process::builder(serve_std)
            .arg(Fd(listener))
            .backend(b)
            .start()
            .unwrap();
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"hello").unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).unwrap();
        assert_eq!(buf, b"HELLO");
        assert!(p.join().await.unwrap().success());

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut p = Process::builder_async(serve_tokio)
            .arg(Fd(listener))
            .backend(b)
            .start()
            .unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"tokio").await.unwrap();
        let mut buf = Vec::new();
        c.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"TOKIO");
        assert!(p.join().await.unwrap().success());
    });
}

fn udp_socket(b: Backend) {
    common::block_on(async {
        let child_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let child_addr = child_sock.local_addr().unwrap();
        let mut p = Process::builder(udp_echo)
            .arg(Fd(child_sock))
            .backend(b)
            .start()
            .unwrap();
        let me = UdpSocket::bind("127.0.0.1:0").unwrap();
        me.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        me.send_to(b"datagram", child_addr).unwrap();
        let mut buf = [0u8; 64];
        // A blocking call on a thread with io_uring operations in flight
        // (here the child's exit watch) can return EINTR when a completion's
        // task work arrives: retry, as any caller of a blocking syscall must.
        let n = loop {
            match me.recv_from(&mut buf) {
                Ok((n, _)) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("recv_from: {e}"),
            }
        };
        assert_eq!(&buf[..n], b"datagram");
        assert_eq!(p.join_value().await.unwrap(), b"datagram");
    });
}

fn nested_in_a_struct(b: Backend) {
    common::block_on(async {
        let baseline = {
            let mut p = Process::builder(count_fds)
                .arg(())
                .backend(b)
                .start()
                .unwrap();
            p.join_value().await.unwrap()
        };
        let (main_here, main_there) = UnixStream::pair().unwrap();
        let mut extra_here = Vec::new();
        let mut extra_there = Vec::new();
        for _ in 0..3 {
            let (a, b) = UnixStream::pair().unwrap();
            extra_here.push(a);
            extra_there.push(Fd(b));
        }
        let mut log = temp_file(b"");
        let bundle = Bundle {
            label: "bundle".into(),
            main: main_there,
            extra: extra_there,
            log: Some(Fd(log.try_clone().unwrap())),
            none: None,
        };
        let mut p = Process::builder(use_bundle)
            .arg(bundle)
            .backend(b)
            .start()
            .unwrap();
        let child_fds = p.join_value().await.unwrap();
        // The child holds exactly the five fds it was given on top of what
        // any child holds.
        assert_eq!(child_fds, baseline + 5);
        let mut got = String::new();
        let mut main_here = main_here;
        main_here.read_to_string(&mut got).unwrap();
        assert_eq!(got, "bundle main");
        for (i, mut s) in extra_here.into_iter().enumerate() {
            let mut got = String::new();
            s.read_to_string(&mut got).unwrap();
            assert_eq!(got, format!("extra {i}"));
        }
        let mut got = String::new();
        log.rewind().unwrap();
        log.read_to_string(&mut got).unwrap();
        assert_eq!(got, "logged");
    });
}

/// Inside a message on a channel an fd cannot travel (a pipe carries no
/// fds): a typed error, nothing sent, and the channel still works.
fn fd_in_a_message_is_refused(b: Backend) {
    common::block_on(async {
        let (mut tx, mut rx) = ChannelConfig::new()
            .backend(b)
            .pipe::<Option<Fd<File>>>()
            .unwrap();
        let e = tx.send(&Some(Fd(temp_file(b"x")))).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(e.to_string().contains("Fd<std::fs::File>"), "{e}");
        assert!(e.to_string().contains("start arguments"), "{e}");
        tx.send(&None).await.unwrap();
        assert!(rx.recv().await.unwrap().is_none());
    });
}

/// The parent keeps no copy of what it handed over, and a child gets only
/// its own fds: counts stay flat over many children.
fn no_fd_leaks(b: Backend) {
    common::block_on(async {
        let f = temp_file(b"shared");
        let mut seen = Vec::new();
        // The first child on this runtime sets up what the backend keeps
        // per runtime (its reactor registration); count after it.
        let mut before = 0;
        for i in 0..41 {
            if i == 1 {
                before = open_fds();
            }
            let mut p = Process::builder(count_fds_with)
                .arg(Fd(f.try_clone().unwrap()))
                .backend(b)
                .start()
                .unwrap();
            seen.push(p.join_value().await.unwrap());
        }
        // At most as many as after the first child (state of earlier
        // tests' runtimes may be released meanwhile; a leak would add 40).
        let after = open_fds();
        assert!(
            after <= before,
            "the parent leaked fds: {before} -> {after}"
        );
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        assert!(f.as_raw_fd() >= 0);
    });
}

/// A tokio type reaches a sync entry too: a child's arguments are decoded
/// with its runtime entered.
fn tokio_type_in_a_sync_entry(b: Backend) {
    common::block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut p = Process::builder(sync_takes_tokio)
            .arg(Fd(listener))
            .backend(b)
            .start()
            .unwrap();
        assert!(p.join().await.unwrap().success());
    });
}

fn main() {
    ringipc::init();
    common::harness(&[
        ("file_and_owned_fd", file_and_owned_fd),
        ("tcp_listener_std_and_tokio", tcp_listener_std_and_tokio),
        ("udp_socket", udp_socket),
        ("nested_in_a_struct", nested_in_a_struct),
        ("fd_in_a_message_is_refused", fd_in_a_message_is_refused),
        ("no_fd_leaks", no_fd_leaks),
        ("tokio_type_in_a_sync_entry", tokio_type_in_a_sync_entry),
    ]);
}
