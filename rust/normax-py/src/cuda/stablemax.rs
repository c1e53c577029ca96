//! cuda_stablemax (and log_stablemax) of the (rows, cols) contiguous rows.

use super::{Call, CudaStream};
use normax_cuda as cu;
use pyo3::prelude::*;

#[pyfunction]
fn cuda_stablemax(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    shape: (usize, usize),
    log: bool,
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (x, y) = (c.buf(x, "x")?, c.buf(out, "out")?);
    c.run(py, |s| cu::stablemax(s, x, y, rows, cols, log))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_stablemax, m)?)
}
