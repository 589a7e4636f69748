//! The threads that run HTTP connections: one single-threaded tokio runtime
//! per thread, and each accepted connection lives its whole life on one of
//! them, the one with the fewest open connections when it was accepted.
//!
//! Why not the main (work-stealing) runtime: there a connection's task could be
//! woken on either worker, and every wake-up of a parked worker, every steal and
//! every hand-over between workers is a futex call and a cache miss on a path
//! whose own work is a few microseconds. Serving connections on runtimes of
//! their own took 13–15 % off a consume's server CPU in same-run A/Bs (issue 24,
//! BENCHMARKS.md); Limitador's server (actix-web) is built the same way. What
//! is given up is stealing: a thread busy with its connections does not hand
//! them to an idle one, which the least-loaded placement makes up for while
//! connections are many and alike (a load balancer's pool).
//!
//! The listeners accept on the main runtime, and the background tasks stay
//! there. A task a request spawns (a handler's engine call finished after its
//! client left, see [`super::finish`]) runs on the connection's thread, so
//! [`ConnectionThreads::stop`] lets those tasks end, within a limit, before it
//! drops the runtimes.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Why the connection threads could not start.
#[derive(Debug, thiserror::Error)]
pub enum ThreadsError {
    #[error("starting HTTP connection thread {index}: {source}")]
    Start { index: usize, source: std::io::Error },
    #[error("HTTP connection thread {index} ended before its runtime started")]
    Lost { index: usize },
}

/// A fixed set of connection threads, shared by the listeners.
pub struct ConnectionThreads {
    workers: Vec<Worker>,
    /// Where the search for the least-loaded thread starts, so ties rotate.
    next: AtomicUsize,
}

struct Worker {
    handle: Handle,
    /// Connections open on this thread.
    open: Arc<AtomicUsize>,
    /// The same count, for operators (`meterd_http_thread_connections`).
    gauge: metrics::Gauge,
    /// Tells the thread to finish: the limit for the tasks left on it.
    stop: Mutex<Option<oneshot::Sender<Instant>>>,
    /// Sent once the runtime is dropped: how many tasks it had to abandon.
    done: Mutex<Option<oneshot::Receiver<usize>>>,
}

impl ConnectionThreads {
    /// Starts `count` threads (at least one), each running its own runtime.
    pub fn start(count: usize) -> Result<ConnectionThreads, ThreadsError> {
        let workers = (0..count.max(1)).map(Worker::start).collect::<Result<Vec<_>, _>>()?;
        Ok(ConnectionThreads { workers, next: AtomicUsize::new(0) })
    }

    /// Connections open on each thread, in thread order.
    #[cfg(test)]
    fn open(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.open.load(Ordering::Relaxed)).collect()
    }

    /// Moves `stream` to the least-loaded thread and runs `serve` on it there,
    /// as a task of `connections` (so the listener can wait for it, or cut it).
    pub fn spawn<F, Fut>(&self, connections: &mut JoinSet<()>, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Registered with this runtime's reactor; taken off it to move.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "an accepted connection could not be moved to a connection thread");
                return;
            }
        };
        let worker = self.least_loaded();
        let counted = Counted::new(worker.open.clone(), worker.gauge.clone());
        connections.spawn_on(
            async move {
                let _counted = counted;
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve(stream).await,
                    Err(e) => tracing::debug!(error = %e, "an accepted connection could not join its thread's reactor"),
                }
            },
            &worker.handle,
        );
    }

    fn least_loaded(&self) -> &Worker {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = &self.workers[start];
        for i in 1..n {
            let w = &self.workers[(start + i) % n];
            if w.open.load(Ordering::Relaxed) < best.open.load(Ordering::Relaxed) {
                best = w;
            }
        }
        best
    }

    /// Stops every thread once the tasks left on it have ended, or at
    /// `deadline`, whichever comes first (the rest are dropped, as a stopping
    /// runtime drops them); returns how many tasks were dropped. Call it once
    /// the listeners' connections have ended.
    pub async fn stop(&self, deadline: Instant) -> usize {
        let mut waiting = Vec::new();
        for w in &self.workers {
            if let Some(stop) = w.stop.lock().unwrap_or_else(PoisonError::into_inner).take() {
                let _ = stop.send(deadline);
            }
            waiting.extend(w.done.lock().unwrap_or_else(PoisonError::into_inner).take());
        }
        let mut dropped = 0;
        for done in waiting {
            dropped += done.await.unwrap_or(0);
        }
        dropped
    }
}

impl Worker {
    fn start(index: usize) -> Result<Worker, ThreadsError> {
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = oneshot::channel::<Instant>();
        let (done_tx, done) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("meterd-http-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // Dropped without a stop (the threads' owner went away): nothing waits.
                let deadline = runtime.block_on(stop_rx).unwrap_or_else(|_| Instant::now());
                let left = runtime.block_on(tasks_ended(deadline));
                drop(runtime);
                if left > 0 {
                    tracing::warn!(thread = index, tasks = left, "tasks still running on an HTTP thread at shutdown were dropped");
                }
                let _ = done_tx.send(left);
            })
            .map_err(|source| ThreadsError::Start { index, source })?;
        let handle = match handle_rx.recv() {
            Ok(Ok(handle)) => handle,
            Ok(Err(source)) => return Err(ThreadsError::Start { index, source }),
            Err(_) => return Err(ThreadsError::Lost { index }),
        };
        Ok(Worker {
            handle,
            open: Arc::default(),
            gauge: crate::telemetry::thread_connections(index),
            stop: Mutex::new(Some(stop)),
            done: Mutex::new(Some(done)),
        })
    }
}

/// Waits, on a connection thread's runtime, until no task is left on it or
/// `deadline` passes; returns how many are left.
async fn tasks_ended(deadline: Instant) -> usize {
    let metrics = Handle::current().metrics();
    loop {
        let left = metrics.num_alive_tasks();
        if left == 0 || Instant::now() >= deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Counts a connection on its thread while it lives.
struct Counted {
    open: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl Counted {
    fn new(open: Arc<AtomicUsize>, gauge: metrics::Gauge) -> Counted {
        open.fetch_add(1, Ordering::Relaxed);
        gauge.increment(1.0);
        Counted { open, gauge }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        self.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair: the accepted side and the client side.
    async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (accepted.expect("accept").0, client.expect("connect"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_go_to_the_least_loaded_thread_and_run_there() {
        let threads = ConnectionThreads::start(3).expect("start");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut connections = JoinSet::new();
        let (names_tx, mut names_rx) = tokio::sync::mpsc::unbounded_channel();
        // Each connection reports the thread it runs on, echoes one message,
        // then holds on until its client closes.
        let open = |accepted, i: usize, connections: &mut JoinSet<()>| {
            let names = names_tx.clone();
            threads.spawn(connections, accepted, move |mut stream| async move {
                let _ = names.send((i, std::thread::current().name().unwrap_or("").to_string()));
                let mut buf = [0u8; 4];
                if stream.read_exact(&mut buf).await.is_ok() {
                    let _ = stream.write_all(&buf).await;
                }
                let _ = stream.read(&mut buf).await;
            });
        };
        let mut clients = Vec::new();
        for i in 0..6 {
            let (accepted, client) = pair(&listener).await;
            open(accepted, i, &mut connections);
            clients.push(Some(client));
        }
        let mut on = vec![String::new(); 6];
        for _ in 0..6 {
            let (i, name) = names_rx.recv().await.expect("a connection ran");
            on[i] = name;
        }
        let mut names = on.clone();
        names.sort();
        assert_eq!(names, ["meterd-http-0", "meterd-http-0", "meterd-http-1", "meterd-http-1", "meterd-http-2", "meterd-http-2"]);
        assert_eq!(threads.open(), [2, 2, 2]);
        for c in clients.iter_mut().flatten() {
            c.write_all(b"ping").await.expect("write");
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).await.expect("echo");
            assert_eq!(&buf, b"ping");
        }
        // Both connections of client 0's thread end: the next two go there,
        // whatever thread a rotation would have picked.
        let emptied = on[0].clone();
        for (i, name) in on.iter().enumerate() {
            if *name == emptied {
                clients[i] = None;
            }
        }
        while threads.open().iter().sum::<usize>() > 4 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for i in 6..8 {
            let (accepted, client) = pair(&listener).await;
            open(accepted, i, &mut connections);
            clients.push(Some(client));
            assert_eq!(names_rx.recv().await.map(|(_, name)| name), Some(emptied.clone()), "connection {i}");
        }
        assert_eq!(threads.open(), [2, 2, 2]);
        drop(clients);
        while connections.join_next().await.is_some() {}
        assert_eq!(threads.open(), [0, 0, 0]);
        assert_eq!(threads.stop(Instant::now() + Duration::from_secs(5)).await, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_lets_tasks_spawned_by_connections_finish() {
        let threads = ConnectionThreads::start(2).expect("start");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut connections = JoinSet::new();
        let finished = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for _ in 0..2 {
            let (accepted, client) = pair(&listener).await;
            let f = finished.clone();
            threads.spawn(&mut connections, accepted, move |_stream| async move {
                // What a handler's call dropped by its client does: a task of its own.
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    f.fetch_add(1, Ordering::SeqCst);
                });
            });
            clients.push(client);
        }
        while connections.join_next().await.is_some() {}
        assert_eq!(finished.load(Ordering::SeqCst), 0, "the spawned tasks are still sleeping");
        assert_eq!(threads.stop(Instant::now() + Duration::from_secs(5)).await, 0);
        assert_eq!(finished.load(Ordering::SeqCst), 2, "stop waited for both");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stop_drops_what_is_left_at_its_deadline() {
        let threads = ConnectionThreads::start(1).expect("start");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut connections = JoinSet::new();
        let (accepted, _client) = pair(&listener).await;
        threads.spawn(&mut connections, accepted, |_stream| async {
            tokio::spawn(std::future::pending::<()>());
        });
        while connections.join_next().await.is_some() {}
        let asked = Instant::now();
        assert_eq!(threads.stop(asked + Duration::from_millis(100)).await, 1);
        assert!(asked.elapsed() < Duration::from_secs(5));
        // A second stop has nothing left to wait for.
        assert_eq!(threads.stop(Instant::now()).await, 0);
    }

    #[tokio::test]
    async fn dropped_threads_end_by_themselves() {
        let threads = ConnectionThreads::start(2).expect("start");
        let handles: Vec<Handle> = threads.workers.iter().map(|w| w.handle.clone()).collect();
        for h in &handles {
            assert_eq!(h.spawn(async { 1 }).await.ok(), Some(1), "a running thread runs tasks");
        }
        drop(threads);
        for h in handles {
            // A runtime that has ended cancels what is spawned on it.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut ended = false;
            while !ended && Instant::now() < deadline {
                ended = h.spawn(async { 1 }).await.is_err_and(|e| e.is_cancelled());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(ended, "the thread's runtime still runs tasks");
        }
    }
}
