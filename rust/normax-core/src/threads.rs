//! The thread pool kernels run on: sized by `RAYON_NUM_THREADS` (else the CPU count), resizable.

use crate::Error;
use rayon::prelude::*;
use std::sync::{Arc, RwLock};

static POOL: RwLock<Option<Arc<rayon::ThreadPool>>> = RwLock::new(None);

fn default_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn build(threads: usize) -> Result<Arc<rayon::ThreadPool>, Error> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("normax-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Value(format!("cannot start {threads} threads: {e}")))
}

fn pool() -> Arc<rayon::ThreadPool> {
    if let Some(p) = POOL.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
        return p.clone();
    }
    let mut slot = POOL.write().unwrap_or_else(|e| e.into_inner());
    if slot.is_none() {
        // A pool of one thread cannot fail to start except by resource exhaustion; fall back to it.
        *slot = Some(
            build(default_threads())
                .or_else(|_| build(1))
                .expect("thread pool"),
        );
    }
    slot.as_ref().unwrap().clone()
}

/// Threads the kernels use.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Resizes the pool; calls already running finish on the old one.
pub fn set_num_threads(threads: usize) -> Result<(), Error> {
    if threads == 0 {
        return Err(Error::Value("n must be at least 1".into()));
    }
    let new = build(threads)?;
    *POOL.write().unwrap_or_else(|e| e.into_inner()) = Some(new);
    Ok(())
}

/// Runs `task(i)` for i in 0..tasks, in parallel when there is more than one task and thread.
pub(crate) fn for_each(tasks: usize, task: impl Fn(usize) + Sync + Send) {
    if tasks <= 1 {
        (0..tasks).for_each(task);
        return;
    }
    let pool = pool();
    if pool.current_num_threads() == 1 {
        (0..tasks).for_each(task);
    } else {
        pool.install(|| (0..tasks).into_par_iter().for_each(task));
    }
}

/// Maps `task` over 0..tasks in parallel and returns the results in order.
pub(crate) fn map<R: Send>(tasks: usize, task: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    let pool = pool();
    if tasks <= 1 || pool.current_num_threads() == 1 {
        (0..tasks).map(task).collect()
    } else {
        pool.install(|| (0..tasks).into_par_iter().map(task).collect())
    }
}

/// Runs `f` inside the pool, so rayon work it starts (a GEMM's) uses these threads.
pub(crate) fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}
