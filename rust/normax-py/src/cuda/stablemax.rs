//! cuda_stablemax (and log_stablemax).

use super::Call;
use normax_cuda as cu;
use pyo3::prelude::*;

#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn cuda_stablemax(
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
    c.run(py, |s| cu::stablemax(s, x, y, rows, cols, log))
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_stablemax, m)?)
}
