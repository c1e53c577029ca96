//! cuda_cross_entropy: per-row losses and, optionally, the gradient scaled on the device.

use super::{Call, Capsule};
use normax_cuda::{self as cu, CeOptions, Target};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `softcap` 0 means none; `scale` is grad_output as float32 on the device (`scale_stride` 0:
/// one value, 1: one per row). The reduction is the Python layer's (the kernels write per-row
/// losses).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, target, weight, loss_rows, grad, scale, scale_stride, rows, cols, ignore_index, label_smoothing, z_loss, softcap, device, stream_handle))]
fn cuda_cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    loss_rows: &Bound<'_, PyAny>,
    grad: Option<&Bound<'_, PyAny>>,
    scale: Option<&Bound<'_, PyAny>>,
    scale_stride: usize,
    rows: usize,
    cols: usize,
    ignore_index: i64,
    label_smoothing: f64,
    z_loss: f64,
    softcap: f64,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let x = c.buf(logits, "logits")?;
    let target = match c.capsule(target, "target")? {
        Capsule::Indices(t) => Target::Classes(t),
        Capsule::Floats(p) => Target::Probs(p),
    };
    let opts = CeOptions {
        weight: c.opt(weight, "weight")?,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap: (softcap != 0.0).then_some(softcap),
        ..CeOptions::default()
    };
    let loss = c.buf(loss_rows, "loss")?;
    let grad = match (c.opt(grad, "grad")?, c.opt(scale, "grad_output")?) {
        (Some(g), Some(s)) => Some((g, s, scale_stride)),
        (None, _) => None,
        (Some(_), None) => return Err(PyValueError::new_err("grad_output: needed with grad")),
    };
    c.run(py, |s| {
        cu::cross_entropy(s, x, target, &opts, loss, grad, rows, cols)
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_cross_entropy, m)?)
}
