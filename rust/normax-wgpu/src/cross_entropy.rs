//! Cross-entropy of rows of logits against class indices, with its gradient
//! (shaders/cross_entropy.wgsl).

use crate::device::{f32_bytes, i32_bytes, run, Input, Kernel, Uniform};
use crate::{dim, Error};
use normax_core::spec::{check_class, check_len, size, CeOptions, GradOutput, Reduction};

/// The loss (one per row for [`Reduction::None`], else one value) and, when asked for, the
/// gradient of grad_output * loss with respect to the logits.
pub type LossAndGrad = (Vec<f32>, Option<Vec<f32>>);

/// Cross-entropy of `logits` (rows x classes) against class indices `target` (one per row),
/// with its gradient when `grad` is given. Semantics are normax-core's `cross_entropy`: rows whose
/// target is `ignore_index` count neither in the loss nor in the mean's denominator (the summed
/// weight of the other rows' targets) and get a zero gradient; rows with NaN or +inf logits (after
/// the cap), or only -inf, are NaN. The per-row losses come from the GPU and are summed here in
/// f64, in row order.
pub fn cross_entropy(
    logits: &[f32],
    rows: usize,
    classes: usize,
    target: &[i64],
    opts: &CeOptions<&[f32]>,
    grad: Option<GradOutput<&[f32]>>,
) -> Result<LossAndGrad, Error> {
    if classes == 0 {
        return Err(Error::Value("logits: the class axis is empty".into()));
    }
    check_len("logits", logits.len(), size(rows, classes)?)?;
    check_len("target", target.len(), rows)?;
    opts.check(classes)?;
    // Class indices become i32, ignored rows -1: WGSL has no 64-bit integers.
    let mut denom = 0.0f64;
    let mut classes32 = Vec::with_capacity(rows);
    for (i, &y) in target.iter().enumerate() {
        let class = check_class(i, y, classes, opts.ignore_index)?;
        if let Some(c) = class {
            denom += opts.weight.map_or(1.0, |w| w[c] as f64);
        }
        classes32.push(class.map_or(-1, |c| c as i32));
    }
    let scale: Option<Vec<f32>> = match (grad, opts.reduction) {
        (None, _) => None,
        (Some(GradOutput::Scalar(g)), Reduction::Mean) => Some(vec![(g / denom) as f32; rows]),
        (Some(GradOutput::Scalar(g)), _) => Some(vec![g as f32; rows]),
        (Some(GradOutput::Rows(g)), Reduction::None) => {
            check_len("grad_output", g.len(), rows)?;
            Some(g.to_vec())
        }
        (Some(GradOutput::Rows(_)), _) => {
            return Err(Error::Value(
                "grad_output: must be a number unless reduction is 'none'".into(),
            ))
        }
    };
    let with_grad = scale.is_some();
    let (row_loss, grad) = if rows == 0 {
        (Vec::new(), with_grad.then(Vec::new))
    } else {
        let c = dim("classes", classes)?;
        let w_sum = opts
            .weight
            .map_or(classes as f64, |w| w.iter().map(|&v| v as f64).sum());
        let uniform = |n: u32, nx: u32| {
            Uniform::default()
                .u32(n)
                .u32(c)
                .u32(nx)
                .u32(opts.weight.is_some() as u32)
                .u32(with_grad as u32)
                .u32(opts.softcap.is_some() as u32)
                .u32(0)
                .f32(opts.label_smoothing as f32)
                .f32(opts.z_loss as f32)
                .f32(opts.softcap.unwrap_or(1.0) as f32)
                .f32(w_sum as f32)
                .f32((1.0 / classes as f64) as f32)
        };
        let scale_rows = scale.as_deref().unwrap_or(&[]);
        let mut out = run(
            Kernel::CrossEntropy,
            rows,
            &[
                Input::Rows(f32_bytes(logits), classes),
                Input::Rows(i32_bytes(&classes32), 1),
                Input::Rows(f32_bytes(scale_rows), with_grad as usize),
                Input::Whole(opts.weight.map(f32_bytes)),
            ],
            &[1, if with_grad { classes } else { 0 }],
            &uniform,
        )?;
        let grad = out.pop().filter(|_| with_grad);
        (out.pop().unwrap_or_default(), grad)
    };
    let total = row_loss.iter().map(|&l| l as f64).sum::<f64>();
    let loss = match opts.reduction.reduce(total, denom) {
        Some(value) => vec![value as f32],
        None => row_loss,
    };
    Ok((loss, grad))
}
