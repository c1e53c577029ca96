//! cuda_softmax (and log_softmax), cuda_logsumexp, cuda_softmax_backward.

use super::Call;
use normax_cuda as cu;
use pyo3::prelude::*;

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_softmax(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    log: bool,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let (x, y) = (c.buf(x, "x")?, c.buf(out, "out")?);
    c.run(py, |s| cu::softmax(s, x, y, rows, cols, log))
}

#[pyfunction]
fn cuda_logsumexp(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let (x, o) = (c.buf(x, "x")?, c.buf(out, "out")?);
    c.run(py, |s| cu::logsumexp(s, x, o, rows, cols))
}

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_softmax_backward(
    py: Python<'_>,
    y: &Bound<'_, PyAny>,
    dy: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    rows: usize,
    cols: usize,
    log: bool,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let (y, dy, dx) = (c.buf(y, "y")?, c.buf(dy, "dy")?, c.buf(dx, "dx")?);
    c.run(py, |s| cu::softmax_backward(s, y, dy, dx, rows, cols, log))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_softmax, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_softmax_backward, m)?)
}
