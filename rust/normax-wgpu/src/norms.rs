//! rms_norm and layer_norm of rows (shaders/norms.wgsl).

use crate::device::{f32_bytes, run, Input, Kernel, Uniform};
use crate::{dim, Error};
use normax_core::spec::{check_eps, check_len, size, NormKind};

fn norm(
    x: &[f32],
    rows: usize,
    cols: usize,
    weight: Option<&[f32]>,
    bias: Option<&[f32]>,
    eps: f32,
    kind: NormKind,
) -> Result<Vec<f32>, Error> {
    check_len("x", x.len(), size(rows, cols)?)?;
    check_eps(eps as f64)?;
    for (p, name) in [(weight, "weight"), (bias, "bias")] {
        if let Some(p) = p {
            check_len(name, p.len(), cols)?;
        }
    }
    if rows == 0 || cols == 0 {
        return Ok(Vec::new());
    }
    let c = dim("cols", cols)?;
    let mut out = run(
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
                // The shader's `layer` flag: 1 centres the row (LayerNorm), 0 does not (RMSNorm).
                .u32((kind == NormKind::Layer) as u32)
                .f32(eps)
                .u32(weight.is_some() as u32)
                .u32(bias.is_some() as u32)
        },
    )?;
    Ok(out.swap_remove(0))
}

/// RMSNorm of each row: x / sqrt(mean(x^2) + eps) * weight (weight None: ones).
pub fn rms_norm(
    x: &[f32],
    rows: usize,
    cols: usize,
    weight: Option<&[f32]>,
    eps: f32,
) -> Result<Vec<f32>, Error> {
    norm(x, rows, cols, weight, None, eps, NormKind::Rms)
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
    norm(x, rows, cols, weight, bias, eps, NormKind::Layer)
}
