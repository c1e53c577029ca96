//! normax's forward ops on a GPU through wgpu (Vulkan, Metal, DX12), in float32.
//!
//! Every op takes `rows` contiguous rows of `cols` values (`x.len() == rows * cols`) and works on
//! each row alone, one workgroup per row (WGSL kernels in `src/shaders`). The device is created on
//! first use: the first adapter wgpu offers (a GPU before a software one such as Mesa's lavapipe).
//! Nothing here panics: a missing adapter, an input too large for the device, or a lost device
//! are [`Error`]s. Inputs larger than the device's buffer or dispatch limits run in chunks of rows.
//!
//! Semantics are normax-core's (`softmax`, `log_softmax`, `logsumexp`, `rms_norm`, `layer_norm`,
//! `cross_entropy`), including NaN, infinities and ignored rows; the arithmetic is float32 with
//! max-subtracted exponentials, so results agree with the CPU kernels to float32 rounding (a few
//! ULP, more where the GPU's `exp` and `log` are less accurate), not bit for bit.

mod device;

use device::{f32_bytes, gpu, i32_bytes, run, Input, Kernel, Uniform};

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// No adapter: no GPU driver (and no software one such as lavapipe).
    NoAdapter(String),
    /// An adapter that gave no device, or on which the kernels do not compile.
    Unavailable(String),
    /// Bad argument (length, option), or an input the device cannot hold.
    Value(String),
    /// A class index out of range.
    Index(String),
    /// The device failed: out of memory, rejected work, lost.
    Device(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NoAdapter(m)
            | Error::Unavailable(m)
            | Error::Value(m)
            | Error::Index(m)
            | Error::Device(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// The adapter in use ("name (backend, device type)"), creating the device on first call; an
/// [`Error::NoAdapter`] when there is none.
pub fn adapter_info() -> Result<String, Error> {
    guarded(|| gpu().map(|g| g.describe()))
}

/// Test hook: at most `rows` rows per chunk (0 restores the device's limits), so that small
/// inputs exercise the chunked path.
#[doc(hidden)]
pub fn set_chunk_rows_limit(rows: usize) {
    device::set_chunk_rows_limit(rows);
}

/// Runs `f`, turning a panic inside wgpu (a driver bug, say) into an error.
fn guarded<R>(f: impl FnOnce() -> Result<R, Error>) -> Result<R, Error> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err(Error::Device(format!(
            "wgpu panicked: {}",
            device::panic_text(&p)
        )))
    })
}

fn check_len(name: &str, len: usize, want: usize) -> Result<(), Error> {
    if len != want {
        return Err(Error::Value(format!(
            "{name} has {len} elements; expected {want}"
        )));
    }
    Ok(())
}

fn size(rows: usize, cols: usize) -> Result<usize, Error> {
    rows.checked_mul(cols)
        .ok_or_else(|| Error::Value("x: rows * cols overflows".into()))
}

fn dim(name: &str, v: usize) -> Result<u32, Error> {
    u32::try_from(v).map_err(|_| Error::Value(format!("{name}: {v} is too large for the GPU")))
}

#[derive(Clone, Copy)]
enum RowOp {
    Softmax = 0,
    LogSoftmax = 1,
    LogSumExp = 2,
}

fn softmax_family(x: &[f32], rows: usize, cols: usize, op: RowOp) -> Result<Vec<f32>, Error> {
    check_len("x", x.len(), size(rows, cols)?)?;
    let per_row = if let RowOp::LogSumExp = op { 1 } else { cols };
    if rows == 0 || cols == 0 {
        // An empty reduction's log-sum-exp is -inf; empty rows have nothing to normalize.
        return Ok(vec![f32::NEG_INFINITY; rows * per_row]);
    }
    let c = dim("cols", cols)?;
    guarded(|| {
        let g = gpu()?;
        let mut out = run(
            g,
            Kernel::Softmax,
            rows,
            &[Input::Rows(f32_bytes(x), cols)],
            &[per_row],
            &|n, nx| {
                Uniform::default()
                    .u32(n)
                    .u32(c)
                    .u32(nx)
                    .u32(op as u32)
                    .u32(0)
            },
        )?;
        Ok(out.swap_remove(0))
    })
}

/// softmax of each row: exp(x - max) / sum(exp(x - max)). A row with NaN or +inf, or only -inf,
/// is NaN.
pub fn softmax(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
    softmax_family(x, rows, cols, RowOp::Softmax)
}

/// log_softmax of each row: (x - max) - log(sum(exp(x - max))); NaN rows as [`softmax`].
pub fn log_softmax(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
    softmax_family(x, rows, cols, RowOp::LogSoftmax)
}

/// log(sum(exp(x))) of each row: NaN with a NaN, +inf with +inf, -inf for a row of only -inf or
/// an empty row.
pub fn logsumexp(x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
    softmax_family(x, rows, cols, RowOp::LogSumExp)
}

fn check_eps(eps: f32) -> Result<(), Error> {
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::Value(format!(
            "eps: must be finite and >= 0, got {eps}"
        )));
    }
    Ok(())
}

fn norm(
    x: &[f32],
    rows: usize,
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    layer: bool,
) -> Result<Vec<f32>, Error> {
    check_len("x", x.len(), size(rows, cols)?)?;
    check_eps(eps)?;
    for (p, name) in [(weight, "weight"), (bias, "bias")] {
        if let Some(p) = p {
            check_len(name, p.len(), cols)?;
        }
    }
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    let c = dim("cols", cols)?;
    guarded(|| {
        let g = gpu()?;
        let mut out = run(
            g,
            Kernel::Norms,
            rows,
            &[
                Input::Rows(f32_bytes(x), cols),
                Input::Whole(weight.map(f32_bytes)),
                Input::Whole(bias.map(f32_bytes)),
            ],
            &[cols],
            &|n, nx| {
                Uniform::default()
                    .u32(n)
                    .u32(c)
                    .u32(nx)
                    .u32(layer as u32)
                    .f32(eps)
                    .u32(weight.is_some() as u32)
                    .u32(bias.is_some() as u32)
            },
        )?;
        Ok(out.swap_remove(0))
    })
}

/// RMSNorm of each row: x / sqrt(mean(x^2) + eps) * weight (weight None: ones).
pub fn rms_norm(
    x: &[f32],
    rows: usize,
    cols: usize,
    weight: Option<&[f32]>,
    eps: f32,
) -> Result<Vec<f32>, Error> {
    norm(x, rows, cols, weight, None, eps, false)
}

/// LayerNorm of each row: (x - mean) / sqrt(var + eps) * weight + bias, biased variance from
/// two passes (mean, then centred squares).
pub fn layer_norm(
    x: &[f32],
    rows: usize,
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
) -> Result<Vec<f32>, Error> {
    norm(x, rows, cols, weight, bias, eps, true)
}

/// How the per-row losses combine, as torch's `reduction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Sum,
    Mean,
}

/// Cross-entropy options, named and defaulted as in torch.nn.functional.cross_entropy.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// One weight per class.
    pub weight: Option<&'a [f32]>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f32,
    /// PaLM's auxiliary loss: z_loss * lse^2 per row not ignored.
    pub z_loss: f32,
    /// Gemma 2's logit cap: logits become softcap * tanh(logits / softcap).
    pub softcap: Option<f32>,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            weight: None,
            ignore_index: -100,
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
        }
    }
}

/// d(loss)/d(output) the gradient is scaled by: a number, or one per row (reduction None only).
#[derive(Clone, Copy, Debug)]
pub enum GradOutput<'a> {
    Scalar(f64),
    Rows(&'a [f32]),
}

/// The loss (one per row for [`Reduction::None`], else one value) and, when asked for, the
/// gradient of grad_output * loss with respect to the logits.
pub type LossAndGrad = (Vec<f32>, Option<Vec<f32>>);

fn check_options(o: &Options, classes: usize) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&o.label_smoothing) {
        return Err(Error::Value(format!(
            "label_smoothing: must be between 0.0 and 1.0, got {}",
            o.label_smoothing
        )));
    }
    if !(o.z_loss >= 0.0 && o.z_loss.is_finite()) {
        return Err(Error::Value(format!(
            "z_loss: must be a finite number >= 0, got {}",
            o.z_loss
        )));
    }
    if let Some(s) = o.softcap {
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::Value(format!(
                "softcap: must be a finite number > 0, got {s}"
            )));
        }
    }
    if let Some(w) = o.weight {
        check_len("weight", w.len(), classes)?;
    }
    Ok(())
}

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
    opts: &Options,
    grad: Option<GradOutput>,
) -> Result<LossAndGrad, Error> {
    if classes == 0 {
        return Err(Error::Value("logits: the class axis is empty".into()));
    }
    check_len("logits", logits.len(), size(rows, classes)?)?;
    check_len("target", target.len(), rows)?;
    check_options(opts, classes)?;
    // Class indices become i32, ignored rows -1: WGSL has no 64-bit integers.
    let mut denom = 0.0f64;
    let mut classes32 = Vec::with_capacity(rows);
    for (i, &y) in target.iter().enumerate() {
        if y == opts.ignore_index {
            classes32.push(-1);
            continue;
        }
        if y < 0 || y as u64 >= classes as u64 {
            return Err(Error::Index(format!(
                "target {y} at position {i} is out of range for {classes} classes \
                 (and is not ignore_index = {})",
                opts.ignore_index
            )));
        }
        denom += opts.weight.map_or(1.0, |w| w[y as usize] as f64);
        classes32.push(y as i32);
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
                .f32(opts.label_smoothing)
                .f32(opts.z_loss)
                .f32(opts.softcap.unwrap_or(1.0))
                .f32(w_sum as f32)
                .f32((1.0 / classes as f64) as f32)
        };
        let scale_rows = scale.as_deref().unwrap_or(&[]);
        let mut out = guarded(|| {
            let g = gpu()?;
            run(
                g,
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
            )
        })?;
        let grad = out.pop().filter(|_| with_grad);
        (out.pop().unwrap_or_default(), grad)
    };
    let loss = match opts.reduction {
        Reduction::None => row_loss,
        Reduction::Sum => vec![row_loss.iter().map(|&l| l as f64).sum::<f64>() as f32],
        Reduction::Mean => {
            vec![(row_loss.iter().map(|&l| l as f64).sum::<f64>() / denom) as f32]
        }
    };
    Ok((loss, grad))
}
