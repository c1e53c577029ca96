//! Run-time settings of the CPU kernels: the thread count and the SIMD implementation.

use crate::errors::to_py;
use normax_core::{isa, threads, Isa};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

#[pyfunction]
fn set_num_threads(n: i64) -> PyResult<()> {
    if n < 1 {
        return Err(PyValueError::new_err(format!(
            "n must be at least 1, got {n}"
        )));
    }
    threads::set_num_threads(n as usize).map_err(to_py)
}

/// The SIMD implementation in use: "scalar", "avx2" or "avx512".
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

/// Applies NORMAX_ISA and adds the settings functions. A bad NORMAX_ISA fails the import
/// loudly rather than silently running another path.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    if let Some(chosen) = isa::from_env().map_err(to_py)? {
        isa::set_active(chosen).map_err(to_py)?;
    }
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_isa, m)?)?;
    m.add_function(wrap_pyfunction!(set_isa, m)?)?;
    m.add_function(wrap_pyfunction!(supported_isas, m)?)?;
    Ok(())
}
