//! Bindings of the vocabulary-parallel cross-entropy kernels (normax_core::cross_entropy::vocab_parallel_*):
//! array conversion, the GIL released, errors mapped. The packed-row protocol around them is
//! python/normax/_vocab_parallel.py's, the collectives the torch and JAX adapters'.
//!
//! Every function takes the rank's [`VocabParallelLayout`], the checked [`CeOptions`] and `labels`, the
//! pair (target class indices, class weights or None) the rows are scored against, or the triple
//! with the rows' token weights (or None) last (the statistics passes do not use them).

use crate::arrays::{by_dtype, matrix_shape, readonly, readonly_opt, readwrite, readwrite_opt};
use crate::arrays::{slice, slice_mut, slice_mut_opt, slice_opt, Arr, Read};
use crate::interrupt::detach;
use crate::options::{CeOptions, GradOutput, VocabParallelLayout};
use normax_core::cross_entropy::{self as k, Shard, ShardLinear};
use normax_core::spec::Reduction;
use normax_core::Float;
use numpy::Element;
use pyo3::prelude::*;

/// (target class indices, class weights or None[, token weights or None]).
#[derive(FromPyObject)]
enum Labels<'py> {
    Weighted((Arr<'py>, Option<Arr<'py>>, Option<Arr<'py>>)),
    Plain((Arr<'py>, Option<Arr<'py>>)),
}

impl<'py> Labels<'py> {
    /// (target, class weights, token weights).
    fn parts(&self) -> (&Arr<'py>, Option<&Arr<'py>>, Option<&Arr<'py>>) {
        match self {
            Labels::Plain((t, w)) => (t, w.as_ref(), None),
            Labels::Weighted((t, w, tw)) => (t, w.as_ref(), tw.as_ref()),
        }
    }
}
/// The linear op's inputs on this rank: hidden (rows, H), its linear weight shard (length, H), its
/// bias shard or None.
type LinearInputs<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);
/// What a backward takes from the forward: each row's log-sum-exp (rows x 2 float64), the mean's
/// denominator, and d(loss)/d(output).
type Saved<'py> = (Arr<'py>, f64, GradOutput<'py>);

/// The statistics pass sums the loss terms of its shard's classes; z-loss and the reduction
/// apply once the shards are combined.
fn stats_options(options: &CeOptions) -> CeOptions {
    CeOptions {
        reduction: Reduction::Sum,
        z_loss: 0.0,
        ..*options
    }
}

fn stats_typed<T: Float + Element>(
    logits: &Arr<'_>,
    labels: &Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    packed: &Arr<'_>,
) -> PyResult<()> {
    let (target, weight, _) = labels.parts();
    let x = readonly::<T>(logits, "logits")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let mut p = readwrite::<T>(packed, "packed")?;
    let (xs, ts) = (slice(&x, "logits")?, slice(&t, "target")?);
    let o = stats_options(options).with_weight(slice_opt(&w, "weight")?);
    let ps = slice_mut(&mut p, "packed")?;
    let (rows, sh) = (shard.rows, shard.core());
    detach(logits.py(), xs.len(), || {
        k::vocab_parallel_stats(xs, rows, sh, ts, &o, ps)
    })
}

/// A shard's per-row statistics of its (rows, length) logits into `packed` (rows, fields).
#[pyfunction]
fn vocab_parallel_stats(
    logits: &Arr<'_>,
    labels: Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    packed: &Arr<'_>,
) -> PyResult<()> {
    by_dtype!(logits, stats_typed(logits, &labels, shard, options, packed))
}

fn combine_typed<T: Float + Element>(
    gathered: &Arr<'_>,
    shards: &[Shard],
    labels: &Labels<'_>,
    options: &CeOptions,
    (loss, lse): (&Arr<'_>, &Arr<'_>),
) -> PyResult<f64> {
    let (target, weight, token_weight) = labels.parts();
    let tw = readonly_opt::<T>(token_weight, "token_weight")?;
    let (_, stride) = matrix_shape(gathered, "gathered")?;
    let g = readonly::<T>(gathered, "gathered")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let mut l = readwrite::<T>(loss, "loss")?;
    let mut s = readwrite::<f64>(lse, "lse")?;
    let (gs, ts) = (slice(&g, "gathered")?, slice(&t, "target")?);
    let o = options.with_weights(slice_opt(&w, "weight")?, slice_opt(&tw, "token_weight")?);
    let (ls, ss) = (slice_mut(&mut l, "loss")?, slice_mut(&mut s, "lse")?);
    let rows = ts.len();
    detach(gathered.py(), gs.len(), || {
        k::vocab_parallel_combine(gs, stride, shards, rows, ts, &o, ls, ss)
    })
}

/// The loss from every rank's statistics (`gathered`: ranks x stride, in the order of
/// `shards`); writes `out` = (loss, lse: each row's log-sum-exp, rows x 2 float64) and returns
/// the mean's denominator.
#[pyfunction]
fn vocab_parallel_combine(
    gathered: &Arr<'_>,
    shards: Vec<VocabParallelLayout>,
    labels: Labels<'_>,
    options: &CeOptions,
    out: (Arr<'_>, Arr<'_>),
) -> PyResult<f64> {
    let shards: Vec<Shard> = shards.iter().map(VocabParallelLayout::core).collect();
    let out = (&out.0, &out.1);
    by_dtype!(
        gathered,
        combine_typed(gathered, &shards, &labels, options, out)
    )
}

fn backward_typed<T: Float + Element>(
    logits: &Arr<'_>,
    labels: &Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    (lse, denom, grad_output): &Saved<'_>,
    grad: &Arr<'_>,
) -> PyResult<()> {
    let (target, weight, token_weight) = labels.parts();
    let tw = readonly_opt::<T>(token_weight, "token_weight")?;
    let x = readonly::<T>(logits, "logits")?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let s = readonly::<f64>(lse, "lse")?;
    let go = grad_output.read::<T>()?;
    let mut g = readwrite::<T>(grad, "grad")?;
    let (xs, ts, ss) = (
        slice(&x, "logits")?,
        slice(&t, "target")?,
        slice(&s, "lse")?,
    );
    let o = options.with_weights(slice_opt(&w, "weight")?, slice_opt(&tw, "token_weight")?);
    let go = grad_output.core(&go)?;
    let gs = slice_mut(&mut g, "grad")?;
    let (rows, sh, classes, d) = (shard.rows, shard.core(), shard.classes, *denom);
    detach(logits.py(), xs.len(), || {
        k::vocab_parallel_backward(xs, rows, sh, classes, ts, &o, ss, d, go, gs)
    })
}

/// The shard's gradient of grad_output * loss into `grad`, from the forward's `saved`
/// (lse, denom, grad_output).
#[pyfunction]
fn vocab_parallel_backward(
    logits: &Arr<'_>,
    labels: Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    saved: Saved<'_>,
    grad: &Arr<'_>,
) -> PyResult<()> {
    by_dtype!(
        logits,
        backward_typed(logits, &labels, shard, options, &saved, grad)
    )
}

/// The core's view of the linear inputs, borrowed for reading.
struct LinearRead<'py, T: Element> {
    hidden: Read<'py, T>,
    weight: Read<'py, T>,
    bias: Option<Read<'py, T>>,
    h: usize,
}

impl<'py, T: Float + Element> LinearRead<'py, T> {
    fn new((hidden, weight, bias): &LinearInputs<'py>) -> PyResult<Self> {
        Ok(LinearRead {
            h: matrix_shape(hidden, "hidden")?.1,
            hidden: readonly::<T>(hidden, "hidden")?,
            weight: readonly::<T>(weight, "weight_shard")?,
            bias: readonly_opt::<T>(bias.as_ref(), "bias_shard")?,
        })
    }

    fn core(&self) -> PyResult<ShardLinear<'_, T>> {
        Ok(ShardLinear {
            hidden: slice(&self.hidden, "hidden")?,
            weight: slice(&self.weight, "weight_shard")?,
            bias: slice_opt(&self.bias, "bias_shard")?,
            h: self.h,
        })
    }
}

fn linear_stats_typed<T: Float + Element>(
    inputs: &LinearInputs<'_>,
    labels: &Labels<'_>,
    shard: &VocabParallelLayout,
    (options, chunk_size): (&CeOptions, Option<usize>),
    packed: &Arr<'_>,
) -> PyResult<()> {
    let (target, weight, _) = labels.parts();
    let read = LinearRead::<T>::new(inputs)?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let mut p = readwrite::<T>(packed, "packed")?;
    let lin = read.core()?;
    let ts = slice(&t, "target")?;
    let o = stats_options(options).with_weight(slice_opt(&w, "weight")?);
    let ps = slice_mut(&mut p, "packed")?;
    let (rows, sh) = (shard.rows, shard.core());
    let work = rows.saturating_mul(shard.length);
    detach(packed.py(), work, || {
        k::vocab_parallel_linear_stats(lin, rows, sh, ts, &o, chunk_size, ps)
    })
}

/// [`vocab_parallel_stats`] of logits = hidden @ weight_shard.T + bias_shard, block by block
/// (`chunk_size` logits per block, None: the kernel's choice).
#[pyfunction]
fn vocab_parallel_linear_stats(
    inputs: LinearInputs<'_>,
    labels: Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    chunk_size: Option<usize>,
    packed: &Arr<'_>,
) -> PyResult<()> {
    let opts = (options, chunk_size);
    by_dtype!(
        &inputs.0,
        linear_stats_typed(&inputs, &labels, shard, opts, packed)
    )
}

/// The linear op's gradient outputs on this rank: dhidden, dweight_shard, dbias_shard or None.
type LinearGrads<'py> = (Arr<'py>, Arr<'py>, Option<Arr<'py>>);

fn linear_backward_typed<T: Float + Element>(
    inputs: &LinearInputs<'_>,
    labels: &Labels<'_>,
    (shard, options, chunk_size): (&VocabParallelLayout, &CeOptions, Option<usize>),
    (lse, denom, grad_output): &Saved<'_>,
    (dhidden, dweight, dbias): &LinearGrads<'_>,
) -> PyResult<()> {
    let (target, weight, token_weight) = labels.parts();
    let tw = readonly_opt::<T>(token_weight, "token_weight")?;
    let read = LinearRead::<T>::new(inputs)?;
    let t = readonly::<i64>(target, "target")?;
    let w = readonly_opt::<T>(weight, "weight")?;
    let s = readonly::<f64>(lse, "lse")?;
    let go = grad_output.read::<T>()?;
    let mut dh = readwrite::<T>(dhidden, "dhidden")?;
    let mut dw = readwrite::<T>(dweight, "dweight")?;
    let mut db = readwrite_opt::<T>(dbias.as_ref(), "dbias")?;
    let lin = read.core()?;
    let (ts, ss) = (slice(&t, "target")?, slice(&s, "lse")?);
    let o = options.with_weights(slice_opt(&w, "weight")?, slice_opt(&tw, "token_weight")?);
    let go = grad_output.core(&go)?;
    let dhs = slice_mut(&mut dh, "dhidden")?;
    let dws = slice_mut(&mut dw, "dweight")?;
    let dbs = slice_mut_opt(&mut db, "dbias")?;
    let (rows, sh, c, d) = (shard.rows, shard.core(), shard.classes, *denom);
    let work = rows.saturating_mul(shard.length);
    detach(dhidden.py(), work, || {
        k::vocab_parallel_linear_backward(
            lin, rows, sh, c, ts, &o, chunk_size, ss, d, go, dhs, dws, dbs,
        )
    })
}

/// The linear op's gradients on this rank into `grads` = (dhidden: this shard's part, to be
/// summed over the ranks; dweight_shard; dbias_shard or None), from the forward's `saved`.
#[pyfunction]
fn vocab_parallel_linear_backward(
    inputs: LinearInputs<'_>,
    labels: Labels<'_>,
    shard: &VocabParallelLayout,
    options: &CeOptions,
    chunk_size: Option<usize>,
    saved: Saved<'_>,
    grads: LinearGrads<'_>,
) -> PyResult<()> {
    let plan = (shard, options, chunk_size);
    by_dtype!(
        &inputs.0,
        linear_backward_typed(&inputs, &labels, plan, &saved, &grads)
    )
}

/// Values per row each rank sends (see normax_core::cross_entropy::vocab_parallel_fields).
#[pyfunction]
fn vocab_parallel_fields(options: &CeOptions) -> usize {
    k::vocab_parallel_fields(options.label_smoothing)
}

/// Adds this module's functions to `normax._core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(vocab_parallel_stats, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel_combine, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel_backward, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel_linear_stats, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel_linear_backward, m)?)?;
    m.add_function(wrap_pyfunction!(vocab_parallel_fields, m)?)?;
    Ok(())
}
