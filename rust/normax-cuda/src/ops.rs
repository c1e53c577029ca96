//! The ops: argument checks, launch shapes and the kernel sequence of each.

use crate::device::{launch, params, with_device, Device, Scratch};
use crate::{Buf, DType, Error, Result, Stream};

/// How rows map to blocks: `block.0` threads per row, `block.1` rows per block, and each row
/// cut in `chunks` pieces of `chunk` elements (one block each).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub block: (u32, u32),
    pub chunks: u32,
    pub chunk: usize,
    pub grid: u32,
    /// Elements per load/store: 16 bytes' worth when every row is 16-byte aligned, else 1.
    pub vec: usize,
}

/// Rows at most this many per block (the kernels' shared scratch is sized for it).
const MAX_ROWS_PER_BLOCK: u32 = 8;
/// Threads per block at most: the kernels' `__launch_bounds__(512)` (more registers per thread).
const MAX_THREADS: u32 = 512;
/// A row is split across blocks only when there are too few rows to fill the device and each
/// piece keeps at least this many elements.
const MIN_CHUNK: usize = 4096;

/// The launch shape for `rows` rows of `cols` elements; `split` allows cutting rows in chunks.
pub fn plan(rows: usize, cols: usize, vec: usize, sms: u32, split: bool) -> Result<Plan> {
    let vectors = cols.div_ceil(vec);
    let threads: u32 = match vectors {
        0..=128 => 32,
        129..=512 => 128,
        513..=2048 => 256,
        _ => MAX_THREADS,
    };
    let rows_per_block = (256 / threads).clamp(1, MAX_ROWS_PER_BLOCK);
    let groups = rows.div_ceil(rows_per_block as usize);
    let mut chunks = 1usize;
    let mut chunk = cols;
    let wanted = 4 * sms as usize; // blocks that keep every SM busy with a few resident
    if split && rows_per_block == 1 && groups < wanted && cols >= 2 * MIN_CHUNK {
        chunks = wanted.div_ceil(groups).min(cols / MIN_CHUNK).max(1);
        chunk = cols.div_ceil(chunks).next_multiple_of(vec);
        chunks = cols.div_ceil(chunk);
    }
    let grid = groups
        .checked_mul(chunks)
        .filter(|&g| g <= i32::MAX as usize)
        .ok_or_else(|| Error::Value(format!("too many rows for one launch: {rows} x {cols}")))?;
    Ok(Plan {
        block: (threads, rows_per_block),
        chunks: chunks as u32,
        chunk,
        grid: grid as u32,
        vec,
    })
}

/// Registers of row per thread the cached kernels may hold (their `P * V` floats; more spills).
const MAX_CACHED_FLOATS: usize = 64;

/// The packs per thread of a cached kernel (`<op>_cached_<dtype>_p<P>`: the row held in
/// registers, one read of memory), or None where the row does not fit or is not vectorized.
fn cached_packs(p: &Plan, cols: usize) -> Option<usize> {
    if p.chunks != 1 || p.vec == 1 {
        return None;
    }
    let packs = cols
        .div_ceil(p.vec)
        .div_ceil(p.block.0 as usize)
        .next_power_of_two();
    (packs * p.vec <= MAX_CACHED_FLOATS).then_some(packs)
}

/// 16 bytes' worth of elements when the rows and every buffer are 16-byte aligned, else 1.
pub(crate) fn vector_width(dtype: DType, cols: usize, bufs: &[u64]) -> usize {
    let v = 16 / dtype.size();
    if cols % v == 0 && bufs.iter().all(|&p| p % 16 == 0) {
        v
    } else {
        1
    }
}

pub(crate) fn check(name: &str, b: &Buf, dtype: DType, len: usize) -> Result<()> {
    if b.dtype != dtype {
        return Err(Error::Value(format!(
            "{name}: expected {dtype:?} elements, got {:?}",
            b.dtype
        )));
    }
    if b.len != len {
        return Err(Error::Value(format!(
            "{name}: expected {len} elements, got {}",
            b.len
        )));
    }
    if len > 0 && b.ptr == 0 {
        return Err(Error::Value(format!("{name}: null device address")));
    }
    Ok(())
}

pub(crate) fn size(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .filter(|&n| n <= i64::MAX as usize)
        .ok_or_else(|| Error::Value(format!("{rows} x {cols} elements overflow")))
}

/// Which instantiation of a kernel template: `<op>_<dtype>`, `<op>_<dtype>_v<V>` (V elements
/// per load) or `<op>_<dtype>_p<P>` (a cached kernel holding P packs per thread).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Variant {
    Plain,
    Vec(usize),
    Packs(usize),
}

pub(crate) fn kernel_name(op: &str, dtype: DType, variant: Variant) -> String {
    let t = dtype.kernel_name();
    match variant {
        Variant::Plain => format!("{op}_{t}"),
        Variant::Vec(v) => format!("{op}_{t}_v{v}"),
        Variant::Packs(p) => format!("{op}_{t}_p{p}"),
    }
}

pub(crate) fn kernel(
    d: &mut Device,
    module: &'static str,
    op: &str,
    dtype: DType,
    variant: Variant,
) -> Result<cudarc::driver::sys::CUfunction> {
    d.function(module, &kernel_name(op, dtype, variant))
}

/// softmax (`log = false`) or log_softmax of `rows` contiguous rows of `cols` elements.
pub fn softmax(s: Stream, x: Buf, y: Buf, rows: usize, cols: usize, log: bool) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("out", &y, x.dtype, n)?;
    if n == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        let vec = vector_width(x.dtype, cols, &[x.ptr, y.ptr]);
        let p = plan(rows, cols, vec, d.sms, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) =
            (rows as i64, cols as i64, p.chunk as i64, p.chunks as i32);
        let mode = log as i32;
        if let Some(packs) = cached_packs(&p, cols) {
            let f = kernel(
                d,
                "softmax",
                "softmax_cached",
                x.dtype,
                Variant::Packs(packs),
            )?;
            // Safety: x and y have rows*cols elements (checked), 16-byte aligned rows (vec > 1).
            return unsafe {
                launch(
                    f,
                    p.grid,
                    p.block,
                    s,
                    &mut params![x.ptr, y.ptr, rows_i, cols_i, mode],
                )
            };
        }
        let scratch = if p.chunks > 1 {
            let sc = Scratch::new(rows * p.chunks as usize * 8, s)?;
            let f = kernel(d, "softmax", "max_sum_part", x.dtype, Variant::Vec(vec))?;
            // Safety: x has rows*cols elements (checked), the scratch rows*chunks (max, sum) pairs.
            unsafe {
                launch(
                    f,
                    p.grid,
                    p.block,
                    s,
                    &mut params![x.ptr, rows_i, cols_i, chunk_i, chunks_i, sc.ptr],
                )?
            };
            Some(sc)
        } else {
            None
        };
        let part = scratch.as_ref().map_or(0u64, |sc| sc.ptr);
        let f = kernel(d, "softmax", "softmax", x.dtype, Variant::Vec(vec))?;
        // Safety: x and y have rows*cols elements; part is null or the partials written above.
        unsafe {
            launch(
                f,
                p.grid,
                p.block,
                s,
                &mut params![x.ptr, y.ptr, rows_i, cols_i, chunk_i, chunks_i, part, mode],
            )
        }
    })
}

/// log-sum-exp of each row into `out` (`rows` elements of x's dtype).
pub fn logsumexp(s: Stream, x: Buf, out: Buf, rows: usize, cols: usize) -> Result<()> {
    let n = size(rows, cols)?;
    check("x", &x, x.dtype, n)?;
    check("out", &out, x.dtype, rows)?;
    if rows == 0 {
        return Ok(());
    }
    if cols == 0 {
        return Err(Error::Value("x: logsumexp of an empty row".into()));
    }
    with_device(s.device, |d| {
        let vec = vector_width(x.dtype, cols, &[x.ptr]);
        let p = plan(rows, cols, vec, d.sms, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) =
            (rows as i64, cols as i64, p.chunk as i64, p.chunks as i32);
        let sc = Scratch::new(rows * p.chunks as usize * 8, s)?;
        let f = kernel(d, "softmax", "max_sum_part", x.dtype, Variant::Vec(vec))?;
        // Safety: as in softmax.
        unsafe {
            launch(
                f,
                p.grid,
                p.block,
                s,
                &mut params![x.ptr, rows_i, cols_i, chunk_i, chunks_i, sc.ptr],
            )?
        };
        let f = kernel(d, "softmax", "logsumexp", x.dtype, Variant::Plain)?;
        let grid = rows.div_ceil(256) as u32;
        // Safety: the partials written above and `out` of `rows` elements.
        unsafe {
            launch(
                f,
                grid,
                (256, 1),
                s,
                &mut params![sc.ptr, chunks_i, rows_i, out.ptr],
            )
        }
    })
}

/// The backward of softmax (`log = false`: dx = y (dy - sum(dy y))) or of log_softmax
/// (dx = dy - exp(y) sum(dy)), from the forward's output `y`.
pub fn softmax_backward(
    s: Stream,
    y: Buf,
    dy: Buf,
    dx: Buf,
    rows: usize,
    cols: usize,
    log: bool,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("y", &y, y.dtype, n)?;
    check("dy", &dy, y.dtype, n)?;
    check("dx", &dx, y.dtype, n)?;
    if n == 0 {
        return Ok(());
    }
    with_device(s.device, |d| {
        let vec = vector_width(y.dtype, cols, &[y.ptr, dy.ptr, dx.ptr]);
        let p = plan(rows, cols, vec, d.sms, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) =
            (rows as i64, cols as i64, p.chunk as i64, p.chunks as i32);
        let mode = log as i32;
        let scratch = if p.chunks > 1 {
            let sc = Scratch::new(rows * p.chunks as usize * 4, s)?;
            let f = kernel(d, "softmax", "dot_part", y.dtype, Variant::Vec(vec))?;
            // Safety: y, dy of rows*cols elements; rows*chunks floats of scratch.
            unsafe {
                launch(
                    f,
                    p.grid,
                    p.block,
                    s,
                    &mut params![y.ptr, dy.ptr, rows_i, cols_i, chunk_i, chunks_i, mode, sc.ptr],
                )?
            };
            Some(sc)
        } else {
            None
        };
        let part = scratch.as_ref().map_or(0u64, |sc| sc.ptr);
        let f = kernel(d, "softmax", "softmax_backward", y.dtype, Variant::Vec(vec))?;
        // Safety: as above; dx of rows*cols elements.
        unsafe {
            launch(
                f,
                p.grid,
                p.block,
                s,
                &mut params![y.ptr, dy.ptr, dx.ptr, rows_i, cols_i, chunk_i, chunks_i, part, mode],
            )
        }
    })
}

/// The targets of a cross-entropy: class indices (int64, one per row) or probabilities (the
/// logits' dtype and shape).
#[derive(Clone, Copy, Debug)]
pub enum Target {
    Classes { ptr: u64, len: usize },
    Probs(Buf),
}

/// The loss options, as in normax-core's cross-entropy.
#[derive(Clone, Copy, Debug)]
pub struct CeOptions {
    pub ignore_index: i64,
    pub label_smoothing: f32,
    pub z_loss: f32,
    /// 0: no softcap.
    pub softcap: f32,
}

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
    cap: f32,
}

/// sizeof(CeStats) in cross_entropy.cu: a float2 and six floats.
const CE_STATS_BYTES: usize = 32;

/// The per-row cross-entropy `loss_rows` (float32, `rows`; 0 for ignored rows) and, with
/// `grad = Some((grad, scale, stride))`, the gradient scaled per row by `scale[row * stride]`
/// (float32 on the device: stride 0 for one scale, 1 for one per row). `weight`: float32 per class.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    s: Stream,
    x: Buf,
    target: Target,
    weight: Option<Buf>,
    opts: CeOptions,
    loss_rows: Buf,
    grad: Option<(Buf, Buf, usize)>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("logits", &x, x.dtype, n)?;
    check("loss", &loss_rows, DType::F32, rows)?;
    let (target_ptr, probs_ptr) = match target {
        Target::Classes { ptr, len } => {
            if len != rows {
                return Err(Error::Value(format!(
                    "target: expected {rows} class indices, got {len}"
                )));
            }
            if rows > 0 && ptr == 0 {
                return Err(Error::Value("target: null device address".into()));
            }
            (ptr, 0)
        }
        Target::Probs(p) => {
            check("target", &p, x.dtype, n)?;
            (0, p.ptr)
        }
    };
    if let Some(w) = &weight {
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
        weight: weight.map_or(0, |w| w.ptr),
        ignore_index: opts.ignore_index,
        eps: opts.label_smoothing,
        z: opts.z_loss,
        cap: opts.softcap,
    };
    with_device(s.device, |d| {
        let mut bufs = vec![x.ptr, probs_ptr];
        if let Some((g, _, _)) = &grad {
            bufs.push(g.ptr);
        }
        let vec = vector_width(x.dtype, cols, &bufs);
        let p = plan(rows, cols, vec, d.sms, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) =
            (rows as i64, cols as i64, p.chunk as i64, p.chunks as i32);
        let (g_ptr, scale_ptr, stride) =
            grad.map_or((0, 0, 0i64), |(g, sc, st)| (g.ptr, sc.ptr, st as i64));
        let cached = cached_packs(&p, cols).filter(|_| probs_ptr == 0);
        if let Some(packs) = cached {
            let f = kernel(
                d,
                "cross_entropy",
                "ce_cached",
                x.dtype,
                Variant::Packs(packs),
            )?;
            // Safety: buffers checked above; class-index targets, 16-byte aligned rows (vec > 1).
            return unsafe {
                launch(
                    f,
                    p.grid,
                    p.block,
                    s,
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
        let scratch = if p.chunks > 1 {
            let sc = Scratch::new(rows * p.chunks as usize * CE_STATS_BYTES, s)?;
            let f = kernel(d, "cross_entropy", "ce_part", x.dtype, Variant::Vec(vec))?;
            // Safety: buffers checked above; the scratch holds rows*chunks CeStats.
            unsafe {
                launch(
                    f,
                    p.grid,
                    p.block,
                    s,
                    &mut params![x.ptr, rows_i, cols_i, chunk_i, chunks_i, args, sc.ptr],
                )?
            };
            Some(sc)
        } else {
            None
        };
        let part = scratch.as_ref().map_or(0u64, |sc| sc.ptr);
        let f = kernel(
            d,
            "cross_entropy",
            "cross_entropy",
            x.dtype,
            Variant::Vec(vec),
        )?;
        // Safety: buffers checked above.
        unsafe {
            launch(
                f,
                p.grid,
                p.block,
                s,
                &mut params![
                    x.ptr,
                    rows_i,
                    cols_i,
                    chunk_i,
                    chunks_i,
                    args,
                    part,
                    loss_rows.ptr,
                    g_ptr,
                    scale_ptr,
                    stride
                ],
            )
        }
    })
}

/// The normalization of a row: kind 0 rms_norm, 1 crms_norm, 2 layer_norm (as in norms.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    Rms = 0,
    Crms = 1,
    Layer = 2,
}

/// Rows are never split for the norms: one block (or warp) per row.
fn norm_plan(d: &Device, rows: usize, cols: usize, vec: usize) -> Result<Plan> {
    plan(rows, cols, vec, d.sms, false)
}

/// y = (x - mean) * rstd * weight + bias per row (mean 0 for the RMS kinds); `y` None computes
/// the statistics only. weight, bias (float32, `cols`) and mean, rstd (float32, `rows`) optional.
#[allow(clippy::too_many_arguments)]
pub fn norm_forward(
    s: Stream,
    kind: Norm,
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
    for (name, b, dtype, len) in [
        ("weight", weight, DType::F32, cols),
        ("bias", bias, DType::F32, cols),
        ("out", y, x.dtype, n),
        ("mean", mean, DType::F32, rows),
        ("rstd", rstd, DType::F32, rows),
    ] {
        if let Some(b) = b {
            check(name, &b, dtype, len)?;
        }
    }
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let ptr = |b: Option<Buf>| b.map_or(0u64, |b| b.ptr);
    with_device(s.device, |d| {
        let vec = vector_width(x.dtype, cols, &[x.ptr, ptr(y)]);
        let p = norm_plan(d, rows, cols, vec)?;
        let (rows_i, cols_i, kind_i) = (rows as i64, cols as i64, kind as i32);
        let f = match cached_packs(&p, cols) {
            Some(packs) => kernel(
                d,
                "norms",
                "norm_forward_cached",
                x.dtype,
                Variant::Packs(packs),
            )?,
            None => kernel(d, "norms", "norm_forward", x.dtype, Variant::Vec(vec))?,
        };
        // Safety: every buffer checked above (null where absent).
        unsafe {
            launch(
                f,
                p.grid,
                p.block,
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
    kind: Norm,
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
    if kind == Norm::Layer && mean.is_none() {
        return Err(Error::Value(
            "mean: layer_norm's backward needs the saved mean".into(),
        ));
    }
    for (name, b, len) in [
        ("weight", weight, cols),
        ("mean", mean, rows),
        ("dweight", dweight, cols),
        ("dbias", dbias, cols),
    ] {
        if let Some(b) = b {
            check(name, &b, DType::F32, len)?;
        }
    }
    if cols == 0 {
        return Ok(());
    }
    let ptr = |b: Option<Buf>| b.map_or(0u64, |b| b.ptr);
    with_device(s.device, |d| {
        let (rows_i, cols_i, kind_i) = (rows as i64, cols as i64, kind as i32);
        if rows > 0 {
            let vec = vector_width(x.dtype, cols, &[x.ptr, dy.ptr, dx.ptr]);
            let p = norm_plan(d, rows, cols, vec)?;
            let f = kernel(d, "norms", "norm_backward", x.dtype, Variant::Vec(vec))?;
            // Safety: every buffer checked above.
            unsafe {
                launch(
                    f,
                    p.grid,
                    p.block,
                    s,
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
        // Column sums in fixed row blocks, then a fixed-order sum of the blocks: deterministic.
        let tiles = cols.div_ceil(32);
        let parts = (8 * d.sms as usize)
            .div_ceil(tiles)
            .clamp(1, rows.div_ceil(32).max(1));
        let rows_per_part = rows.div_ceil(parts).max(1);
        let parts = rows.div_ceil(rows_per_part).max(1);
        let part_w = Scratch::new(parts * cols * 4, s)?;
        let part_b = Scratch::new(parts * cols * 4, s)?;
        if tiles > u32::MAX as usize || parts > 65535 {
            return Err(Error::Value(format!(
                "too many columns for one launch: {cols}"
            )));
        }
        let f = kernel(d, "norms", "norm_param_part", x.dtype, Variant::Plain)?;
        let (rpp_i, parts_i) = (rows_per_part as i64, parts as i32);
        let mut p = params![
            dy.ptr,
            x.ptr,
            ptr(mean),
            rstd.ptr,
            rows_i,
            cols_i,
            rpp_i,
            part_w.ptr,
            part_b.ptr
        ];
        // Safety: the scratch holds parts*cols floats each; a 2-D grid (tiles, parts).
        unsafe {
            crate::device::launch_2d(f, (tiles as u32, parts as u32), (32, 8), s, &mut p)?;
        }
        let sum = d.function("norms", "sum_parts")?;
        let grid = cols.div_ceil(256) as u32;
        for (part, out) in [(part_w.ptr, dweight), (part_b.ptr, dbias)] {
            if let Some(out) = out {
                // Safety: parts*cols partials in, cols floats out.
                unsafe {
                    launch(
                        sum,
                        grid,
                        (256, 1),
                        s,
                        &mut params![part, parts_i, cols_i, out.ptr],
                    )?
                };
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_cover_every_element_once() {
        for &(rows, cols) in &[
            (1, 1),
            (7, 3),
            (16384, 4096),
            (4096, 32768),
            (32, 128256),
            (3, 1 << 20),
            (100000, 17),
        ] {
            for vec in [1, 4, 8] {
                if cols % vec != 0 {
                    continue;
                }
                let p = plan(rows, cols, vec, 132, true).unwrap();
                assert!(p.chunk % vec == 0 || p.chunks == 1, "{rows}x{cols}: {p:?}");
                assert!(p.chunk * p.chunks as usize >= cols, "{rows}x{cols}: {p:?}");
                assert!(
                    (p.chunks as usize - 1) * p.chunk < cols,
                    "{rows}x{cols}: {p:?}"
                );
                let rows_covered = (p.grid / p.chunks) as usize * p.block.1 as usize;
                assert!(rows_covered >= rows && rows_covered < rows + p.block.1 as usize);
                assert!(p.block.0 * p.block.1 <= MAX_THREADS && p.block.1 <= MAX_ROWS_PER_BLOCK);
                assert!(p.block.0 % 32 == 0);
                if p.chunks > 1 {
                    assert_eq!(p.block.1, 1);
                }
            }
        }
    }

    /// Every kernel name the ops can ask for, by module.
    fn names_asked_for() -> Vec<(&'static str, String)> {
        let mut names = vec![("norms", "sum_parts".to_string())];
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let vecs = [1, 16 / dtype.size()];
            let packs = (0..)
                .map(|k| 1usize << k)
                .take_while(|p| p * vecs[1] <= MAX_CACHED_FLOATS);
            for (module, op) in [
                ("softmax", "max_sum_part"),
                ("softmax", "softmax"),
                ("softmax", "dot_part"),
                ("softmax", "softmax_backward"),
                ("cross_entropy", "ce_part"),
                ("cross_entropy", "cross_entropy"),
                ("norms", "norm_forward"),
                ("norms", "norm_backward"),
            ] {
                for v in vecs {
                    names.push((module, kernel_name(op, dtype, Variant::Vec(v))));
                }
            }
            names.push(("softmax", kernel_name("logsumexp", dtype, Variant::Plain)));
            names.push((
                "norms",
                kernel_name("norm_param_part", dtype, Variant::Plain),
            ));
            for p in packs {
                for (module, op) in [
                    ("softmax", "softmax_cached"),
                    ("cross_entropy", "ce_cached"),
                    ("norms", "norm_forward_cached"),
                ] {
                    names.push((module, kernel_name(op, dtype, Variant::Packs(p))));
                }
            }
        }
        names
    }

    #[test]
    fn every_kernel_asked_for_is_in_its_module() {
        let Ok(_) = crate::nvrtc_version() else {
            eprintln!("NVRTC not found: skipped (CI runs tests/compile.rs with NVRTC required)");
            return;
        };
        for module in ["softmax", "cross_entropy", "norms"] {
            let image = crate::compile::compile(module, "sm_80").unwrap();
            for (_, name) in names_asked_for().iter().filter(|(m, _)| *m == module) {
                // A cubin is an ELF file: its symbol names are NUL-terminated strings in it.
                let needle = [name.as_bytes(), b"\0"].concat();
                assert!(
                    image.windows(needle.len()).any(|w| w == needle),
                    "{module} has no {name}"
                );
            }
            // And the search can fail: a name that is never instantiated is not found.
            let absent = kernel_name(module, DType::BF16, Variant::Packs(64));
            let absent = [absent.as_bytes(), b"\0"].concat();
            assert!(!image.windows(absent.len()).any(|w| w == absent));
        }
    }

    #[test]
    fn cached_plans_hold_whole_rows() {
        for cols in (1..40_000).step_by(97).chain([4096, 32768, 16384, 8192]) {
            for vec in [4, 8] {
                if cols % vec != 0 {
                    continue;
                }
                let p = plan(1000, cols, vec, 132, true).unwrap();
                if let Some(packs) = cached_packs(&p, cols) {
                    assert!(packs.is_power_of_two() && packs * vec <= MAX_CACHED_FLOATS);
                    assert!(
                        packs * vec * p.block.0 as usize >= cols,
                        "{cols}: {p:?} {packs}"
                    );
                }
            }
        }
        // The shapes of the issue: rows of 4096 and 32768 are read once.
        assert!(cached_packs(&plan(16384, 4096, 4, 132, true).unwrap(), 4096).is_some());
        assert!(cached_packs(&plan(4096, 32768, 4, 132, true).unwrap(), 32768).is_some());
        assert!(cached_packs(&plan(4096, 32768, 8, 132, true).unwrap(), 32768).is_some());
        assert!(cached_packs(&plan(32, 128256, 4, 132, true).unwrap(), 128256).is_none());
    }

    #[test]
    fn long_rows_are_split_only_when_few() {
        assert!(plan(32, 128256, 4, 132, true).unwrap().chunks > 1);
        assert_eq!(plan(16384, 4096, 4, 132, true).unwrap().chunks, 1);
        assert_eq!(plan(32, 128256, 4, 132, false).unwrap().chunks, 1);
    }

    #[test]
    fn bad_sizes_are_errors_before_any_cuda_call() {
        let s = Stream {
            device: 0,
            handle: 0,
        };
        let x = Buf {
            ptr: 16,
            dtype: DType::F32,
            len: 6,
        };
        let y = Buf {
            ptr: 32,
            dtype: DType::F32,
            len: 5,
        };
        assert!(matches!(
            softmax(s, x, y, 2, 3, false),
            Err(Error::Value(_))
        ));
        let y16 = Buf {
            ptr: 32,
            dtype: DType::F16,
            len: 6,
        };
        assert!(matches!(
            softmax(s, x, y16, 2, 3, false),
            Err(Error::Value(_))
        ));
    }
}
