//! The Python extension `normax._core`: converts arrays, releases the GIL, maps errors. No math.
//!
//! The Python layer (python/normax) validates user input and reshapes every call into the
//! (outer, len, inner) layout of C-contiguous, native-endian float32/float64 arrays; the bindings
//! re-check what memory safety depends on (dtype, contiguity, sizes, writeability).
//!
//! One file per op family (`softmax`, `stablemax`, `cross_entropy`, `vocab_parallel`, `logprobs`,
//! `norms`), one per GPU backend (`cuda`, `wgpu`), and the shared parts: `options` (the checked
//! options, the one form in which they cross: `CeOptions`, `NormOptions`, `PowerNormOptions`,
//! `VocabParallelLayout`; `LogprobOptions` lives beside its op in `logprobs`),
//! `arrays` (array checks), `errors` (the one error mapping), `config` (threads, ISA),
//! `interrupt` (Ctrl-C during a long call). `ffi` holds the XLA typed-FFI handlers that
//! `normax.jax` registers with `jax.ffi` (plain `extern "C"` functions, exported as capsules).

use pyo3::prelude::*;

mod arrays;
mod config;
mod cross_entropy;
#[cfg(feature = "cuda")]
mod cuda;
mod errors;
mod ffi;
mod interrupt;
mod logprobs;
mod norms;
mod options;
mod softmax;
mod stablemax;
mod vocab_parallel;
#[cfg(feature = "wgpu")]
mod wgpu;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    config::register(m)?;
    options::register(m)?;
    softmax::register(m)?;
    stablemax::register(m)?;
    norms::register(m)?;
    cross_entropy::register(m)?;
    vocab_parallel::register(m)?;
    logprobs::register(m)?;
    ffi::register(m)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    #[cfg(feature = "wgpu")]
    wgpu::register(m)?;
    Ok(())
}
