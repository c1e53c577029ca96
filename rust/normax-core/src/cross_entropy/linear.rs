//! Linear cross-entropy: logits = hidden @ weight^T + bias, one block of rows x vocabulary at a
//! time, never all held at once.

use super::rows::{
    cap_into, pass2, pass2_exact, run_rows, Probs, RowOutputs, RowStats, StatsOut, Sums, Targets,
};
use super::rule::{minus, scale_for, Coef, RowLse, Rule, Scale};
use super::stats::Top;
use super::{finish_loss, prepare, CeStats};
use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::gemm::{matmul, matmul_scaled, release_free_memory};
use crate::isa::{dispatch, Kernel};
use crate::lse::Lse;
use crate::rows::fill;
use crate::simd::Vector;
use crate::spec::{check_len, size, CeOptions, GradOutput, Reduction, Target};
use crate::threads;
use crate::Error;

/// Largest logits block when `chunk_size` is None: 2^24 elements (64 MiB of f32).
pub const DEFAULT_CHUNK: usize = 1 << 24;
/// Rows a block keeps before the vocabulary is split instead: narrower GEMMs run slower.
const MIN_BLOCK_ROWS: usize = 128;

/// (rows, vocabulary) of the logits block the linear cross-entropy holds: at most `chunk` elements
/// (DEFAULT_CHUNK when None). The whole vocabulary when that leaves enough rows (one GEMM per
/// block and direction); otherwise blocks of the vocabulary, whose row sums are combined.
pub fn linear_block(n: usize, v: usize, chunk: Option<usize>) -> (usize, usize) {
    let budget = chunk.unwrap_or(DEFAULT_CHUNK).max(1);
    let (n, v) = (n.max(1), v.max(1));
    let full_rows = budget / v;
    if full_rows >= n.min(MIN_BLOCK_ROWS) {
        (full_rows.min(n), v)
    } else {
        let rows = n.min(MIN_BLOCK_ROWS).min(budget);
        (rows, (budget / rows).min(v))
    }
}

/// The gradients of the linear cross-entropy; `dbias` present exactly when a bias is.
pub struct LinearGrads<'a, T> {
    pub dhidden: &'a mut [T],
    pub dweight: &'a mut [T],
    pub dbias: Option<&'a mut [T]>,
}

/// The inputs of the linear op, as raw parts (also the linear logprobs', with scale 1: they
/// divide by the temperature in their row kernels).
#[derive(Clone, Copy)]
pub(crate) struct Linear<T> {
    pub(crate) hidden: Ptr<T>,
    pub(crate) weight: Ptr<T>,
    pub(crate) bias: Ptr<T>,
    pub(crate) h: usize,
    /// The logits come out multiplied by it: 1 / temperature.
    pub(crate) scale: T,
}

impl<T: Float> Linear<T> {
    /// out (rn x vn, contiguous) = (hidden[r0..r0+rn] @ weight[v0..v0+vn]^T + bias[v0..v0+vn])
    /// * scale.
    pub(crate) unsafe fn logits(&self, out: *mut T, r0: usize, rn: usize, v0: usize, vn: usize) {
        let has_bias = !self.bias.0.is_null();
        if has_bias {
            for i in 0..rn {
                std::ptr::copy_nonoverlapping(self.bias.at(v0), out.add(i * vn), vn);
            }
        }
        matmul_scaled(
            (rn, vn, self.h),
            (out, vn),
            has_bias,
            (self.hidden.at(r0 * self.h), (self.h, 1)),
            (self.weight.at(v0 * self.h), (1, self.h)),
            self.scale,
        );
    }

    /// Feeds a gradient block g (rn x vn) into dhidden[r0..] and dweight[v0..] (and the bias sums).
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn backward(
        &self,
        g: *const T,
        (r0, rn): (usize, usize),
        (v0, vn): (usize, usize),
        dhidden: *mut T,
        dweight: *mut T,
        bias_sums: Option<&mut [f64]>,
    ) {
        let h = self.h;
        // dhidden[r0..] (+)= g @ weight[v0..]; the first vocabulary block overwrites.
        matmul(
            (rn, h, vn),
            dhidden.add(r0 * h),
            h,
            v0 > 0,
            g,
            (vn, 1),
            self.weight.at(v0 * h),
            (h, 1),
        );
        // dweight[v0..] (+)= g^T @ hidden[r0..]; the first row block overwrites.
        matmul(
            (vn, h, rn),
            dweight.add(v0 * h),
            h,
            r0 > 0,
            g,
            (1, vn),
            self.hidden.at(r0 * h),
            (h, 1),
        );
        if let Some(acc) = bias_sums {
            add_column_sums(&mut acc[v0..v0 + vn], g, rn, vn);
        }
    }
}

/// acc[j] += sum_i g[i, j] in f64, rows in order (the same result for any thread count).
unsafe fn add_column_sums<T: Float>(acc: &mut [f64], g: *const T, rn: usize, vn: usize) {
    const COLS: usize = 1024;
    let (acc, g) = (Ptr(acc.as_mut_ptr()), Ptr::from_const(g));
    threads::for_each(vn.div_ceil(COLS), |c| {
        let (j0, j1) = (c * COLS, ((c + 1) * COLS).min(vn));
        for i in 0..rn {
            let row = g.at(i * vn);
            for j in j0..j1 {
                *acc.at(j) += (*row.add(j)).to_f64();
            }
        }
    });
}

/// A row's statistics gathered over vocabulary blocks.
#[derive(Clone, Copy, Debug)]
struct BlockedRow {
    lse: RowLse,
    /// The target's (capped) logit, once its block has been seen.
    x_y: f64,
    /// sum_c (run - x_c) over the classes seen so far, with run = ln of their sum of exponentials:
    /// every term and every update is >= 0, so the smoothing sum never cancels.
    smooth: f64,
    run: f64,
    seen: usize,
    /// With stats: the entropy of the classes seen so far (of their own softmax, whose
    /// log-sum-exp is `ent_lse`), and the argmax check over them.
    entropy: f64,
    ent_lse: f64,
    top: Top,
}

impl BlockedRow {
    const NEW: BlockedRow = BlockedRow {
        lse: RowLse::EMPTY,
        x_y: 0.0,
        smooth: 0.0,
        run: f64::NEG_INFINITY,
        seen: 0,
        entropy: 0.0,
        ent_lse: f64::NEG_INFINITY,
        top: Top::NEW,
    };
}

/// Sweep 1 over one logits block: caps it in place and folds each row's part into its state.
struct StatsBlock<'a, T> {
    rule: &'a Rule<T>,
    logits: Ptr<T>,
    state: Ptr<BlockedRow>,
    targets: &'a [i64],
    ignore: i64,
    stats: bool,
    row0: usize,
    v0: usize,
    vn: usize,
    rows: std::ops::Range<usize>,
}

impl<T: Float> Kernel<T> for StatsBlock<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let vn = self.vn;
        let rule = self.rule;
        let no_coef = Coef {
            a: 0.0,
            b: 0.0,
            ct: 0.0,
            zl: 0.0,
            stable: false,
        };
        let none = (std::ptr::null(), std::ptr::null());
        for i in self.rows {
            let y = self.targets[self.row0 + i];
            if y == self.ignore {
                continue;
            }
            unsafe {
                let x = self.logits.at(i * vn);
                let row = &mut *self.state.at(i);
                if self.stats {
                    // Before the cap: the argmax of the logits themselves.
                    row.top.add::<V>(x, self.v0, vn, y as usize);
                }
                if let Some(c) = rule.cap {
                    cap_into::<V>(x, x, vn, c);
                }
                let part = RowLse::of_block::<V>(x, vn);
                let local = (y as u64).wrapping_sub(self.v0 as u64);
                if y >= self.v0 as i64 && local < vn as u64 {
                    row.x_y = (*x.add(local as usize)).to_f64();
                }
                let lse = row.lse.combine(part);
                let run = lse.ln_sum();
                if rule.eps > 0.0 || self.stats {
                    // The block's own softmax: sums relative to its log-sum-exp rb.
                    let rb = part.ln_sum();
                    let inner = match part {
                        _ if rb == f64::NEG_INFINITY => Sums {
                            smooth: f64::INFINITY,
                            ..Sums::default()
                        },
                        RowLse::Fast(e) => {
                            let (l, probs) = (Lse { hi: rb, lo: 0.0 }, Probs::<V>::new(e));
                            let cu = (None, rule.unit);
                            let g = std::ptr::null_mut();
                            if self.stats {
                                pass2::<V, false, true>(x, none, vn, l, &probs, &no_coef, cu, g)
                            } else {
                                pass2::<V, false, false>(x, none, vn, l, &probs, &no_coef, cu, g)
                            }
                        }
                        RowLse::Exact { max, sum } => {
                            let l = Lse {
                                hi: max,
                                lo: sum.ln(),
                            };
                            let g = std::ptr::null_mut();
                            pass2_exact::<T, false>(x, none, vn, l, &no_coef, None, g)
                        }
                        RowLse::Nan => Sums {
                            smooth: f64::NAN,
                            soft: 0.0,
                            entropy: f64::NAN,
                        },
                    };
                    if rule.eps > 0.0 {
                        let before = if row.seen > 0 {
                            row.smooth + row.seen as f64 * (run - row.run)
                        } else {
                            0.0
                        };
                        row.smooth = before + inner.smooth + vn as f64 * (run - rb);
                    }
                    if self.stats {
                        // H = sum over blocks of (their share of the sum) * (H_b + lse - lse_b):
                        // every term >= 0.
                        let mut h = 0.0;
                        if row.ent_lse > f64::NEG_INFINITY {
                            h += (row.ent_lse - run).exp() * (row.entropy + (run - row.ent_lse));
                        }
                        if rb > f64::NEG_INFINITY {
                            h += (rb - run).exp() * (inner.entropy + (run - rb));
                        }
                        row.entropy = h;
                        row.ent_lse = run;
                    }
                }
                row.run = run;
                row.seen += vn;
                row.lse = lse;
            }
        }
    }
}

/// Sweep 2 over one logits block: overwrites it with the gradient, given the rows' statistics.
struct GradBlock<'a, T> {
    rule: &'a Rule<T>,
    logits: Ptr<T>,
    state: &'a [BlockedRow],
    targets: &'a [i64],
    ignore: i64,
    scale: Scale<'a, T>,
    row0: usize,
    v0: usize,
    vn: usize,
    rows: std::ops::Range<usize>,
}

impl<T: Float> Kernel<T> for GradBlock<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let vn = self.vn;
        for i in self.rows {
            let g = self.row0 + i;
            let y = self.targets[g];
            unsafe {
                let x = self.logits.at(i * vn);
                if y == self.ignore {
                    fill(x, vn, T::ZERO);
                    continue;
                }
                let st = &self.state[i];
                let Some(lse) = st.lse.lse() else {
                    fill(x, vn, T::NAN);
                    continue;
                };
                if let Some(c) = self.rule.cap {
                    cap_into::<V>(x, x, vn, c);
                }
                let rule = self.rule;
                let s = self.scale.of(g) * rule.token_weight_of(g) * rule.grad_t;
                let coef = rule.coef(lse.value(), 1.0, s);
                let none = (std::ptr::null(), std::ptr::null());
                match st.lse {
                    RowLse::Fast(e) => {
                        let probs = Probs::<V>::new(e);
                        let cu = (rule.cap, rule.unit);
                        pass2::<V, true, false>(x, none, vn, lse, &probs, &coef, cu, x);
                    }
                    _ => {
                        pass2_exact::<T, true>(x, none, vn, lse, &coef, rule.cap, x);
                    }
                }
                let local = (y as u64).wrapping_sub(self.v0 as u64);
                if y >= self.v0 as i64 && local < vn as u64 {
                    *x.add(local as usize) =
                        T::from_f64(self.rule.target_grad(st.x_y, lse, &coef, 1.0));
                }
            }
        }
    }
}

/// Linear cross-entropy: the loss of logits = hidden @ weight^T + bias (hidden n x h, weight v x h,
/// target n) without holding the n x v logits; with `grads`, also the gradients of
/// grad_output * loss; with `stats`, the rows' statistics (as [`super::cross_entropy_into`]'s; the
/// argmax is that of the logits as computed, divided by the temperature). `opts.weight` (class
/// weights) is not supported here.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy<T: Float>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    target: &[i64],
    (n, h, v): (usize, usize, usize),
    opts: &CeOptions<&[T]>,
    chunk_size: Option<usize>,
    grads: Option<(GradOutput<&[T]>, LinearGrads<T>)>,
    loss: &mut [T],
    mut stats: Option<CeStats<T>>,
) -> Result<(), Error> {
    if opts.weight.is_some() {
        return Err(Error::Value(
            "class weights are not supported by the linear cross-entropy".into(),
        ));
    }
    if chunk_size == Some(0) {
        return Err(Error::Value("chunk_size must be at least 1".into()));
    }
    check_len("hidden", hidden.len(), size(n, h)?)?;
    check_len("weight", weight.len(), size(v, h)?)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), v)?;
    }
    opts.softmax_only("linear_cross_entropy")?;
    let denom = prepare(n, v, &Target::<_, &[T]>::Classes(target), opts, loss)?;
    let stats_out = match &mut stats {
        Some(s) => s.check(n)?,
        None => StatsOut::NONE,
    };
    let (scale, mut grads) = match grads {
        Some((go, g)) => {
            check_len("dhidden", g.dhidden.len(), hidden.len())?;
            check_len("dweight", g.dweight.len(), weight.len())?;
            match (&g.dbias, bias) {
                (Some(db), Some(_)) => check_len("dbias", db.len(), v)?,
                (None, None) => {}
                _ => {
                    return Err(Error::Value(
                        "dbias must be given exactly when bias is".into(),
                    ))
                }
            }
            (scale_for(opts.reduction, go, denom, n)?, Some(g))
        }
        None => (Scale::All(0.0), None),
    };
    let mut rule = Rule::new(opts, v);
    // The GEMM divides by the temperature as it writes each block.
    rule.inv_t = None;
    let lin = Linear {
        hidden: Ptr::from_const(hidden.as_ptr()),
        weight: Ptr::from_const(weight.as_ptr()),
        bias: Ptr::from_const(bias.map_or(std::ptr::null(), |b| b.as_ptr())),
        h,
        scale: T::from_f64(rule.grad_t),
    };
    let losses = if opts.reduction == Reduction::None {
        Ptr(loss.as_mut_ptr())
    } else {
        Ptr(std::ptr::null_mut())
    };
    let ignore = opts.ignore_index;
    let (bn, bv) = linear_block(n, v, chunk_size);
    let mut block = if n > 0 && v > 0 {
        vec![T::ZERO; bn * bv]
    } else {
        Vec::new()
    };
    let blk = Ptr(block.as_mut_ptr());
    let mut bias_sums = vec![
        0.0f64;
        if bias.is_some() && grads.is_some() {
            v
        } else {
            0
        }
    ];
    let mut total = 0.0;

    for r0 in (0..n).step_by(bn) {
        let rn = bn.min(n - r0);
        if bv == v {
            // The whole vocabulary at once: each row is an ordinary fused row, in place.
            unsafe { lin.logits(blk.at(0), r0, rn, 0, v) };
            let grad = if grads.is_some() {
                blk
            } else {
                Ptr(std::ptr::null_mut())
            };
            let targets = Targets::Classes(target, ignore);
            let out = RowOutputs {
                losses,
                stats: stats_out,
            };
            total += run_rows(&rule, blk, grad, targets, scale, out, rn, v, r0);
            if let Some(g) = &mut grads {
                let sums = g.dbias.as_ref().map(|_| &mut bias_sums[..]);
                unsafe {
                    lin.backward(
                        blk.at(0),
                        (r0, rn),
                        (0, v),
                        g.dhidden.as_mut_ptr(),
                        g.dweight.as_mut_ptr(),
                        sums,
                    )
                };
                release_free_memory();
            }
            continue;
        }
        // Vocabulary blocks: sweep 1 gathers each row's statistics, sweep 2 recomputes the
        // logits block by block and turns them into gradients.
        let mut state = vec![BlockedRow::NEW; rn];
        let st = Ptr(state.as_mut_ptr());
        for v0 in (0..v).step_by(bv) {
            let vn = bv.min(v - v0);
            unsafe { lin.logits(blk.at(0), r0, rn, v0, vn) };
            driver::for_each_fixed_row_block(rn, vn, |rows| {
                dispatch(StatsBlock {
                    rule: &rule,
                    logits: blk,
                    state: st,
                    targets: target,
                    ignore,
                    stats: stats_out.wanted(),
                    row0: r0,
                    v0,
                    vn,
                    rows,
                })
            });
        }
        for (i, s) in state.iter().enumerate() {
            let g = r0 + i;
            let (l, row_stats) = if target[g] == ignore {
                (0.0, RowStats::IGNORED)
            } else {
                let tw = rule.token_weight_of(g);
                let correct = s.top.correct();
                match s.lse.lse() {
                    Some(lse) => {
                        let l = rule.loss(lse.value(), minus(lse, s.x_y), s.smooth);
                        let st = RowStats {
                            lse: lse.value(),
                            entropy: s.entropy,
                            correct,
                        };
                        (l * tw, st)
                    }
                    None => {
                        let st = RowStats {
                            lse: s.lse.ln_sum(),
                            entropy: f64::NAN,
                            correct,
                        };
                        (f64::NAN, st)
                    }
                }
            };
            if !losses.0.is_null() {
                unsafe { *losses.at(g) = T::from_f64(l) };
            }
            if stats_out.wanted() {
                unsafe { stats_out.write(g, row_stats) };
            }
            total += l;
        }
        let Some(g) = &mut grads else { continue };
        for v0 in (0..v).step_by(bv) {
            let vn = bv.min(v - v0);
            unsafe { lin.logits(blk.at(0), r0, rn, v0, vn) };
            driver::for_each_fixed_row_block(rn, vn, |rows| {
                dispatch(GradBlock {
                    rule: &rule,
                    logits: blk,
                    state: &state,
                    targets: target,
                    ignore,
                    scale,
                    row0: r0,
                    v0,
                    vn,
                    rows,
                })
            });
            let sums = g.dbias.as_ref().map(|_| &mut bias_sums[..]);
            unsafe {
                lin.backward(
                    blk.at(0),
                    (r0, rn),
                    (v0, vn),
                    g.dhidden.as_mut_ptr(),
                    g.dweight.as_mut_ptr(),
                    sums,
                )
            };
            release_free_memory();
        }
    }
    if let Some(g) = grads {
        if n == 0 {
            g.dweight.fill(T::ZERO);
        }
        if let Some(db) = g.dbias {
            for (d, s) in db.iter_mut().zip(&bias_sums) {
                *d = T::from_f64(*s);
            }
        }
    }
    finish_loss(opts.reduction, total, denom, loss);
    Ok(())
}
