//! Pool throughput: a tiny job (the per-call overhead, against calling the
//! function directly) and a CPU-bound job of about 1 ms, with one worker and
//! with one worker per core.
//!
//! `cargo bench --bench pool`; `cargo test --benches` runs each once.

use criterion::{BenchmarkId, Criterion, Throughput};
use ringipc::{Backend, Pool};
use std::hint::black_box;

fn tiny(x: u64) -> u64 {
    x.wrapping_mul(3)
}

/// About 1 ms of CPU on a current x86 core.
fn one_ms(seed: u64) -> u64 {
    let mut h = seed;
    for _ in 0..1_000_000 {
        h = h
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
    h
}

fn backends() -> Vec<Backend> {
    let mut v = Vec::new();
    match ringipc::uring_probe() {
        Ok(()) => v.push(Backend::Uring),
        Err(why) => eprintln!("skipping uring: {why}"),
    }
    v.push(Backend::Epoll);
    v
}

fn overhead(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_call_tiny");
    g.bench_function("direct_fn_call", |b| b.iter(|| tiny(black_box(7))));
    for backend in backends() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pool = rt
            .block_on(Pool::builder(tiny).workers(1).backend(backend).build())
            .unwrap();
        g.bench_function(BenchmarkId::new("pool_call", backend.name()), |b| {
            b.iter(|| rt.block_on(async { pool.call(black_box(7)).await.unwrap().to_native() }))
        });
        rt.block_on(pool.shutdown()).unwrap();
    }
    g.finish();
}

fn cpu_bound(c: &mut Criterion) {
    const JOBS: u64 = 16;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut g = c.benchmark_group("pool_cpu_1ms");
    g.sample_size(10);
    g.throughput(Throughput::Elements(JOBS));
    for backend in backends() {
        for workers in [1, cores] {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let pool = rt
                .block_on(
                    Pool::builder(one_ms)
                        .workers(workers)
                        .backend(backend)
                        .build(),
                )
                .unwrap();
            let id = BenchmarkId::new(format!("{}_workers", workers), backend.name());
            g.bench_function(id, |b| {
                b.iter(|| {
                    rt.block_on(async {
                        let mut results = pool.map(0..JOBS);
                        while let Some(r) = results.next().await {
                            black_box(r.unwrap().to_native());
                        }
                    })
                })
            });
            rt.block_on(pool.shutdown()).unwrap();
        }
    }
    g.finish();
}

fn main() {
    ringipc::init();
    let mut c = Criterion::default().configure_from_args();
    overhead(&mut c);
    cpu_bound(&mut c);
    c.final_summary();
}
