//! cuda_softmax (and log_softmax), cuda_logsumexp, cuda_softmax_backward: `shape` is the
//! (rows, cols) of the contiguous rows, reduced over cols.

use super::{Call, CudaStream};
use normax_cuda as cu;
use pyo3::prelude::*;

#[pyfunction]
fn cuda_softmax(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    shape: (usize, usize),
    log: bool,
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (x, y) = (c.buf(x, "x")?, c.buf(out, "out")?);
    c.run(py, |s| cu::softmax(s, x, y, rows, cols, log))
}

#[pyfunction]
fn cuda_logsumexp(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    shape: (usize, usize),
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (x, o) = (c.buf(x, "x")?, c.buf(out, "out")?);
    c.run(py, |s| cu::logsumexp(s, x, o, None, rows, cols))
}

#[pyfunction]
fn cuda_softmax_backward(
    py: Python<'_>,
    y: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    shape: (usize, usize),
    log: bool,
    stream: &CudaStream,
) -> PyResult<()> {
    let (c, (rows, cols)) = (Call::new(stream), shape);
    let (y, dy, dx) = (c.buf(y, "y")?, c.buf(dy, "dy")?, c.buf(dx, "dx")?);
    c.run(py, |s| cu::softmax_backward(s, y, dy, dx, rows, cols, log))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_softmax_backward, m)?)
}
