//! cuda_cross_entropy: per-row losses and, optionally, the gradient scaled on the device.
//! cuda_shard_stats / cuda_shard_backward: a vocabulary shard's row statistics and gradient (the
//! vocabulary-parallel cross-entropy; the combine between them is the CPU's `shard_combine`).

use super::{Call, Capsule};
use normax_cuda::{self as cu, Buf, CeOptions, Indices, ShardRows, Target};
use pyo3::exceptions::{PyTypeError, PyValueError};
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

impl Call {
    fn indices(&self, obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Indices> {
        match self.capsule(obj, name)? {
            Capsule::Indices(t) => Ok(t),
            Capsule::Floats(_) => Err(PyTypeError::new_err(format!(
                "{name}: expected int64 class indices"
            ))),
        }
    }

    fn shard(
        &self,
        logits: &Bound<'_, PyAny>,
        target: &Bound<'_, PyAny>,
        rows: usize,
        start: usize,
        length: usize,
    ) -> PyResult<ShardRows> {
        Ok(ShardRows {
            x: self.buf(logits, "logits")?,
            target: self.indices(target, "target")?,
            rows,
            start,
            len: length,
        })
    }
}

fn shard_options(
    weight: Option<Buf>,
    ignore_index: i64,
    label_smoothing: f64,
    z_loss: f64,
    softcap: f64,
) -> CeOptions<Buf> {
    CeOptions {
        weight,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap: (softcap != 0.0).then_some(softcap),
        ..CeOptions::default()
    }
}

/// The shard's statistics (float32, rows x fields) into `packed`; `weight` is the whole
/// vocabulary's (float32), `softcap` 0 means none.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, target, weight, packed, rows, start, length, ignore_index, label_smoothing, softcap, device, stream_handle))]
fn cuda_shard_stats(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    packed: &Bound<'_, PyAny>,
    rows: usize,
    start: usize,
    length: usize,
    ignore_index: i64,
    label_smoothing: f64,
    softcap: f64,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let sh = c.shard(logits, target, rows, start, length)?;
    let opts = shard_options(
        c.opt(weight, "weight")?,
        ignore_index,
        label_smoothing,
        0.0,
        softcap,
    );
    let packed = c.buf(packed, "packed")?;
    c.run(py, |s| cu::vocab_parallel_stats(s, sh, &opts, packed))
}

/// The shard's gradient into `grad` from each row's global log-sum-exp (`lse`: float32 hi, lo per
/// row); `scale` is grad_output (over the mean's denominator) as float32, `scale_stride` 0 for
/// one value, 1 for one per row; `w_sum` the sum of the whole vocabulary's weights.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, target, weight, lse, grad, scale, scale_stride, rows, start, length, classes, w_sum, ignore_index, label_smoothing, z_loss, softcap, device, stream_handle))]
fn cuda_shard_backward(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    target: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    lse: &Bound<'_, PyAny>,
    grad: &Bound<'_, PyAny>,
    scale: &Bound<'_, PyAny>,
    scale_stride: usize,
    rows: usize,
    start: usize,
    length: usize,
    classes: usize,
    w_sum: f64,
    ignore_index: i64,
    label_smoothing: f64,
    z_loss: f64,
    softcap: f64,
    device: i32,
    stream_handle: u64,
) -> PyResult<()> {
    let c = Call::new(device, stream_handle);
    let sh = c.shard(logits, target, rows, start, length)?;
    let opts = shard_options(
        c.opt(weight, "weight")?,
        ignore_index,
        label_smoothing,
        z_loss,
        softcap,
    );
    let (lse, grad, scale) = (
        c.buf(lse, "lse")?,
        c.buf(grad, "grad")?,
        c.buf(scale, "grad_output")?,
    );
    c.run(py, |s| {
        cu::vocab_parallel_backward(s, sh, classes, w_sum, &opts, lse, grad, scale, scale_stride)
    })
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_shard_stats, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_shard_backward, m)?)
}
