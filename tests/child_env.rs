//! Scenarios that need a process of their own: a seccomp filter that forbids
//! io_uring (as Docker's default profile does), and SIGPIPE left at its
//! default action. The binary re-executes itself with `RINGIPC_TEST_ROLE` set;
//! without it, it runs every scenario as a parent and checks the children.
//! (`harness = false`: a child must own its whole process.)

use ringipc::{Backend, ChannelConfig, ErrorKind};
use std::process::Command;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Makes io_uring_setup, io_uring_enter and io_uring_register fail with
/// EPERM, like Docker's default seccomp profile. (The numbers are the same on
/// every architecture: io_uring came after the syscall tables were unified.)
fn forbid_io_uring() {
    const fn stmt(code: u32, k: u32) -> libc::sock_filter {
        libc::sock_filter {
            code: code as u16,
            jt: 0,
            jf: 0,
            k,
        }
    }
    const fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt,
            jf,
            k,
        }
    }
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let filter = [
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0), // seccomp_data.nr
        jeq(425, 3, 0),
        jeq(426, 2, 0),
        jeq(427, 1, 0),
        stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(libc::BPF_RET | libc::BPF_K, deny),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    // SAFETY: plain prctl calls; `prog` and `filter` outlive the call, and the
    // kernel copies the program.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

async fn messages_flow(cfg: ChannelConfig) {
    let (mut tx, mut rx) = cfg.pipe::<String>().unwrap();
    let send = async move {
        for i in 0..1000 {
            tx.feed(&format!("m{i}")).await.unwrap();
        }
        tx.close().await.unwrap();
    };
    let recv = async move {
        for i in 0..1000 {
            assert_eq!(rx.recv().await.unwrap().as_str(), format!("m{i}"));
        }
        assert_eq!(rx.recv().await.unwrap_err().kind(), ErrorKind::Closed);
    };
    tokio::join!(send, recv);
}

fn child(role: &str) {
    match role {
        "seccomp-auto" => {
            forbid_io_uring();
            let why =
                ringipc::uring_probe().expect_err("io_uring must be refused under the filter");
            assert!(why.contains("Operation not permitted"), "{why}");
            assert_eq!(ringipc::default_backend().unwrap(), Backend::Epoll);
            assert_eq!(Backend::Auto.resolve().unwrap(), Backend::Epoll);
            let e = Backend::Uring.resolve().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            let e = ChannelConfig::new()
                .backend(Backend::Uring)
                .pipe::<u8>()
                .err()
                .unwrap();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            runtime().block_on(messages_flow(ChannelConfig::new()));
        }
        "seccomp-forced-uring" => {
            // RINGIPC_BACKEND=uring is set by the parent: an error, not a fallback.
            forbid_io_uring();
            let e = ringipc::default_backend().unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unsupported);
            assert_eq!(
                ringipc::pipe::<u8>().err().unwrap().kind(),
                ErrorKind::Unsupported
            );
        }
        "env-epoll" => {
            assert_eq!(ringipc::default_backend().unwrap(), Backend::Epoll);
            runtime().block_on(messages_flow(ChannelConfig::new()));
        }
        "sigpipe-uring" | "sigpipe-epoll" => {
            let backend = if role.ends_with("uring") {
                Backend::Uring
            } else {
                Backend::Epoll
            };
            // SAFETY: restoring the default disposition before any thread exists.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            runtime().block_on(async {
                let (mut tx, rx) = ChannelConfig::new()
                    .backend(backend)
                    .pipe::<Vec<u8>>()
                    .unwrap();
                drop(rx);
                let e = tx.send(&vec![1u8; 100_000]).await.unwrap_err();
                assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
            });
        }
        other => panic!("unknown role {other}"),
    }
}

fn run_child(role: &str, env: &[(&str, &str)]) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.env("RINGIPC_TEST_ROLE", role)
        .env_remove("RINGIPC_BACKEND");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// (test name, child role, extra environment)
type Case = (
    &'static str,
    &'static str,
    Vec<(&'static str, &'static str)>,
);

fn main() {
    if let Ok(role) = std::env::var("RINGIPC_TEST_ROLE") {
        child(&role);
        return;
    }
    let uring_ok = ringipc::uring_probe();
    let cases: Vec<Case> = vec![
        ("seccomp_auto_falls_back_to_epoll", "seccomp-auto", vec![]),
        (
            "seccomp_forced_uring_is_an_error",
            "seccomp-forced-uring",
            vec![("RINGIPC_BACKEND", "uring")],
        ),
        (
            "env_selects_epoll",
            "env-epoll",
            vec![("RINGIPC_BACKEND", "epoll")],
        ),
        (
            "epoll::no_sigpipe_on_closed_reader",
            "sigpipe-epoll",
            vec![],
        ),
        (
            "uring::no_sigpipe_on_closed_reader",
            "sigpipe-uring",
            vec![],
        ),
    ];
    // libtest's command line (filters, --list, --exact), one case at a time:
    // each re-executes this binary in a role.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let uring_ok = uring_ok.map_err(|why| why.to_string());
    let trials = cases
        .into_iter()
        .map(|(name, role, env)| {
            let uring_ok = uring_ok.clone();
            libtest_mimic::Trial::ignorable_test(name, move || {
                if role == "sigpipe-uring"
                    && let Err(why) = uring_ok
                {
                    let why = format!("the kernel refuses io_uring here: {why}");
                    eprintln!("SKIPPED: {why}");
                    return Ok(libtest_mimic::Completion::ignored_with(why));
                }
                run_child(role, &env)
                    .map(|()| libtest_mimic::Completion::Completed)
                    .map_err(|e| e.to_string().into())
            })
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
