//! Vocabulary-parallel cross-entropy: each rank holds the logits of a slice of the classes (its
//! [`Shard`]), computes a few numbers per row, and one all-gather of them gives every rank the
//! loss. The op is `vocab_parallel` in every layer (core, CUDA, bindings, Python); "shard" names
//! only one rank's slice of the vocabulary and its data.
//!
//! Per row, shard k sends [`fields`] values: its log-sum-exp lse_k as hi + lo (hi rounded to T,
//! lo the remainder: a (max, scaled sum) pair that combines exactly in any order), the target's
//! logit if the target lives in the shard (else 0) and, with label smoothing, the smoothing sum
//! sum_c w_c (lse_k - x_c) as hi + lo. Logits are capped first (softcap).
//! [`vocab_parallel_combine`] folds the ranks' rows in rank order, so every rank computes
//! bit-identical losses, and keeps each row's global log-sum-exp for [`vocab_parallel_backward`],
//! which writes the shard's gradient with no communication: dL/dx_c needs only lse and the row's
//! target, which every rank has. The linear variants compute the shard's logits block by block
//! from the hidden states (`super::linear`'s GEMMs) and never hold more than one block.

use super::linear::{linear_block, Linear};
use super::rows::{pass2, pass2_exact, transform_into, Probs};
use super::rule::{minus, scale_for, Coef, RowLse, Rule, Scale};
use super::{check_classes, finish_loss};
use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::gemm::release_free_memory;
use crate::isa::{dispatch, Kernel};
use crate::lse::{refined_lse, ExpSum, Lse};
use crate::rows::fill;
use crate::simd::Vector;
use crate::spec::{check_len, size, CeOptions, GradOutput, Reduction};
use crate::Error;
use std::f64::consts::{LN_2, LOG2_E};

/// Values per row a shard contributes: lse (hi, lo), target logit and, with label smoothing, the
/// smoothing sum (hi, lo).
pub fn fields(label_smoothing: f64) -> usize {
    if label_smoothing > 0.0 {
        5
    } else {
        3
    }
}
const LSE: usize = 0;
const XY: usize = 2;
const SMOOTH: usize = 3;

/// Which classes a rank holds: [start, start + len) of the whole vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub start: usize,
    pub len: usize,
}

impl Shard {
    /// The target's column in this shard, if it lives here.
    fn local(&self, y: i64) -> Option<usize> {
        let c = (y as u64).wrapping_sub(self.start as u64);
        (y >= 0 && c < self.len as u64).then_some(c as usize)
    }
}

/// v as hi + lo in T (lo 0 where T holds v exactly, as f64 does).
fn split<T: Float>(v: f64) -> (T, T) {
    let hi = T::from_f64(v);
    let lo = if v.is_finite() {
        T::from_f64(v - hi.to_f64())
    } else {
        T::ZERO
    };
    (hi, lo)
}

/// The rule of the loss as a shard sees it: C and sum_c w_c of the whole vocabulary, the class
/// weights of its own classes (indexed from the shard's first class).
fn shard_rule<T: Float>(opts: &CeOptions<&[T]>, classes: usize, shard: Shard) -> Rule<T> {
    let mut rule = Rule::new(opts, classes);
    if let Some(w) = opts.weight {
        rule.weight = Ptr::from_const(w[shard.start..].as_ptr());
    }
    rule
}

fn check_shard<T>(opts: &CeOptions<&[T]>, shard: Shard) -> Result<(), Error> {
    opts.softmax_only("the vocabulary-parallel cross-entropy")?;
    if let Some(w) = opts.weight {
        if shard
            .start
            .checked_add(shard.len)
            .is_none_or(|e| e > w.len())
        {
            return Err(Error::Value(format!(
                "weight has {} classes; the shard holds classes [{}, {})",
                w.len(),
                shard.start,
                shard.start.saturating_add(shard.len)
            )));
        }
    }
    Ok(())
}

/// The shard statistics of a block of rows (see the module notes), into `packed` ([`fields`] a row).
struct StatsRows<'a, T: Float> {
    rule: &'a Rule<T>,
    x: Ptr<T>,
    /// Where capped logits go: `x` itself (the linear op's block), or null for a scratch row.
    capped: Ptr<T>,
    target: &'a [i64],
    ignore: i64,
    shard: Shard,
    packed: Ptr<T>,
    rows: std::ops::Range<usize>,
}

impl<T: Float> Kernel<T> for StatsRows<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let len = self.shard.len;
        let rule = self.rule;
        let transformed = rule.cap.is_some() || rule.inv_t.is_some();
        let mut scratch = if transformed && self.capped.0.is_null() {
            vec![T::ZERO; len]
        } else {
            Vec::new()
        };
        let no_probs = Probs::<V>::new(ExpSum::new(1.0, T::ZERO));
        let no_coef = Coef {
            a: 0.0,
            b: 0.0,
            ct: 0.0,
            zl: 0.0,
            stable: false,
        };
        let w = rule.weight.0 as *const T;
        let fields = fields(rule.eps);
        for r in self.rows {
            let out = unsafe { std::slice::from_raw_parts_mut(self.packed.at(r * fields), fields) };
            out.fill(T::ZERO);
            let y = self.target[r];
            if y == self.ignore {
                continue;
            }
            unsafe {
                let dst = if self.capped.0.is_null() {
                    scratch.as_mut_ptr()
                } else {
                    self.capped.at(r * len)
                };
                let x = transform_into::<V>(rule, self.x.at(r * len), dst, len);
                if let Some(c) = self.shard.local(y) {
                    out[XY] = *x.add(c);
                }
                let (lse, fast) = match RowLse::of::<V>(x, len) {
                    RowLse::Nan => {
                        out[LSE] = T::NAN;
                        continue;
                    }
                    RowLse::Fast(e) => (refined_lse::<V>(x, len, e), true),
                    RowLse::Exact { max, sum } if max > f64::NEG_INFINITY => (
                        Lse {
                            hi: max,
                            lo: sum.ln(),
                        },
                        false,
                    ),
                    RowLse::Exact { .. } => {
                        // Every class -inf (or none here): adds nothing to the sum of exponentials;
                        // its smoothing terms are infinite.
                        out[LSE] = T::NEG_INFINITY;
                        if rule.eps > 0.0 && len > 0 {
                            out[SMOOTH] = T::INFINITY;
                        }
                        continue;
                    }
                };
                (out[LSE], out[LSE + 1]) = split(lse.value());
                if rule.eps > 0.0 {
                    let (wt, g) = ((w, std::ptr::null()), std::ptr::null_mut());
                    let cu = (None, rule.unit);
                    let smooth = if fast {
                        pass2::<V, false, false>(x, wt, len, lse, &no_probs, &no_coef, cu, g)
                    } else {
                        pass2_exact::<T, false>(x, wt, len, lse, &no_coef, None, g)
                    };
                    // Unscaled: the CUDA kernels write the same packed rows for the host's combine.
                    (out[SMOOTH], out[SMOOTH + 1]) = split(smooth.smooth);
                }
            }
        }
    }
}

/// The gradient of a block of rows given their global log-sum-exp (`lse`: hi, lo per row).
struct GradRows<'a, T: Float> {
    rule: &'a Rule<T>,
    x: Ptr<T>,
    grad: Ptr<T>,
    target: &'a [i64],
    /// The whole vocabulary's class weights (null for ones): w_y of a target in another shard.
    weight: Ptr<T>,
    ignore: i64,
    shard: Shard,
    lse: &'a [f64],
    scale: Scale<'a, T>,
    /// Index of the first row of `x` in `target`, `lse` and `scale` (blocks of the linear op).
    row0: usize,
    rows: std::ops::Range<usize>,
}

impl<T: Float> Kernel<T> for GradRows<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let len = self.shard.len;
        let rule = self.rule;
        let limit = T::SPLIT_LIMIT.to_f64() / 2.0;
        for r in self.rows {
            let g_row = self.row0 + r;
            let y = self.target[g_row];
            unsafe {
                let grad = self.grad.at(r * len);
                if y == self.ignore {
                    fill(grad, len, T::ZERO);
                    continue;
                }
                let lse = Lse {
                    hi: self.lse[2 * g_row],
                    lo: self.lse[2 * g_row + 1],
                };
                if !lse.value().is_finite() {
                    fill(grad, len, T::NAN);
                    continue;
                }
                let x = transform_into::<V>(rule, self.x.at(r * len), grad, len);
                let local = self.shard.local(y);
                // Read before pass 2 may overwrite it (in place).
                let x_y = local.map_or(0.0, |c| (*x.add(c)).to_f64());
                let w_y = if self.weight.0.is_null() {
                    1.0
                } else {
                    (*self.weight.at(y as usize)).to_f64()
                };
                let s = self.scale.of(g_row) * rule.token_weight_of(g_row) * rule.grad_t;
                let coef = rule.coef(lse.value(), w_y, s);
                let wt = (rule.weight.0 as *const T, std::ptr::null());
                let l = lse.value();
                if l.abs() <= limit {
                    // softmax = exp(x) * 2^-n / m with m 2^n = e^lse.
                    let n = (l * LOG2_E).round();
                    let probs = Probs::<V>::new(ExpSum {
                        m: (l - n * LN_2).exp(),
                        n,
                        max: l,
                        top: f64::NAN,
                        rest: f64::NAN,
                    });
                    let cu = (rule.cap, rule.unit);
                    pass2::<V, true, false>(x, wt, len, lse, &probs, &coef, cu, grad);
                } else {
                    pass2_exact::<T, true>(x, wt, len, lse, &coef, rule.cap, grad);
                }
                if let Some(c) = local {
                    *grad.add(c) = T::from_f64(rule.target_grad(x_y, lse, &coef, w_y));
                }
            }
        }
    }
}

/// The shard's statistics of `logits` (rows x shard.len, contiguous) into `packed` (rows x
/// [`fields`]). `opts.weight` is the whole vocabulary's class weights. Targets are not
/// range-checked here (the vocabulary size is known after the gather): one outside the shard adds
/// nothing.
pub fn vocab_parallel_stats<T: Float>(
    logits: &[T],
    rows: usize,
    shard: Shard,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    packed: &mut [T],
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, shard.len)?)?;
    check_len("target", target.len(), rows)?;
    check_len(
        "packed",
        packed.len(),
        size(rows, fields(opts.label_smoothing))?,
    )?;
    check_shard(opts, shard)?;
    let rule = shard_rule(opts, shard.start + shard.len, shard);
    let x = Ptr::from_const(logits.as_ptr());
    run_stats(
        &rule,
        x,
        Ptr(std::ptr::null_mut()),
        target,
        opts,
        shard,
        packed,
    );
    Ok(())
}

fn run_stats<T: Float>(
    rule: &Rule<T>,
    x: Ptr<T>,
    capped: Ptr<T>,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    shard: Shard,
    packed: &mut [T],
) {
    let rows = target.len();
    let packed = Ptr(packed.as_mut_ptr());
    driver::for_each_fixed_row_block(rows, shard.len, |rows| {
        dispatch(StatsRows {
            rule,
            x,
            capped,
            target,
            ignore: opts.ignore_index,
            shard,
            packed,
            rows,
        })
    });
}

/// The loss from every rank's statistics: `gathered` holds, per rank in order, `stride` values of
/// which the first rows x [`fields`] are its [`vocab_parallel_stats`]; `shards` the ranks' classes,
/// which must tile [0, classes). Writes the loss (rows values for reduction None, else one) and
/// each row's log-sum-exp (hi, lo; NaN for NaN rows) into `lse`; returns the mean's denominator.
/// Checks every class index (IndexError naming it).
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_combine<T: Float>(
    gathered: &[T],
    stride: usize,
    shards: &[Shard],
    rows: usize,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    loss: &mut [T],
    lse: &mut [f64],
) -> Result<f64, Error> {
    let classes = shards.iter().map(|s| s.len).sum::<usize>();
    let mut ends: Vec<Shard> = shards.to_vec();
    ends.sort_by_key(|s| s.start);
    let mut next = 0;
    for s in &ends {
        if s.start != next {
            return Err(Error::Value(format!(
                "the ranks' shards {shards:?} do not tile the vocabulary [0, {classes})"
            )));
        }
        next += s.len;
    }
    let nf = fields(opts.label_smoothing);
    if stride < size(rows, nf)? {
        return Err(Error::Value("gathered: stride too small".into()));
    }
    check_len("gathered", gathered.len(), size(stride, shards.len())?)?;
    check_len("target", target.len(), rows)?;
    check_len("loss", loss.len(), opts.reduction.loss_len(rows))?;
    check_len("lse", lse.len(), size(rows, 2)?)?;
    opts.check(classes)?;
    opts.check_rows(rows)?;
    let denom = check_classes(
        target,
        classes,
        opts.ignore_index,
        opts.weight,
        opts.token_weight,
    )?;
    let rule = Rule::new(opts, classes);
    let w_shard: Vec<f64> = shards
        .iter()
        .map(|s| match opts.weight {
            Some(w) => w[s.start..s.start + s.len].iter().map(|v| v.to_f64()).sum(),
            None => s.len as f64,
        })
        .collect();
    let mut total = 0.0;
    for r in 0..rows {
        let y = target[r];
        let field = |k: usize, f: usize| gathered[k * stride + r * nf + f].to_f64();
        // The largest shard lse (hi, exact in T): NaN if any is.
        let top = (0..shards.len()).fold(f64::NEG_INFINITY, |m, k| {
            let v = field(k, LSE);
            if v.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(v)
            }
        });
        let l = if y == opts.ignore_index {
            (lse[2 * r], lse[2 * r + 1]) = (0.0, 0.0);
            0.0
        } else if !(top > f64::NEG_INFINITY) {
            // NaN or +inf somewhere, or every class -inf: NaN, as torch.
            (lse[2 * r], lse[2 * r + 1]) = (f64::NAN, f64::NAN);
            f64::NAN
        } else {
            let mut sum = 0.0;
            for k in 0..shards.len() {
                if field(k, LSE) > f64::NEG_INFINITY {
                    sum += ((field(k, LSE) - top) + field(k, LSE + 1)).exp();
                }
            }
            let ln_sum = sum.ln();
            let l = Lse::new::<T>(top, ln_sum);
            (lse[2 * r], lse[2 * r + 1]) = (l.hi, l.lo);
            let owner = shards.iter().position(|s| s.local(y).is_some());
            let x_y = owner.map_or(0.0, |k| field(k, XY));
            let w_y = opts.weight.map_or(1.0, |w| w[y as usize].to_f64());
            let mut smooth = 0.0;
            if rule.eps > 0.0 {
                for (k, s) in shards.iter().enumerate() {
                    let part = field(k, SMOOTH) + field(k, SMOOTH + 1);
                    if s.len == 0 {
                        continue;
                    }
                    if part.is_infinite() || field(k, LSE) == f64::NEG_INFINITY {
                        smooth += f64::INFINITY;
                        continue;
                    }
                    // lse - lse_k, the large parts cancelled first.
                    let gap = ((top - field(k, LSE)) + ln_sum) - field(k, LSE + 1);
                    smooth += part + w_shard[k] * gap;
                }
            }
            let tw = opts.token_weight.map_or(1.0, |t| t[r].to_f64());
            tw * rule.loss(l.value(), w_y * minus(l, x_y), smooth)
        };
        if opts.reduction == Reduction::None {
            loss[r] = T::from_f64(l);
        }
        total += l;
    }
    finish_loss(opts.reduction, total, denom, loss);
    Ok(denom)
}

/// d(grad_output * loss)/d(logits) of this shard into `grad` (which may be `logits`), from the row
/// statistics [`vocab_parallel_combine`] returned (`lse`, `denom`) and the whole vocabulary's size.
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_backward<T: Float>(
    logits: &[T],
    rows: usize,
    shard: Shard,
    classes: usize,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    lse: &[f64],
    denom: f64,
    grad_output: GradOutput<&[T]>,
    grad: &mut [T],
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, shard.len)?)?;
    check_len("grad", grad.len(), logits.len())?;
    let rule = backward_rule(rows, shard, classes, target, opts, lse)?;
    let scale = scale_for(opts.reduction, grad_output, denom, rows)?;
    let x = Ptr::from_const(logits.as_ptr());
    run_grad(
        &rule,
        x,
        Ptr(grad.as_mut_ptr()),
        target,
        opts,
        shard,
        lse,
        scale,
        0,
        rows,
    );
    Ok(())
}

fn backward_rule<T: Float>(
    rows: usize,
    shard: Shard,
    classes: usize,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    lse: &[f64],
) -> Result<Rule<T>, Error> {
    check_len("target", target.len(), rows)?;
    check_len("lse", lse.len(), size(rows, 2)?)?;
    opts.check(classes)?;
    check_shard(opts, shard)?;
    if shard.start + shard.len > classes {
        return Err(Error::Value(format!(
            "the shard [{}, {}) lies outside the {classes} classes",
            shard.start,
            shard.start + shard.len
        )));
    }
    // Indexes the weights: checked again so memory safety never depends on the caller.
    opts.check_rows(rows)?;
    check_classes(
        target,
        classes,
        opts.ignore_index,
        opts.weight,
        opts.token_weight,
    )?;
    Ok(shard_rule(opts, classes, shard))
}

#[allow(clippy::too_many_arguments)]
fn run_grad<T: Float>(
    rule: &Rule<T>,
    x: Ptr<T>,
    grad: Ptr<T>,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    shard: Shard,
    lse: &[f64],
    scale: Scale<'_, T>,
    row0: usize,
    rows: usize,
) {
    let weight = Ptr::from_const(opts.weight.map_or(std::ptr::null(), |w| w.as_ptr()));
    driver::for_each_fixed_row_block(rows, shard.len, |rows| {
        dispatch(GradRows {
            rule,
            x,
            grad,
            target,
            weight,
            ignore: opts.ignore_index,
            shard,
            lse,
            scale,
            row0,
            rows,
        })
    });
}

/// The linear op's inputs: hidden (n x h, the same on every rank), the shard's weight rows
/// (shard.len x h) and bias.
#[derive(Clone, Copy)]
pub struct ShardLinear<'a, T> {
    pub hidden: &'a [T],
    pub weight: &'a [T],
    pub bias: Option<&'a [T]>,
    pub h: usize,
}

impl<T: Float> ShardLinear<'_, T> {
    fn check(&self, rows: usize, shard: Shard) -> Result<Linear<T>, Error> {
        check_len("hidden", self.hidden.len(), size(rows, self.h)?)?;
        check_len("weight", self.weight.len(), size(shard.len, self.h)?)?;
        if let Some(b) = self.bias {
            check_len("bias", b.len(), shard.len)?;
        }
        Ok(Linear {
            hidden: Ptr::from_const(self.hidden.as_ptr()),
            weight: Ptr::from_const(self.weight.as_ptr()),
            bias: Ptr::from_const(self.bias.map_or(std::ptr::null(), |b| b.as_ptr())),
            h: self.h,
            scale: T::ONE,
        })
    }
}

/// Rows per block of the linear ops: whole shard rows, at most `chunk` elements (at least one row).
fn block_rows(rows: usize, len: usize, chunk: Option<usize>) -> usize {
    match chunk {
        Some(c) => (c / len.max(1)).clamp(1, rows.max(1)),
        None => linear_block(rows, len, None).0,
    }
}

/// [`vocab_parallel_stats`] of logits = hidden @ weight^T + bias, computed `chunk_size` elements at
/// a time.
pub fn vocab_parallel_linear_stats<T: Float>(
    lin: ShardLinear<T>,
    rows: usize,
    shard: Shard,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    chunk_size: Option<usize>,
    packed: &mut [T],
) -> Result<(), Error> {
    if chunk_size == Some(0) {
        return Err(Error::Value("chunk_size must be at least 1".into()));
    }
    let mut l = lin.check(rows, shard)?;
    check_len("target", target.len(), rows)?;
    check_len(
        "packed",
        packed.len(),
        size(rows, fields(opts.label_smoothing))?,
    )?;
    check_shard(opts, shard)?;
    let mut rule = shard_rule(opts, shard.start + shard.len, shard);
    // The GEMM divides by the temperature as it writes each block.
    (rule.inv_t, l.scale) = (None, T::from_f64(rule.grad_t));
    let bn = block_rows(rows, shard.len, chunk_size);
    let mut block = vec![T::ZERO; bn * shard.len];
    let blk = Ptr(block.as_mut_ptr());
    for r0 in (0..rows).step_by(bn) {
        let rn = bn.min(rows - r0);
        unsafe { l.logits(blk.at(0), r0, rn, 0, shard.len) };
        let t = &target[r0..r0 + rn];
        let f = fields(opts.label_smoothing);
        let p = &mut packed[r0 * f..(r0 + rn) * f];
        run_stats(&rule, blk, blk, t, opts, shard, p);
    }
    Ok(())
}

/// The linear op's gradients on this rank: `dhidden` is this shard's part (the caller sums it over
/// the ranks), `dweight` and `dbias` the shard's own.
#[allow(clippy::too_many_arguments)]
pub fn vocab_parallel_linear_backward<T: Float>(
    lin: ShardLinear<T>,
    rows: usize,
    shard: Shard,
    classes: usize,
    target: &[i64],
    opts: &CeOptions<&[T]>,
    chunk_size: Option<usize>,
    lse: &[f64],
    denom: f64,
    grad_output: GradOutput<&[T]>,
    dhidden: &mut [T],
    dweight: &mut [T],
    dbias: Option<&mut [T]>,
) -> Result<(), Error> {
    if chunk_size == Some(0) {
        return Err(Error::Value("chunk_size must be at least 1".into()));
    }
    let mut l = lin.check(rows, shard)?;
    check_len("dhidden", dhidden.len(), lin.hidden.len())?;
    check_len("dweight", dweight.len(), lin.weight.len())?;
    match (&dbias, lin.bias) {
        (Some(db), Some(_)) => check_len("dbias", db.len(), shard.len)?,
        (None, None) => {}
        _ => {
            return Err(Error::Value(
                "dbias must be given exactly when bias is".into(),
            ))
        }
    }
    let mut rule = backward_rule(rows, shard, classes, target, opts, lse)?;
    (rule.inv_t, l.scale) = (None, T::from_f64(rule.grad_t));
    let scale = scale_for(opts.reduction, grad_output, denom, rows)?;
    let bn = block_rows(rows, shard.len, chunk_size);
    let mut block = vec![T::ZERO; bn * shard.len];
    let blk = Ptr(block.as_mut_ptr());
    let mut bias_sums = vec![0.0f64; if dbias.is_some() { shard.len } else { 0 }];
    if rows == 0 || shard.len == 0 {
        dhidden.fill(T::ZERO);
        dweight.fill(T::ZERO);
    }
    for r0 in (0..rows).step_by(bn) {
        let rn = bn.min(rows - r0);
        unsafe { l.logits(blk.at(0), r0, rn, 0, shard.len) };
        run_grad(&rule, blk, blk, target, opts, shard, lse, scale, r0, rn);
        let sums = dbias.as_ref().map(|_| &mut bias_sums[..]);
        unsafe {
            l.backward(
                blk.at(0),
                (r0, rn),
                (0, shard.len),
                dhidden.as_mut_ptr(),
                dweight.as_mut_ptr(),
                sums,
            )
        };
        release_free_memory();
    }
    if let Some(db) = dbias {
        for (d, s) in db.iter_mut().zip(&bias_sums) {
            *d = T::from_f64(*s);
        }
    }
    Ok(())
}
