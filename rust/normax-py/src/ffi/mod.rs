//! XLA's typed FFI: the handlers `normax.jax` calls through `jax.ffi.ffi_call`.
//!
//! `api` is the hand-written subset of XLA's C header, `frame` the safe decoding of a call
//! frame (all of the unsafe code), and one file per op family holds its CPU handlers, each a
//! plain `extern "C"` function over normax-core. `ffi_targets(platform)` gives them to Python as
//! PyCapsules whose pointer is the function itself, for `jax.ffi.register_ffi_target`.

pub(crate) mod api;
pub(crate) mod batch;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
pub(crate) mod frame;
mod linear;
mod logprobs;
mod norms;
mod softmax;
mod vocab_parallel;

use api::XLA_FFI_Handler;
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyDict};

/// A target's name and handler.
pub(crate) type Target = (&'static str, XLA_FFI_Handler);

/// The CPU handlers of every family.
fn cpu_targets() -> Vec<Target> {
    [
        softmax::TARGETS,
        cross_entropy::TARGETS,
        norms::TARGETS,
        linear::TARGETS,
        logprobs::TARGETS,
        vocab_parallel::TARGETS,
    ]
    .concat()
}

/// A capsule whose pointer is the handler itself (as `jax.ffi.pycapsule` makes one): PyO3's
/// `PyCapsule::new` would store a pointer to a boxed value, one level too deep for XLA.
fn capsule(py: Python<'_>, handler: XLA_FFI_Handler) -> PyResult<Bound<'_, PyCapsule>> {
    // SAFETY: PyCapsule_New with a non-null pointer, no name and no destructor returns a new
    // reference or null with an exception set.
    unsafe {
        let ptr =
            pyo3::ffi::PyCapsule_New(handler as *mut std::ffi::c_void, std::ptr::null(), None);
        Bound::from_owned_ptr_or_err(py, ptr).map(|b| b.cast_into_unchecked::<PyCapsule>())
    }
}

/// The FFI handlers for `platform` ("cpu" or "CUDA") as {target name: PyCapsule}; empty for a
/// platform this build has no handlers for.
#[pyfunction]
fn ffi_targets<'py>(py: Python<'py>, platform: &str) -> PyResult<Bound<'py, PyDict>> {
    let targets = match platform {
        "cpu" => cpu_targets(),
        #[cfg(feature = "cuda")]
        "CUDA" => cuda::TARGETS.to_vec(),
        _ => Vec::new(),
    };
    let dict = PyDict::new(py);
    for (name, handler) in targets {
        dict.set_item(name, capsule(py, handler)?)?;
    }
    Ok(dict)
}

/// Adds `ffi_targets` to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(ffi_targets, m)?)
}
