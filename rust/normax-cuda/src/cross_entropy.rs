//! Cross-entropy over rows of logits, with its gradient (kernels/cross_entropy.cu).

use crate::device::{params, with_device};
use crate::launch::{check, size, RowLaunch, Variant};
use crate::{Buf, CeOptions, DType, Error, Indices, Result, Stream, Target};

/// What the rows are scored against: int64 class indices (one per row) or probabilities (the
/// logits' dtype and shape).
pub type CeTarget = Target<Indices, Buf>;

/// The kernels' argument block (`CeArgs` in cross_entropy.cu: same fields, same order).
#[repr(C)]
#[derive(Clone, Copy)]
struct CeArgs {
    target: u64,
    probs: u64,
    weight: u64,
    ignore_index: i64,
    eps: f32,
    z: f32,
    /// 0: no softcap.
    cap: f32,
}

/// sizeof(CeStats) in cross_entropy.cu: a float2 and six floats.
const CE_STATS_BYTES: usize = 32;

/// The per-row cross-entropy `loss_rows` (float32, `rows`; 0 for ignored rows) and, with
/// `grad = Some((grad, scale, stride))`, the gradient scaled per row by `scale[row * stride]`
/// (float32 on the device: stride 0 for one scale, 1 for one per row). The weight in `opts` is
/// float32 per class. `opts.reduction` is the caller's to apply: it sums `loss_rows` and folds
/// the mean's denominator into `scale`.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    s: Stream,
    x: Buf,
    target: CeTarget,
    opts: &CeOptions<Buf>,
    loss_rows: Buf,
    grad: Option<(Buf, Buf, usize)>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("logits", &x, x.dtype, n)?;
    check("loss", &loss_rows, DType::F32, rows)?;
    opts.check(cols)?;
    let (target_ptr, probs_ptr) = match target {
        Target::Classes(t) => {
            if t.len != rows {
                return Err(Error::Value(format!(
                    "target: expected {rows} class indices, got {}",
                    t.len
                )));
            }
            if rows > 0 && t.ptr == 0 {
                return Err(Error::Value("target: null device address".into()));
            }
            (t.ptr, 0)
        }
        Target::Probs(p) => {
            check("target", &p, x.dtype, n)?;
            (0, p.ptr)
        }
    };
    if let Some(w) = &opts.weight {
        check("weight", w, DType::F32, cols)?;
    }
    if let Some((g, scale, stride)) = &grad {
        check("grad", g, x.dtype, n)?;
        let need = if *stride == 0 {
            1
        } else {
            rows.saturating_sub(1) * stride + 1
        };
        if scale.dtype != DType::F32 || scale.len < need {
            return Err(Error::Value(format!(
                "grad_output: expected {need} float32 scales, got {}",
                scale.len
            )));
        }
    }
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        return Err(Error::Value("logits: the class axis is empty".into()));
    }
    let args = CeArgs {
        target: target_ptr,
        probs: probs_ptr,
        weight: opts.weight.map_or(0, |w| w.ptr),
        ignore_index: opts.ignore_index,
        eps: opts.label_smoothing as f32,
        z: opts.z_loss as f32,
        cap: opts.softcap.unwrap_or(0.0) as f32,
    };
    with_device(s.device, |d| {
        let mut bufs = vec![x.ptr, probs_ptr];
        if let Some((g, _, _)) = &grad {
            bufs.push(g.ptr);
        }
        let mut r = RowLaunch::new(d, s, "cross_entropy", x.dtype, rows, cols, &bufs, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let (g_ptr, scale_ptr, stride) =
            grad.map_or((0, 0, 0i64), |(g, sc, st)| (g.ptr, sc.ptr, st as i64));
        if let Some(packs) = r.cached_packs().filter(|_| probs_ptr == 0) {
            // Safety: buffers checked above; class-index targets, 16-byte aligned rows (vec > 1).
            return unsafe {
                r.run(
                    "ce_cached",
                    Variant::Packs(packs),
                    &mut params![
                        x.ptr,
                        rows_i,
                        cols_i,
                        args,
                        loss_rows.ptr,
                        g_ptr,
                        scale_ptr,
                        stride
                    ],
                )
            };
        }
        // Safety: buffers checked above; the scratch holds rows*chunks CeStats.
        let part = unsafe {
            r.split_stats(
                "ce_part",
                CE_STATS_BYTES,
                &params![x.ptr, rows_i, cols_i, chunk_i, chunks_i, args],
            )?
        };
        let part_ptr = part.as_ref().map_or(0u64, |sc| sc.ptr);
        // Safety: buffers checked above.
        unsafe {
            r.run_vec(
                "cross_entropy",
                &mut params![
                    x.ptr,
                    rows_i,
                    cols_i,
                    chunk_i,
                    chunks_i,
                    args,
                    part_ptr,
                    loss_rows.ptr,
                    g_ptr,
                    scale_ptr,
                    stride
                ],
            )
        }
    })
}
