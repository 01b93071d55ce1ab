//! A running sum split by coordinate range over threads.
//!
//! Summing K updates is a stream over memory: one core alone does not draw the machine's
//! memory bandwidth, and starting a thread per update (or per round) costs as much as adding a
//! 10⁵-value update. So the process keeps one summing thread per core beyond the first
//! (`pool`), started once; a [`Stripes`] gives each of them a contiguous range of
//! coordinates (allocated and first touched on that thread) and sends every update to all of
//! them through short queues, while the caller sums the first range itself; where a thread
//! lags (asleep, or its core busy), the caller runs its waiting jobs too. Each range gets the
//! updates in the order they were sent, so every coordinate sees the same additions in
//! the same order as a single loop would: the result is bit for bit the sequential one.
//!
//! Small sums (under [`MIN_STRIPE`] coordinates per stripe) run inline, without threads.

use std::any::Any;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Work sent to every stripe: called with the stripe's part of the sum and the range of
/// coordinates it covers, once per stripe, in the order the work was sent.
pub type Job<T> = Arc<dyn Fn(&mut [T], Range<usize>) + Send + Sync>;

/// The fewest coordinates worth a thread (256 KiB of `f64`).
pub const MIN_STRIPE: usize = 1 << 15;

/// Jobs a stripe may have waiting before the caller runs them itself: enough to keep its
/// thread busy while the next update is checked, few enough that memory stays O(model).
const QUEUE: usize = 2;

/// Tasks (wake-ups and set-ups, a few bytes each) a summing thread may have queued.
const TASKS: usize = 64;

/// Most summing threads the pool starts, whatever the core count.
const MAX_THREADS: usize = 7;

type Task = Box<dyn FnOnce() + Send>;

/// The queues of the process's summing threads, started at first use: one per core beyond the
/// first (none on one core, or where the system refuses a thread). They live as long as the
/// process.
fn pool() -> &'static [SyncSender<Task>] {
    static POOL: OnceLock<Vec<SyncSender<Task>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut queues = Vec::new();
        for i in 1..cores.min(MAX_THREADS + 1) {
            let (tx, rx) = sync_channel::<Task>(TASKS);
            let started = std::thread::Builder::new()
                .name(format!("fedretail-sum-{i}"))
                .spawn(move || run(&rx));
            if started.is_err() {
                break;
            }
            queues.push(tx);
        }
        queues
    })
}

/// Polls before sleeping (about 0.3 ms here): a thread woken from sleep in the middle of a
/// stream of updates starts tens of microseconds late, longer on a virtual machine, as long
/// as adding a batch of 10⁵-value updates takes. Rayon's workers likewise spin before they
/// sleep.
const SPINS: u32 = 20_000;

/// A pool thread: runs its tasks in order, polling a while before it sleeps.
fn run(tasks: &Receiver<Task>) {
    loop {
        let mut spins = 0;
        let task = loop {
            match tasks.try_recv() {
                Ok(task) => break task,
                Err(TryRecvError::Empty) if spins < SPINS => {
                    spins += 1;
                    std::hint::spin_loop();
                }
                Err(_) => match tasks.recv() {
                    Ok(task) => break task,
                    Err(_) => return,
                },
            }
        };
        task();
    }
}

/// A stripe's part of the sum, and the panic of a job, if one panicked.
struct Part<T> {
    values: Vec<T>,
    panic: Option<Box<dyn Any + Send>>,
}

/// A stripe summed on a pool thread, or by the caller when the thread lags.
///
/// Invariant: jobs run in the order they were queued, one at a time, by whoever holds `part`.
struct Stripe<T> {
    thread: usize,
    range: Range<usize>,
    jobs: Mutex<VecDeque<Job<T>>>,
    part: Mutex<Part<T>>,
}

/// A sum of `len` values of `T`, split over the pool's threads and the caller.
///
/// Invariant: the first stripe (the caller's) covers `0..first.len()`, each pool stripe the
/// range it was given, contiguous and in order up to `len`.
pub struct Stripes<T> {
    len: usize,
    first: Vec<T>,
    others: Vec<Arc<Stripe<T>>>,
}

impl<T> std::fmt::Debug for Stripes<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stripes")
            .field("len", &self.len)
            .field("pool_stripes", &self.others.len())
            .finish()
    }
}

impl<T: Copy + Default + Send + 'static> Stripes<T> {
    /// A zero sum of `len` values, on the caller and every pool thread, each stripe with at
    /// least [`MIN_STRIPE`] coordinates.
    pub fn new(len: usize) -> Stripes<T> {
        Stripes::with_threads(len, MAX_THREADS + 1)
    }

    /// A zero sum of `len` values in at most `stripes` stripes (inline for 0 or 1).
    pub fn with_threads(len: usize, stripes: usize) -> Stripes<T> {
        let pool = pool();
        let n = stripes.min(pool.len() + 1).min(len / MIN_STRIPE).max(1);
        if n == 1 {
            return Stripes { len, first: vec![T::default(); len], others: Vec::new() };
        }
        let (ready, all_ready) = sync_channel(n);
        let others: Vec<_> = (1..n)
            .map(|s| {
                let stripe = Arc::new(Stripe {
                    thread: s - 1,
                    range: len * s / n..len * (s + 1) / n,
                    jobs: Mutex::new(VecDeque::with_capacity(QUEUE + 1)),
                    part: Mutex::new(Part { values: Vec::new(), panic: None }),
                });
                let (shared, ready) = (stripe.clone(), ready.clone());
                // Written, not allocated zeroed, so its pages are faulted on its thread now,
                // not during the first sum.
                let task = move || {
                    lock(&shared.part).values.resize(shared.range.len(), T::default());
                    let _ = ready.send(());
                };
                // The pool's threads never end (a panicking job is caught), so it is open.
                pool[s - 1].send(Box::new(task)).expect("summing threads live with the process");
                stripe
            })
            .collect();
        // Likewise every page of the finished sum: `finish` appends the other stripes to this
        // one, into pages faulted here.
        let mut first = Vec::with_capacity(len);
        first.resize(len, T::default());
        first.truncate(len / n);
        // A new sum is ready to take updates at full speed: its pages are all in place.
        for _ in 1..n {
            let _ = all_ready.recv();
        }
        Stripes { len, first, others }
    }

    /// Number of coordinates.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the sum has no coordinates.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stripes summed in parallel, the caller's included (0 when inline).
    pub fn threads(&self) -> usize {
        if self.others.is_empty() { 0 } else { self.others.len() + 1 }
    }

    /// Applies `job` to every stripe: to the first before this returns, to the others on the
    /// pool's threads, where it may still be running. Where a thread has fallen more than a
    /// few jobs behind (asleep, or its core busy), the caller runs its jobs itself.
    pub fn apply(&mut self, job: Job<T>) {
        let pool = pool();
        for stripe in &self.others {
            lock(&stripe.jobs).push_back(job.clone());
            let shared = stripe.clone();
            // A full queue of tasks holds wake-ups enough.
            let _ = pool[stripe.thread].try_send(Box::new(move || drain(&shared)));
        }
        let n = self.first.len();
        job(&mut self.first, 0..n);
        for stripe in &self.others {
            let behind = lock(&stripe.jobs).len() > QUEUE;
            if behind {
                drain(stripe);
            }
        }
    }

    /// The sum, once every job sent has been applied (the caller runs those a thread has not
    /// started).
    ///
    /// # Panics
    ///
    /// If a job panicked: with that panic.
    pub fn finish(self) -> Vec<T> {
        let mut sum = self.first;
        for stripe in self.others {
            drain(&stripe);
            let part = std::mem::replace(
                &mut *lock(&stripe.part),
                Part { values: Vec::new(), panic: None },
            );
            if let Some(panic) = part.panic {
                std::panic::resume_unwind(panic);
            }
            sum.extend_from_slice(&part.values);
        }
        sum
    }
}

/// How many updates one pass over the sum adds: each pass reads and writes the sum once, so
/// four updates to a pass move 8 bytes per update and coordinate instead of 20 (`f64` sums).
pub const BATCH: usize = 4;

/// Bytes of the sum a kernel's slow path keeps in L1 cache while it adds a batch (16 KiB).
pub const CHUNK_BYTES: usize = 16 * 1024;

/// Adds a batch of items to the part of a sum over `range` of their coordinates.
pub type Kernel<T, X> = fn(&mut [T], &[X], Range<usize>);

/// A running sum over [`Stripes`] fed items [`BATCH`] at a time: up to `BATCH − 1` items wait
/// (shared, not copied) until a batch is full or the sum finishes, then `kernel` adds them in
/// one pass over each stripe. Both the coordinator's sums (`Aggregator`, `WrappingSum`) are
/// one of these with their own kernel.
pub struct Batched<T, X> {
    sum: Stripes<T>,
    pending: Vec<X>,
    kernel: Kernel<T, X>,
}

impl<T, X> std::fmt::Debug for Batched<T, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batched")
            .field("sum", &self.sum)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl<T: Copy + Default + Send + 'static, X: Send + Sync + 'static> Batched<T, X> {
    /// A zero sum of `len` values, added to by `kernel`.
    pub fn new(len: usize, kernel: Kernel<T, X>) -> Batched<T, X> {
        Batched { sum: Stripes::new(len), pending: Vec::with_capacity(BATCH), kernel }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Queues `item`, and sends the batch to the stripes once it is full.
    pub fn push(&mut self, item: X) {
        self.pending.push(item);
        if self.pending.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCH));
        let kernel = self.kernel;
        self.sum
            .apply(Arc::new(move |sum: &mut [T], range: Range<usize>| kernel(sum, &batch, range)));
    }

    /// The sum, once every item pushed has been added.
    pub fn finish(mut self) -> Vec<T> {
        self.flush();
        self.sum.finish()
    }
}

/// Runs a stripe's waiting jobs in order, on whichever thread gets its part first.
fn drain<T>(stripe: &Stripe<T>) {
    let mut part = lock(&stripe.part);
    loop {
        let Some(job) = lock(&stripe.jobs).pop_front() else { return };
        if part.panic.is_none() {
            let range = stripe.range.clone();
            let run = std::panic::AssertUnwindSafe(|| job(&mut part.values, range));
            part.panic = std::panic::catch_unwind(run).err();
        }
    }
}

/// A lock that a panicking job poisoned still holds the values and the panic.
fn lock<V>(m: &Mutex<V>) -> std::sync::MutexGuard<'_, V> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_job(update: Arc<Vec<f64>>, weight: f64) -> Job<f64> {
        Arc::new(move |sum: &mut [f64], range: Range<usize>| {
            for (s, &x) in sum.iter_mut().zip(&update[range]) {
                *s += weight * x;
            }
        })
    }

    /// Threads give bit for bit the inline sum, for lengths that do not divide evenly.
    #[test]
    fn threads_sum_exactly_as_one_loop() {
        let len = 3 * MIN_STRIPE + 7;
        let updates: Vec<Arc<Vec<f64>>> = (0..9)
            .map(|k| Arc::new((0..len).map(|i| ((i * 31 + k * 17) % 1001) as f64 * 0.1).collect()))
            .collect();
        let mut inline = Stripes::with_threads(len, 1);
        let mut threaded = Stripes::with_threads(len, 3);
        let expected_stripes = (pool().len() + 1).min(3);
        assert_eq!(inline.threads(), 0);
        assert_eq!(threaded.threads(), if expected_stripes > 1 { expected_stripes } else { 0 });
        for (k, u) in updates.iter().enumerate() {
            inline.apply(add_job(u.clone(), 1.0 / (k + 1) as f64));
            threaded.apply(add_job(u.clone(), 1.0 / (k + 1) as f64));
        }
        let (a, b) = (inline.finish(), threaded.finish());
        assert_eq!(a.len(), len);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        // Every coordinate got every update, the ones at the stripes' edges included.
        for i in [0, len / 3 - 1, len / 3, len / 2, len - 1] {
            let mut expected = 0.0;
            for (k, u) in updates.iter().enumerate() {
                expected += 1.0 / (k + 1) as f64 * u[i];
            }
            assert_eq!(b[i].to_bits(), expected.to_bits(), "coordinate {i}");
        }
    }

    /// Small sums do not start threads.
    #[test]
    fn small_sums_run_inline() {
        let s = Stripes::<f64>::with_threads(2 * MIN_STRIPE - 1, 8);
        assert_eq!(s.threads(), 0);
        assert_eq!(s.finish(), vec![0.0; 2 * MIN_STRIPE - 1]);
    }

    /// A job that panics on a stripe's thread surfaces at `finish`, not as a silently short sum.
    #[test]
    fn a_panic_on_a_stripe_reaches_finish() {
        let mut s = Stripes::<f64>::with_threads(2 * MIN_STRIPE, 2);
        assert_eq!(s.threads(), 2);
        s.apply(Arc::new(|_: &mut [f64], r: Range<usize>| assert!(r.start == 0, "stripe {r:?}")));
        s.apply(Arc::new(|_: &mut [f64], _| {}));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.finish()));
        let message = caught.expect_err("the second stripe panicked");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("stripe"), "{text}");
        // The pool thread caught it and goes on summing for the next sum.
        let mut s = Stripes::<f64>::with_threads(2 * MIN_STRIPE, 2);
        s.apply(Arc::new(|p: &mut [f64], _| p.iter_mut().for_each(|v| *v += 1.5)));
        assert_eq!(s.finish(), vec![1.5; 2 * MIN_STRIPE]);
    }
}
