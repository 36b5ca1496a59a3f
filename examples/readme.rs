//! The README's example, kept compiling and running.

use ringipc::{Process, Receiver, Sender};

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Work {
    jobs: Receiver<Vec<u64>>,
    sums: Sender<u64>,
}

// Runs in a child process, pinned to core 0.
async fn summer(mut w: Work) -> u32 {
    let mut n = 0;
    while let Ok(job) = w.jobs.recv().await {
        let sum = job.iter().map(|x| x.to_native()).sum(); // zero-copy: read in place
        w.sums.send(&sum).await.unwrap();
        n += 1;
    }
    n
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ringipc::Result<()> {
    ringipc::init(); // first line of main: children take over here

    let (mut jobs, jobs_rx) = ringipc::pipe::<Vec<u64>>()?;
    let (sums_tx, mut sums) = ringipc::pipe::<u64>()?;
    let mut child = Process::builder_async(summer)
        .arg(Work {
            jobs: jobs_rx,
            sums: sums_tx,
        }) // handles move into the child
        .pin(ringipc::Affinity::Core(0))
        .name("summer")
        .start()?;

    for n in 1..=3u64 {
        jobs.send(&(1..=n).collect()).await?;
        println!("sum = {}", sums.recv().await?.to_native());
    }
    drop(jobs); // EOF: the child's loop ends
    child.join().await?;
    println!("child handled {} jobs", child.result()?.to_native());
    Ok(())
}
