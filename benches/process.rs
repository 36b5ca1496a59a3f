//! Child start-to-join: ringipc running an empty function in a re-executed
//! child, against `std::process::Command` spawning `/bin/true`.
//!
//! `cargo bench --bench process`; `cargo test --benches` runs each once.

use criterion::{BenchmarkId, Criterion};
use ringipc::{Backend, Process};
use std::process::Command;

fn empty(_: ()) {}

fn start_to_join(c: &mut Criterion) {
    let mut g = c.benchmark_group("start_to_join");
    g.sample_size(30);
    for backend in [Backend::Uring, Backend::Epoll] {
        if backend == Backend::Uring
            && let Err(why) = ringipc::uring_probe()
        {
            eprintln!("skipping uring: {why}");
            continue;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        g.bench_function(BenchmarkId::new("ringipc_empty_fn", backend.name()), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let mut p = Process::builder(empty)
                        .arg(())
                        .backend(backend)
                        .start()
                        .unwrap();
                    assert!(p.join().await.unwrap().success());
                })
            })
        });
    }
    if std::path::Path::new("/bin/true").exists() {
        g.bench_function("std_command_bin_true", |b| {
            b.iter(|| assert!(Command::new("/bin/true").status().unwrap().success()))
        });
    }
    g.finish();
}

fn main() {
    ringipc::init();
    let mut c = Criterion::default().configure_from_args();
    start_to_join(&mut c);
    c.final_summary();
}
