//! Turns for CPU work on an async runtime, first come, first served.

use tokio::sync::Semaphore;

/// Runs CPU-bound work one piece at a time, in the order it was asked for,
/// between the runtime's I/O.
///
/// A server whose connection handlers compute inline on one thread (a
/// [`Prefork`](crate::Prefork) child, a current-thread runtime) leaves tokio
/// to decide which ready handler computes next, and that is not the request
/// that has waited longest: a handler whose next request was read at once
/// computes again ahead of connections whose requests arrived while it ran.
/// Throughput is the same, but some requests wait two rounds of the others
/// and some none. In `examples/server.rs` (two prefork children, 16 client
/// connections, 1 ms jobs) p99 was about 2× p50 computing inline, and
/// 1.3–1.6× through a lane, about what a FIFO thread pool (rayon) gives.
///
/// [`run`](Lane::run) waits for its turn in a FIFO queue, runs the closure
/// on the caller's own task (no thread, no `'static` bound, a panic unwinds
/// in the caller), then yields to the runtime once before it passes the
/// turn on. That yield is the point: it lets the runtime poll its I/O, so
/// the handlers whose requests arrived meanwhile are woken, read them and
/// queue up in arrival order, ahead of the handler that just ran.
///
/// One lane serializes all its callers, on whatever threads they run: use
/// one per thread that computes (a `static` lane in a prefork child, or in
/// a pool worker that runs several async jobs at once: each has a runtime
/// of one thread).
///
/// Cancellation: dropping `run`'s future while it waits leaves the queue;
/// dropping it after the closure ran (during the yield) passes the turn on
/// and discards the result. A panic in the closure passes the turn on too.
///
/// ```
/// use ringipc::Lane;
///
/// static LANE: Lane = Lane::new();
///
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let request = vec![7u8; 1024];
/// // CPU work that borrows the request; other handlers' turns come first
/// // if their requests arrived earlier.
/// let digest = LANE.run(|| request.iter().map(|&b| b as u64).sum::<u64>()).await;
/// assert_eq!(digest, 7 * 1024);
/// # });
/// ```
#[derive(Debug)]
pub struct Lane {
    /// One permit: the turn. tokio's semaphore queues waiters in FIFO order
    /// and removes a waiter whose future is dropped, which is all a lane
    /// needs; hand-written, it would be the same queue.
    turn: Semaphore,
}

impl Lane {
    /// A lane with nobody in it. `const`, so a lane can be a `static`.
    pub const fn new() -> Self {
        Lane {
            turn: Semaphore::const_new(1),
        }
    }

    /// Waits for this caller's turn, runs `f` on the caller's task, and
    /// yields once to the runtime before the next caller's turn.
    pub async fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        // `acquire` fails only on a closed semaphore, and this one is never
        // closed; without a turn the work would still run, just out of line.
        let turn = self.turn.acquire().await.ok();
        let r = f();
        // Still holding the turn: the runtime polls its I/O now, and the
        // handlers it wakes queue up before the turn is free.
        tokio::task::yield_now().await;
        drop(turn);
        r
    }
}

impl Default for Lane {
    fn default() -> Self {
        Lane::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A caller that asks again at once, right after its turn, goes behind
    /// the callers that became ready while it ran.
    #[test]
    fn a_caller_back_at_once_queues_behind_those_woken_meanwhile() {
        runtime().block_on(async {
            let lane = Arc::new(Lane::new());
            let order = Arc::new(Mutex::new(Vec::new()));
            let (go, _) = tokio::sync::broadcast::channel::<()>(1);
            let mut tasks = Vec::new();
            for name in ["b", "c"] {
                let (lane, order, mut go) = (lane.clone(), order.clone(), go.subscribe());
                tasks.push(tokio::spawn(async move {
                    let _ = go.recv().await;
                    lane.run(|| order.lock().unwrap().push(name)).await;
                }));
            }
            // Let b and c start waiting for `go`.
            tokio::task::yield_now().await;
            // The job wakes b and c, as a request arriving would.
            lane.run(|| {
                order.lock().unwrap().push("a1");
                go.send(()).unwrap();
            })
            .await;
            lane.run(|| order.lock().unwrap().push("a2")).await;
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(*order.lock().unwrap(), ["a1", "b", "c", "a2"]);
        });
    }

    /// Callers are served in the order they asked, and a dropped waiter
    /// neither runs nor holds the others up.
    #[test]
    fn first_come_first_served_and_a_dropped_waiter_leaves() {
        runtime().block_on(async {
            let lane = Arc::new(Lane::new());
            let order = Arc::new(Mutex::new(Vec::new()));
            // Hold the turn while the others queue up.
            let held = lane.turn.acquire().await.unwrap();
            let mut tasks = Vec::new();
            for i in 0..5 {
                let (lane, order) = (lane.clone(), order.clone());
                tasks.push(tokio::spawn(async move {
                    lane.run(|| order.lock().unwrap().push(i)).await
                }));
                tokio::task::yield_now().await;
            }
            tasks.remove(2).abort();
            tokio::task::yield_now().await;
            drop(held);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(*order.lock().unwrap(), [0, 1, 3, 4]);
        });
    }

    /// A panicking job unwinds in its caller and passes the turn on.
    #[test]
    fn a_panic_passes_the_turn_on() {
        runtime().block_on(async {
            let lane = Arc::new(Lane::new());
            let l = lane.clone();
            let panicked = tokio::spawn(async move { l.run(|| panic!("job failed")).await });
            assert!(panicked.await.unwrap_err().is_panic());
            assert_eq!(lane.run(|| 5).await, 5);
        });
    }

    /// A caller dropped during its closing yield passes the turn on.
    #[test]
    fn dropped_after_the_job_passes_the_turn_on() {
        runtime().block_on(async {
            let lane = Lane::new();
            let ran = std::cell::Cell::new(false);
            {
                let mut fut = std::pin::pin!(lane.run(|| ran.set(true)));
                // First poll: turn taken, job run, now pending in the yield.
                let polled = futures_poll_once(fut.as_mut()).await;
                assert!(polled.is_none());
            }
            assert!(ran.get());
            assert_eq!(lane.run(|| 1).await, 1);
        });
    }

    /// Polls `fut` once and returns its output if it was ready.
    async fn futures_poll_once<F: std::future::Future>(
        mut fut: std::pin::Pin<&mut F>,
    ) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match fut.as_mut().poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
