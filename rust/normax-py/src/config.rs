//! Run-time settings of the CPU kernels: the thread count and the SIMD implementation.

use crate::errors::to_py;
use normax_core::{isa, threads, Isa};
use pyo3::exceptions::{PyOverflowError, PyRuntimeWarning, PyValueError};
use pyo3::prelude::*;

/// The number of threads the CPU kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

/// Sets the number of threads the CPU kernels use: an integer from 1 to the maximum, the larger
/// of 1024 and 4 x the logical CPUs; anything else is a ValueError naming `n` (a float is a
/// TypeError). The threads start with the next call; calls already running finish on the old
/// ones. The default comes from NORMAX_NUM_THREADS, else RAYON_NUM_THREADS, else the CPU count
/// (0 = the CPU count; above the maximum is clamped with a RuntimeWarning at import).
#[pyfunction]
fn set_num_threads(n: &Bound<'_, PyAny>) -> PyResult<()> {
    let max = threads::max_threads();
    // Python ints of any size: past i64 they are simply out of range.
    let value = match n.extract::<i64>() {
        Ok(v) => v,
        Err(e) if e.is_instance_of::<PyOverflowError>(n.py()) => {
            if n.gt(0)? {
                i64::MAX
            } else {
                i64::MIN
            }
        }
        Err(e) => return Err(e),
    };
    if value < 1 {
        return Err(PyValueError::new_err(format!(
            "n must be at least 1, got {n}"
        )));
    }
    if value as u64 > max as u64 {
        return Err(PyValueError::new_err(format!(
            "n must be at most {max} (the larger of {} and 4 x the {} logical CPUs), got {n}",
            threads::MIN_MAX_THREADS,
            threads::logical_cpus()
        )));
    }
    threads::set_num_threads(value as usize).map_err(to_py)
}

/// The SIMD implementation in use: "scalar", "avx2", "avx512" (x86-64) or "neon" (AArch64).
#[pyfunction]
fn get_isa() -> &'static str {
    isa::active().name()
}

#[pyfunction]
fn set_isa(name: &str) -> PyResult<()> {
    isa::set_active(Isa::parse(name).map_err(to_py)?).map_err(to_py)
}

/// The implementations this CPU supports, narrowest first.
#[pyfunction]
fn supported_isas() -> Vec<&'static str> {
    isa::supported().into_iter().map(Isa::name).collect()
}

/// Applies NORMAX_ISA, warns about an out-of-range NORMAX_NUM_THREADS / RAYON_NUM_THREADS, and
/// adds the settings functions. A bad NORMAX_ISA fails the import loudly rather than silently
/// running another path.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if let Some(chosen) = isa::from_env().map_err(to_py)? {
        isa::set_active(chosen).map_err(to_py)?;
    }
    // A thread count from the environment that is out of range is clamped (or ignored) with a
    // warning, as OpenBLAS and numexpr do, rather than failing the import.
    if let (_, Some(warning)) = threads::env_threads() {
        let msg = std::ffi::CString::new(format!("normax: {warning}")).unwrap_or_default();
        PyErr::warn(m.py(), &m.py().get_type::<PyRuntimeWarning>(), &msg, 1)?;
    }
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_isa, m)?)?;
    m.add_function(wrap_pyfunction!(set_isa, m)?)?;
    m.add_function(wrap_pyfunction!(supported_isas, m)?)?;
    Ok(())
}
