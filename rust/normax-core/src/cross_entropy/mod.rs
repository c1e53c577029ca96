//! Cross-entropy: loss and gradient fused over rows of logits, and a linear cross-entropy that
//! computes the logits block by block from the hidden states and never holds all of them.
//!
//! Per row with logits x (after the optional softcap x -> s * tanh(x / s)), lse = log-sum-exp(x),
//! class weights w (ones without), smoothing eps, z-loss z and C classes:
//!
//! ```text
//! L      = (1 - eps) * w_y * (lse - x_y) + eps / C * sum_c w_c (lse - x_c) + z * lse^2
//! dL/dx_c = p_c * A - w_c * (eps / C + (1 - eps) * t_c),     p = softmax(x)
//! A      = (1 - eps) * sum_c w_c t_c + eps / C * sum_c w_c + 2 z lse
//! ```
//!
//! with t the one-hot target (hard targets) or the target probabilities (soft targets, whose first
//! loss term is (1 - eps) * sum_c w_c t_c (lse - x_c)). With a softcap the gradient is multiplied
//! by 1 - (x / s)^2 (x capped). These are torch.nn.functional.cross_entropy's definitions.
//!
//! Pass 1 is the sum-of-exponentials machinery of [`crate::lse`] (exact f64 path for rows with NaN,
//! inf or huge values). Pass 2 writes the gradient and accumulates the sums that need lse; the
//! common case (hard targets, no smoothing, no softcap) instead keeps pass 1's exp terms in the
//! gradient buffer and only scales them, as the in-cache softmax does. Rows run in parallel in
//! fixed blocks whose loss sums add up in f64 in block order: the same result for any thread count.
//!
//! Here: the public functions and their checks; `rule`: the loss algebra above; `rows`: the SIMD
//! passes and `run_rows`; `stats`: what `return_stats` adds to them (the argmax check, the plain
//! path's entropy pass); `stable`: the StableMax loss's direct path (sums of s(x), no phi);
//! `linear`: the linear cross-entropy; `vocab_parallel`: both with the classes split across
//! ranks.

mod linear;
mod rows;
mod rule;
mod stable;
mod stats;
mod vocab_parallel;

use crate::driver::Ptr;
use crate::float::Float;
use crate::spec::{check_class, check_len, size, CeOptions, GradOutput, Reduction, Target};
use crate::Error;
use rows::{run_rows, RowOutputs, StatsOut, Targets};
use rule::{scale_for, Rule};

pub(crate) use linear::Linear;
pub use linear::{linear_block, linear_cross_entropy, LinearGrads, DEFAULT_CHUNK};
pub use vocab_parallel::{
    fields as vocab_parallel_fields, vocab_parallel_backward, vocab_parallel_combine,
    vocab_parallel_linear_backward, vocab_parallel_linear_stats, vocab_parallel_stats, Shard,
    ShardLinear,
};

/// Checks every class index; returns the mean's denominator, the summed weight of the rows kept
/// (class weight of the target times the row's token weight).
fn check_classes<T: Float>(
    target: &[i64],
    classes: usize,
    ignore: i64,
    weight: Option<&[T]>,
    token_weight: Option<&[T]>,
) -> Result<f64, Error> {
    let mut total = 0.0;
    for (i, &y) in target.iter().enumerate() {
        if let Some(c) = check_class(i, y, classes, ignore)? {
            let w = weight.map_or(1.0, |w| w[c].to_f64());
            total += token_weight.map_or(w, |t| w * t[i].to_f64());
        }
    }
    Ok(total)
}

/// The per-row statistics of `return_stats` (one value per row each): the log-sum-exp and the
/// entropy of the distribution the loss uses (logits divided by the temperature, then capped),
/// and whether the argmax of the logits as given is the target (the argmax of the target row for
/// probability targets). Ignored rows: 0, 0, false. NaN rows: NaN (lse -inf where every logit is
/// -inf), NaN.
pub struct CeStats<'a, T> {
    pub lse: &'a mut [T],
    pub entropy: &'a mut [T],
    pub correct: &'a mut [bool],
}

impl<T: Float> CeStats<'_, T> {
    fn check(&mut self, rows: usize) -> Result<StatsOut<T>, Error> {
        check_len("lse", self.lse.len(), rows)?;
        check_len("entropy", self.entropy.len(), rows)?;
        check_len("correct", self.correct.len(), rows)?;
        Ok(StatsOut {
            lse: Ptr(self.lse.as_mut_ptr()),
            entropy: Ptr(self.entropy.as_mut_ptr()),
            correct: Ptr(self.correct.as_mut_ptr()),
        })
    }
}

/// The logits of [`cross_entropy_into`] and where its gradient goes.
pub enum CeLogits<'a, T> {
    /// The loss alone.
    Loss(&'a [T]),
    /// The loss, and the gradient into the second slice.
    Grad(&'a [T], &'a mut [T]),
    /// The loss, and the gradient written over the logits.
    GradInPlace(&'a mut [T]),
}

/// Writes the reduced loss (the per-row buffer is already written for reduction None).
pub(super) fn finish_loss<T: Float>(reduction: Reduction, total: f64, denom: f64, loss: &mut [T]) {
    if let Some(value) = reduction.reduce(total, denom) {
        loss[0] = T::from_f64(value);
    }
}

/// Validates everything and returns the mean's denominator.
pub(super) fn prepare<T: Float>(
    rows: usize,
    classes: usize,
    target: &Target<&[i64], &[T]>,
    opts: &CeOptions<&[T]>,
    loss: &[T],
) -> Result<f64, Error> {
    opts.check(classes)?;
    opts.check_rows(rows)?;
    check_len("loss", loss.len(), opts.reduction.loss_len(rows))?;
    match target {
        Target::Classes(t) => {
            check_len("target", t.len(), rows)?;
            check_classes(
                t,
                classes,
                opts.ignore_index,
                opts.weight,
                opts.token_weight,
            )
        }
        Target::Probs(p) => {
            check_len("target", p.len(), size(rows, classes)?)?;
            if opts.ignore_index >= 0 {
                return Err(Error::Value(
                    "ignore_index is not supported with class-probability targets".into(),
                ));
            }
            Ok(opts
                .token_weight
                .map_or(rows as f64, |t| t.iter().map(|v| v.to_f64()).sum()))
        }
    }
}

/// Checks every size and option, then runs the rows: the loss into `loss` and, unless `grad` is
/// null, the gradient into `grad` (which may be the logits).
///
/// # Safety
/// Each pointer valid for the length beside it.
#[allow(clippy::too_many_arguments)]
unsafe fn run<T: Float>(
    (x, x_len): (*const T, usize),
    (grad, grad_len): (*mut T, usize),
    rows: usize,
    classes: usize,
    target: Target<&[i64], &[T]>,
    opts: &CeOptions<&[T]>,
    grad_output: GradOutput<&[T]>,
    (loss, mut stats): (&mut [T], Option<CeStats<T>>),
) -> Result<(), Error> {
    check_len("logits", x_len, size(rows, classes)?)?;
    let stats = match &mut stats {
        Some(s) => s.check(rows)?,
        None => StatsOut::NONE,
    };
    if !grad.is_null() {
        check_len("grad", grad_len, x_len)?;
    }
    let denom = prepare(rows, classes, &target, opts, loss)?;
    let scale = scale_for(opts.reduction, grad_output, denom, rows)?;
    let rule = Rule::new(opts, classes);
    let targets = match target {
        Target::Classes(t) => Targets::Classes(t, opts.ignore_index),
        Target::Probs(p) => Targets::Probs(Ptr::from_const(p.as_ptr())),
    };
    let losses = if opts.reduction == Reduction::None {
        Ptr(loss.as_mut_ptr())
    } else {
        Ptr(std::ptr::null_mut())
    };
    let out = RowOutputs { losses, stats };
    let total = run_rows(
        &rule,
        Ptr::from_const(x),
        Ptr(grad),
        targets,
        scale,
        out,
        rows,
        classes,
        0,
    );
    finish_loss(opts.reduction, total, denom, loss);
    Ok(())
}

/// Cross-entropy of `logits` (rows x classes, contiguous) into `loss`: one value per row for
/// reduction None, else one.
pub fn cross_entropy<T: Float>(
    logits: &[T],
    rows: usize,
    classes: usize,
    target: Target<&[i64], &[T]>,
    opts: &CeOptions<&[T]>,
    loss: &mut [T],
) -> Result<(), Error> {
    let go = GradOutput::Scalar(0.0);
    let x = CeLogits::Loss(logits);
    cross_entropy_into(x, (rows, classes), target, opts, go, loss, None)
}

/// [`cross_entropy`] and d(grad_output * loss)/d(logits) into `grad`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy_with_grad<T: Float>(
    logits: &[T],
    grad: &mut [T],
    rows: usize,
    classes: usize,
    target: Target<&[i64], &[T]>,
    opts: &CeOptions<&[T]>,
    grad_output: GradOutput<&[T]>,
    loss: &mut [T],
) -> Result<(), Error> {
    let x = CeLogits::Grad(logits, grad);
    cross_entropy_into(x, (rows, classes), target, opts, grad_output, loss, None)
}

/// [`cross_entropy_with_grad`] writing the gradient over the logits.
pub fn cross_entropy_with_grad_inplace<T: Float>(
    logits: &mut [T],
    rows: usize,
    classes: usize,
    target: Target<&[i64], &[T]>,
    opts: &CeOptions<&[T]>,
    grad_output: GradOutput<&[T]>,
    loss: &mut [T],
) -> Result<(), Error> {
    let x = CeLogits::GradInPlace(logits);
    cross_entropy_into(x, (rows, classes), target, opts, grad_output, loss, None)
}

/// Every form of the cross-entropy in one: the loss of `logits` ((rows, classes), contiguous),
/// the gradient where `logits` asks for it, and with `stats` the per-row statistics, all from
/// the same passes over each row.
pub fn cross_entropy_into<T: Float>(
    logits: CeLogits<T>,
    (rows, classes): (usize, usize),
    target: Target<&[i64], &[T]>,
    opts: &CeOptions<&[T]>,
    grad_output: GradOutput<&[T]>,
    loss: &mut [T],
    stats: Option<CeStats<T>>,
) -> Result<(), Error> {
    let (x, g) = match logits {
        CeLogits::Loss(x) => ((x.as_ptr(), x.len()), (std::ptr::null_mut(), 0)),
        CeLogits::Grad(x, g) => ((x.as_ptr(), x.len()), (g.as_mut_ptr(), g.len())),
        CeLogits::GradInPlace(x) => {
            let (p, n) = (x.as_mut_ptr(), x.len());
            ((p as *const T, n), (p, n))
        }
    };
    let out = (loss, stats);
    unsafe { run(x, g, rows, classes, target, opts, grad_output, out) }
}
