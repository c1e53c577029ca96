//! CPU handlers of the vocabulary-parallel cross-entropy, one rank's shard of the classes, as
//! `_core.vocab_parallel_stats` / `_combine` / `_backward` / `vocab_parallel_linear_stats` /
//! `_backward`, in the operand order of the JAX adapter (normax/jax/_vocab_parallel.py,
//! _linear.py).
//!
//! Operands (absent = empty): logits (N, Vl) — or for the linear ops hidden (N, H), weight_shard
//! (Vl, H), bias_shard (Vl,) —, target (N,) int32/int64, class weight (V,) of the whole
//! vocabulary; the logits backward adds lse (N, 2) and grad_output (N,) (reduction "none"), the
//! linear backward lse, the mean's denominator () and grad_output (() or (N,)), all in the
//! logits' dtype; every op ends with vocab_start, a 0-d int32/int64 operand (under shard_map
//! `axis_index * Vl`, a run-time value). Attributes: the CE attributes, for the backwards classes
//! (V), for the linear backward reduction, for the linear ops chunk_size (0: the kernel's
//! choice). `normax_vocab_parallel_combine` folds the gathered statistics (world, N, fields) of
//! the shards [k * shard_length, (k + 1) * shard_length) in rank order. Leading batch dims: one
//! call per batch element.

use super::batch::{parts_mut, Batch, PerBatch};
use super::cross_entropy::{ce_options, class_ids, widen};
use super::frame::{by_float, ffi_handler, Buffer, DType, Element, Frame};
use super::Target;
use normax_core::cross_entropy::{self as k, Shard, ShardLinear};
use normax_core::spec::{CeOptions, GradOutput, Reduction};
use normax_core::{Error, Float};

/// The statistics pass sums its shard's loss terms; z-loss and the reduction apply once the
/// shards are combined (as the NumPy-first API's `stats_options`).
fn stats_options<W>(frame: &Frame) -> Result<CeOptions<W>, Error> {
    let o = ce_options(frame, Reduction::Sum)?;
    Ok(CeOptions { z_loss: 0.0, ..o })
}

/// Each batch element's shard [start, start + len), its start read from the `vocab_start`
/// operand: one value, or one per batch element.
struct Shards {
    starts: Vec<i64>,
    len: usize,
}

impl Shards {
    fn of(b: &Buffer<'_>, batch: &Batch<'_>, len: usize) -> Result<Shards, Error> {
        if !matches!(b.dtype(), DType::S32 | DType::S64) {
            return Err(Error::Value(format!(
                "vocab_start: expected int32 or int64, got {:?}",
                b.dtype()
            )));
        }
        let per_element = batch.is_batched("vocab_start", b.leading(0)?)?;
        let starts = b.indices()?.into_owned();
        let expected = if per_element { batch.count } else { 1 };
        if starts.len() != expected {
            return Err(Error::Value(format!(
                "vocab_start: expected {expected} value(s), got shape {:?}",
                b.dims()
            )));
        }
        Ok(Shards { starts, len })
    }

    fn at(&self, g: usize) -> Result<Shard, Error> {
        let start = self.starts[if self.starts.len() == 1 { 0 } else { g }];
        if start < 0 {
            return Err(Error::Value(format!("vocab_start: {start} is negative")));
        }
        Ok(Shard {
            start: start as usize,
            len: self.len,
        })
    }
}

/// chunk_size: 0 for the kernel's choice.
pub(super) fn chunk_size(frame: &Frame) -> Result<Option<usize>, Error> {
    let c = frame.attr_usize("chunk_size")?;
    Ok((c > 0).then_some(c))
}

/// The labels of one call per batch element: class ids, class weights.
struct Labels<'a, T> {
    target: PerBatch<'a, i64>,
    weight: Option<PerBatch<'a, T>>,
}

/// The backward's saved values per batch element: lse (widened to f64), the mean's denominator
/// (None: 1), grad_output.
struct Saved<'a, T> {
    lse: PerBatch<'a, f64>,
    denom: Option<PerBatch<'a, T>>,
    grad_output: PerBatch<'a, T>,
}

impl<T: Float> Saved<'_, T> {
    fn grad_output(&self, g: usize) -> GradOutput<&[T]> {
        grad_output_of(self.grad_output.at(g))
    }

    fn denom(&self, g: usize) -> Result<f64, Error> {
        self.denom.map_or(Ok(1.0), |d| one(d.at(g)))
    }
}

/// One value: a scalar d(loss)/d(output); several: one per row.
fn grad_output_of<T: Float>(s: &[T]) -> GradOutput<&[T]> {
    match s {
        [v] => GradOutput::Scalar(v.to_f64()),
        rows => GradOutput::Rows(rows),
    }
}

/// The operand indices of the backward's saved values.
struct SavedAt {
    lse: usize,
    denom: Option<usize>,
    grad_output: usize,
}

fn saved<'a: 'b, 'b, T: Float + Element>(
    frame: &Frame<'a>,
    at: SavedAt,
    batch: &Batch<'_>,
    lse64: &'b mut Vec<f64>,
) -> Result<Saved<'b, T>, Error> {
    let lse = frame.operand(at.lse, "lse")?;
    if lse.dim_from_end(0)? != 2 {
        return Err(Error::Value(format!(
            "lse: expected (rows, 2), got shape {:?}",
            lse.dims()
        )));
    }
    let shared = !batch.is_batched("lse", lse.leading(2)?)?;
    *lse64 = widen(lse.slice::<T>()?);
    let lse64: &'b [f64] = lse64;
    let lse = if shared {
        PerBatch::shared(lse64)
    } else {
        PerBatch::parts("lse", lse64, batch.count)?
    };
    let denom = match at.denom {
        Some(i) => Some(frame.operand(i, "denom")?.per_batch(batch, 0)?),
        None => None,
    };
    let go = frame.operand(at.grad_output, "grad_output")?;
    // () or (N,) per batch element.
    let base = usize::from(go.rank() > batch.dims.len());
    Ok(Saved {
        lse,
        denom,
        grad_output: go.per_batch(batch, base)?,
    })
}

fn labels<'a: 'b, 'b, T: Element>(
    frame: &Frame<'a>,
    first: usize,
    batch: &Batch<'_>,
    ids: &'b mut std::borrow::Cow<'a, [i64]>,
) -> Result<Labels<'b, T>, Error> {
    let target = frame.operand(first, "target")?;
    let weight = frame.operand(first + 1, "weight")?;
    let batched = batch.is_batched("target", target.leading(1)?)?;
    *ids = class_ids(&target, target.dims())?;
    let ids: &'b [i64] = ids;
    Ok(Labels {
        target: if batched {
            PerBatch::parts("target", ids, batch.count)?
        } else {
            PerBatch::shared(ids)
        },
        weight: weight.per_batch_opt::<T>(batch, 1)?,
    })
}

fn stats_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let logits = frame.operand(0, "logits")?;
    let batch = Batch::of(&logits, 2)?;
    let (rows, len) = (logits.dim_from_end(1)?, logits.dim_from_end(0)?);
    let mut ids = Default::default();
    let labels = labels::<T>(frame, 1, &batch, &mut ids)?;
    let shards = Shards::of(&frame.operand(3, "vocab_start")?, &batch, len)?;
    let o = stats_options::<&[T]>(frame)?;
    let xs = logits.per_batch::<T>(&batch, 2)?;
    let packed = frame.result(0, "packed")?;
    let out = parts_mut("packed", packed.slice_mut::<T>()?, batch.count)?;
    for (g, p) in out.into_iter().enumerate() {
        let o = CeOptions {
            weight: labels.weight.map(|w| w.at(g)),
            ..o
        };
        k::vocab_parallel_stats(xs.at(g), rows, shards.at(g)?, labels.target.at(g), &o, p)?;
    }
    Ok(())
}

fn vocab_parallel_stats(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(4, 1)?;
    let logits = frame.operand(0, "logits")?;
    by_float!(logits, stats_typed(frame))
}

/// Operands: gathered (world, N, fields), target (N,), weight (V,) or empty; results: loss (N,),
/// lse (N, 2) as hi, lo in the statistics' dtype.
fn combine_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let gathered = frame.operand(0, "gathered")?;
    let batch = Batch::of(&gathered, 3)?;
    let (world, rows, nf) = (
        gathered.dim_from_end(2)?,
        gathered.dim_from_end(1)?,
        gathered.dim_from_end(0)?,
    );
    let mut ids = Default::default();
    let labels = labels::<T>(frame, 1, &batch, &mut ids)?;
    let o = ce_options::<&[T]>(frame, Reduction::None)?;
    if nf != k::vocab_parallel_fields(o.label_smoothing) {
        return Err(Error::Value(format!(
            "gathered: {nf} values per row, expected {}",
            k::vocab_parallel_fields(o.label_smoothing)
        )));
    }
    let len = frame.attr_usize("shard_length")?;
    let shards: Vec<Shard> = (0..world)
        .map(|r| Shard {
            start: r * len,
            len,
        })
        .collect();
    let gs = gathered.per_batch::<T>(&batch, 3)?;
    let (loss, lse) = (frame.result(0, "loss")?, frame.result(1, "lse")?);
    let row_dims = &gathered.dims()[..gathered.rank() - 3];
    loss.expect_same(&[row_dims, &[rows as i64][..]].concat())?;
    lse.expect_same(&[row_dims, &[rows as i64, 2][..]].concat())?;
    let losses = parts_mut("loss", loss.slice_mut::<T>()?, batch.count)?;
    let lse = lse.slice_mut::<T>()?;
    let mut lse64 = vec![0.0; lse.len()];
    let lses = parts_mut("lse", &mut lse64, batch.count)?;
    for (g, (l, s)) in losses.into_iter().zip(lses).enumerate() {
        let o = CeOptions {
            weight: labels.weight.map(|w| w.at(g)),
            ..o
        };
        let t = labels.target.at(g);
        k::vocab_parallel_combine(gs.at(g), rows * nf, &shards, rows, t, &o, l, s)?;
    }
    // hi is exact in T and lo small beside it: both keep their value there.
    for (to, from) in lse.iter_mut().zip(&lse64) {
        *to = T::from_f64(*from);
    }
    Ok(())
}

fn vocab_parallel_combine(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(3, 2)?;
    let gathered = frame.operand(0, "gathered")?;
    by_float!(gathered, combine_typed(frame))
}

/// Operands: logits, target, weight, lse, grad_output (N,), vocab_start; the gradient of
/// sum(grad_output * loss) (reduction "none").
fn backward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let logits = frame.operand(0, "logits")?;
    let batch = Batch::of(&logits, 2)?;
    let (rows, len) = (logits.dim_from_end(1)?, logits.dim_from_end(0)?);
    let mut ids = Default::default();
    let labels = labels::<T>(frame, 1, &batch, &mut ids)?;
    let mut lse64 = Vec::new();
    let at = SavedAt {
        lse: 3,
        denom: None,
        grad_output: 4,
    };
    let saved = saved::<T>(frame, at, &batch, &mut lse64)?;
    let shards = Shards::of(&frame.operand(5, "vocab_start")?, &batch, len)?;
    let classes = frame.attr_usize("classes")?;
    let o = ce_options::<&[T]>(frame, Reduction::None)?;
    let xs = logits.per_batch::<T>(&batch, 2)?;
    let grad = frame.result(0, "grad")?;
    grad.expect_same(logits.dims())?;
    let out = parts_mut("grad", grad.slice_mut::<T>()?, batch.count)?;
    for (g, gs) in out.into_iter().enumerate() {
        let o = CeOptions {
            weight: labels.weight.map(|w| w.at(g)),
            ..o
        };
        let (t, lse, sh) = (labels.target.at(g), saved.lse.at(g), shards.at(g)?);
        let (d, go) = (saved.denom(g)?, saved.grad_output(g));
        k::vocab_parallel_backward(xs.at(g), rows, sh, classes, t, &o, lse, d, go, gs)?;
    }
    Ok(())
}

/// The one value of a scalar operand.
fn one<T: Float>(s: &[T]) -> Result<f64, Error> {
    match s {
        [v] => Ok(v.to_f64()),
        _ => Err(Error::Value(format!(
            "denom: expected one value per call, got {}",
            s.len()
        ))),
    }
}

fn vocab_parallel_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 1)?;
    let logits = frame.operand(0, "logits")?;
    by_float!(logits, backward_typed(frame))
}

/// The linear inputs per batch element: hidden, the weight shard, the bias shard.
struct LinearInputs<'a, T> {
    hidden: PerBatch<'a, T>,
    weight: PerBatch<'a, T>,
    bias: Option<PerBatch<'a, T>>,
    rows: usize,
    h: usize,
    len: usize,
}

impl<'a, T> LinearInputs<'a, T> {
    fn at(&self, g: usize) -> ShardLinear<'a, T> {
        ShardLinear {
            hidden: self.hidden.at(g),
            weight: self.weight.at(g),
            bias: self.bias.map(|b| b.at(g)),
            h: self.h,
        }
    }
}

fn linear_inputs<'a, T: Element>(
    frame: &Frame<'a>,
) -> Result<(Batch<'a>, LinearInputs<'a, T>), Error> {
    let hidden = frame.operand(0, "hidden")?;
    let weight = frame.operand(1, "weight_shard")?;
    let bias = frame.operand(2, "bias_shard")?;
    let batch = Batch::of(&hidden, 2)?;
    let inputs = LinearInputs {
        rows: hidden.dim_from_end(1)?,
        h: hidden.dim_from_end(0)?,
        len: weight.dim_from_end(1)?,
        hidden: hidden.per_batch(&batch, 2)?,
        weight: weight.per_batch(&batch, 2)?,
        bias: bias.per_batch_opt(&batch, 1)?,
    };
    Ok((batch, inputs))
}

fn linear_stats_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let (batch, lin) = linear_inputs::<T>(frame)?;
    let mut ids = Default::default();
    let labels = labels::<T>(frame, 3, &batch, &mut ids)?;
    let shards = Shards::of(&frame.operand(5, "vocab_start")?, &batch, lin.len)?;
    let o = stats_options::<&[T]>(frame)?;
    let chunk = chunk_size(frame)?;
    let packed = frame.result(0, "packed")?;
    let out = parts_mut("packed", packed.slice_mut::<T>()?, batch.count)?;
    for (g, p) in out.into_iter().enumerate() {
        let o = CeOptions {
            weight: labels.weight.map(|w| w.at(g)),
            ..o
        };
        let (t, sh) = (labels.target.at(g), shards.at(g)?);
        k::vocab_parallel_linear_stats(lin.at(g), lin.rows, sh, t, &o, chunk, p)?;
    }
    Ok(())
}

fn vocab_parallel_linear_stats(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(6, 1)?;
    let hidden = frame.operand(0, "hidden")?;
    by_float!(hidden, linear_stats_typed(frame))
}

fn linear_backward_typed<T: Float + Element>(frame: &Frame) -> Result<(), Error> {
    let (batch, lin) = linear_inputs::<T>(frame)?;
    let mut ids = Default::default();
    let labels = labels::<T>(frame, 3, &batch, &mut ids)?;
    let mut lse64 = Vec::new();
    let at = SavedAt {
        lse: 5,
        denom: Some(6),
        grad_output: 7,
    };
    let saved = saved::<T>(frame, at, &batch, &mut lse64)?;
    let shards = Shards::of(&frame.operand(8, "vocab_start")?, &batch, lin.len)?;
    let classes = frame.attr_usize("classes")?;
    let reduction = Reduction::parse(frame.attr_str("reduction")?)?;
    let o = ce_options::<&[T]>(frame, reduction)?;
    let chunk = chunk_size(frame)?;
    let (dh, dw, db) = (
        frame.result(0, "dhidden")?,
        frame.result(1, "dweight_shard")?,
        frame.result(2, "dbias_shard")?,
    );
    let with_bias = lin.bias.is_some();
    if with_bias != (db.len() > 0) {
        return Err(Error::Value(
            "dbias_shard: give it exactly when bias_shard is given".into(),
        ));
    }
    let dhs = parts_mut("dhidden", dh.slice_mut::<T>()?, batch.count)?;
    let dws = parts_mut("dweight_shard", dw.slice_mut::<T>()?, batch.count)?;
    let dbs = super::batch::opt_parts_mut(
        "dbias_shard",
        with_bias.then_some(db.slice_mut::<T>()?),
        batch.count,
    )?;
    for (g, ((dh, dw), db)) in dhs.into_iter().zip(dws).zip(dbs).enumerate() {
        let o = CeOptions {
            weight: labels.weight.map(|w| w.at(g)),
            ..o
        };
        let (t, lse, sh) = (labels.target.at(g), saved.lse.at(g), shards.at(g)?);
        let (d, go) = (saved.denom(g)?, saved.grad_output(g));
        k::vocab_parallel_linear_backward(
            lin.at(g),
            lin.rows,
            sh,
            classes,
            t,
            &o,
            chunk,
            lse,
            d,
            go,
            dh,
            dw,
            db,
        )?;
    }
    Ok(())
}

fn vocab_parallel_linear_backward(frame: &Frame) -> Result<(), Error> {
    frame.expect_arity(9, 3)?;
    let hidden = frame.operand(0, "hidden")?;
    by_float!(hidden, linear_backward_typed(frame))
}

ffi_handler!(stats_handler, vocab_parallel_stats);
ffi_handler!(combine_handler, vocab_parallel_combine);
ffi_handler!(backward_handler, vocab_parallel_backward);
ffi_handler!(linear_stats_handler, vocab_parallel_linear_stats);
ffi_handler!(linear_backward_handler, vocab_parallel_linear_backward);

/// This family's CPU targets.
pub(crate) const TARGETS: &[Target] = &[
    ("normax_vocab_parallel_stats", stats_handler),
    ("normax_vocab_parallel_combine", combine_handler),
    ("normax_vocab_parallel_backward", backward_handler),
    ("normax_vocab_parallel_linear_stats", linear_stats_handler),
    (
        "normax_vocab_parallel_linear_backward",
        linear_backward_handler,
    ),
];
