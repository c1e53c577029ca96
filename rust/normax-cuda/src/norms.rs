//! rms_norm, crms_norm and layer_norm of rows, and their backward (kernels/norms.cu).
//!
//! Forward: one launch, threads per row from the row's length (about 16 values each), the row
//! held in registers where it fits (`norm_forward_<dtype>_p<P>`), else read twice
//! (`norm_forward_<dtype>_v<V>`). Backward: one persistent launch writing dx and float32 partial
//! column sums of dweight/dbias into the caller's workspace, one launch adding them in a fixed
//! order ([`norm_workspace`] says how large the workspace is): no allocation here.
//! Parameters are float32 or x's own dtype (`norm_*_wx_<dtype>_*`); dweight/dbias float32 or x's
//! dtype.

use crate::device::{launch, launch_2d, params, with_device, Device};
use crate::launch::{check, check_opt, ptr, size, vector_width};
use crate::table::{KernelKey, Op, Variant};
use crate::{Buf, DType, Error, NormKind, Result, Stream};

/// Values of row per thread: the forward holds up to 16 of them in registers, the backward 8 (its
/// partial dweight/dbias sums take twice as many again). More spill past 64 registers.
const FORWARD_VALUES: usize = 16;
const BACKWARD_VALUES: usize = 8;
/// Values per thread of the scalar (unaligned) backward, `norm_backward_<dtype>_v1`.
const BACKWARD_SCALAR_VALUES: usize = 2;
/// Threads per row at most: the kernels' `__launch_bounds__(1024)` (so at most 64 registers).
const MAX_THREADS: usize = 1024;
/// Rows per block at most (the kernels' shared scratch, NORM_MAX_ROWS).
const MAX_ROWS_PER_BLOCK: u32 = 4;
/// Resident backward blocks per SM at most: a few, so that the partial rows stay few.
const BACKWARD_BLOCKS_PER_SM: usize = 4;
/// Threads an SM holds at up to 64 registers each (its 65536 registers).
const RESIDENT_THREADS: usize = 1024;

/// Threads per row: a power of two from 32 to 1024, about `values` values each.
fn threads_per_row(cols: usize, values: usize) -> u32 {
    cols.div_ceil(values)
        .next_power_of_two()
        .clamp(32, MAX_THREADS) as u32
}

/// Rows per block: blocks of at least 128 threads.
fn rows_per_block(threads: u32) -> u32 {
    (128 / threads).clamp(1, MAX_ROWS_PER_BLOCK)
}

/// The dtype the parameters are read in: float32, or x's own dtype, the same for both.
fn params_dtype(x: DType, weight: Option<Buf>, bias: Option<Buf>) -> Result<DType> {
    let dtype = weight.or(bias).map_or(DType::F32, |p| p.dtype);
    for (name, p) in [("weight", weight), ("bias", bias)] {
        if let Some(p) = p {
            if p.dtype != dtype || (p.dtype != DType::F32 && p.dtype != x) {
                return Err(Error::Value(format!(
                    "{name}: expected {:?} or x's {x:?} elements (weight and bias alike), got {:?}",
                    DType::F32,
                    p.dtype
                )));
            }
        }
    }
    Ok(dtype)
}

/// `op` (the forward or the backward) with float32 parameters, its `_wx` twin with x's 16-bit ones.
fn family(op: Op, params: DType) -> Op {
    match (op, params) {
        (Op::NormForward, DType::F16 | DType::BF16) => Op::NormForwardWx,
        (Op::NormBackward, DType::F16 | DType::BF16) => Op::NormBackwardWx,
        _ => op,
    }
}

/// The forward's kernel variant and block for rows of `cols` elements, `vec` per 16-byte load.
fn forward_shape(cols: usize, vec: usize) -> (Variant, (u32, u32)) {
    let threads = threads_per_row(cols, FORWARD_VALUES);
    let packs = cols.div_ceil(threads as usize * vec).next_power_of_two();
    let variant = if vec > 1 && packs * vec <= FORWARD_VALUES {
        Variant::Packs(packs)
    } else {
        Variant::Vec(vec)
    };
    (variant, (threads, rows_per_block(threads)))
}

/// y = (x - mean) * rstd * weight + bias per row (mean 0 for the RMS kinds); `y` None computes
/// the statistics only. weight, bias (`cols`, float32 or x's dtype, both alike) and the float32
/// mean, rstd (`rows`) optional. Rows whose squares overflow or underflow float32 are normalized
/// scaled by a power of two, as normax-core's.
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
    eps: f64,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    let pdtype = params_dtype(x.dtype, weight, bias)?;
    check_opt("weight", weight, pdtype, cols)?;
    check_opt("bias", bias, pdtype, cols)?;
    check_opt("out", y, x.dtype, n)?;
    check_opt("mean", mean, DType::F32, rows)?;
    check_opt("rstd", rstd, DType::F32, rows)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let vec = vector_width(x.dtype, cols, &[x.ptr, ptr(y), ptr(weight), ptr(bias)]);
    let (variant, block) = forward_shape(cols, vec);
    let grid = u32::try_from(rows.div_ceil(block.1 as usize))
        .map_err(|_| Error::Value(format!("too many rows for one launch: {rows}")))?;
    // eps in float32, and sqrt(eps) for the scaled rows (float32 even where eps is not).
    let (eps_f, root_eps, kind_i) = (eps as f32, eps.sqrt() as f32, kind as i32);
    let (rows_i, cols_i) = (rows as i64, cols as i64);
    with_device(s.device, |d| {
        let f = d.kernel(KernelKey::new(
            family(Op::NormForward, pdtype),
            x.dtype,
            variant,
        ))?;
        // Safety: every buffer checked above (null where absent); one row per blockDim.y slot.
        unsafe {
            launch(
                f,
                grid,
                block,
                s,
                &mut params![
                    x.ptr,
                    ptr(weight),
                    ptr(bias),
                    ptr(y),
                    ptr(mean),
                    ptr(rstd),
                    rows_i,
                    cols_i,
                    eps_f,
                    root_eps,
                    kind_i
                ],
            )
        }
    })
}

/// How the backward covers the rows: `grid.0` persistent blocks of `block` threads (`block.1`
/// rows each), `grid.1` column tiles of `tile` elements; one partial row per row slot.
#[derive(Clone, Copy, Debug, PartialEq)]
struct BackwardPlan {
    grid: (u32, u32),
    block: (u32, u32),
    tile: usize,
    variant: Variant,
    slots: usize,
}

/// The backward's launch for `rows` x `cols` with `vec` elements per 16-byte load on `sms` SMs.
/// The slots (and so the workspace) do not depend on `vec`.
fn backward_plan(rows: usize, cols: usize, vec: usize, sms: u32) -> Result<BackwardPlan> {
    let threads = threads_per_row(cols, BACKWARD_VALUES);
    let rows_per_block = rows_per_block(threads);
    let per_block = (threads * rows_per_block) as usize;
    let blocks_per_sm = (RESIDENT_THREADS / per_block).clamp(1, BACKWARD_BLOCKS_PER_SM);
    let grid = rows
        .div_ceil(rows_per_block as usize)
        .min(sms.max(1) as usize * blocks_per_sm)
        .max(1);
    let (variant, values) = if vec > 1 {
        let packs = cols
            .div_ceil(threads as usize * vec)
            .next_power_of_two()
            .min(BACKWARD_VALUES / vec);
        (Variant::Packs(packs), packs * vec)
    } else {
        (Variant::Vec(1), BACKWARD_SCALAR_VALUES)
    };
    let tile = threads as usize * values;
    let tiles = u32::try_from(cols.div_ceil(tile))
        .ok()
        .filter(|&t| t <= 65535)
        .ok_or_else(|| Error::Value(format!("too many columns for one launch: {cols}")))?;
    Ok(BackwardPlan {
        grid: (grid as u32, tiles),
        block: (threads, rows_per_block),
        tile,
        variant,
        slots: grid * rows_per_block as usize,
    })
}

/// float32 elements of the backward's workspace: one partial row of `cols` per slot for
/// dweight, and as many again for layer_norm's dbias; 0 without parameters.
fn workspace_len(kind: NormKind, rows: usize, cols: usize, sms: u32) -> Result<usize> {
    if rows == 0 || cols == 0 {
        return Ok(0);
    }
    let slots = backward_plan(rows, cols, 1, sms)?.slots;
    let rows_of_partials = if kind == NormKind::Layer { 2 } else { 1 };
    size(slots * rows_of_partials, cols)
}

/// float32 elements of the workspace [`norm_backward`] needs on the stream's device (0: none, as
/// without parameters).
pub fn norm_workspace(
    s: Stream,
    kind: NormKind,
    rows: usize,
    cols: usize,
    has_params: bool,
) -> Result<usize> {
    size(rows, cols)?;
    if !has_params || rows == 0 || cols == 0 {
        return Ok(0);
    }
    with_device(s.device, |d| workspace_len(kind, rows, cols, d.sms))
}

/// The parameter gradients' outputs: dweight, dbias (`cols`, float32 or x's dtype, both alike)
/// where wanted, and the float32 workspace of [`norm_workspace`]'s length (or longer).
#[derive(Clone, Copy, Debug)]
pub struct NormParamGrads {
    pub dweight: Option<Buf>,
    pub dbias: Option<Buf>,
    pub workspace: Option<Buf>,
}

/// dx, and the column sums dweight = sum(dy * xhat), dbias = sum(dy) where wanted, from the saved
/// float32 statistics `rstd` (and `mean` for layer_norm). Two launches (one without dweight and
/// dbias), deterministic: the partial sums are added in a fixed order whatever the device.
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
    grads: NormParamGrads,
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
    check_opt("weight", weight, params_dtype(x.dtype, weight, None)?, cols)?;
    check_opt("mean", mean, DType::F32, rows)?;
    let NormParamGrads {
        dweight,
        dbias,
        workspace,
    } = grads;
    let gdtype = params_dtype(x.dtype, dweight, dbias)
        .map_err(|e| Error::Value(format!("dweight/dbias: {e}")))?;
    check_opt("dweight", dweight, gdtype, cols)?;
    check_opt("dbias", dbias, gdtype, cols)?;
    if dbias.is_some() && kind != NormKind::Layer {
        return Err(Error::Value("dbias: only layer_norm has a bias".into()));
    }
    let wanted = dweight.is_some() || dbias.is_some();
    if cols == 0 || (rows == 0 && !wanted) {
        return Ok(());
    }
    with_device(s.device, |d| {
        let need = if wanted {
            workspace_len(kind, rows, cols, d.sms)?
        } else {
            0
        };
        let ws = match workspace {
            _ if need == 0 => 0,
            Some(w) if w.dtype == DType::F32 && w.len >= need && w.ptr != 0 => w.ptr,
            _ => {
                return Err(Error::Value(format!(
                    "workspace: expected at least {need} float32 elements (cuda_norm_workspace)"
                )))
            }
        };
        let mut slots = 0;
        if rows > 0 {
            let bufs = [x.ptr, dy.ptr, dx.ptr, ptr(weight), ws];
            let vec = vector_width(x.dtype, cols, &bufs);
            let plan = backward_plan(rows, cols, vec, d.sms)?;
            slots = plan.slots;
            let pdtype = weight.map_or(DType::F32, |w| w.dtype);
            let f = d.kernel(KernelKey::new(
                family(Op::NormBackward, pdtype),
                x.dtype,
                plan.variant,
            ))?;
            let part_w = if dweight.is_some() { ws } else { 0 };
            let part_b = if dbias.is_some() {
                ws + (slots * cols * 4) as u64
            } else {
                0
            };
            let (rows_i, cols_i, tile_i, kind_i) =
                (rows as i64, cols as i64, plan.tile as i64, kind as i32);
            // Safety: every buffer checked above; the workspace holds `need` floats: one partial
            // row per slot for dweight, then one per slot for dbias.
            unsafe {
                launch_2d(
                    f,
                    plan.grid,
                    plan.block,
                    s,
                    &mut params![
                        dy.ptr,
                        x.ptr,
                        ptr(weight),
                        ptr(mean),
                        rstd.ptr,
                        dx.ptr,
                        part_w,
                        part_b,
                        rows_i,
                        cols_i,
                        tile_i,
                        kind_i
                    ],
                )?
            };
        }
        if wanted {
            reduce_partials(d, s, (ws, slots), cols, dweight, dbias, gdtype)?;
        }
        Ok(())
    })
}

/// dweight/dbias from the `slots` partial rows at `ws` (none: zeros), by `norm_param_reduce`.
fn reduce_partials(
    d: &mut Device,
    s: Stream,
    (ws, slots): (u64, usize),
    cols: usize,
    dweight: Option<Buf>,
    dbias: Option<Buf>,
    dtype: DType,
) -> Result<()> {
    // 16-byte loads of the partial rows and stores of the results.
    let vec = vector_width(dtype, cols, &[ptr(dweight), ptr(dbias), ws]);
    let f = d.kernel(KernelKey::new(
        Op::NormParamReduce,
        dtype,
        Variant::Vec(vec),
    ))?;
    let grid = u32::try_from(cols.div_ceil(32))
        .map_err(|_| Error::Value(format!("too many columns for one launch: {cols}")))?;
    let part_w = if dweight.is_some() { ws } else { 0 };
    let part_b = if dbias.is_some() {
        ws + (slots * cols * 4) as u64
    } else {
        0
    };
    let (slots_i, cols_i) = (slots as i32, cols as i64);
    // Safety: `slots` partial rows of `cols` floats at each part pointer (null: not wanted), the
    // outputs checked by the caller.
    unsafe {
        launch(
            f,
            grid,
            (32, 8),
            s,
            &mut params![part_w, part_b, slots_i, cols_i, ptr(dweight), ptr(dbias)],
        )
    }
}

/// Every kernel name the norms can ask for.
#[cfg(test)]
pub(crate) fn kernel_names() -> Vec<String> {
    let kernel_name = |op, dtype, variant| KernelKey::new(op, dtype, variant).name();
    let mut names = Vec::new();
    for x in [DType::F32, DType::F16, DType::BF16] {
        for vec in [1, 16 / x.size()] {
            for cols in (1usize..=1 << 17).filter(|c| c.is_power_of_two() || c % 3 == 0) {
                if cols % vec != 0 {
                    continue;
                }
                for p in [DType::F32, x] {
                    let (variant, _) = forward_shape(cols, vec);
                    names.push(kernel_name(family(Op::NormForward, p), x, variant));
                    let plan = backward_plan(1000, cols, vec, 132).unwrap();
                    names.push(kernel_name(family(Op::NormBackward, p), x, plan.variant));
                }
                names.push(kernel_name(Op::NormParamReduce, x, Variant::Vec(vec)));
            }
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Stream = Stream {
        device: 0,
        handle: 0,
    };

    fn buf(dtype: DType, len: usize) -> Buf {
        Buf {
            ptr: 256,
            dtype,
            len,
        }
    }

    #[test]
    fn forward_rows_are_read_once_up_to_16k_values() {
        for (cols, vec, variant, threads) in [
            (4096, 8, Variant::Packs(2), 256),
            (4096, 4, Variant::Packs(4), 256),
            (16384, 8, Variant::Packs(2), 1024),
            (16384, 4, Variant::Packs(4), 1024),
            (32768, 8, Variant::Vec(8), 1024),
            (64, 4, Variant::Packs(1), 32),
            (50, 1, Variant::Vec(1), 32),
        ] {
            let (v, block) = forward_shape(cols, vec);
            assert_eq!((v, block.0), (variant, threads), "{cols} / {vec}");
            if let Variant::Packs(p) = v {
                assert!(p * vec * threads as usize >= cols && p * vec <= FORWARD_VALUES);
            }
            assert!(block.0 * block.1 <= MAX_THREADS as u32 && block.1 <= MAX_ROWS_PER_BLOCK);
        }
    }

    #[test]
    fn backward_plans_cover_every_column_once_with_the_same_slots_for_any_alignment() {
        for &(rows, cols) in &[
            (1, 1),
            (7, 3),
            (16384, 4096),
            (100, 50),
            (64, 65536),
            (3, 40000),
        ] {
            for sms in [1, 132] {
                let slots = backward_plan(rows, cols, 1, sms).unwrap().slots;
                for vec in [1, 4, 8] {
                    if cols % vec != 0 {
                        continue;
                    }
                    let p = backward_plan(rows, cols, vec, sms).unwrap();
                    let values = match p.variant {
                        Variant::Packs(packs) => packs * vec,
                        _ => BACKWARD_SCALAR_VALUES,
                    };
                    assert!(values <= BACKWARD_VALUES, "{p:?}");
                    assert_eq!(p.tile, p.block.0 as usize * values, "{p:?}");
                    let tiles = p.grid.1 as usize;
                    assert!(
                        tiles * p.tile >= cols && (tiles - 1) * p.tile < cols,
                        "{p:?}"
                    );
                    assert_eq!(p.slots, slots);
                    assert_eq!(p.slots, p.grid.0 as usize * p.block.1 as usize);
                    assert!(p.grid.0 as usize <= 4 * sms as usize, "{p:?}");
                    // Every block has rows.
                    assert!(
                        (p.grid.0 as usize - 1) * (p.block.1 as usize) < rows,
                        "{p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn workspace_holds_a_partial_row_per_slot_and_parameter() {
        let rms = workspace_len(NormKind::Rms, 16384, 4096, 132).unwrap();
        let layer = workspace_len(NormKind::Layer, 16384, 4096, 132).unwrap();
        let slots = backward_plan(16384, 4096, 8, 132).unwrap().slots;
        assert_eq!((rms, layer), (slots * 4096, 2 * slots * 4096));
        assert_eq!(workspace_len(NormKind::Rms, 0, 4096, 132).unwrap(), 0);
        assert_eq!(norm_workspace(S, NormKind::Rms, 8, 64, false), Ok(0));
    }

    #[test]
    fn bad_arguments_are_value_errors_before_any_cuda_call() {
        let value = |r: Result<()>| matches!(r, Err(Error::Value(_)));
        let x = buf(DType::BF16, 24);
        let fwd = |w, b, y| {
            value(norm_forward(
                S,
                NormKind::Layer,
                x,
                w,
                b,
                y,
                None,
                None,
                4,
                6,
                1e-5,
            ))
        };
        // Parameters: float32 or x's dtype, weight and bias alike.
        assert!(fwd(Some(buf(DType::F16, 6)), None, None));
        assert!(fwd(
            Some(buf(DType::F32, 6)),
            Some(buf(DType::BF16, 6)),
            None
        ));
        assert!(fwd(Some(buf(DType::F32, 5)), None, None));
        assert!(fwd(None, None, Some(buf(DType::F32, 24))));
        let f32s = |len| buf(DType::F32, len);
        let grads = |dweight, dbias, workspace| NormParamGrads {
            dweight,
            dbias,
            workspace,
        };
        let bwd = |kind, mean, g| {
            value(norm_backward(
                S,
                kind,
                x,
                x,
                None,
                mean,
                f32s(4),
                x,
                g,
                4,
                6,
            ))
        };
        let none = grads(None, None, None);
        assert!(bwd(NormKind::Layer, None, none));
        assert!(bwd(NormKind::Rms, None, grads(None, Some(f32s(6)), None)));
        assert!(bwd(
            NormKind::Rms,
            None,
            grads(Some(buf(DType::F16, 6)), None, None)
        ));
        assert!(bwd(
            NormKind::Layer,
            Some(f32s(4)),
            grads(Some(f32s(6)), Some(x), None)
        ));
    }
}
