//! Ctrl-C during a long call. The kernels run with the GIL released, where Python cannot run its
//! SIGINT handler, so a 2 GiB call would finish before KeyboardInterrupt is raised. For a large
//! call on the main thread under Python's default SIGINT handler, a C handler chained in front
//! of Python's own asks the core to stop (`threads::interrupt`, one atomic store): the parallel
//! loops start no new task, and the call raises KeyboardInterrupt with its output partly
//! written, as NumPy's do. Small calls, other threads and custom Python handlers (which might
//! not raise) are left alone.

use crate::errors::to_py;
use normax_core::{threads, Error};
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;

/// Calls on fewer elements (a few milliseconds at most) are not watched: the set-up (two
/// lookups in Python, two sigaction calls) would cost more than the wait it saves.
const WATCH_MIN: usize = 1 << 22;

/// Runs `kernel` over `elements` values with the GIL released, stopping it with
/// KeyboardInterrupt on Ctrl-C when it is large and on the main thread.
pub(crate) fn detach<R: Send>(
    py: Python<'_>,
    elements: usize,
    kernel: impl FnOnce() -> Result<R, Error> + Send,
) -> PyResult<R> {
    let hook = if elements >= WATCH_MIN && watchable(py)? {
        hook::install()
    } else {
        None
    };
    let Some(hook) = hook else {
        return py.detach(kernel).map_err(to_py);
    };
    let (result, interrupted) = py.detach(|| threads::watch_interrupts(kernel));
    drop(hook);
    if interrupted {
        py.check_signals()?; // runs Python's handler: KeyboardInterrupt
        return Err(PyKeyboardInterrupt::new_err(()));
    }
    result.map_err(to_py)
}

/// On the main thread, with Python's default SIGINT handler (which raises KeyboardInterrupt).
fn watchable(py: Python<'_>) -> PyResult<bool> {
    let signal = py.import("signal")?;
    let handler = signal.call_method1("getsignal", (signal.getattr("SIGINT")?,))?;
    if !handler.is(&signal.getattr("default_int_handler")?) {
        return Ok(false);
    }
    let threading = py.import("threading")?;
    let main = threading.call_method0("main_thread")?;
    Ok(threading.call_method0("current_thread")?.is(&main))
}

#[cfg(unix)]
mod hook {
    use normax_core::threads;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// The handler found at install time (a function, never SIG_DFL / SIG_IGN) and its kind.
    static PREVIOUS: AtomicUsize = AtomicUsize::new(0);
    static PREVIOUS_SIGINFO: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_sigint(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
        threads::interrupt();
        let previous = PREVIOUS.load(Ordering::Relaxed);
        // Python's own handler then records the signal, as if this one were not there.
        unsafe {
            if PREVIOUS_SIGINFO.load(Ordering::Relaxed) {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(previous);
                f(sig, info, ctx)
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(previous);
                f(sig)
            }
        }
    }

    /// The SIGINT action before [`install`], put back exactly (flags and mask too) on drop.
    pub(super) struct Hook(libc::sigaction);

    impl Drop for Hook {
        fn drop(&mut self) {
            unsafe { libc::sigaction(libc::SIGINT, &self.0, std::ptr::null_mut()) };
        }
    }

    pub(super) fn install() -> Option<Hook> {
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGINT, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction == libc::SIG_DFL
                || old.sa_sigaction == libc::SIG_IGN
            {
                return None;
            }
            PREVIOUS.store(old.sa_sigaction, Ordering::Relaxed);
            PREVIOUS_SIGINFO.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::Relaxed);
            let mut new = old;
            new.sa_sigaction = on_sigint as *const () as usize;
            new.sa_flags = old.sa_flags | libc::SA_SIGINFO;
            if libc::sigaction(libc::SIGINT, &new, std::ptr::null_mut()) != 0 {
                return None;
            }
            Some(Hook(old))
        }
    }
}

#[cfg(not(unix))]
mod hook {
    pub(super) struct Hook;

    pub(super) fn install() -> Option<Hook> {
        None
    }
}
