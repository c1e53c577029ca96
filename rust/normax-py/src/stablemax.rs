//! Bindings of `normax_core::stablemax`: stablemax and log_stablemax (the backwards are
//! softmax's, scaled in the Python layer).

use crate::arrays::{by_dtype, rows_layout, Arr};
use crate::softmax::{last_axis, map_typed, RowOps};
use normax_core::stablemax as k;
use pyo3::prelude::*;

/// stablemax over the last axis into `out` or a new array, or None where the general path is
/// needed (see `softmax::last_axis`).
#[pyfunction]
#[pyo3(signature = (x, out=None))]
fn stablemax_last<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Arr<'py>>> {
    let ops32: RowOps<f32> = (k::stablemax, k::stablemax_inplace);
    last_axis(py, x, out, ops32, (k::stablemax, k::stablemax_inplace))
}

/// log_stablemax over the last axis into `out` or a new array, or None where the general path
/// is needed (see `softmax::last_axis`).
#[pyfunction]
#[pyo3(signature = (x, out=None))]
fn log_stablemax_last<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    out: Option<&Bound<'py, PyAny>>,
) -> PyResult<Option<Arr<'py>>> {
    let ops32: RowOps<f32> = (k::log_stablemax, k::log_stablemax_inplace);
    last_axis(
        py,
        x,
        out,
        ops32,
        (k::log_stablemax, k::log_stablemax_inplace),
    )
}

/// stablemax(x) into out (which may be x) over the middle axis of `layout` = (outer, len, inner).
#[pyfunction]
fn stablemax(
    py: Python<'_>,
    x: &Arr<'_>,
    out: &Arr<'_>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(
        x,
        map_typed(py, x, out, l, k::stablemax, k::stablemax_inplace)
    )
}

/// log_stablemax(x) into out (which may be x) over the middle axis of `layout` = (outer, len, inner).
#[pyfunction]
fn log_stablemax(
    py: Python<'_>,
    x: &Arr<'_>,
    out: &Arr<'_>,
    layout: (usize, usize, usize),
) -> PyResult<()> {
    let l = rows_layout(layout);
    by_dtype!(
        x,
        map_typed(py, x, out, l, k::log_stablemax, k::log_stablemax_inplace)
    )
}

/// Adds the stablemax family to the extension module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(stablemax, m)?)?;
    m.add_function(wrap_pyfunction!(stablemax_last, m)?)?;
    m.add_function(wrap_pyfunction!(log_stablemax, m)?)?;
    m.add_function(wrap_pyfunction!(log_stablemax_last, m)?)?;
    Ok(())
}
