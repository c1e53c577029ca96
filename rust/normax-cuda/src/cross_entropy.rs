//! Cross-entropy over rows of logits, with its gradient (kernels/cross_entropy.cu): the general
//! kernels ([`cross_entropy`]: probability targets too) and the vocabulary-parallel shards. The
//! two-kernel path of class-index targets is cross_entropy_classes.rs.

use crate::device::{params, with_device};
use crate::launch::{check, size, RowLaunch};
use crate::table::{Op, Variant};
use crate::{Buf, CeOptions, DType, Error, Indices, Result, Stream, Target};

/// What the rows are scored against: int64 class indices (one per row) or probabilities (the
/// logits' dtype and shape).
pub type CeTarget = Target<Indices, Buf>;

/// The kernels' argument block (`CeArgs` in cross_entropy.cu: same fields, same order).
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CeArgs {
    pub(crate) target: u64,
    pub(crate) probs: u64,
    pub(crate) weight: u64,
    pub(crate) ignore_index: i64,
    pub(crate) eps: f32,
    pub(crate) z: f32,
    /// 0: no softcap.
    pub(crate) cap: f32,
    /// 1 / temperature.
    pub(crate) inv_t: f32,
    /// Per-row float32 factors, 0: none.
    pub(crate) token_weight: u64,
    /// The stats kernels' outputs (float32 per row), 0 elsewhere.
    pub(crate) stat_lse: u64,
    pub(crate) stat_entropy: u64,
    pub(crate) stat_correct: u64,
}

/// What the general kernels add to the options (issue 24's CE options; the class-index two-kernel
/// path takes none of them): the temperature the logits are divided by (before the softcap; the
/// gradient carries its 1 / T), float32 per-row token weights multiplying each row's loss and
/// gradient, and where to write the per-row statistics.
#[derive(Clone, Copy, Debug)]
pub struct CeExtras {
    pub temperature: f64,
    pub token_weight: Option<Buf>,
    pub stats: Option<CeStatsOut>,
}

impl Default for CeExtras {
    fn default() -> Self {
        CeExtras {
            temperature: 1.0,
            token_weight: None,
            stats: None,
        }
    }
}

/// The per-row statistics of `return_stats` (float32, one per row; 0 for ignored rows): the
/// log-sum-exp and the entropy of the distribution the loss uses, and 1.0 where the first argmax
/// of the logits as given (NaN first, as `np.argmax`) is the target class (for probability
/// targets: the target row's first argmax), else 0.0. Written by the same pass as the loss.
#[derive(Clone, Copy, Debug)]
pub struct CeStatsOut {
    pub lse: Buf,
    pub entropy: Buf,
    pub correct: Buf,
}

impl CeExtras {
    fn check(&self, rows: usize) -> Result<()> {
        let t = self.temperature;
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::Value(format!(
                "temperature: must be a finite number > 0, got {t}"
            )));
        }
        if let Some(w) = &self.token_weight {
            check("token_weight", w, DType::F32, rows)?;
        }
        if let Some(st) = &self.stats {
            check("lse", &st.lse, DType::F32, rows)?;
            check("entropy", &st.entropy, DType::F32, rows)?;
            check("correct", &st.correct, DType::F32, rows)?;
        }
        Ok(())
    }
}

/// sizeof(CeStats) in cross_entropy.cu: a float2 and six floats.
const CE_STATS_BYTES: usize = 32;

/// The per-row cross-entropy `loss_rows` (float32, `rows`; 0 for ignored rows) and, with
/// `grad = Some((grad, scale, stride))`, the gradient scaled per row by `scale[row * stride]`
/// (float32 on the device: stride 0 for one scale, 1 for one per row). The weight in `opts` is
/// float32 per class. `opts.reduction` is the caller's to apply: it sums `loss_rows` and folds
/// the mean's denominator into `scale`. `extras`: temperature, token weights (`loss_rows` and the
/// gradient are multiplied by them) and the stats outputs; with stats the rows are never split
/// across blocks (the stats kernels gather whole rows in one pass).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    s: Stream,
    x: Buf,
    target: CeTarget,
    opts: &CeOptions<Buf>,
    extras: &CeExtras,
    loss_rows: Buf,
    grad: Option<(Buf, Buf, usize)>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = size(rows, cols)?;
    check("logits", &x, x.dtype, n)?;
    check("loss", &loss_rows, DType::F32, rows)?;
    opts.check(cols)?;
    extras.check(rows)?;
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
        inv_t: (1.0 / extras.temperature) as f32,
        token_weight: extras.token_weight.map_or(0, |w| w.ptr),
        stat_lse: extras.stats.map_or(0, |st| st.lse.ptr),
        stat_entropy: extras.stats.map_or(0, |st| st.entropy.ptr),
        stat_correct: extras.stats.map_or(0, |st| st.correct.ptr),
    };
    let stats = extras.stats.is_some();
    // The stats kernels keep the argmax's class index as an int.
    if stats && cols > i32::MAX as usize {
        return Err(Error::Value(format!(
            "logits: {cols} classes; return_stats takes at most {} (32-bit argmax indices)",
            i32::MAX
        )));
    }
    let (cached_op, row_op) = if stats {
        (Op::CeCachedStats, Op::CrossEntropyStats)
    } else {
        (Op::CeCached, Op::CrossEntropy)
    };
    with_device(s.device, |d| {
        // The class weights too where the kernels read them per class (label smoothing or
        // probability targets): 16 bytes at a time beside the logits.
        let per_class = args.eps > 0.0 || probs_ptr != 0;
        let mut bufs = vec![x.ptr, probs_ptr, if per_class { args.weight } else { 0 }];
        if let Some((g, _, _)) = &grad {
            bufs.push(g.ptr);
        }
        let mut r = RowLaunch::new(d, s, x.dtype, rows, cols, &bufs, !stats)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let (g_ptr, scale_ptr, stride) =
            grad.map_or((0, 0, 0i64), |(g, sc, st)| (g.ptr, sc.ptr, st as i64));
        // The cached kernel holds at most 16 floats of row per thread (a softmax's half): with
        // its statistics and a pack of weights beside them, 32 spilled past 64 registers. The
        // stats variant 8 (16 spilled beside its extra statistics).
        let share = if stats { 4 } else { 2 };
        if let Some(packs) = r.cached_packs_of(share).filter(|_| probs_ptr == 0) {
            // Safety: buffers checked above; class-index targets, 16-byte aligned rows (vec > 1).
            return unsafe {
                r.run(
                    cached_op,
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
                Op::CePart,
                CE_STATS_BYTES,
                &params![x.ptr, rows_i, cols_i, chunk_i, chunks_i, args],
            )?
        };
        let part_ptr = part.as_ref().map_or(0u64, |sc| sc.ptr);
        // Safety: buffers checked above.
        unsafe {
            r.run_vec(
                row_op,
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

/// The vocabulary-parallel kernels' argument block (`VocabParallelArgs` in cross_entropy.cu: same
/// fields, same order).
#[repr(C)]
#[derive(Clone, Copy)]
struct VocabParallelArgs {
    target: u64,
    weight: u64,
    ignore_index: i64,
    start: i64,
    classes: i64,
    eps: f32,
    z: f32,
    /// 0: no softcap.
    cap: f32,
    w_sum: f32,
}

/// A vocabulary shard's rows: the logits (`rows` x `shard.len`, contiguous) of the classes
/// `[shard.start, shard.start + shard.len)`, their global class ids, and `opts.weight`, the whole
/// vocabulary's class weights (float32).
#[derive(Clone, Copy)]
pub struct ShardRows {
    pub x: Buf,
    pub target: Indices,
    pub rows: usize,
    pub start: usize,
    pub len: usize,
}

impl ShardRows {
    fn check(&self, opts: &CeOptions<Buf>) -> Result<()> {
        check("logits", &self.x, self.x.dtype, size(self.rows, self.len)?)?;
        if self.target.len != self.rows {
            return Err(Error::Value(format!(
                "target: expected {} class indices, got {}",
                self.rows, self.target.len
            )));
        }
        if self.rows > 0 && self.target.ptr == 0 {
            return Err(Error::Value("target: null device address".into()));
        }
        // The scalar options (the weight is checked against the shard below).
        CeOptions::<Buf> {
            weight: None,
            ..*opts
        }
        .check(0)?;
        if let Some(w) = &opts.weight {
            let end = self.start.checked_add(self.len);
            if w.dtype != DType::F32 || end.is_none_or(|e| e > w.len) || w.ptr == 0 {
                return Err(Error::Value(format!(
                    "weight: expected float32 weights of the whole vocabulary, at least {} classes, \
                     got {} {:?}",
                    self.start.saturating_add(self.len),
                    w.len,
                    w.dtype
                )));
            }
        }
        self.start
            .checked_add(self.len)
            .and_then(|end| i64::try_from(end).ok())
            .map(|_| ())
            .ok_or_else(|| Error::Value("vocab_start: too large".into()))
    }

    /// The address of the shard's first class weight where the kernels read the weights per
    /// class (label smoothing; else 0): 16 bytes at a time beside the logits, so aligned as the
    /// rows are.
    fn weight_at_start(&self, opts: &CeOptions<Buf>) -> u64 {
        match opts.weight {
            Some(w) if opts.label_smoothing > 0.0 => w.ptr + 4 * self.start as u64,
            _ => 0,
        }
    }

    fn args(&self, opts: &CeOptions<Buf>, classes: usize, w_sum: f64) -> VocabParallelArgs {
        VocabParallelArgs {
            target: self.target.ptr,
            weight: opts.weight.map_or(0, |w| w.ptr),
            ignore_index: opts.ignore_index,
            start: self.start as i64,
            classes: classes as i64,
            // Positive wherever the host's f64 is (the kernel picks the packed width from its
            // sign): a smoothing below f32's range keeps 5 fields, with a negligible term.
            eps: if opts.label_smoothing > 0.0 {
                (opts.label_smoothing as f32).max(f32::from_bits(1))
            } else {
                0.0
            },
            z: opts.z_loss as f32,
            cap: opts.softcap.unwrap_or(0.0) as f32,
            w_sum: w_sum as f32,
        }
    }
}

/// Floats per row of [`vocab_parallel_stats`]: normax-core's `vocab_parallel_fields`.
pub fn vocab_parallel_fields(label_smoothing: f64) -> usize {
    normax_core::cross_entropy::vocab_parallel_fields(label_smoothing)
}

/// The shard's row statistics into `packed` (float32, rows x [`vocab_parallel_fields`]) in
/// normax-core's `vocab_parallel_stats` layout, which its `vocab_parallel_combine` reads once every
/// rank's rows are gathered. Targets are not range-checked here (the vocabulary is known after the
/// gather); one outside the shard adds nothing. `opts.reduction` and `opts.z_loss` are the
/// combine's.
pub fn vocab_parallel_stats(
    s: Stream,
    sh: ShardRows,
    opts: &CeOptions<Buf>,
    packed: Buf,
) -> Result<()> {
    sh.check(opts)?;
    let fields = vocab_parallel_fields(opts.label_smoothing);
    check("packed", &packed, DType::F32, size(sh.rows, fields)?)?;
    if sh.rows == 0 {
        return Ok(());
    }
    let args = sh.args(opts, 0, 0.0);
    with_device(s.device, |d| {
        // Whole rows per block: the statistics are one reduction per row.
        let bufs = [sh.x.ptr, sh.weight_at_start(opts)];
        let mut r = RowLaunch::new(d, s, sh.x.dtype, sh.rows, sh.len, &bufs, false)?;
        let (rows_i, cols_i, _, _) = r.dims();
        // Safety: buffers checked above; packed holds rows * fields floats.
        unsafe {
            r.run_vec(
                Op::CeVocabParallelStats,
                &mut params![sh.x.ptr, rows_i, cols_i, args, packed.ptr],
            )
        }
    })
}

/// d(grad_output * loss)/d(logits) of the shard into `grad` (the logits' dtype; may be the logits
/// themselves), from each row's global log-sum-exp `lse` (float32 hi, lo per row) that the
/// combine returned, the vocabulary size `classes` and `w_sum`, the sum of the whole
/// vocabulary's weights (`classes` without weights). `scale` is grad_output (divided by the
/// mean's denominator) as float32 on the device: `stride` 0 for one value, 1 for one per row.
/// Class ids must already be checked against `classes` (the combine raises IndexError); any other
/// is treated as ignored, never read out of bounds.
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_backward(
    s: Stream,
    sh: ShardRows,
    classes: usize,
    w_sum: f64,
    opts: &CeOptions<Buf>,
    lse: Buf,
    grad: Buf,
    scale: Buf,
    stride: usize,
) -> Result<()> {
    sh.check(opts)?;
    if sh.start.saturating_add(sh.len) > classes {
        return Err(Error::Value(format!(
            "the shard [{}, {}) lies outside the {classes} classes",
            sh.start,
            sh.start.saturating_add(sh.len)
        )));
    }
    if let Some(w) = &opts.weight {
        if w.len != classes {
            return Err(Error::Value(format!(
                "weight has {} elements; expected one per class ({classes})",
                w.len
            )));
        }
    }
    check("lse", &lse, DType::F32, size(sh.rows, 2)?)?;
    check("grad", &grad, sh.x.dtype, sh.x.len)?;
    let need = if stride == 0 {
        1
    } else {
        sh.rows.saturating_sub(1) * stride + 1
    };
    if scale.dtype != DType::F32 || scale.len < need || scale.ptr == 0 {
        return Err(Error::Value(format!(
            "grad_output: expected {need} float32 scales, got {}",
            scale.len
        )));
    }
    if sh.rows == 0 || sh.len == 0 {
        return Ok(());
    }
    let args = sh.args(opts, classes, w_sum);
    with_device(s.device, |d| {
        let bufs = [sh.x.ptr, grad.ptr, sh.weight_at_start(opts)];
        let mut r = RowLaunch::new(d, s, sh.x.dtype, sh.rows, sh.len, &bufs, true)?;
        let (rows_i, cols_i, chunk_i, chunks_i) = r.dims();
        let stride_i = stride as i64;
        // Safety: buffers checked above.
        unsafe {
            r.run_vec(
                Op::CeVocabParallelBackward,
                &mut params![
                    sh.x.ptr, rows_i, cols_i, chunk_i, chunks_i, args, lse.ptr, grad.ptr,
                    scale.ptr, stride_i
                ],
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(ptr: u64, len: usize) -> Buf {
        Buf {
            ptr,
            dtype: DType::F32,
            len,
        }
    }

    /// Every argument mistake of the shard kernels is a ValueError before any CUDA call (this
    /// machine may have no driver: reaching one would be Unavailable instead).
    #[test]
    fn bad_shard_arguments_are_value_errors_before_any_cuda_call() {
        let s = Stream {
            device: 0,
            handle: 0,
        };
        let sh = ShardRows {
            x: f32s(16, 6),
            target: Indices { ptr: 64, len: 2 },
            rows: 2,
            start: 4,
            len: 3,
        };
        let opts = CeOptions::<Buf>::default();
        let value = |r: Result<()>| matches!(r, Err(Error::Value(_)));
        // packed: 3 floats per row without label smoothing, 5 with.
        assert!(value(vocab_parallel_stats(s, sh, &opts, f32s(128, 5))));
        let smooth = CeOptions {
            label_smoothing: 0.1,
            ..opts
        };
        assert!(value(vocab_parallel_stats(s, sh, &smooth, f32s(128, 6))));
        // Logits, target, options and the whole vocabulary's weights.
        let short = ShardRows {
            x: f32s(16, 5),
            ..sh
        };
        assert!(value(vocab_parallel_stats(s, short, &opts, f32s(128, 6))));
        let targets = ShardRows {
            target: Indices { ptr: 64, len: 3 },
            ..sh
        };
        assert!(value(vocab_parallel_stats(s, targets, &opts, f32s(128, 6))));
        let bad_eps = CeOptions {
            label_smoothing: 1.5,
            ..opts
        };
        assert!(value(vocab_parallel_stats(s, sh, &bad_eps, f32s(128, 10))));
        let few_weights = CeOptions {
            weight: Some(f32s(256, 6)),
            ..opts
        };
        assert!(value(vocab_parallel_stats(
            s,
            sh,
            &few_weights,
            f32s(128, 6)
        )));
        // Backward: the shard inside the vocabulary, one weight per class, lse and grad sizes.
        let one = f32s(512, 1);
        let back = |classes, o: &CeOptions<Buf>, lse, grad| {
            vocab_parallel_backward(s, sh, classes, 7.0, o, lse, grad, one, 0)
        };
        assert!(value(back(6, &opts, f32s(128, 4), f32s(256, 6))));
        assert!(value(back(7, &opts, f32s(128, 3), f32s(256, 6))));
        assert!(value(back(7, &opts, f32s(128, 4), f32s(256, 5))));
        let weights = CeOptions {
            weight: Some(f32s(256, 8)),
            ..opts
        };
        assert!(value(back(7, &weights, f32s(128, 4), f32s(256, 6))));
        let per_row =
            vocab_parallel_backward(s, sh, 7, 7.0, &opts, f32s(128, 4), f32s(256, 6), one, 1);
        assert!(value(per_row));
    }
}
