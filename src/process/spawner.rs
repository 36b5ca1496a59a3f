//! All children are started from one long-lived thread.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that created the child exits,
//! not the process: a child started from an engine core thread or a
//! short-lived helper thread would be killed when that thread ends. Starting
//! every child from a thread that lives as long as the process makes "dies
//! with the parent" mean the parent process. The thread also resets its CPU
//! affinity to the process's, so an unpinned child does not inherit the pin
//! of whichever thread asked for it.

use crate::sys;
use std::io;
use std::process::{Child, Command};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Mutex, OnceLock};

struct Request {
    cmd: Command,
    reply: SyncSender<io::Result<Child>>,
}

fn spawner() -> io::Result<&'static Mutex<Sender<Request>>> {
    static SPAWNER: OnceLock<Mutex<Sender<Request>>> = OnceLock::new();
    if let Some(s) = SPAWNER.get() {
        return Ok(s);
    }
    let (tx, rx) = mpsc::channel::<Request>();
    let process_cpus = sys::process_cpus()?;
    std::thread::Builder::new()
        .name("ringipc-spawner".into())
        .spawn(move || {
            let _ = sys::set_affinity(&sys::cpu_set(&process_cpus));
            for mut req in rx {
                let _ = req.reply.send(req.cmd.spawn());
            }
        })?;
    // A racing caller may have installed its own spawner first; then this
    // one's thread exits when `tx` is dropped here.
    Ok(SPAWNER.get_or_init(|| Mutex::new(tx)))
}

/// Spawns `cmd` on the spawner thread and waits for the exec to succeed or fail.
pub(crate) fn launch(cmd: Command) -> io::Result<Child> {
    let (reply, rx) = mpsc::sync_channel(1);
    spawner()?
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(Request { cmd, reply })
        .map_err(|_| io::Error::other("ringipc spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| io::Error::other("ringipc spawner thread is gone"))?
}
