//! The row kernels: the SIMD passes over one row (or one vocabulary block of it), and
//! [`run_rows`], which runs them over the driver's fixed blocks of rows.

use super::rule::{chain, minus, Coef, RowLse, Rule, Scale};
use super::stats::{argmax, argmax_is, scale_terms};
pub(super) use super::stats::{RowStats, StatsOut};
use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::lse::{
    refined_lse, refined_lse_from_terms, sum_in_cache, sum_in_cache_scaled, ExpSum, Lse, ScaledExp,
    IN_CACHE_MAX_LEN,
};
use crate::rows::{dot, fill, keep_lanes, load_n, map_elements, store_n};
use crate::simd::{exp, tanh, Vector, MAX_LANES};
use crate::sum::SHORT_FOLD;

/// softmax(x) = exp(x) * 2^-n / m for x of a fast-path row whose sum of exponentials is m * 2^n.
#[derive(Clone, Copy)]
pub(super) struct Probs<V> {
    pub(super) scaled: ScaledExp<V>,
    pub(super) inv: V,
}

impl<V: Vector> Probs<V> {
    #[inline(always)]
    pub(super) fn new(s: ExpSum) -> Self {
        Probs {
            scaled: ScaledExp::new(V::Elem::from_f64(s.n)),
            inv: V::splat(V::Elem::from_f64(1.0 / s.m)),
        }
    }

    #[inline(always)]
    pub(super) fn of(&self, x: V) -> V {
        self.scaled.apply(x).mul(self.inv)
    }
}

/// A running sum of vectors, folded into f64 every `SHORT_FOLD` additions so f32 partials stay
/// short.
pub(super) struct Acc<V: Vector> {
    v: V,
    steps: usize,
    total: f64,
}

impl<V: Vector> Acc<V> {
    #[inline(always)]
    pub(super) fn new() -> Self {
        Acc {
            v: V::splat(V::Elem::ZERO),
            steps: 0,
            total: 0.0,
        }
    }

    #[inline(always)]
    pub(super) fn add(&mut self, x: V) {
        self.v = self.v.add(x);
        self.steps += 1;
        if self.steps == SHORT_FOLD {
            self.total += self.v.reduce_add().to_f64();
            self.v = V::splat(V::Elem::ZERO);
            self.steps = 0;
        }
    }

    #[inline(always)]
    pub(super) fn value(&self) -> f64 {
        self.total + self.v.reduce_add().to_f64()
    }
}

/// x' = s * tanh(x / s) into `y` (which may be `x`).
#[inline(always)]
pub(super) unsafe fn cap_into<V: Vector>(
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
    s: V::Elem,
) {
    let s = V::splat(s);
    map_elements::<V>(
        x,
        y,
        len,
        #[inline(always)]
        |v| tanh(v.div(s)).mul(s),
    );
}

/// StableMax's phi(x) = log s(x) = sign(x) log1p(|x|), on the vector log1p.
#[inline(always)]
fn phi<V: Vector>(x: V) -> V {
    let zero = V::splat(V::Elem::ZERO);
    let (hi, lo) = V::Elem::log1p_parts(x.max(zero.sub(x)));
    let l = hi.add(lo);
    // -l where x < 0 (exact; -inf stays -inf).
    l.sub(l.add(l).keep(x.lt(zero)))
}

/// The logits the loss sees, z = cap(x / temperature) (StableMax: phi of it), into `y` (which
/// may be `x`); returns `y`, or `x` itself where the rule changes nothing.
#[inline(always)]
pub(super) unsafe fn transform_into<V: Vector>(
    rule: &Rule<V::Elem>,
    x: *const V::Elem,
    y: *mut V::Elem,
    len: usize,
) -> *const V::Elem {
    if rule.stable {
        let k = V::splat(rule.inv_t.unwrap_or(V::Elem::ONE));
        let cap = rule.cap.map(|c| (V::splat(c), V::splat(V::Elem::ONE / c)));
        map_elements::<V>(
            x,
            y,
            len,
            #[inline(always)]
            |v| {
                let v = v.mul(k);
                phi(match cap {
                    Some((s, inv_s)) => tanh(v.mul(inv_s)).mul(s),
                    None => v,
                })
            },
        );
        return y;
    }
    match (rule.inv_t, rule.cap) {
        (None, None) => x,
        (None, Some(c)) => {
            cap_into::<V>(x, y, len, c);
            y
        }
        (Some(k), None) => {
            let k = V::splat(k);
            map_elements::<V>(
                x,
                y,
                len,
                #[inline(always)]
                |v| v.mul(k),
            );
            y
        }
        (Some(k), Some(c)) => {
            let (k, s, inv_s) = (V::splat(k), V::splat(c), V::splat(V::Elem::ONE / c));
            map_elements::<V>(
                x,
                y,
                len,
                #[inline(always)]
                |v| tanh(v.mul(k).mul(inv_s)).mul(s),
            );
            y
        }
    }
}

/// The loop-invariant state of [`pass2`].
struct Pass2<V: Vector> {
    x: *const V::Elem,
    w: *const V::Elem,
    t: *const V::Elem,
    grad: *mut V::Elem,
    /// r = hi + lo, so r - x = (hi - x) + lo is exact where x is close to r.
    hi: V,
    lo: V,
    a: V,
    b: V,
    ct: V,
    inv_cap: Option<V>,
    /// StableMax: x is phi, the gradient carries exp(-|phi|) (see `rule::chain`).
    stable: bool,
    probs: Probs<V>,
    /// `Rule::unit`: the scale of the weighted sums' terms.
    unit: V,
    /// float32's largest finite value (a bound on any r - x the fast path sees where p > 0):
    /// r - x = inf (x = -inf) times p = 0 adds 0 to the entropy.
    big: V,
}

impl<V: Vector> Pass2<V> {
    /// Elements [i, i + n), n <= LANES.
    #[inline(always)]
    unsafe fn step<const GRAD: bool, const STATS: bool>(
        &self,
        i: usize,
        n: usize,
        [s, st, h]: &mut [Acc<V>; 3],
    ) {
        let one = V::splat(V::Elem::ONE);
        let xv = load_n::<V>(self.x.add(i), n);
        // Padding lanes get weight 0, so they add nothing.
        let wv = if !self.w.is_null() {
            load_n::<V>(self.w.add(i), n)
        } else if n == V::LANES {
            one
        } else {
            let ones = [V::Elem::ONE; MAX_LANES];
            load_n::<V>(ones.as_ptr(), n)
        };
        let d = self.hi.sub(xv).add(self.lo);
        // Scaled before the weight: w_c (r - x_c) may exceed the largest float where the loss
        // does not (x_c near -max, w_c > 1).
        let wd = wv.mul(d.mul(self.unit));
        s.add(wd);
        let tv = if self.t.is_null() {
            None
        } else {
            Some(load_n::<V>(self.t.add(i), n))
        };
        if let Some(tv) = tv {
            st.add(wd.mul(tv));
        }
        let p = if GRAD || STATS {
            self.probs.of(xv)
        } else {
            V::splat(V::Elem::ZERO)
        };
        if STATS {
            // Padding lanes read as 0 (x = 0): their p is not 0, so keep them out.
            h.add(keep_lanes::<V>(p, n).mul(d.min(self.big)));
        }
        if GRAD {
            let off = match tv {
                Some(tv) => tv.mul_add(self.ct, self.b),
                None => self.b,
            };
            let mut g = p.mul(self.a).sub(wv.mul(off));
            if self.stable {
                let zero = V::splat(V::Elem::ZERO);
                let e = exp(zero.sub(xv.max(zero.sub(xv))));
                g = g.mul(e);
                if let Some(ic) = self.inv_cap {
                    // |x'| = 1 / e - 1 (the cap's factor squares it: its sign does not matter).
                    let u = one.div(e).sub(one).mul(ic);
                    g = g.mul(one.sub(u.mul(u)));
                }
            } else if let Some(ic) = self.inv_cap {
                let u = xv.mul(ic);
                g = g.mul(one.sub(u.mul(u)));
            }
            store_n(g, self.grad.add(i), n);
        }
    }
}

/// The sums pass 2 returns: with r = lse, `smooth` = sum_c w_c (r - x_c), `soft` = sum_c w_c
/// t_c (r - x_c) (0 without `t`), `entropy` = sum_c p_c (r - x_c) (with STATS, else 0).
#[derive(Clone, Copy, Default)]
pub(super) struct Sums {
    pub(super) smooth: f64,
    pub(super) soft: f64,
    pub(super) entropy: f64,
}

/// Pass 2 over x[..len] (a row, or one vocabulary block of it), fast path.
///
/// Returns its [`Sums`] (the smoothing terms accumulated at `unit`, see `Rule::unit`). With
/// GRAD, also writes grad_c = (p_c * a - w_c * (b + ct * t_c)) * cap'(x_c), p_c from `probs`.
/// Null `w` means all ones, null `t` all zeros. `grad` may be `x`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pass2<V: Vector, const GRAD: bool, const STATS: bool>(
    x: *const V::Elem,
    (w, t): (*const V::Elem, *const V::Elem),
    len: usize,
    lse: Lse,
    probs: &Probs<V>,
    coef: &Coef,
    (cap, unit): (Option<V::Elem>, f64),
    grad: *mut V::Elem,
) -> Sums {
    let hi = V::Elem::from_f64(lse.hi);
    let p = Pass2 {
        x,
        w,
        t,
        grad,
        hi: V::splat(hi),
        lo: V::splat(V::Elem::from_f64((lse.hi - hi.to_f64()) + lse.lo)),
        a: V::splat(V::Elem::from_f64(coef.a)),
        b: V::splat(V::Elem::from_f64(coef.b)),
        ct: V::splat(V::Elem::from_f64(coef.ct)),
        inv_cap: match cap {
            Some(s) => Some(V::splat(V::Elem::ONE / s)),
            None => None,
        },
        stable: coef.stable,
        probs: *probs,
        unit: V::splat(V::Elem::from_f64(unit)),
        big: V::splat(V::Elem::from_f64(f32::MAX as f64)),
    };
    let mut acc = [Acc::<V>::new(), Acc::<V>::new(), Acc::<V>::new()];
    let mut i = 0;
    while i + V::LANES <= len {
        p.step::<GRAD, STATS>(i, V::LANES, &mut acc);
        i += V::LANES;
    }
    if i < len {
        p.step::<GRAD, STATS>(i, len - i, &mut acc);
    }
    Sums {
        smooth: acc[0].value() / unit,
        soft: acc[1].value() / unit,
        entropy: acc[2].value(),
    }
}

/// [`pass2`] for rows on the exact path: scalar f64, p_c = exp(x_c - lse); every sum in f64.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pass2_exact<T: Float, const GRAD: bool>(
    x: *const T,
    (w, t): (*const T, *const T),
    len: usize,
    lse: Lse,
    coef: &Coef,
    cap: Option<T>,
    grad: *mut T,
) -> Sums {
    let mut sums = Sums::default();
    for c in 0..len {
        let xv = (*x.add(c)).to_f64();
        let wv = if w.is_null() {
            1.0
        } else {
            (*w.add(c)).to_f64()
        };
        let tv = if t.is_null() {
            0.0
        } else {
            (*t.add(c)).to_f64()
        };
        let d = minus(lse, xv);
        let wd = wv * d;
        sums.smooth += wd;
        if !t.is_null() {
            sums.soft += wd * tv;
        }
        let p = (-d).exp();
        if p > 0.0 {
            sums.entropy += p * d;
        }
        if GRAD {
            let g = p * coef.a - wv * (coef.b + coef.ct * tv);
            let g = g * chain(xv, cap.map(T::to_f64), coef.stable);
            *grad.add(c) = T::from_f64(g);
        }
    }
    sums
}

/// What one row is scored against.
#[derive(Clone, Copy)]
enum RowTarget<T> {
    Ignored,
    Class(i64),
    Probs(*const T),
}

/// One whole row: returns its loss (unweighted by its token weight) and, with STATS, its
/// statistics; with GRAD, writes its gradient (scaled by `s`) to `grad`. With a temperature or a
/// softcap the transformed logits go to `buf` first (it may be `x` or `grad`); without GRAD,
/// STATS uses `buf` for the exp terms.
///
/// # Safety
/// `x` readable, `grad` (with GRAD) and `buf` (with a temperature or softcap, or STATS without
/// GRAD) writable for `len` elements; a `Probs` target readable for `len`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn full_row<T: Float, V: Vector<Elem = T>, const GRAD: bool, const STATS: bool>(
    rule: &Rule<T>,
    x: *const T,
    len: usize,
    target: RowTarget<T>,
    s: f64,
    grad: *mut T,
    buf: *mut T,
) -> (f64, RowStats) {
    let nan_row = |lse: f64, correct: bool| {
        if GRAD {
            fill(grad, len, T::NAN);
        }
        let stats = RowStats {
            lse,
            entropy: f64::NAN,
            correct,
        };
        (f64::NAN, stats)
    };
    let (y, t) = match target {
        RowTarget::Ignored => {
            if GRAD {
                fill(grad, len, T::ZERO);
            }
            return (0.0, RowStats::IGNORED);
        }
        // Checked before the kernels ran; checked again so memory safety never depends on it.
        RowTarget::Class(y) if y < 0 || y as u64 >= len as u64 => return nan_row(f64::NAN, false),
        RowTarget::Class(y) => (y as usize, std::ptr::null()),
        RowTarget::Probs(t) => (0, t),
    };
    let hard = t.is_null();
    if rule.stable && hard && rule.eps == 0.0 && rule.cap.is_none() && !STATS {
        if let Some(row) = super::stable::direct_row::<V, GRAD>(rule, x, len, y, s, grad) {
            return row;
        }
    }
    let raw = x;
    // The plain path's pass 2 (below) reads the logits as given and checks the argmax there.
    let terms = if GRAD { grad } else { buf };
    let plain = (GRAD || STATS)
        && hard
        && rule.eps == 0.0
        && rule.cap.is_none()
        && !rule.stable
        && len <= IN_CACHE_MAX_LEN
        && !(STATS && std::ptr::eq(terms, raw));
    // Elsewhere on the logits as given, before anything may overwrite them (in place).
    let correct = STATS
        && !plain
        && if hard {
            argmax_is::<V>(x, len, y)
        } else {
            argmax::<V>(x, len) == argmax::<V>(t, len)
        };
    // The plain path's rows that turn out exact: the logits as given are still there.
    let late_correct = || STATS && (correct || (plain && argmax_is::<V>(raw, len, y)));
    // The plain path folds 1 / T into its passes: the divided logits are never written (but for
    // a row that turns out exact).
    let fold_t = if plain { rule.inv_t } else { None };
    let mut x = match fold_t {
        Some(_) => x,
        None => transform_into::<V>(rule, x, buf, len),
    };
    let w = rule.weight.0 as *const T;
    // Read before pass 2 may overwrite it (in place).
    let x_y = match fold_t {
        _ if !hard => 0.0,
        Some(k) => (*x.add(y) * k).to_f64(),
        None => (*x.add(y)).to_f64(),
    };
    let w_y = if hard { rule.weight_of(y) } else { 0.0 };

    // The common case: pass 1 leaves exp(z) * 2^-N in `terms` (the gradient, or the scratch row
    // for the statistics alone), pass 2 only scales them. With STATS pass 2 also reads the logits
    // as given for the entropy (z recomputed from them), so they must not be `terms` (in place).
    let row = if plain {
        let sum = match fold_t {
            Some(k) => sum_in_cache_scaled::<V>(x, len, k, Some(terms)),
            None => sum_in_cache::<V>(x, len, Some(terms)),
        };
        if fold_t.is_some() && sum.usable::<T>().is_none() {
            // The exact path reads the divided logits (a NaN row in place: NaN either way).
            x = transform_into::<V>(rule, raw, buf, len);
        }
        RowLse::from_sum(sum, x, len)
    } else {
        RowLse::of::<V>(x, len)
    };
    // Fast rows: the log-sum-exp made accurate where the target dominates (a loss near 0).
    let lse = match row {
        RowLse::Fast(e) if plain => refined_lse_from_terms::<V>(terms, len, e),
        RowLse::Fast(e) => refined_lse::<V>(x, len, e),
        other => match other.lse() {
            Some(l) => l,
            None => return nan_row(other.ln_sum(), late_correct()),
        },
    };
    let sum_wt = if hard { w_y } else { dot::<V>(t, w, len) };
    let coef = rule.coef(lse.value(), sum_wt, s);
    let mut fused_correct = None;
    let sums = match row {
        RowLse::Fast(e) if plain && STATS => {
            let k = T::from_f64(coef.a / e.m);
            let (h, top) = scale_terms::<V, GRAD>(terms, raw, (len, y), lse, rule.inv_t, k);
            fused_correct = top;
            Sums {
                entropy: h / e.m,
                ..Sums::default()
            }
        }
        RowLse::Fast(e) if plain => {
            let k = V::splat(T::from_f64(coef.a / e.m));
            map_elements::<V>(
                grad,
                grad,
                len,
                #[inline(always)]
                |v| v.mul(k),
            );
            Sums::default()
        }
        _ if !(GRAD || STATS || rule.eps > 0.0 || !hard) => Sums::default(),
        RowLse::Fast(e) => {
            let probs = Probs::<V>::new(e);
            let (wt, cu) = ((w, t), (rule.cap, rule.unit));
            pass2::<V, GRAD, STATS>(x, wt, len, lse, &probs, &coef, cu, grad)
        }
        _ => pass2_exact::<T, GRAD>(x, (w, t), len, lse, &coef, rule.cap, grad),
    };
    if GRAD && hard {
        *grad.add(y) = T::from_f64(rule.target_grad(x_y, lse, &coef, w_y));
    }
    let target_term = if hard {
        w_y * minus(lse, x_y)
    } else {
        sums.soft
    };
    let stats = RowStats {
        lse: lse.value(),
        entropy: sums.entropy,
        correct: fused_correct.unwrap_or_else(late_correct),
    };
    (rule.loss(lse.value(), target_term, sums.smooth), stats)
}

#[derive(Clone, Copy)]
pub(super) enum Targets<'a, T> {
    Classes(&'a [i64], i64),
    Probs(Ptr<T>),
}

impl<T: Copy> Targets<'_, T> {
    /// Row `r`'s target; `o` is the row's element offset.
    fn row(&self, r: usize, o: usize) -> RowTarget<T> {
        match self {
            Targets::Classes(t, ignore) if t[r] == *ignore => RowTarget::Ignored,
            Targets::Classes(t, _) => RowTarget::Class(t[r]),
            Targets::Probs(p) => RowTarget::Probs(p.at(o)),
        }
    }
}

/// The per-row outputs of [`run_rows`], indexed by the row's global index: losses (reduction
/// None, else null) and statistics.
#[derive(Clone, Copy)]
pub(super) struct RowOutputs<T> {
    pub(super) losses: Ptr<T>,
    pub(super) stats: StatsOut<T>,
}

/// A block of consecutive rows on one thread; returns their summed loss.
struct RowBlock<'a, T: Float> {
    rule: &'a Rule<T>,
    x: Ptr<T>,
    /// Null for the loss alone.
    grad: Ptr<T>,
    targets: Targets<'a, T>,
    scale: Scale<'a, T>,
    out: RowOutputs<T>,
    len: usize,
    rows: std::ops::Range<usize>,
    /// Row index of the first row of `x` in `targets`, `scale` and `out` (blocks of the linear op).
    row0: usize,
}

impl<T: Float> RowBlock<'_, T> {
    #[inline(always)]
    fn rows<V: Vector<Elem = T>, const STATS: bool>(self) -> f64 {
        let len = self.len;
        let rule = self.rule;
        let with_grad = !self.grad.0.is_null();
        // The transformed logits (or the statistics' exp terms) need somewhere to live when there
        // is no gradient buffer.
        let transformed = rule.cap.is_some() || rule.inv_t.is_some() || rule.stable;
        let mut scratch = if (STATS || transformed) && !with_grad {
            vec![T::ZERO; len]
        } else {
            Vec::new()
        };
        let mut total = 0.0;
        for r in self.rows {
            let o = r * len;
            let g = self.row0 + r;
            let target = self.targets.row(g, o);
            let tw = rule.token_weight_of(g);
            let (l, stats) = unsafe {
                if with_grad {
                    let grad = self.grad.at(o);
                    let s = self.scale.of(g) * tw * rule.grad_t;
                    full_row::<T, V, true, STATS>(rule, self.x.at(o), len, target, s, grad, grad)
                } else {
                    let buf = scratch.as_mut_ptr();
                    let null = std::ptr::null_mut();
                    full_row::<T, V, false, STATS>(rule, self.x.at(o), len, target, 0.0, null, buf)
                }
            };
            // Ignored rows stay 0 whatever their token weight.
            let l = if tw == 1.0 || l == 0.0 { l } else { l * tw };
            if !self.out.losses.0.is_null() {
                unsafe { *self.out.losses.at(g) = T::from_f64(l) };
            }
            if STATS {
                unsafe { self.out.stats.write(g, stats) };
            }
            total += l;
        }
        total
    }
}

impl<T: Float> Kernel<T> for RowBlock<'_, T> {
    type Output = f64;
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) -> f64 {
        if self.out.stats.wanted() {
            self.rows::<V, true>()
        } else {
            self.rows::<V, false>()
        }
    }
}

/// Runs every row of `x` (rows x len, contiguous) in the driver's fixed blocks; returns the loss
/// total, the block sums added in order.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_rows<T: Float>(
    rule: &Rule<T>,
    x: Ptr<T>,
    grad: Ptr<T>,
    targets: Targets<'_, T>,
    scale: Scale<'_, T>,
    out: RowOutputs<T>,
    rows: usize,
    len: usize,
    row0: usize,
) -> f64 {
    driver::sum_fixed_row_blocks(rows, len, |rows| {
        dispatch(RowBlock {
            rule,
            x,
            grad,
            targets,
            scale,
            out,
            len,
            rows,
            row0,
        })
    })
}
