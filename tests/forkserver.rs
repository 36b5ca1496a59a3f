//! The fork server's life: its fallback to re-exec when it is gone, and the
//! ways to do without it (`RINGIPC_START=exec`, `init_with`, `init` after
//! threads exist). Each scenario that needs a process of its own re-executes
//! this binary with `RINGIPC_TEST_ROLE` set. (`harness = false`.)

mod common;

use ringipc::{Backend, Process, StartMode};
use std::process::Command;
use std::time::Duration;

async fn add(pair: (u64, u64)) -> u64 {
    pair.0 + pair.1
}

/// Sends 7 on `tx`; returns what fds 0–2 are (the child's own runtime may
/// have taken free ones) and whether SIGINT is at its default action.
async fn send_and_report(mut tx: ringipc::Sender<u32>) -> (Vec<String>, bool) {
    tx.send(&7).await.unwrap();
    tx.close().await.unwrap();
    let fds = (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    // SAFETY: sigaction with a null new action only reads the current one.
    let sigint_default = unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old);
        old.sa_sigaction == libc::SIG_DFL
    };
    (fds, sigint_default)
}

/// In a child of a daemon (0–2 closed in the parent): reads its stdin (null),
/// writes its stdout (a pipe), sends on its handle, and reports what its
/// fds 0–2 are.
async fn daemon_child(mut tx: ringipc::Sender<u32>) -> Vec<String> {
    use std::io::{Read, Write};
    let mut input = Vec::new();
    std::io::stdin().read_to_end(&mut input).unwrap();
    assert!(input.is_empty(), "stdin is /dev/null");
    print!("to the parent's pipe");
    std::io::stdout().flush().unwrap();
    tx.send(&9).await.unwrap();
    (0..3)
        .map(|fd| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|t| t.display().to_string())
                .unwrap_or_default()
        })
        .collect()
}

/// A daemon (0–2 closed) starts a child with a handle, stdin null, stdout
/// piped and stderr inherited (closed): every fd lands where it belongs,
/// none clobbering another, in `mode`.
async fn daemon_stdio(
    backend: Backend,
    mode: StartMode,
    (tx, mut rx): (ringipc::Sender<u32>, ringipc::Receiver<u32>),
) {
    use std::io::Read;
    let mut p = Process::builder_async(daemon_child)
        .arg(tx)
        .backend(backend)
        .start_mode(mode)
        .stdin(ringipc::ChildStdio::Null)
        .stdout(ringipc::ChildStdio::Piped)
        .start()
        .unwrap();
    assert_eq!(p.started_by(), mode);
    let mut out = p.take_stdout().unwrap();
    let m = rx.recv_timeout(Duration::from_secs(20)).await.unwrap();
    assert_eq!(m.to_native(), 9);
    let fds = p.join_value().await.unwrap();
    let mut text = String::new();
    out.read_to_string(&mut text).unwrap();
    assert_eq!(text, "to the parent's pipe");
    assert_eq!(fds[0], "/dev/null", "{fds:?}");
    assert!(fds[1].starts_with("pipe:"), "{fds:?}");
    // stderr was closed in the parent: whatever the child opened since may
    // sit at 2, but none of the pipes it was handed.
    assert!(!fds[2].starts_with("pipe:"), "{fds:?}");
}

/// Starts a forked child with a handle through the server; with
/// `stdio_closed`, checks no pipe of ours became its stdio.
async fn handle_through_server(stdio_closed: bool) {
    let (tx, mut rx) = ringipc::ChannelConfig::new()
        .backend(Backend::Epoll)
        .pipe::<u32>()
        .unwrap();
    let mut p = Process::builder_async(send_and_report)
        .arg(tx)
        .backend(Backend::Epoll)
        .start()
        .unwrap();
    assert_eq!(p.started_by(), StartMode::Fork);
    let m = rx.recv_timeout(Duration::from_secs(20)).await.unwrap();
    assert_eq!(m.to_native(), 7);
    let (fds, sigint_default) = p.join_value().await.unwrap();
    if stdio_closed {
        assert!(
            fds.iter().all(|f| !f.starts_with("pipe:")),
            "a pipe of the parent's became the child's stdio: {fds:?}"
        );
    }
    assert!(
        sigint_default,
        "the child kept the server's SIG_IGN for SIGINT"
    );
}

fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let mut f = after.split(' ');
        let (state, ppid) = (f.next().unwrap(), f.next().unwrap());
        if ppid == me && state == "Z" {
            z.push(pid);
        }
    }
    z
}

async fn start_and_check(backend: Backend, expect: StartMode) {
    for i in 0..3 {
        let mut p = Process::builder_async(add)
            .arg((i, 1))
            .backend(backend)
            .start()
            .unwrap();
        assert_eq!(p.started_by(), expect);
        assert_eq!(p.join_value().await.unwrap(), i + 1);
    }
}

/// Runs in the test binary's own process, after the role scenarios: kills
/// the server, then starts must re-execute, and the server is reaped.
async fn killed_server_falls_back(backend: Backend) {
    if let Some(pid) = ringipc::fork_server_pid() {
        start_and_check(backend, StartMode::Fork).await;
        // SAFETY: kill on the server's pid, which is our unreaped child.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
        // Let it die before the next start, which then finds it gone.
        let t = std::time::Instant::now();
        while !zombie_children().contains(&pid) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    start_and_check(backend, StartMode::Exec).await;
    assert_eq!(ringipc::fork_server_pid(), None);
    assert!(
        zombie_children().is_empty(),
        "zombies: {:?}",
        zombie_children()
    );
}

fn role(role: &str) {
    match role {
        "env-exec" => {
            ringipc::init();
            assert_eq!(ringipc::fork_server_pid(), None);
            assert_eq!(ringipc::default_start_mode(), StartMode::Exec);
        }
        "init-with-exec" => {
            ringipc::init_with(ringipc::InitOptions::new().start_mode(StartMode::Exec));
            assert_eq!(ringipc::fork_server_pid(), None);
        }
        "late-init" => {
            // A thread exists before init: no fork server, re-exec only.
            // (Children re-run this line before their own init: harmless.)
            let t = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(200)));
            ringipc::init();
            assert_eq!(ringipc::fork_server_pid(), None);
            assert_eq!(ringipc::default_start_mode(), StartMode::Fork);
            t.join().unwrap();
        }
        "env-fork" => {
            ringipc::init();
            assert!(ringipc::fork_server_pid().is_some());
            common::block_on(start_and_check(Backend::Epoll, StartMode::Fork));
            return;
        }
        "init-in-runtime" => {
            // `#[tokio::main(flavor = "current_thread")]`: init inside a
            // runtime, still single-threaded, so a server is forked; its
            // children must not trip over the runtime the fork copied.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                ringipc::init();
                assert!(ringipc::fork_server_pid().is_some());
                start_and_check(Backend::Epoll, StartMode::Fork).await;
            });
            return;
        }
        "stdio-closed" => {
            // A daemon: 0–2 closed after init. Our pipes then sit at 0–2
            // (close-on-exec): the child gets the handle by index, and none
            // of them as its stdio.
            ringipc::init();
            // SAFETY: closing our own stdio; nothing here uses it again.
            unsafe {
                libc::close(0);
                libc::close(1);
                libc::close(2);
            }
            common::block_on(handle_through_server(true));
            return;
        }
        "stale-child" => {
            // RINGIPC_CHILD inherited from an ancestor (here naming stdin,
            // /dev/null): no sealed spec there, so an ordinary process.
            ringipc::init();
            assert!(std::env::var_os("RINGIPC_CHILD").is_some());
            common::block_on(handle_through_server(false));
            return;
        }
        "daemon-stdio-uring" | "daemon-stdio-epoll" => {
            let backend = if role == "daemon-stdio-uring" {
                Backend::Uring
            } else {
                Backend::Epoll
            };
            ringipc::init();
            // With stderr closed, a panic message goes to a file the test
            // prints on failure.
            std::panic::set_hook(Box::new(|info| {
                if let Some(path) = std::env::var_os("RINGIPC_TEST_PANIC_FILE") {
                    let _ = std::fs::write(path, info.to_string());
                }
            }));
            // SAFETY: closing our own stdio; nothing here uses it again.
            unsafe {
                libc::close(0);
                libc::close(1);
                libc::close(2);
            }
            // The channels are made first, so their pipes take 0–2.
            let channel = || {
                ringipc::ChannelConfig::new()
                    .backend(backend)
                    .pipe::<u32>()
                    .unwrap()
            };
            let (a, b) = (channel(), channel());
            common::block_on(daemon_stdio(backend, StartMode::Exec, a));
            common::block_on(daemon_stdio(backend, StartMode::Fork, b));
            return;
        }
        "server-ignores-sigint" => {
            ringipc::init();
            let pid = ringipc::fork_server_pid().unwrap() as i32;
            // SAFETY: signals to our own child, the server.
            unsafe {
                libc::kill(pid, libc::SIGINT);
                libc::kill(pid, libc::SIGTERM);
                libc::kill(pid, libc::SIGHUP);
            }
            std::thread::sleep(Duration::from_millis(50));
            common::block_on(handle_through_server(false));
            assert_eq!(ringipc::fork_server_pid(), Some(pid as u32));
            return;
        }
        other => panic!("unknown role {other}"),
    }
    common::block_on(start_and_check(Backend::Epoll, StartMode::Exec));
}

fn main() {
    if let Ok(r) = std::env::var("RINGIPC_TEST_ROLE") {
        role(&r);
        return;
    }
    ringipc::init();
    let roles: [(&str, &str, Option<&str>); 10] = [
        ("env_selects_exec", "env-exec", Some("exec")),
        ("env_selects_fork", "env-fork", Some("fork")),
        ("init_with_exec_starts_no_server", "init-with-exec", None),
        ("init_after_threads_starts_no_server", "late-init", None),
        (
            "init_inside_a_current_thread_runtime",
            "init-in-runtime",
            None,
        ),
        ("fork_with_stdio_closed", "stdio-closed", None),
        (
            "uring::daemon_stdio_in_both_modes",
            "daemon-stdio-uring",
            None,
        ),
        (
            "epoll::daemon_stdio_in_both_modes",
            "daemon-stdio-epoll",
            None,
        ),
        ("stale_ringipc_child_env_is_ignored", "stale-child", None),
        (
            "server_survives_sigint_sigterm_sighup",
            "server-ignores-sigint",
            None,
        ),
    ];
    // libtest's command line (filters, --list, --exact), one case at a time,
    // in this order: the last ones kill this process's server.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let panic_file =
        std::env::temp_dir().join(format!("ringipc-forkserver-test-{}", std::process::id()));
    let mut trials: Vec<libtest_mimic::Trial> = roles
        .into_iter()
        .map(|(name, r, start)| {
            let panic_file = panic_file.clone();
            libtest_mimic::Trial::test(name, move || {
                let _ = std::fs::remove_file(&panic_file);
                let mut cmd = Command::new(std::env::current_exe().unwrap());
                cmd.env("RINGIPC_TEST_ROLE", r);
                cmd.env("RINGIPC_TEST_PANIC_FILE", &panic_file);
                if r == "stale-child" {
                    cmd.env("RINGIPC_CHILD", "0");
                }
                match start {
                    Some(v) => cmd.env("RINGIPC_START", v),
                    None => cmd.env_remove("RINGIPC_START"),
                };
                let out = cmd.output().map_err(|e| e.to_string())?;
                let panicked = std::fs::read_to_string(&panic_file).unwrap_or_default();
                let _ = std::fs::remove_file(&panic_file);
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{}\n{}{panicked}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    )
                    .into())
                }
            })
        })
        .collect();
    for backend in [Backend::Uring, Backend::Epoll] {
        let name = format!("{}::killed_server_falls_back", backend.name());
        trials.push(libtest_mimic::Trial::ignorable_test(name, move || {
            if backend == Backend::Uring
                && let Err(why) = ringipc::uring_probe()
            {
                let why = format!("the kernel refuses io_uring here: {why}");
                eprintln!("SKIPPED: {why}");
                return Ok(libtest_mimic::Completion::ignored_with(why));
            }
            common::block_on(killed_server_falls_back(backend));
            Ok(libtest_mimic::Completion::Completed)
        }));
    }
    libtest_mimic::run(&args, trials).exit();
}
