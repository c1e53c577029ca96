//! The thread pool: usable in a forked child (issue 13 item 1) and bounded (item 2).

mod common;

use common::{lock, Rng};
use normax_core::softmax::softmax;
use normax_core::{threads, Layout};
use std::time::{Duration, Instant};

const ROWS: usize = 512;
const COLS: usize = 1024;

fn run(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    softmax(x, &mut y, Layout::rows(x.len() / COLS, COLS)).unwrap();
    y
}

#[cfg(unix)]
mod sys {
    use std::os::raw::{c_int, c_uint};
    extern "C" {
        pub fn fork() -> c_int;
        pub fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
        pub fn _exit(code: c_int) -> !;
        pub fn alarm(seconds: c_uint) -> c_uint;
    }
}

/// Forks; the child runs `child` (killed by SIGALRM after 60 s, so a hang fails) and exits 0 when
/// it returns true. Returns the child's wait status: 0 is a clean exit 0.
#[cfg(unix)]
fn fork_and_wait(child: impl FnOnce() -> bool) -> i32 {
    // SAFETY: the child only computes with this crate and exits with _exit (no unwinding, no
    // destructors of the parent's state).
    unsafe {
        let pid = sys::fork();
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            sys::alarm(60);
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).unwrap_or(false);
            sys::_exit(if ok { 0 } else { 3 });
        }
        let mut status = 0;
        assert_eq!(sys::waitpid(pid, &mut status, 0), pid);
        status
    }
}

#[cfg(unix)]
#[test]
fn forked_child_rebuilds_the_pool() {
    let _guard = lock();
    let before = threads::num_threads();
    threads::set_num_threads(2).unwrap(); // multi-threaded even on one CPU
    let x = Rng(3).vec_f32(ROWS * COLS, 3.0);
    let want = run(&x); // the parent's pool threads now exist
    let status = fork_and_wait(|| {
        let mut ok = run(&x) == want && threads::num_threads() == 2;
        threads::set_num_threads(3).unwrap();
        ok &= run(&x) == want && threads::num_threads() == 3;
        // A grandchild of a child that rebuilt its pool.
        ok && fork_and_wait(|| run(&x) == want) == 0
    });
    assert_eq!(status, 0, "child failed or hung (wait status {status:#x})");
    assert_eq!(run(&x), want, "the parent's pool after the fork");
    threads::set_num_threads(before).unwrap();
}

#[cfg(unix)]
#[test]
fn fork_while_another_thread_is_inside_a_call() {
    let _guard = lock();
    let before = threads::num_threads();
    threads::set_num_threads(2).unwrap();
    let x = Rng(4).vec_f32(ROWS * COLS, 3.0);
    let want = run(&x);
    let long = Rng(5).vec_f32(8 * ROWS * COLS, 3.0);
    let want_long = run(&long);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let calls = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                assert_eq!(run(&long), want_long);
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        while calls.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 0..6 {
            std::thread::sleep(Duration::from_millis(3 * (i + 1)));
            let status = fork_and_wait(|| run(&x) == want && run(&long) == want_long);
            assert_eq!(
                status, 0,
                "child {i} failed or hung (wait status {status:#x})"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    threads::set_num_threads(before).unwrap();
}

#[test]
fn thread_count_is_bounded() {
    let _guard = lock();
    let before = threads::num_threads();
    let max = threads::max_threads();
    assert!(max >= 1024 && max >= 4 * threads::logical_cpus());
    let start = Instant::now();
    for too_many in [max + 1, 1_000_000, 1 << 40, usize::MAX] {
        let err = threads::set_num_threads(too_many).unwrap_err().to_string();
        assert!(err.contains(&format!("at most {max}")), "{err}");
    }
    assert!(threads::set_num_threads(0).is_err());
    assert_eq!(threads::num_threads(), before);
    // The maximum is accepted, and no thread starts before a call needs one.
    threads::set_num_threads(max).unwrap();
    assert_eq!(threads::num_threads(), max);
    threads::set_num_threads(before).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(threads::num_threads(), before);
}
