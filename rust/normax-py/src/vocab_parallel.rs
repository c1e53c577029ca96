//! Bindings of the vocabulary-parallel cross-entropy kernels (normax_core::cross_entropy::shard_*):
//! array conversion, the GIL released, errors mapped. The collective itself is the caller's
//! (python/normax/torch/_vocab_parallel.py, python/normax/_jax_vocab_parallel.py).

use crate::arrays::{by_dtype, readonly, readonly_opt, readwrite, readwrite_opt};
use crate::arrays::{slice, slice_mut, slice_mut_opt, slice_opt, Arr};
use crate::errors::to_py;
use normax_core::cross_entropy::{self as k, Shard, ShardLinear};
use normax_core::spec::{CeOptions, GradOutput, Reduction};
use normax_core::Float;
use numpy::Element;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// (ignore_index, reduction, label_smoothing, z_loss, softcap), as the other bindings take them.
type Opts<'a> = (i64, &'a str, f64, f64, Option<f64>);

fn options<'w, T>(weight: Option<&'w [T]>, o: Opts<'_>) -> PyResult<CeOptions<&'w [T]>> {
    Ok(CeOptions {
        weight,
        ignore_index: o.0,
        reduction: Reduction::parse(o.1).map_err(to_py)?,
        label_smoothing: o.2,
        z_loss: o.3,
        softcap: o.4,
    })
}

fn grad_output<'a, T: Element>(
    rows: &'a Option<numpy::PyReadonlyArrayDyn<'_, T>>,
    scalar: f64,
) -> PyResult<GradOutput<&'a [T]>> {
    Ok(match rows {
        Some(g) => GradOutput::Rows(slice(g, "grad_output")?),
        None => GradOutput::Scalar(scalar),
    })
}

fn stats_typed<T: Float + Element>(
    py: Python<'_>,
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    packed: &Arr<'_>,
    (rows, shard): (usize, Shard),
    opts: Opts<'_>,
) -> PyResult<()> {
    let x = readonly::<T>(logits, "logits")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let mut p = readwrite::<T>(packed, "packed")?;
    let (xs, ts, ws) = (
        slice(&x, "logits")?,
        slice(&t, "target")?,
        slice_opt(&w, "weight")?,
    );
    let o = options(ws, opts)?;
    let ps = slice_mut(&mut p, "packed")?;
    py.detach(|| k::vocab_parallel_stats(xs, rows, shard, ts, &o, ps))
        .map_err(to_py)
}

/// A shard's per-row statistics of (rows, length) logits into `packed` (rows, FIELDS).
#[pyfunction]
#[pyo3(signature = (logits, target, weight, packed, rows, start, length, ignore_index,
                    label_smoothing, softcap))]
#[allow(clippy::too_many_arguments)]
fn shard_stats(
    py: Python<'_>,
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    packed: &Arr<'_>,
    rows: usize,
    start: usize,
    length: usize,
    ignore_index: i64,
    label_smoothing: f64,
    softcap: Option<f64>,
) -> PyResult<()> {
    let shard = Shard { start, len: length };
    let opts = (ignore_index, "sum", label_smoothing, 0.0, softcap);
    let w = weight.as_ref();
    by_dtype!(
        logits,
        stats_typed(py, logits, target, w, packed, (rows, shard), opts)
    )
}

#[allow(clippy::too_many_arguments)]
fn combine_typed<T: Float + Element>(
    py: Python<'_>,
    gathered: &Arr<'_>,
    stride: usize,
    shards: &[Shard],
    rows: usize,
    target: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    loss: &Arr<'_>,
    lse: &Arr<'_>,
    opts: Opts<'_>,
) -> PyResult<f64> {
    let g = readonly::<T>(gathered, "gathered")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let mut l = readwrite::<T>(loss, "loss")?;
    let mut s = readwrite::<f64>(lse, "lse")?;
    let (gs, ts, ws) = (
        slice(&g, "gathered")?,
        slice(&t, "target")?,
        slice_opt(&w, "weight")?,
    );
    let o = options(ws, opts)?;
    let (ls, ss) = (slice_mut(&mut l, "loss")?, slice_mut(&mut s, "lse")?);
    py.detach(|| k::vocab_parallel_combine(gs, stride, shards, rows, ts, &o, ls, ss))
        .map_err(to_py)
}

/// The loss from every rank's statistics (`gathered`: ranks x stride); writes `loss` and each
/// row's log-sum-exp (`lse`: rows x 2 float64); returns the mean's denominator.
#[pyfunction]
#[pyo3(signature = (gathered, stride, starts, lengths, rows, target, weight, loss, lse,
                    ignore_index, reduction, label_smoothing, z_loss, softcap))]
#[allow(clippy::too_many_arguments)]
fn shard_combine(
    py: Python<'_>,
    gathered: &Arr<'_>,
    stride: usize,
    starts: Vec<usize>,
    lengths: Vec<usize>,
    rows: usize,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    loss: &Arr<'_>,
    lse: &Arr<'_>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
) -> PyResult<f64> {
    if starts.len() != lengths.len() {
        return Err(PyValueError::new_err("starts and lengths differ in length"));
    }
    let shards: Vec<Shard> = starts
        .iter()
        .zip(&lengths)
        .map(|(&start, &len)| Shard { start, len })
        .collect();
    let opts = (ignore_index, reduction, label_smoothing, z_loss, softcap);
    let w = weight.as_ref();
    by_dtype!(
        gathered,
        combine_typed(py, gathered, stride, &shards, rows, target, w, loss, lse, opts)
    )
}

/// The statistics the backward passes take from the forward.
struct Saved<'a> {
    lse: &'a Arr<'a>,
    denom: f64,
    classes: usize,
    grad_rows: Option<&'a Arr<'a>>,
    grad_scalar: f64,
}

#[allow(clippy::too_many_arguments)]
fn backward_typed<T: Float + Element>(
    py: Python<'_>,
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    grad: &Arr<'_>,
    saved: &Saved<'_>,
    (rows, shard): (usize, Shard),
    opts: Opts<'_>,
) -> PyResult<()> {
    let x = readonly::<T>(logits, "logits")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let s = readonly::<f64>(saved.lse, "lse")?;
    let go = readonly_opt::<T>(saved.grad_rows, "grad_output")?;
    let mut g = readwrite::<T>(grad, "grad")?;
    let (xs, ts, ws) = (
        slice(&x, "logits")?,
        slice(&t, "target")?,
        slice_opt(&w, "weight")?,
    );
    let o = options(ws, opts)?;
    let ss = slice(&s, "lse")?;
    let go = grad_output(&go, saved.grad_scalar)?;
    let gs = slice_mut(&mut g, "grad")?;
    let (c, d) = (saved.classes, saved.denom);
    py.detach(|| k::vocab_parallel_backward(xs, rows, shard, c, ts, &o, ss, d, go, gs))
        .map_err(to_py)
}

/// The shard's gradient of grad_output * loss into `grad`, from the forward's `lse` and `denom`.
#[pyfunction]
#[pyo3(signature = (logits, target, weight, lse, denom, grad, grad_rows, grad_scalar, rows,
                    start, length, classes, ignore_index, reduction, label_smoothing, z_loss,
                    softcap))]
#[allow(clippy::too_many_arguments)]
fn shard_backward(
    py: Python<'_>,
    logits: &Arr<'_>,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    lse: &Arr<'_>,
    denom: f64,
    grad: &Arr<'_>,
    grad_rows: Option<Arr<'_>>,
    grad_scalar: f64,
    rows: usize,
    start: usize,
    length: usize,
    classes: usize,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
) -> PyResult<()> {
    let saved = Saved {
        lse,
        denom,
        classes,
        grad_rows: grad_rows.as_ref(),
        grad_scalar,
    };
    let shard = Shard { start, len: length };
    let opts = (ignore_index, reduction, label_smoothing, z_loss, softcap);
    let w = weight.as_ref();
    by_dtype!(
        logits,
        backward_typed(py, logits, target, w, grad, &saved, (rows, shard), opts)
    )
}

#[allow(clippy::too_many_arguments)]
fn linear_stats_typed<T: Float + Element>(
    py: Python<'_>,
    (hidden, weight_shard, bias): (&Arr<'_>, &Arr<'_>, Option<&Arr<'_>>),
    target: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    packed: &Arr<'_>,
    (rows, h, shard): (usize, usize, Shard),
    opts: Opts<'_>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let hid = readonly::<T>(hidden, "hidden")?;
    let ws = readonly::<T>(weight_shard, "weight_shard")?;
    let b = readonly_opt::<T>(bias, "bias_shard")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let mut p = readwrite::<T>(packed, "packed")?;
    let lin = ShardLinear {
        hidden: slice(&hid, "hidden")?,
        weight: slice(&ws, "weight_shard")?,
        bias: slice_opt(&b, "bias_shard")?,
        h,
    };
    let ts = slice(&t, "target")?;
    let o = options(slice_opt(&w, "weight")?, opts)?;
    let ps = slice_mut(&mut p, "packed")?;
    py.detach(|| k::vocab_parallel_linear_stats(lin, rows, shard, ts, &o, chunk_size, ps))
        .map_err(to_py)
}

/// [`shard_stats`] of logits = hidden @ weight_shard.T + bias_shard, block by block.
#[pyfunction]
#[pyo3(signature = (hidden, weight_shard, bias_shard, target, weight, packed, rows, h, start,
                    length, ignore_index, label_smoothing, softcap, chunk_size))]
#[allow(clippy::too_many_arguments)]
fn shard_linear_stats(
    py: Python<'_>,
    hidden: &Arr<'_>,
    weight_shard: &Arr<'_>,
    bias_shard: Option<Arr<'_>>,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    packed: &Arr<'_>,
    rows: usize,
    h: usize,
    start: usize,
    length: usize,
    ignore_index: i64,
    label_smoothing: f64,
    softcap: Option<f64>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let shard = Shard { start, len: length };
    let opts = (ignore_index, "sum", label_smoothing, 0.0, softcap);
    let ins = (hidden, weight_shard, bias_shard.as_ref());
    let w = weight.as_ref();
    by_dtype!(
        hidden,
        linear_stats_typed(
            py,
            ins,
            target,
            w,
            packed,
            (rows, h, shard),
            opts,
            chunk_size
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn linear_backward_typed<T: Float + Element>(
    py: Python<'_>,
    (hidden, weight_shard, bias): (&Arr<'_>, &Arr<'_>, Option<&Arr<'_>>),
    target: &Arr<'_>,
    weight: Option<&Arr<'_>>,
    saved: &Saved<'_>,
    (dhidden, dweight, dbias): (&Arr<'_>, &Arr<'_>, Option<&Arr<'_>>),
    (rows, h, shard): (usize, usize, Shard),
    opts: Opts<'_>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let hid = readonly::<T>(hidden, "hidden")?;
    let ws = readonly::<T>(weight_shard, "weight_shard")?;
    let b = readonly_opt::<T>(bias, "bias_shard")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let s = readonly::<f64>(saved.lse, "lse")?;
    let go = readonly_opt::<T>(saved.grad_rows, "grad_output")?;
    let mut dh = readwrite::<T>(dhidden, "dhidden")?;
    let mut dw = readwrite::<T>(dweight, "dweight")?;
    let mut db = readwrite_opt::<T>(dbias, "dbias")?;
    let lin = ShardLinear {
        hidden: slice(&hid, "hidden")?,
        weight: slice(&ws, "weight_shard")?,
        bias: slice_opt(&b, "bias_shard")?,
        h,
    };
    let (ts, ss) = (slice(&t, "target")?, slice(&s, "lse")?);
    let o = options(slice_opt(&w, "weight")?, opts)?;
    let go = grad_output(&go, saved.grad_scalar)?;
    let dhs = slice_mut(&mut dh, "dhidden")?;
    let dws = slice_mut(&mut dw, "dweight")?;
    let dbs = slice_mut_opt(&mut db, "dbias")?;
    let (c, d) = (saved.classes, saved.denom);
    py.detach(|| {
        k::vocab_parallel_linear_backward(
            lin, rows, shard, c, ts, &o, chunk_size, ss, d, go, dhs, dws, dbs,
        )
    })
    .map_err(to_py)
}

/// The linear op's gradients on this rank: this shard's part of dhidden (to be summed over the
/// ranks), and its dweight_shard / dbias_shard.
#[pyfunction]
#[pyo3(signature = (hidden, weight_shard, bias_shard, target, weight, lse, denom, dhidden,
                    dweight, dbias, grad_rows, grad_scalar, rows, h, start, length, classes,
                    ignore_index, reduction, label_smoothing, z_loss, softcap, chunk_size))]
#[allow(clippy::too_many_arguments)]
fn shard_linear_backward(
    py: Python<'_>,
    hidden: &Arr<'_>,
    weight_shard: &Arr<'_>,
    bias_shard: Option<Arr<'_>>,
    target: &Arr<'_>,
    weight: Option<Arr<'_>>,
    lse: &Arr<'_>,
    denom: f64,
    dhidden: &Arr<'_>,
    dweight: &Arr<'_>,
    dbias: Option<Arr<'_>>,
    grad_rows: Option<Arr<'_>>,
    grad_scalar: f64,
    rows: usize,
    h: usize,
    start: usize,
    length: usize,
    classes: usize,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    chunk_size: Option<usize>,
) -> PyResult<()> {
    let saved = Saved {
        lse,
        denom,
        classes,
        grad_rows: grad_rows.as_ref(),
        grad_scalar,
    };
    let shard = Shard { start, len: length };
    let opts = (ignore_index, reduction, label_smoothing, z_loss, softcap);
    let ins = (hidden, weight_shard, bias_shard.as_ref());
    let outs = (dhidden, dweight, dbias.as_ref());
    let w = weight.as_ref();
    let dims = (rows, h, shard);
    by_dtype!(
        hidden,
        linear_backward_typed(py, ins, target, w, &saved, outs, dims, opts, chunk_size)
    )
}

/// Values per row each rank sends (see normax_core::cross_entropy::shard_fields).
#[pyfunction]
fn shard_fields(label_smoothing: f64) -> usize {
    k::vocab_parallel_fields(label_smoothing)
}

/// Adds this module's functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(shard_stats, m)?)?;
    m.add_function(wrap_pyfunction!(shard_combine, m)?)?;
    m.add_function(wrap_pyfunction!(shard_backward, m)?)?;
    m.add_function(wrap_pyfunction!(shard_linear_stats, m)?)?;
    m.add_function(wrap_pyfunction!(shard_linear_backward, m)?)?;
    m.add_function(wrap_pyfunction!(shard_fields, m)?)?;
    Ok(())
}
