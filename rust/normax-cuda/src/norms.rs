//! rms_norm, crms_norm and layer_norm of rows, and their backward (kernels/norms.cu). Rows are
//! never split across blocks here: one block (or warp) per row.

use crate::device::{params, with_device, Scratch};
use crate::launch::{check, check_opt, column_plan, ptr, size, sum_parts, RowLaunch};
use crate::table::{KernelKey, Op, Variant};
use crate::{Buf, DType, Error, NormKind, Result, Stream};

/// y = (x - mean) * rstd * weight + bias per row (mean 0 for the RMS kinds); `y` None computes
/// the statistics only. weight, bias (float32, `cols`) and mean, rstd (float32, `rows`) optional.
#[allow(clippy::too_many_arguments)]
pub fn norm_forward(
    s: Stream,
    kind: NormKind,
    x: Buf,
    weight: Option<Buf>,
    bias: Option<Buf>,
    y: Option<Buf>,
    mean: Option<Buf>,
    rstd: Option<Buf>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check_opt("weight", weight, DType::F32, cols)?;
    check_opt("bias", bias, DType::F32, cols)?;
    check_opt("out", y, x.dtype, n)?;
    check_opt("mean", mean, DType::F32, rows)?;
    check_opt("rstd", rstd, DType::F32, rows)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        let bufs = [x.ptr, ptr(y)];
        let mut r = RowLaunch::new(d, s, x.dtype, rows, cols, &bufs, false)?;
        let (rows_i, cols_i, _, _) = r.dims();
        let kind_i = kind as i32;
        let (op, variant) = match r.cached_packs() {
            Some(packs) => (Op::NormForwardCached, Variant::Packs(packs)),
            None => (Op::NormForward, Variant::Vec(r.p.vec)),
        };
        // Safety: every buffer checked above (null where absent).
        unsafe {
            r.run(
                op,
                variant,
                &mut params![
                    x.ptr,
                    ptr(weight),
                    ptr(bias),
                    ptr(y),
                    ptr(mean),
                    ptr(rstd),
                    rows_i,
                    cols_i,
                    eps,
                    kind_i
                ],
            )
        }
    })
}

/// dx (and the column sums dweight = sum(dy * xhat), dbias = sum(dy), float32) from the saved
/// statistics `rstd` (and `mean` for layer_norm).
#[allow(clippy::too_many_arguments)]
pub fn norm_backward(
    s: Stream,
    kind: NormKind,
    dy: Buf,
    x: Buf,
    weight: Option<Buf>,
    mean: Option<Buf>,
    rstd: Buf,
    dx: Buf,
    dweight: Option<Buf>,
    dbias: Option<Buf>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("dy", &dy, x.dtype, n)?;
    check("dx", &dx, x.dtype, n)?;
    check("rstd", &rstd, DType::F32, rows)?;
    if kind == NormKind::Layer && mean.is_none() {
        return Err(Error::Value(
            "mean: layer_norm's backward needs the saved mean".into(),
        ));
    }
    check_opt("weight", weight, DType::F32, cols)?;
    check_opt("mean", mean, DType::F32, rows)?;
    check_opt("dweight", dweight, DType::F32, cols)?;
    check_opt("dbias", dbias, DType::F32, cols)?;
    if cols == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        let (rows_i, cols_i, kind_i) = (rows as i64, cols as i64, kind as i32);
        if rows > 0 {
            let bufs = [x.ptr, dy.ptr, dx.ptr];
            let mut r = RowLaunch::new(d, s, x.dtype, rows, cols, &bufs, false)?;
            // Safety: every buffer checked above.
            unsafe {
                r.run_vec(
                    Op::NormBackward,
                    &mut params![
                        dy.ptr,
                        x.ptr,
                        ptr(weight),
                        ptr(mean),
                        rstd.ptr,
                        dx.ptr,
                        rows_i,
                        cols_i,
                        kind_i
                    ],
                )?
            };
        }
        if dweight.is_none() && dbias.is_none() {
            return Ok(());
        }
        let cp = column_plan(rows, cols, d.sms)?;
        let part_w = Scratch::new(cp.parts as usize * cols * 4, s)?;
        let part_b = Scratch::new(cp.parts as usize * cols * 4, s)?;
        let f = d.kernel(KernelKey::new(Op::NormParamPart, x.dtype, Variant::Plain))?;
        let per_part_i = cp.per_part as i64;
        // Safety: the scratch holds parts*cols floats each, on the plan's (tiles, parts) grid.
        unsafe {
            cp.run(
                f,
                s,
                &mut params![
                    dy.ptr,
                    x.ptr,
                    ptr(mean),
                    rstd.ptr,
                    rows_i,
                    cols_i,
                    per_part_i,
                    part_w.ptr,
                    part_b.ptr
                ],
            )?
        };
        for (part, out) in [(part_w.ptr, dweight), (part_b.ptr, dbias)] {
            if let Some(out) = out {
                sum_parts(d, s, Op::SumParts, part, cp.parts, cols, out.ptr)?;
            }
        }
        Ok(())
    })
}
