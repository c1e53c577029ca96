//! The thread pool kernels run on: sized by `NORMAX_NUM_THREADS`, else `RAYON_NUM_THREADS`, else
//! the CPU count; resizable up to [`max_threads`]; started lazily and rebuilt in a forked child.
//!
//! Fork: a child made by `fork()` has only the forking thread, so the parent's pool threads do
//! not exist there and a call handed to that pool would wait forever. A `pthread_atfork` child
//! handler (one atomic store) detaches the pool state, and the child's first call builds a new
//! pool with the same thread count. The parent's pool is leaked in the child, never touched: its
//! locks may have been held by threads that are gone (a call running in another thread at the
//! fork is fine). OpenBLAS and PyTorch do the same with `pthread_atfork`.
//!
//! Interrupts (Ctrl-C): a host runs a call under [`watch_interrupts`] on the thread it can
//! interrupt, and its signal handler calls [`interrupt`]. The parallel loops of that call then
//! start no new task, so it returns within about one task (a few milliseconds at most), its
//! output partly written; the host raises. Calls not watched never look at the flag.

use crate::Error;
use rayon::prelude::*;
use std::cell::Cell;
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// The pool, built on first use after start-up, `set_num_threads` or a fork. Heap-allocated and
/// only ever replaced (never freed) so that the fork handler can detach it with one store.
struct Slot {
    pool: RwLock<Option<Arc<rayon::ThreadPool>>>,
}

static SLOT: AtomicPtr<Slot> = AtomicPtr::new(null_mut());
/// The thread count the pool has or will be built with; 0 until first resolved from the
/// environment. Written under the slot's write lock (or by the first resolution).
static THREADS: AtomicUsize = AtomicUsize::new(0);
/// Logical CPUs, cached (0 until read).
static CPUS: AtomicUsize = AtomicUsize::new(0);
static ATFORK_REGISTERED: AtomicBool = AtomicBool::new(false);

/// Set by [`interrupt`]: the watched call should stop.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Whether the call running on this thread is watched for [`interrupt`].
    static WATCHED: Cell<bool> = const { Cell::new(false) };
}

/// Asks the watched call to stop; async-signal-safe (one atomic store).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Runs `f` (one whole call) so that [`interrupt`] stops it early; returns its result and
/// whether it was interrupted (then its outputs are partly written and its result meaningless).
/// One watched call at a time: the host's signal-handling thread.
pub fn watch_interrupts<R>(f: impl FnOnce() -> R) -> (R, bool) {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            WATCHED.set(self.0);
        }
    }
    INTERRUPTED.store(false, Ordering::Relaxed);
    let _restore = Restore(WATCHED.replace(true));
    let r = f();
    (r, INTERRUPTED.swap(false, Ordering::Relaxed))
}

/// The interrupt state of the call running on this thread, captured once per parallel loop so
/// that a task costs one relaxed load, and nothing when the call is not watched.
#[derive(Clone, Copy)]
pub(crate) struct Stop(bool);

impl Stop {
    pub(crate) fn current() -> Stop {
        Stop(WATCHED.get())
    }

    #[inline(always)]
    pub(crate) fn hit(self) -> bool {
        self.0 && INTERRUPTED.load(Ordering::Relaxed)
    }
}

/// The fewest threads [`max_threads`] allows on any machine.
pub const MIN_MAX_THREADS: usize = 1024;

/// Logical CPUs this process may run on (`std::thread::available_parallelism`, else 1).
pub fn logical_cpus() -> usize {
    match CPUS.load(Ordering::Relaxed) {
        0 => {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            CPUS.store(n, Ordering::Relaxed);
            n
        }
        n => n,
    }
}

/// The largest thread count accepted: the larger of 1024 and 4 x the logical CPUs. Larger
/// requests are refused by [`set_num_threads`] and clamped (with a warning) from the
/// environment; every thread is a real OS thread, so far more than the CPUs only costs.
pub fn max_threads() -> usize {
    MIN_MAX_THREADS.max(logical_cpus().saturating_mul(4))
}

/// The thread count the environment asks for, and a warning when it had to be adjusted.
///
/// `NORMAX_NUM_THREADS` is read first, then `RAYON_NUM_THREADS` (empty counts as unset). `0`
/// means the CPU count (rayon's convention); text that is not a non-negative integer is ignored
/// with a warning (the next variable or the CPU count is used); a count above [`max_threads`]
/// is clamped to it with a warning, as OpenBLAS and numexpr clamp theirs.
pub fn env_threads() -> (usize, Option<String>) {
    let var = |name| std::env::var(name).ok();
    resolve_env(
        var("NORMAX_NUM_THREADS").as_deref(),
        var("RAYON_NUM_THREADS").as_deref(),
        logical_cpus(),
        max_threads(),
    )
}

fn resolve_env(
    normax: Option<&str>,
    rayon: Option<&str>,
    cpus: usize,
    max: usize,
) -> (usize, Option<String>) {
    let mut warnings = Vec::new();
    let mut chosen = None;
    for (name, value) in [("NORMAX_NUM_THREADS", normax), ("RAYON_NUM_THREADS", rayon)] {
        let Some(text) = value.map(str::trim).filter(|t| !t.is_empty()) else {
            continue;
        };
        // Any run of digits is a number, however long: "99999999999999999999" is too many
        // threads, not garbage.
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            warnings.push(format!(
                "ignoring {name}={text:?}: not a non-negative integer"
            ));
            continue;
        }
        let n = text.parse::<usize>().unwrap_or(usize::MAX);
        chosen = Some(if n == 0 {
            cpus
        } else if n > max {
            warnings.push(format!(
                "{name}={text} is above the maximum of {max} threads (the larger of \
                 {MIN_MAX_THREADS} and 4 x the {cpus} logical CPUs); using {max}"
            ));
            max
        } else {
            n
        });
        break;
    }
    let n = chosen.unwrap_or(cpus).clamp(1, max);
    (n, (!warnings.is_empty()).then(|| warnings.join("; ")))
}

/// The thread count, resolving it from the environment the first time.
fn target() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            let n = env_threads().0;
            match THREADS.compare_exchange(0, n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => n,
                Err(set) => set,
            }
        }
        n => n,
    }
}

fn build(threads: usize) -> Result<Arc<rayon::ThreadPool>, Error> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("normax-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Value(format!("cannot start {threads} threads: {e}")))
}

/// In a forked child: detach the parent's pool state (leaked, never touched). One atomic store,
/// async-signal-safe.
#[cfg(unix)]
extern "C" fn after_fork_in_child() {
    SLOT.store(null_mut(), Ordering::Relaxed);
}

#[cfg(unix)]
fn register_fork_handler() {
    extern "C" {
        fn pthread_atfork(
            prepare: Option<extern "C" fn()>,
            parent: Option<extern "C" fn()>,
            child: Option<extern "C" fn()>,
        ) -> std::os::raw::c_int;
    }
    if !ATFORK_REGISTERED.swap(true, Ordering::Relaxed) {
        // SAFETY: registers a handler that only stores to an atomic; it takes no pointers.
        // Failure (ENOMEM) leaves fork unsupported as before; nothing else depends on it.
        unsafe {
            pthread_atfork(None, None, Some(after_fork_in_child));
        }
    }
}

#[cfg(not(unix))]
fn register_fork_handler() {}

fn slot() -> &'static Slot {
    let p = SLOT.load(Ordering::Acquire);
    if p.is_null() {
        new_slot()
    } else {
        // SAFETY: a published slot is never freed.
        unsafe { &*p }
    }
}

#[cold]
fn new_slot() -> &'static Slot {
    register_fork_handler();
    let fresh = Box::into_raw(Box::new(Slot {
        pool: RwLock::new(None),
    }));
    match SLOT.compare_exchange(null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
        // SAFETY: just published; never freed.
        Ok(_) => unsafe { &*fresh },
        Err(current) => {
            // SAFETY: `fresh` was never published; `current` is a published slot.
            unsafe {
                drop(Box::from_raw(fresh));
                &*current
            }
        }
    }
}

fn pool() -> Arc<rayon::ThreadPool> {
    let slot = slot();
    if let Some(p) = slot.pool.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return p.clone();
    }
    let mut guard = slot.pool.write().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let threads = target();
        // A pool of one thread cannot fail to start except by resource exhaustion; fall back to
        // it (and report 1 thread).
        let pool = build(threads).or_else(|_| build(1)).expect("thread pool");
        THREADS.store(pool.current_num_threads(), Ordering::Relaxed);
        *guard = Some(pool);
    }
    guard.as_ref().unwrap().clone()
}

/// Threads the kernels use.
pub fn num_threads() -> usize {
    target()
}

/// Sets the thread count, 1 to [`max_threads`]; the threads start with the next call (calls
/// already running finish on the old pool). Setting the current count changes nothing.
pub fn set_num_threads(threads: usize) -> Result<(), Error> {
    if threads == 0 {
        return Err(Error::Value("n must be at least 1".into()));
    }
    let max = max_threads();
    if threads > max {
        return Err(Error::Value(format!(
            "n must be at most {max} (the larger of {MIN_MAX_THREADS} and 4 x the {} logical \
             CPUs), got {threads}",
            logical_cpus()
        )));
    }
    let slot = slot();
    let old = {
        let mut guard = slot.pool.write().unwrap_or_else(|e| e.into_inner());
        if guard.is_some() && target() == threads {
            return Ok(());
        }
        THREADS.store(threads, Ordering::Relaxed);
        guard.take()
    };
    drop(old); // outside the lock: the old pool's threads stop once its last call returns
    Ok(())
}

/// Runs `task(i)` for i in 0..tasks, in parallel when there is more than one task and thread;
/// tasks not yet started are skipped once the watched call is interrupted.
///
/// The calling thread takes tasks too, and the pool's threads join as they wake: each claims the
/// next task from a shared counter. So the call never waits for a thread that is slow to wake
/// (on a busy core, behind torch's spinning OpenMP workers), only for tasks already started.
pub(crate) fn for_each(tasks: usize, task: impl Fn(usize) + Sync + Send) {
    let stop = Stop::current();
    let task = |t| {
        if !stop.hit() {
            task(t)
        }
    };
    if tasks <= 1 {
        (0..tasks).for_each(task);
        return;
    }
    let pool = pool();
    let helpers = (pool.current_num_threads() - 1).min(tasks - 1);
    if helpers == 0 {
        (0..tasks).for_each(task);
        return;
    }
    let queue = Arc::new(TaskQueue {
        next: AtomicUsize::new(0),
        finished: AtomicUsize::new(0),
        tasks,
        panicked: AtomicBool::new(false),
    });
    let task: &(dyn Fn(usize) + Sync) = &task;
    // SAFETY: a helper calls `task` only for an index it claimed below `tasks`, and this
    // function returns only once every claimed task has finished; a helper that starts later
    // claims nothing and never touches `task`. So `task` outlives every use of this reference.
    let shared = SharedTask(unsafe {
        std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(task)
    });
    for _ in 0..helpers {
        let queue = queue.clone();
        pool.spawn(move || queue.run(shared));
    }
    queue.run(shared);
    let mut spins = 0u32;
    while queue.finished.load(Ordering::Acquire) < tasks {
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    if queue.panicked.load(Ordering::Relaxed) {
        panic!("a normax task panicked");
    }
}

/// The tasks of one [`for_each`] call, claimed in order by whichever thread comes first.
struct TaskQueue {
    next: AtomicUsize,
    finished: AtomicUsize,
    tasks: usize,
    panicked: AtomicBool,
}

#[derive(Clone, Copy)]
struct SharedTask(&'static (dyn Fn(usize) + Sync));

impl TaskQueue {
    fn run(&self, task: SharedTask) {
        loop {
            let t = self.next.fetch_add(1, Ordering::Relaxed);
            if t >= self.tasks {
                return;
            }
            // A panicking task still counts as finished, so the caller never waits forever.
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (task.0)(t))).is_ok();
            if !ok {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.finished.fetch_add(1, Ordering::Release);
        }
    }
}

/// Maps `task` over 0..tasks in parallel and returns the results in order; once the watched
/// call is interrupted, the results of the tasks that ran (fewer than `tasks`).
pub(crate) fn map<R: Send>(tasks: usize, task: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    let stop = Stop::current();
    let pool = pool();
    if tasks <= 1 || pool.current_num_threads() == 1 {
        (0..tasks)
            .map_while(|t| (!stop.hit()).then(|| task(t)))
            .collect()
    } else if stop.0 {
        pool.install(|| {
            (0..tasks)
                .into_par_iter()
                .filter_map(|t| (!stop.hit()).then(|| task(t)))
                .collect()
        })
    } else {
        pool.install(|| (0..tasks).into_par_iter().map(task).collect())
    }
}

/// Runs `f` inside the pool, so rayon work it starts (a GEMM's) uses these threads; a watched
/// call stays watched there.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let watched = WATCHED.get();
    pool().install(move || {
        let previous = WATCHED.replace(watched);
        let r = f();
        WATCHED.set(previous);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::{for_each, resolve_env, SharedTask, TaskQueue};
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::{
        AtomicUsize,
        Ordering::{Relaxed, SeqCst},
    };

    fn queue(tasks: usize) -> TaskQueue {
        TaskQueue {
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            tasks,
            panicked: AtomicBool::new(false),
        }
    }

    #[test]
    fn the_caller_alone_runs_every_task_once_when_no_helper_comes() {
        let counts: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        let task = |t: usize| {
            counts[t].fetch_add(1, Relaxed);
        };
        let task: &(dyn Fn(usize) + Sync) = &task;
        // SAFETY: `task` outlives both runs below.
        let shared = SharedTask(unsafe { std::mem::transmute(task) });
        let q = queue(counts.len());
        q.run(shared);
        // A helper that arrives after the caller took everything claims nothing.
        q.run(shared);
        assert!(counts.iter().all(|c| c.load(Relaxed) == 1));
        assert_eq!(q.finished.load(SeqCst), counts.len());
        assert!(!q.panicked.load(SeqCst));
    }

    #[test]
    fn a_panicking_task_is_finished_and_reported() {
        let task = |t: usize| assert!(t != 3, "task 3 fails");
        let task: &(dyn Fn(usize) + Sync) = &task;
        // SAFETY: `task` outlives the run.
        let shared = SharedTask(unsafe { std::mem::transmute(task) });
        let q = queue(8);
        q.run(shared);
        assert_eq!(q.finished.load(SeqCst), 8);
        assert!(q.panicked.load(SeqCst));
    }

    #[test]
    fn for_each_runs_every_task_once_on_the_pool() {
        let counts: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for_each(counts.len(), |t| {
            counts[t].fetch_add(1, Relaxed);
        });
        assert!(counts.iter().all(|c| c.load(Relaxed) == 1));
    }

    #[test]
    fn an_interrupted_call_starts_no_new_task() {
        // Counted: the tasks whose body starts once the flag is set. Only a task that passed its
        // check just before the store can, at most one per thread, however the threads are
        // scheduled (a count of all tasks run would also count those the other threads ran
        // while the interrupting one was preempted between its two statements: 583 under qemu).
        let tasks = 10_000;
        let (ran, after) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let task = |_| {
            if super::INTERRUPTED.load(SeqCst) {
                after.fetch_add(1, SeqCst);
            }
            if ran.fetch_add(1, SeqCst) == 10 {
                super::interrupt();
            }
        };
        let ((), interrupted) = super::watch_interrupts(|| super::for_each(tasks, task));
        assert!(interrupted);
        assert!(after.load(SeqCst) <= super::num_threads(), "{after:?}");
        assert!(ran.load(SeqCst) < tasks, "{ran:?}");
        let (ran, after) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let (done, interrupted) = super::watch_interrupts(|| {
            super::map(tasks, |t| {
                if super::INTERRUPTED.load(SeqCst) {
                    after.fetch_add(1, SeqCst);
                }
                if ran.fetch_add(1, SeqCst) == 10 {
                    super::interrupt();
                }
                t
            })
        });
        assert!(interrupted);
        assert!(after.load(SeqCst) <= super::num_threads(), "{after:?}");
        assert!(done.len() < tasks, "{}", done.len());
        // A call not watched never looks at the flag.
        super::interrupt();
        let ran = AtomicUsize::new(0);
        super::for_each(tasks, |_| {
            ran.fetch_add(1, Relaxed);
        });
        assert_eq!(ran.load(Relaxed), tasks);
        assert_eq!(super::map(tasks, |t| t).len(), tasks);
    }

    #[test]
    fn environment_is_bounded() {
        let (cpus, max) = (2, 1024);
        assert_eq!(resolve_env(None, None, cpus, max), (2, None));
        assert_eq!(resolve_env(Some("3"), Some("5"), cpus, max), (3, None));
        assert_eq!(resolve_env(None, Some("5"), cpus, max), (5, None));
        assert_eq!(resolve_env(Some(" "), Some("5"), cpus, max), (5, None));
        assert_eq!(resolve_env(Some("0"), Some("5"), cpus, max), (2, None));
        assert_eq!(resolve_env(Some("1024"), None, cpus, max), (1024, None));
        for big in [
            "1025",
            "1000000",
            "1099511627776",
            "99999999999999999999999",
        ] {
            let (n, warning) = resolve_env(Some(big), None, cpus, max);
            assert_eq!(n, 1024);
            assert!(warning.unwrap().contains("NORMAX_NUM_THREADS"));
            let (n, warning) = resolve_env(None, Some(big), cpus, max);
            assert_eq!(n, 1024);
            assert!(warning.unwrap().contains("RAYON_NUM_THREADS"));
        }
        for bad in ["-3", "abc", "2.5", "0x10"] {
            let (n, warning) = resolve_env(Some(bad), Some("7"), cpus, max);
            assert_eq!(n, 7);
            assert!(warning.unwrap().contains("ignoring NORMAX_NUM_THREADS"));
            let (n, warning) = resolve_env(None, Some(bad), cpus, max);
            assert_eq!(n, 2);
            assert!(warning.unwrap().contains("ignoring RAYON_NUM_THREADS"));
        }
    }
}
