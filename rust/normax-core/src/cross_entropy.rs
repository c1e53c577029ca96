//! Cross-entropy: loss and gradient fused over rows of logits, and a linear cross-entropy that
//! computes the logits block by block from the hidden states and never holds all of them.
//!
//! Per row with logits x (after the optional softcap x -> s * tanh(x / s)), lse = log-sum-exp(x),
//! class weights w (ones without), smoothing eps, z-loss z and C classes:
//!
//! ```text
//! L      = (1 - eps) * w_y * (lse - x_y) + eps / C * sum_c w_c (lse - x_c) + z * lse^2
//! dL/dx_c = p_c * A - w_c * (eps / C + (1 - eps) * t_c),     p = softmax(x)
//! A      = (1 - eps) * sum_c w_c t_c + eps / C * sum_c w_c + 2 z lse
//! ```
//!
//! with t the one-hot target (hard targets) or the target probabilities (soft targets, whose first
//! loss term is (1 - eps) * sum_c w_c t_c (lse - x_c)). With a softcap the gradient is multiplied
//! by 1 - (x / s)^2 (x capped). These are torch.nn.functional.cross_entropy's definitions.
//!
//! Pass 1 is the sum-of-exponentials machinery of [`crate::lse`] (exact f64 path for rows with NaN,
//! inf or huge values). Pass 2 writes the gradient and accumulates the sums that need lse; the
//! common case (hard targets, no smoothing, no softcap) instead keeps pass 1's exp terms in the
//! gradient buffer and only scales them, as the in-cache softmax does. Rows run in parallel in
//! fixed blocks whose loss sums add up in f64 in block order: the same result for any thread count.

use crate::driver::{Ptr, GRAIN};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::lse::{
    exact_stats, refined_lse, refined_lse_from_terms, sum_in_cache, ExpSum, Lse, RowSum, ScaledExp,
    FOLD, IN_CACHE_MAX_LEN,
};
use crate::rows::{load_n, store_n};
use crate::simd::{tanh, Vector, MAX_LANES};
use crate::softmax::{dot, map_elements, row_sum, Algorithm};
use crate::threads;
use crate::Error;
use std::f64::consts::LN_2;

/// How the per-row losses combine, as torch's `reduction`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    None,
    Sum,
    Mean,
}

impl Reduction {
    pub fn parse(name: &str) -> Result<Reduction, Error> {
        match name {
            "none" => Ok(Reduction::None),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            _ => Err(Error::Value(format!(
                "reduction must be 'mean', 'sum' or 'none', got {name:?}"
            ))),
        }
    }
}

/// What each row is scored against.
#[derive(Clone, Copy, Debug)]
pub enum Target<'a, T> {
    /// One class index per row; rows equal to `ignore_index` are left out.
    Classes(&'a [i64]),
    /// Class probabilities, rows x classes.
    Probs(&'a [T]),
}

/// The loss options, named and defaulted as in torch.nn.functional.cross_entropy.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a, T> {
    /// One weight per class.
    pub weight: Option<&'a [T]>,
    pub ignore_index: i64,
    pub reduction: Reduction,
    pub label_smoothing: f64,
    /// PaLM's auxiliary loss: z_loss * lse^2 per row not ignored.
    pub z_loss: f64,
    /// Gemma 2's logit cap: logits become softcap * tanh(logits / softcap).
    pub softcap: Option<f64>,
}

impl<T> Default for Options<'_, T> {
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

/// d(loss)/d(output) that the gradient is scaled by: a number, or one per row for reduction None.
#[derive(Clone, Copy, Debug)]
pub enum GradOutput<'a, T> {
    Scalar(f64),
    Rows(&'a [T]),
}

fn check_options<T: Float>(o: &Options<T>, classes: usize) -> Result<(), Error> {
    if !(0.0..=1.0).contains(&o.label_smoothing) {
        return Err(Error::Value(format!(
            "label_smoothing must be between 0 and 1, got {}",
            o.label_smoothing
        )));
    }
    if !(o.z_loss >= 0.0 && o.z_loss.is_finite()) {
        return Err(Error::Value(format!(
            "z_loss must be a finite number >= 0, got {}",
            o.z_loss
        )));
    }
    if let Some(s) = o.softcap {
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::Value(format!(
                "softcap must be a finite number > 0, got {s}"
            )));
        }
    }
    if let Some(w) = o.weight {
        if w.len() != classes {
            return Err(Error::Value(format!(
                "weight has {} elements; expected one per class ({classes})",
                w.len()
            )));
        }
    }
    Ok(())
}

/// Checks every class index; returns the mean's denominator, the summed weight of the rows kept.
fn check_classes<T: Float>(
    target: &[i64],
    classes: usize,
    ignore: i64,
    weight: Option<&[T]>,
) -> Result<f64, Error> {
    let mut total = 0.0;
    for (i, &y) in target.iter().enumerate() {
        if y == ignore {
            continue;
        }
        if y < 0 || y as u64 >= classes as u64 {
            return Err(Error::Index(format!(
                "target {y} at position {i} is out of range for {classes} classes \
                 (and is not ignore_index = {ignore})"
            )));
        }
        total += weight.map_or(1.0, |w| w[y as usize].to_f64());
    }
    Ok(total)
}

/// The per-row gradient scale: grad_output, divided by the denominator for a mean.
#[derive(Clone, Copy)]
enum Scale<'a, T> {
    All(f64),
    Rows(&'a [T]),
}

impl<T: Float> Scale<'_, T> {
    fn of(&self, row: usize) -> f64 {
        match self {
            Scale::All(s) => *s,
            Scale::Rows(g) => g[row].to_f64(),
        }
    }
}

fn scale_for<'a, T: Float>(
    reduction: Reduction,
    grad_output: GradOutput<'a, T>,
    denom: f64,
    rows: usize,
) -> Result<Scale<'a, T>, Error> {
    match (reduction, grad_output) {
        (Reduction::Mean, GradOutput::Scalar(g)) => Ok(Scale::All(g / denom)),
        (_, GradOutput::Scalar(g)) => Ok(Scale::All(g)),
        (Reduction::None, GradOutput::Rows(g)) if g.len() == rows => Ok(Scale::Rows(g)),
        (Reduction::None, GradOutput::Rows(g)) => Err(Error::Value(format!(
            "grad_output has {} elements; expected one per row ({rows})",
            g.len()
        ))),
        (_, GradOutput::Rows(_)) => Err(Error::Value(
            "grad_output must be a number unless reduction is 'none'".into(),
        )),
    }
}

/// The per-call constants of the loss.
struct Rule<T> {
    eps: f64,
    z: f64,
    /// C in eps / C: the whole vocabulary, also when a row is processed block by block.
    classes: usize,
    cap: Option<T>,
    /// Class weights; null for all ones.
    weight: Ptr<T>,
    /// sum_c w_c.
    w_sum: f64,
}

/// Gradient coefficients of one row: grad_c = (p_c * a - w_c * (b + ct * t_c)) * cap'(x_c).
#[derive(Clone, Copy)]
struct Coef {
    a: f64,
    b: f64,
    ct: f64,
}

impl<T: Float> Rule<T> {
    fn new(o: &Options<'_, T>, classes: usize) -> Rule<T> {
        Rule {
            eps: o.label_smoothing,
            z: o.z_loss,
            classes,
            cap: o.softcap.map(T::from_f64),
            weight: Ptr::from_const(o.weight.map_or(std::ptr::null(), |w| w.as_ptr())),
            w_sum: o
                .weight
                .map_or(classes as f64, |w| w.iter().map(|v| v.to_f64()).sum()),
        }
    }

    /// `sum_wt` = sum_c w_c t_c (w_y for a hard target); `s` the row's gradient scale.
    fn coef(&self, lse: f64, sum_wt: f64, s: f64) -> Coef {
        let mut a = (1.0 - self.eps) * sum_wt;
        if self.eps > 0.0 {
            a += self.eps * self.w_sum / self.classes as f64;
        }
        if self.z > 0.0 {
            a += 2.0 * self.z * lse;
        }
        Coef {
            a: s * a,
            b: s * self.eps / self.classes as f64,
            ct: s * (1.0 - self.eps),
        }
    }

    /// The row's loss from its target term (w_y (lse - x_y), or sum_c w_c t_c (lse - x_c)) and
    /// its smoothing sum sum_c w_c (lse - x_c). Terms that are switched off are left out, so an
    /// infinite sum does not turn into NaN by a zero factor.
    fn loss(&self, lse: f64, target_term: f64, smooth: f64) -> f64 {
        let mut l = (1.0 - self.eps) * target_term;
        if self.eps > 0.0 {
            l += self.eps / self.classes as f64 * smooth;
        }
        if self.z > 0.0 {
            l += self.z * lse * lse;
        }
        l
    }

    /// The gradient at a hard target's own class, in f64 (x_y capped).
    fn target_grad(&self, x_y: f64, lse: Lse, c: &Coef, w_y: f64) -> f64 {
        let p = (-minus(lse, x_y)).exp();
        let g = p * c.a - w_y * (c.b + c.ct);
        match self.cap {
            Some(s) => {
                let u = x_y / s.to_f64();
                g * (1.0 - u * u)
            }
            None => g,
        }
    }

    fn weight_of(&self, class: usize) -> f64 {
        if self.weight.0.is_null() {
            1.0
        } else {
            unsafe { (*self.weight.at(class)).to_f64() }
        }
    }
}

/// lse - x, the large parts cancelled first: exact where x is hi (a row's max, or its rounding).
fn minus(l: Lse, x: f64) -> f64 {
    (l.hi - x) + l.lo
}

/// A row's (or a block of a row's) sum of exponentials, combinable across vocabulary blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum RowLse {
    /// From the two-pass / in-cache machinery: every element within the fast range.
    Fast(ExpSum),
    /// From the exact path: sum = sum * e^max in f64; max = -inf when every element is -inf.
    Exact { max: f64, sum: f64 },
    /// NaN or +inf somewhere: the row's loss and gradient are NaN.
    Nan,
}

impl RowLse {
    const EMPTY: RowLse = RowLse::Fast(ExpSum::EMPTY);

    fn from_sum<T: Float>(s: RowSum, x: *const T, len: usize) -> RowLse {
        match s.usable::<T>() {
            Some(e) => RowLse::Fast(e),
            None => {
                let st = unsafe { exact_stats(x, len) };
                if st.nan || st.max == f64::INFINITY {
                    RowLse::Nan
                } else if st.max == f64::NEG_INFINITY {
                    RowLse::Exact {
                        max: f64::NEG_INFINITY,
                        sum: 0.0,
                    }
                } else {
                    RowLse::Exact {
                        max: st.max,
                        sum: st.sum,
                    }
                }
            }
        }
    }

    /// # Safety
    /// `x` readable for `len` elements.
    #[inline(always)]
    unsafe fn of<V: Vector>(x: *const V::Elem, len: usize) -> RowLse {
        RowLse::from_sum(row_sum::<V>(x, len, Algorithm::Auto), x, len)
    }

    /// (M, s) with the sum = s * e^M; M = -inf when empty.
    fn scaled(self) -> (f64, f64) {
        match self {
            RowLse::Fast(e) if e.m == 0.0 => (f64::NEG_INFINITY, 0.0),
            RowLse::Fast(e) => (e.n * LN_2, e.m),
            RowLse::Exact { max, sum } => (max, sum),
            RowLse::Nan => (f64::NAN, f64::NAN),
        }
    }

    fn combine(self, o: RowLse) -> RowLse {
        match (self, o) {
            (RowLse::Nan, _) | (_, RowLse::Nan) => RowLse::Nan,
            (RowLse::Fast(a), RowLse::Fast(b)) => RowLse::Fast(a.combine(b)),
            (a, b) => {
                let ((am, asum), (bm, bsum)) = (a.scaled(), b.scaled());
                if am == f64::NEG_INFINITY {
                    return RowLse::Exact { max: bm, sum: bsum };
                }
                if bm == f64::NEG_INFINITY {
                    return RowLse::Exact { max: am, sum: asum };
                }
                let m = am.max(bm);
                RowLse::Exact {
                    max: m,
                    sum: asum * (am - m).exp() + bsum * (bm - m).exp(),
                }
            }
        }
    }

    /// log of the sum so far: -inf when empty, NaN for a NaN row.
    fn ln_sum(self) -> f64 {
        let (m, s) = self.scaled();
        if m == f64::NEG_INFINITY {
            m
        } else {
            m + s.ln()
        }
    }

    /// The row's log-sum-exp, or None where its loss and gradient are NaN (NaN, +inf, or nothing
    /// but -inf: torch's log_softmax is NaN there too). The exact path keeps the max apart, so
    /// lse - x stays exact next to huge values (a row of equal values near -1e30 gives log C).
    fn lse(self) -> Option<Lse> {
        match self {
            RowLse::Nan => None,
            RowLse::Fast(e) if e.m > 0.0 => Some(Lse {
                hi: e.ln(),
                lo: 0.0,
            }),
            RowLse::Exact { max, sum } if max > f64::NEG_INFINITY => Some(Lse {
                hi: max,
                lo: sum.ln(),
            }),
            _ => None,
        }
    }
}

/// softmax(x) = exp(x) * 2^-n / m for x of a fast-path row whose sum of exponentials is m * 2^n.
#[derive(Clone, Copy)]
struct Probs<V> {
    scaled: ScaledExp<V>,
    inv: V,
}

impl<V: Vector> Probs<V> {
    #[inline(always)]
    fn new(s: ExpSum) -> Self {
        Probs {
            scaled: ScaledExp::new(V::Elem::from_f64(s.n)),
            inv: V::splat(V::Elem::from_f64(1.0 / s.m)),
        }
    }

    #[inline(always)]
    fn of(&self, x: V) -> V {
        self.scaled.apply(x).mul(self.inv)
    }
}

/// A running sum of vectors, folded into f64 every FOLD additions so f32 partials stay short.
struct Acc<V: Vector> {
    v: V,
    steps: usize,
    total: f64,
}

impl<V: Vector> Acc<V> {
    #[inline(always)]
    fn new() -> Self {
        Acc {
            v: V::splat(V::Elem::ZERO),
            steps: 0,
            total: 0.0,
        }
    }

    #[inline(always)]
    fn add(&mut self, x: V) {
        self.v = self.v.add(x);
        self.steps += 1;
        if self.steps == FOLD {
            self.total += self.v.reduce_add().to_f64();
            self.v = V::splat(V::Elem::ZERO);
            self.steps = 0;
        }
    }

    #[inline(always)]
    fn value(&self) -> f64 {
        self.total + self.v.reduce_add().to_f64()
    }
}

/// x' = s * tanh(x / s) into `y` (which may be `x`).
#[inline(always)]
unsafe fn cap_into<V: Vector>(x: *const V::Elem, y: *mut V::Elem, len: usize, s: V::Elem) {
    let s = V::splat(s);
    map_elements::<V>(
        x,
        y,
        len,
        #[inline(always)]
        |v| tanh(v.div(s)).mul(s),
    );
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
    probs: Probs<V>,
}

impl<V: Vector> Pass2<V> {
    /// Elements [i, i + n), n <= LANES.
    #[inline(always)]
    unsafe fn step<const GRAD: bool>(&self, i: usize, n: usize, s: &mut Acc<V>, st: &mut Acc<V>) {
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
        let wd = wv.mul(self.hi.sub(xv).add(self.lo));
        s.add(wd);
        let tv = if self.t.is_null() {
            None
        } else {
            Some(load_n::<V>(self.t.add(i), n))
        };
        if let Some(tv) = tv {
            st.add(wd.mul(tv));
        }
        if GRAD {
            let off = match tv {
                Some(tv) => tv.mul_add(self.ct, self.b),
                None => self.b,
            };
            let mut g = self.probs.of(xv).mul(self.a).sub(wv.mul(off));
            if let Some(ic) = self.inv_cap {
                let u = xv.mul(ic);
                g = g.mul(one.sub(u.mul(u)));
            }
            store_n(g, self.grad.add(i), n);
        }
    }
}

/// Pass 2 over x[..len] (a row, or one vocabulary block of it), fast path.
///
/// Returns (sum_c w_c (r - x_c), sum_c w_c t_c (r - x_c)) with r = `lse` (the second is 0 without
/// `t`). With GRAD, also writes grad_c = (p_c * a - w_c * (b + ct * t_c)) * cap'(x_c), p_c from
/// `probs`. Null `w` means all ones, null `t` all zeros. `grad` may be `x`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pass2<V: Vector, const GRAD: bool>(
    x: *const V::Elem,
    w: *const V::Elem,
    t: *const V::Elem,
    len: usize,
    lse: Lse,
    probs: &Probs<V>,
    coef: &Coef,
    cap: Option<V::Elem>,
    grad: *mut V::Elem,
) -> (f64, f64) {
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
        probs: *probs,
    };
    let (mut acc_s, mut acc_t) = (Acc::<V>::new(), Acc::<V>::new());
    let mut i = 0;
    while i + V::LANES <= len {
        p.step::<GRAD>(i, V::LANES, &mut acc_s, &mut acc_t);
        i += V::LANES;
    }
    if i < len {
        p.step::<GRAD>(i, len - i, &mut acc_s, &mut acc_t);
    }
    (acc_s.value(), acc_t.value())
}

/// [`pass2`] for rows on the exact path: scalar f64, p_c = exp(x_c - lse).
#[allow(clippy::too_many_arguments)]
unsafe fn pass2_exact<T: Float, const GRAD: bool>(
    x: *const T,
    w: *const T,
    t: *const T,
    len: usize,
    lse: Lse,
    coef: &Coef,
    cap: Option<T>,
    grad: *mut T,
) -> (f64, f64) {
    let (mut acc_s, mut acc_t) = (0.0, 0.0);
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
        acc_s += wd;
        acc_t += wd * tv;
        if GRAD {
            let mut g = (-d).exp() * coef.a - wv * (coef.b + coef.ct * tv);
            if let Some(s) = cap {
                let u = xv / s.to_f64();
                g *= 1.0 - u * u;
            }
            *grad.add(c) = T::from_f64(g);
        }
    }
    (acc_s, if t.is_null() { 0.0 } else { acc_t })
}

unsafe fn fill<T: Float>(p: *mut T, len: usize, v: T) {
    std::slice::from_raw_parts_mut(p, len).fill(v);
}

/// What one row is scored against.
#[derive(Clone, Copy)]
enum RowTarget<T> {
    Ignored,
    Class(i64),
    Probs(*const T),
}

/// One whole row: returns its loss and, with GRAD, writes its gradient (scaled by `s`) to `grad`.
/// With a softcap the capped logits go to `buf` first (it may be `x` or `grad`).
///
/// # Safety
/// `x` readable, `grad` (with GRAD) and `buf` (with a softcap) writable for `len` elements; a
/// `Probs` target readable for `len`.
#[inline(always)]
unsafe fn full_row<T: Float, V: Vector<Elem = T>, const GRAD: bool>(
    rule: &Rule<T>,
    x: *const T,
    len: usize,
    target: RowTarget<T>,
    s: f64,
    grad: *mut T,
    buf: *mut T,
) -> f64 {
    let nan_row = || {
        if GRAD {
            fill(grad, len, T::NAN);
        }
        f64::NAN
    };
    let (y, t) = match target {
        RowTarget::Ignored => {
            if GRAD {
                fill(grad, len, T::ZERO);
            }
            return 0.0;
        }
        // Checked before the kernels ran; checked again so memory safety never depends on it.
        RowTarget::Class(y) if y < 0 || y as u64 >= len as u64 => return nan_row(),
        RowTarget::Class(y) => (y as usize, std::ptr::null()),
        RowTarget::Probs(t) => (0, t),
    };
    let x = match rule.cap {
        Some(c) => {
            cap_into::<V>(x, buf, len, c);
            buf as *const T
        }
        None => x,
    };
    let w = rule.weight.0 as *const T;
    let hard = t.is_null();
    // Read before pass 2 may overwrite it (in place).
    let x_y = if hard { (*x.add(y)).to_f64() } else { 0.0 };
    let w_y = if hard { rule.weight_of(y) } else { 0.0 };

    // The common case: pass 1 leaves exp(x) * 2^-N in grad, pass 2 only scales it.
    let plain = GRAD && hard && rule.eps == 0.0 && rule.cap.is_none() && len <= IN_CACHE_MAX_LEN;
    let stats = if plain {
        RowLse::from_sum(sum_in_cache::<V>(x, len, Some(grad)), x, len)
    } else {
        RowLse::of::<V>(x, len)
    };
    // Fast rows: the log-sum-exp made accurate where the target dominates (a loss near 0).
    let lse = match stats {
        RowLse::Fast(e) if plain => refined_lse_from_terms::<V>(grad, len, e),
        RowLse::Fast(e) => refined_lse::<V>(x, len, e),
        other => match other.lse() {
            Some(l) => l,
            None => return nan_row(),
        },
    };
    let sum_wt = if hard { w_y } else { dot::<V>(t, w, len) };
    let coef = rule.coef(lse.value(), sum_wt, s);
    let (smooth, soft) = match stats {
        RowLse::Fast(e) if plain => {
            let k = V::splat(T::from_f64(coef.a / e.m));
            map_elements::<V>(
                grad,
                grad,
                len,
                #[inline(always)]
                |v| v.mul(k),
            );
            (0.0, 0.0)
        }
        _ if !(GRAD || rule.eps > 0.0 || !hard) => (0.0, 0.0),
        RowLse::Fast(e) => {
            let probs = Probs::<V>::new(e);
            pass2::<V, GRAD>(x, w, t, len, lse, &probs, &coef, rule.cap, grad)
        }
        _ => pass2_exact::<T, GRAD>(x, w, t, len, lse, &coef, rule.cap, grad),
    };
    if GRAD && hard {
        *grad.add(y) = T::from_f64(rule.target_grad(x_y, lse, &coef, w_y));
    }
    let target_term = if hard { w_y * minus(lse, x_y) } else { soft };
    rule.loss(lse.value(), target_term, smooth)
}

#[derive(Clone, Copy)]
enum Targets<'a, T> {
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

/// A block of consecutive rows on one thread; returns their summed loss.
struct RowBlock<'a, T: Float> {
    rule: &'a Rule<T>,
    x: Ptr<T>,
    /// Null for the loss alone.
    grad: Ptr<T>,
    targets: Targets<'a, T>,
    scale: Scale<'a, T>,
    /// Per-row losses (reduction None), else null.
    losses: Ptr<T>,
    len: usize,
    rows: std::ops::Range<usize>,
    /// Row index of the first row of `x` in `targets`, `scale` and `losses` (blocks of the linear op).
    row0: usize,
}

impl<T: Float> Kernel<T> for RowBlock<'_, T> {
    type Output = f64;
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) -> f64 {
        let len = self.len;
        let with_grad = !self.grad.0.is_null();
        // The capped logits need somewhere to live when there is no gradient buffer.
        let mut scratch = if self.rule.cap.is_some() && !with_grad {
            vec![T::ZERO; len]
        } else {
            Vec::new()
        };
        let mut total = 0.0;
        for r in self.rows {
            let o = r * len;
            let g = self.row0 + r;
            let target = self.targets.row(g, o);
            let l = unsafe {
                if with_grad {
                    let grad = self.grad.at(o);
                    full_row::<T, V, true>(
                        self.rule,
                        self.x.at(o),
                        len,
                        target,
                        self.scale.of(g),
                        grad,
                        grad,
                    )
                } else {
                    full_row::<T, V, false>(
                        self.rule,
                        self.x.at(o),
                        len,
                        target,
                        0.0,
                        std::ptr::null_mut(),
                        scratch.as_mut_ptr(),
                    )
                }
            };
            if !self.losses.0.is_null() {
                unsafe { *self.losses.at(g) = T::from_f64(l) };
            }
            total += l;
        }
        total
    }
}

/// Runs every row of `x` (rows x len, contiguous) in fixed blocks; the block sums added in order.
#[allow(clippy::too_many_arguments)]
fn run_rows<T: Float>(
    rule: &Rule<T>,
    x: Ptr<T>,
    grad: Ptr<T>,
    targets: Targets<'_, T>,
    scale: Scale<'_, T>,
    losses: Ptr<T>,
    rows: usize,
    len: usize,
    row0: usize,
) -> f64 {
    let per_task = (GRAIN / len.max(1)).max(1);
    let sums = threads::map(rows.div_ceil(per_task), |t| {
        dispatch(RowBlock {
            rule,
            x,
            grad,
            targets,
            scale,
            losses,
            len,
            rows: t * per_task..((t + 1) * per_task).min(rows),
            row0,
        })
    });
    sums.into_iter().sum()
}

fn check_len(name: &str, actual: usize, expected: usize) -> Result<(), Error> {
    if actual != expected {
        return Err(Error::Value(format!(
            "{name} has {actual} elements; expected {expected}"
        )));
    }
    Ok(())
}

fn size(rows: usize, cols: usize) -> Result<usize, Error> {
    rows.checked_mul(cols)
        .ok_or_else(|| Error::Value("array too large".into()))
}

/// Writes the reduced loss (or checks the per-row buffer) once the row sums are in.
fn finish_loss<T: Float>(reduction: Reduction, total: f64, denom: f64, loss: &mut [T]) {
    match reduction {
        Reduction::None => {}
        Reduction::Sum => loss[0] = T::from_f64(total),
        Reduction::Mean => loss[0] = T::from_f64(total / denom),
    }
}

fn loss_len(reduction: Reduction, rows: usize) -> usize {
    if reduction == Reduction::None {
        rows
    } else {
        1
    }
}

/// Validates everything and returns the mean's denominator.
fn prepare<T: Float>(
    rows: usize,
    classes: usize,
    target: &Target<T>,
    opts: &Options<T>,
    loss: &[T],
) -> Result<f64, Error> {
    check_options(opts, classes)?;
    check_len("loss", loss.len(), loss_len(opts.reduction, rows))?;
    match target {
        Target::Classes(t) => {
            check_len("target", t.len(), rows)?;
            check_classes(t, classes, opts.ignore_index, opts.weight)
        }
        Target::Probs(p) => {
            check_len("target", p.len(), size(rows, classes)?)?;
            if opts.ignore_index >= 0 {
                return Err(Error::Value(
                    "ignore_index is not supported with class-probability targets".into(),
                ));
            }
            Ok(rows as f64)
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn run<T: Float>(
    x: *const T,
    grad: *mut T,
    rows: usize,
    classes: usize,
    target: Target<T>,
    opts: &Options<T>,
    grad_output: GradOutput<T>,
    loss: &mut [T],
    denom: f64,
) -> Result<(), Error> {
    let scale = scale_for(opts.reduction, grad_output, denom, rows)?;
    let rule = Rule::new(opts, classes);
    let targets = match target {
        Target::Classes(t) => Targets::Classes(t, opts.ignore_index),
        Target::Probs(p) => Targets::Probs(Ptr::from_const(p.as_ptr())),
    };
    let losses = if opts.reduction == Reduction::None {
        Ptr(loss.as_mut_ptr())
    } else {
        Ptr(std::ptr::null_mut())
    };
    let total = run_rows(
        &rule,
        Ptr::from_const(x),
        Ptr(grad),
        targets,
        scale,
        losses,
        rows,
        classes,
        0,
    );
    finish_loss(opts.reduction, total, denom, loss);
    Ok(())
}

/// Cross-entropy of `logits` (rows x classes, contiguous) into `loss`: one value per row for
/// reduction None, else one.
pub fn cross_entropy<T: Float>(
    logits: &[T],
    rows: usize,
    classes: usize,
    target: Target<T>,
    opts: &Options<T>,
    loss: &mut [T],
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, classes)?)?;
    let denom = prepare(rows, classes, &target, opts, loss)?;
    unsafe {
        run(
            logits.as_ptr(),
            std::ptr::null_mut(),
            rows,
            classes,
            target,
            opts,
            GradOutput::Scalar(0.0),
            loss,
            denom,
        )
    }
}

/// [`cross_entropy`] and d(grad_output * loss)/d(logits) into `grad`.
pub fn cross_entropy_with_grad<T: Float>(
    logits: &[T],
    grad: &mut [T],
    rows: usize,
    classes: usize,
    target: Target<T>,
    opts: &Options<T>,
    grad_output: GradOutput<T>,
    loss: &mut [T],
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, classes)?)?;
    check_len("grad", grad.len(), logits.len())?;
    let denom = prepare(rows, classes, &target, opts, loss)?;
    unsafe {
        run(
            logits.as_ptr(),
            grad.as_mut_ptr(),
            rows,
            classes,
            target,
            opts,
            grad_output,
            loss,
            denom,
        )
    }
}

/// [`cross_entropy_with_grad`] writing the gradient over the logits.
pub fn cross_entropy_with_grad_inplace<T: Float>(
    logits: &mut [T],
    rows: usize,
    classes: usize,
    target: Target<T>,
    opts: &Options<T>,
    grad_output: GradOutput<T>,
    loss: &mut [T],
) -> Result<(), Error> {
    check_len("logits", logits.len(), size(rows, classes)?)?;
    let denom = prepare(rows, classes, &target, opts, loss)?;
    let p = logits.as_mut_ptr();
    unsafe { run(p, p, rows, classes, target, opts, grad_output, loss, denom) }
}

// ---------------------------------------------------------------------------------------------
// Linear cross-entropy: logits = hidden @ weight^T + bias, one block of rows x vocabulary at a time.
// ---------------------------------------------------------------------------------------------

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

/// dst (m x n, row stride `dst_rs`) = [dst +] lhs (m x k) @ rhs (k x n), operands given by
/// (row, column) strides; on this crate's thread pool.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                fill(dst.add(i * dst_rs), n, T::ZERO);
            }
        }
        return;
    }
    let par = match threads::num_threads() {
        1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    let (dst, lhs, rhs) = (Ptr(dst), Ptr::from_const(lhs), Ptr::from_const(rhs));
    threads::install(move || {
        gemm::gemm(
            m,
            n,
            k,
            dst.at(0),
            1,
            dst_rs as isize,
            accumulate,
            lhs.at(0),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.at(0),
            rhs_cs as isize,
            rhs_rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        )
    });
}

/// The inputs of the linear op, as raw parts.
#[derive(Clone, Copy)]
struct Linear<T> {
    hidden: Ptr<T>,
    weight: Ptr<T>,
    bias: Ptr<T>,
    h: usize,
}

impl<T: Float> Linear<T> {
    /// out (rn x vn, contiguous) = hidden[r0..r0+rn] @ weight[v0..v0+vn]^T + bias[v0..v0+vn].
    unsafe fn logits(&self, out: *mut T, r0: usize, rn: usize, v0: usize, vn: usize) {
        let has_bias = !self.bias.0.is_null();
        if has_bias {
            for i in 0..rn {
                std::ptr::copy_nonoverlapping(self.bias.at(v0), out.add(i * vn), vn);
            }
        }
        matmul(
            (rn, vn, self.h),
            out,
            vn,
            has_bias,
            self.hidden.at(r0 * self.h),
            (self.h, 1),
            self.weight.at(v0 * self.h),
            (1, self.h),
        );
    }

    /// Feeds a gradient block g (rn x vn) into dhidden[r0..] and dweight[v0..] (and the bias sums).
    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
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
}

impl BlockedRow {
    const NEW: BlockedRow = BlockedRow {
        lse: RowLse::EMPTY,
        x_y: 0.0,
        smooth: 0.0,
        run: f64::NEG_INFINITY,
        seen: 0,
    };
}

/// Sweep 1 over one logits block: caps it in place and folds each row's part into its state.
struct StatsBlock<'a, T> {
    rule: &'a Rule<T>,
    logits: Ptr<T>,
    state: Ptr<BlockedRow>,
    targets: &'a [i64],
    ignore: i64,
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
        let no_probs = Probs::<V>::new(ExpSum::new(1.0, T::ZERO));
        let no_coef = Coef {
            a: 0.0,
            b: 0.0,
            ct: 0.0,
        };
        for i in self.rows {
            let y = self.targets[self.row0 + i];
            if y == self.ignore {
                continue;
            }
            unsafe {
                let x = self.logits.at(i * vn);
                if let Some(c) = self.rule.cap {
                    cap_into::<V>(x, x, vn, c);
                }
                let part = RowLse::of::<V>(x, vn);
                let row = &mut *self.state.at(i);
                let local = (y as u64).wrapping_sub(self.v0 as u64);
                if y >= self.v0 as i64 && local < vn as u64 {
                    row.x_y = (*x.add(local as usize)).to_f64();
                }
                let lse = row.lse.combine(part);
                if self.rule.eps > 0.0 {
                    let rb = part.ln_sum();
                    let inner = if rb == f64::NEG_INFINITY {
                        f64::INFINITY
                    } else {
                        pass2::<V, false>(
                            x,
                            std::ptr::null(),
                            std::ptr::null(),
                            vn,
                            Lse { hi: rb, lo: 0.0 },
                            &no_probs,
                            &no_coef,
                            None,
                            std::ptr::null_mut(),
                        )
                        .0
                    };
                    let run = lse.ln_sum();
                    let before = if row.seen > 0 {
                        row.smooth + row.seen as f64 * (run - row.run)
                    } else {
                        0.0
                    };
                    row.smooth = before + inner + vn as f64 * (run - rb);
                    row.run = run;
                    row.seen += vn;
                }
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
                let coef = self.rule.coef(lse.value(), 1.0, self.scale.of(g));
                let (w, t) = (std::ptr::null(), std::ptr::null());
                match st.lse {
                    RowLse::Fast(e) => {
                        let probs = Probs::<V>::new(e);
                        pass2::<V, true>(x, w, t, vn, lse, &probs, &coef, self.rule.cap, x);
                    }
                    _ => {
                        pass2_exact::<T, true>(x, w, t, vn, lse, &coef, self.rule.cap, x);
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

/// Hands the allocator's free memory back to the OS (glibc; elsewhere nothing).
///
/// The gemm crate allocates its packing buffers on every call (about 21 MiB for the dweight
/// product at H = 1024, V = 32768). Under glibc's dynamic mmap threshold those come from the heap
/// and, measured with glibc 2.36, the freed ones were not reused: the resident set grew by one
/// buffer per call (+300 MiB over the 16 row blocks of N = 8192) while the live heap stayed at
/// one block of logits plus one buffer. Trimming once per row block keeps resident = live.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only returns free pages to the OS; it takes no pointers.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Rows of a block per task: about GRAIN elements each.
fn row_tasks(rows: usize, len: usize) -> (usize, usize) {
    let per_task = (GRAIN / len.max(1)).max(1);
    (rows.div_ceil(per_task), per_task)
}

/// Linear cross-entropy: the loss of logits = hidden @ weight^T + bias (hidden n x h, weight v x h,
/// target n) without holding the n x v logits; with `grads`, also the gradients of
/// grad_output * loss. `opts.weight` (class weights) is not supported here.
#[allow(clippy::too_many_arguments)]
pub fn linear_cross_entropy<T: Float>(
    hidden: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    target: &[i64],
    (n, h, v): (usize, usize, usize),
    opts: &Options<T>,
    chunk_size: Option<usize>,
    grads: Option<(GradOutput<T>, LinearGrads<T>)>,
    loss: &mut [T],
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
    let denom = prepare(n, v, &Target::<T>::Classes(target), opts, loss)?;
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
    let rule = Rule::new(opts, v);
    let lin = Linear {
        hidden: Ptr::from_const(hidden.as_ptr()),
        weight: Ptr::from_const(weight.as_ptr()),
        bias: Ptr::from_const(bias.map_or(std::ptr::null(), |b| b.as_ptr())),
        h,
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
            total += run_rows(&rule, blk, grad, targets, scale, losses, rn, v, r0);
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
            let (tasks, per_task) = row_tasks(rn, vn);
            threads::for_each(tasks, |t| {
                dispatch(StatsBlock {
                    rule: &rule,
                    logits: blk,
                    state: st,
                    targets: target,
                    ignore,
                    row0: r0,
                    v0,
                    vn,
                    rows: t * per_task..((t + 1) * per_task).min(rn),
                })
            });
        }
        for (i, s) in state.iter().enumerate() {
            let g = r0 + i;
            let l = if target[g] == ignore {
                0.0
            } else {
                match s.lse.lse() {
                    Some(lse) => rule.loss(lse.value(), minus(lse, s.x_y), s.smooth),
                    None => f64::NAN,
                }
            };
            if !losses.0.is_null() {
                unsafe { *losses.at(g) = T::from_f64(l) };
            }
            total += l;
        }
        let Some(g) = &mut grads else { continue };
        for v0 in (0..v).step_by(bv) {
            let vn = bv.min(v - v0);
            unsafe { lin.logits(blk.at(0), r0, rn, v0, vn) };
            let (tasks, per_task) = row_tasks(rn, vn);
            threads::for_each(tasks, |t| {
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
                    rows: t * per_task..((t + 1) * per_task).min(rn),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isa;

    /// The ISA and the thread count are process-wide; tests that change or rely on them take turns.
    fn lock() -> std::sync::MutexGuard<'static, ()> {
        isa::TEST_LOCK.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deterministic pseudo-random numbers in [-1, 1) (no extra dev-dependency).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
            (0..n).map(|_| self.next() * scale).collect()
        }
        fn below(&mut self, n: usize) -> usize {
            (((self.next() + 1.0) / 2.0) * n as f64) as usize % n.max(1)
        }
    }

    enum Tgt {
        Hard(Vec<i64>),
        Soft(Vec<f64>),
    }

    struct Case {
        rows: usize,
        c: usize,
        x: Vec<f64>,
        target: Tgt,
        weight: Option<Vec<f64>>,
        opts: (i64, Reduction, f64, f64, Option<f64>),
    }

    /// torch's definition, written the obvious way in f64: per-row losses and their mean weights.
    fn reference_rows(case: &Case, x: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (ignore, _, eps, z, cap) = case.opts;
        let c = case.c;
        let w = |k: usize| case.weight.as_ref().map_or(1.0, |w| w[k]);
        let mut losses = vec![];
        let mut denoms = vec![];
        for r in 0..case.rows {
            let row: Vec<f64> = x[r * c..(r + 1) * c]
                .iter()
                .map(|&v| cap.map_or(v, |s| s * (v / s).tanh()))
                .collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let logp: Vec<f64> = row.iter().map(|v| v - lse).collect();
            let smooth: f64 = (0..c).map(|k| -w(k) * logp[k]).sum();
            match &case.target {
                Tgt::Hard(t) => {
                    if t[r] == ignore {
                        losses.push(0.0);
                        denoms.push(0.0);
                        continue;
                    }
                    let y = t[r] as usize;
                    let nll = -w(y) * logp[y];
                    losses.push((1.0 - eps) * nll + eps / c as f64 * smooth + z * lse * lse);
                    denoms.push(w(y));
                }
                Tgt::Soft(t) => {
                    let l: f64 = (0..c)
                        .map(|k| -w(k) * ((1.0 - eps) * t[r * c + k] + eps / c as f64) * logp[k])
                        .sum();
                    losses.push(l + z * lse * lse);
                    denoms.push(1.0);
                }
            }
        }
        (losses, denoms)
    }

    /// The reduced reference loss, scaled per row by `g` for reduction none (a scalar to differentiate).
    fn reference(case: &Case, x: &[f64], g: &[f64]) -> Vec<f64> {
        let (losses, denoms) = reference_rows(case, x);
        match case.opts.1 {
            Reduction::None => losses.iter().zip(g).map(|(l, g)| l * g).collect(),
            Reduction::Sum => vec![losses.iter().sum::<f64>() * g[0]],
            Reduction::Mean => {
                vec![losses.iter().sum::<f64>() / denoms.iter().sum::<f64>() * g[0]]
            }
        }
    }

    fn options<'a>(case: &'a Case, w: &'a Option<Vec<f64>>) -> Options<'a, f64> {
        let (ignore_index, reduction, label_smoothing, z_loss, softcap) = case.opts;
        Options {
            weight: w.as_deref(),
            ignore_index,
            reduction,
            label_smoothing,
            z_loss,
            softcap,
        }
    }

    /// Runs the kernel in f64: (loss, grad).
    fn kernel(case: &Case, g: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let w = case.weight.clone();
        let opts = options(case, &w);
        let mut loss = vec![0.0; loss_len(opts.reduction, case.rows)];
        let mut grad = vec![0.0; case.x.len()];
        let target = match &case.target {
            Tgt::Hard(t) => Target::Classes(t),
            Tgt::Soft(t) => Target::Probs(t),
        };
        let go = if opts.reduction == Reduction::None {
            GradOutput::Rows(g)
        } else {
            GradOutput::Scalar(g[0])
        };
        cross_entropy_with_grad(
            &case.x, &mut grad, case.rows, case.c, target, &opts, go, &mut loss,
        )
        .unwrap();
        (loss, grad)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + b.abs())
    }

    fn random_case(
        rng: &mut Lcg,
        rows: usize,
        c: usize,
        soft: bool,
        opts: (i64, Reduction, f64, f64, Option<f64>),
        weighted: bool,
    ) -> Case {
        let x = rng.vec(rows * c, 4.0);
        let target = if soft {
            let mut t: Vec<f64> = rng.vec(rows * c, 1.0).iter().map(|v| v.abs()).collect();
            for r in 0..rows {
                let s: f64 = t[r * c..(r + 1) * c].iter().sum();
                t[r * c..(r + 1) * c].iter_mut().for_each(|v| *v /= s);
            }
            Tgt::Soft(t)
        } else {
            Tgt::Hard(
                (0..rows)
                    .map(|r| {
                        if r % 3 == 1 {
                            opts.0
                        } else {
                            rng.below(c) as i64
                        }
                    })
                    .collect(),
            )
        };
        let weight = weighted.then(|| rng.vec(c, 1.0).iter().map(|v| 0.5 + v.abs()).collect());
        Case {
            rows,
            c,
            x,
            target,
            weight,
            opts,
        }
    }

    /// Loss against the reference and gradient against central differences of the reference.
    fn check_case(case: &Case) {
        let g: Vec<f64> = (0..case.rows).map(|i| 0.5 + i as f64 * 0.25).collect();
        let (loss, grad) = kernel(case, &g);
        let want = reference(case, &case.x, &vec![1.0; case.rows]);
        for (a, b) in loss.iter().zip(&want) {
            assert!(close(*a, *b, 1e-12), "loss {a} vs {b}");
        }
        let total = |x: &[f64]| reference(case, x, &g).iter().sum::<f64>();
        let mut x = case.x.clone();
        for i in 0..x.len() {
            let h = 1e-5;
            let v = x[i];
            x[i] = v + h;
            let up = total(&x);
            x[i] = v - h;
            let down = total(&x);
            x[i] = v;
            let fd = (up - down) / (2.0 * h);
            // Central differences: truncation ~h^2 * x''' and rounding ~1e-16 / h.
            assert!(
                (grad[i] - fd).abs() <= 1e-7 * (1.0 + fd.abs()),
                "grad[{i}] {} vs {fd}",
                grad[i]
            );
        }
    }

    #[test]
    fn matches_reference_over_options() {
        let mut rng = Lcg(1);
        let reds = [Reduction::Mean, Reduction::Sum, Reduction::None];
        for &c in &[1usize, 2, 3, 17, 40] {
            for &soft in &[false, true] {
                for (k, &red) in reds.iter().enumerate() {
                    for &(eps, z, cap) in &[
                        (0.0, 0.0, None),
                        (0.1, 0.0, None),
                        (0.0, 1e-3, None),
                        (0.2, 1e-2, Some(2.5)),
                    ] {
                        for &weighted in &[false, true] {
                            let ignore = if soft { -100 } else { [-100, 0, 1][k] };
                            let case = random_case(
                                &mut rng,
                                7,
                                c,
                                soft,
                                (ignore, red, eps, z, cap),
                                weighted,
                            );
                            check_case(&case);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn long_rows_use_the_two_pass_path() {
        // Longer than IN_CACHE_MAX_LEN: pass 1 is the two-pass sum.
        let mut rng = Lcg(2);
        let c = IN_CACHE_MAX_LEN + 37;
        for &(eps, cap) in &[(0.0, None), (0.1, Some(3.0))] {
            let case = random_case(
                &mut rng,
                2,
                c,
                false,
                (-100, Reduction::Sum, eps, 1e-3, cap),
                false,
            );
            let g = [1.0];
            let (loss, grad) = kernel(&case, &g);
            assert!(close(loss[0], reference(&case, &case.x, &g)[0], 1e-12));
            let sum: f64 = grad.iter().sum();
            // Without smoothing/cap each row's gradient sums to 2 z lse (softmax sums to one).
            if cap.is_none() && eps == 0.0 {
                assert!(sum.abs() < 1.0);
            }
            assert!(grad.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn f32_matches_f64() {
        let _g = lock();
        let mut rng = Lcg(3);
        for isa in isa::supported() {
            isa::set_active(isa).unwrap();
            for &c in &[1usize, 5, 33, 1000] {
                for &(eps, z, cap) in &[(0.0, 0.0, None), (0.1, 1e-4, Some(5.0))] {
                    let case = random_case(
                        &mut rng,
                        9,
                        c,
                        false,
                        (-100, Reduction::None, eps, z, cap),
                        true,
                    );
                    let g = vec![1.0; case.rows];
                    let (loss64, grad64) = kernel(&case, &g);
                    let x32: Vec<f32> = case.x.iter().map(|&v| v as f32).collect();
                    let w32: Vec<f32> = case
                        .weight
                        .as_ref()
                        .unwrap()
                        .iter()
                        .map(|&v| v as f32)
                        .collect();
                    let Tgt::Hard(t) = &case.target else {
                        unreachable!()
                    };
                    let opts = Options {
                        weight: Some(&w32[..]),
                        ignore_index: -100,
                        reduction: Reduction::None,
                        label_smoothing: eps,
                        z_loss: z,
                        softcap: cap,
                    };
                    let mut loss = vec![0f32; case.rows];
                    let mut grad = vec![0f32; x32.len()];
                    cross_entropy_with_grad(
                        &x32,
                        &mut grad,
                        case.rows,
                        c,
                        Target::Classes(t),
                        &opts,
                        GradOutput::Scalar(1.0),
                        &mut loss,
                    )
                    .unwrap();
                    // f32 inputs are the f64 ones rounded: errors of a few f32 ULP of the row's scale.
                    for (a, b) in loss.iter().zip(&loss64) {
                        assert!(
                            (*a as f64 - b).abs() <= 2e-6 * (1.0 + b.abs()),
                            "{} loss {a} vs {b}",
                            isa.name()
                        );
                    }
                    for (a, b) in grad.iter().zip(&grad64) {
                        assert!(
                            (*a as f64 - b).abs() <= 2e-6,
                            "{} grad {a} vs {b}",
                            isa.name()
                        );
                    }
                }
            }
        }
        isa::set_active(isa::best()).unwrap();
    }

    #[test]
    fn special_values_follow_torch() {
        let _g = lock();
        let inf = f64::INFINITY;
        let x = vec![
            1.0,
            2.0,
            -inf,
            0.5, // -inf off the target: finite
            -inf,
            0.0,
            1.0,
            2.0, // -inf at the target: +inf loss
            1e30,
            0.0,
            -1e30,
            3.0, // huge: the exact path, target is the max
            f64::NAN,
            0.0,
            1.0,
            2.0, // NaN: NaN loss and gradient
            inf,
            0.0,
            1.0,
            2.0, // +inf: NaN (as torch's log_softmax)
            -inf,
            -inf,
            -inf,
            -inf, // nothing but -inf: NaN
        ];
        let t = vec![0i64, 0, 0, 1, 1, 2];
        let mut loss = vec![0.0; 6];
        let mut grad = vec![0.0; 24];
        let opts = Options {
            reduction: Reduction::None,
            ..Options::default()
        };
        cross_entropy_with_grad(
            &x,
            &mut grad,
            6,
            4,
            Target::Classes(&t),
            &opts,
            GradOutput::Scalar(1.0),
            &mut loss,
        )
        .unwrap();
        let lse0 = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
        assert!(close(loss[0], lse0 - 1.0, 1e-14));
        assert_eq!(grad[2], 0.0);
        assert_eq!(loss[1], inf);
        assert!(grad[4..8].iter().all(|v| v.is_finite()));
        assert_eq!(grad[4], -1.0);
        assert_eq!(loss[2], 0.0);
        assert_eq!(&grad[8..12], &[0.0, 0.0, 0.0, 0.0]);
        for r in 3..6 {
            assert!(loss[r].is_nan());
            assert!(grad[r * 4..r * 4 + 4].iter().all(|v| v.is_nan()));
        }
        // f32: 1e30 stays finite where the answer is.
        let x32: Vec<f32> = vec![1e30, -1e30, 0.0, 1e30];
        let mut l32 = [0f32; 2];
        let o32 = Options {
            reduction: Reduction::None,
            ..Options::default()
        };
        cross_entropy(&x32, 2, 2, Target::Classes(&[0, 0]), &o32, &mut l32).unwrap();
        assert_eq!(l32, [0.0, 1e30]);
        // Equal huge values: lse - x is log(C) exactly, not lost to the rounding of -1e30 + log(C).
        let flat = [-1e30f32; 4];
        let mut l1 = [0f32; 1];
        let mut g1 = [0f32; 4];
        let o1 = Options::default();
        cross_entropy_with_grad(
            &flat,
            &mut g1,
            1,
            4,
            Target::Classes(&[2]),
            &o1,
            GradOutput::Scalar(1.0),
            &mut l1,
        )
        .unwrap();
        assert_eq!(l1[0], 4f32.ln());
        assert_eq!(g1, [0.25, 0.25, -0.75, 0.25]);
        // A dominant target: the loss log(1 + 3 e^-20) ~ 6e-9 keeps its relative accuracy (lse
        // refined as max + log1p(rest)), in place (from the stored terms) and not.
        let want = (3.0 * (-20f64).exp()).ln_1p();
        for inplace in [false, true] {
            let mut x = [20f32, 0.0, 0.0, 0.0];
            let (mut l, mut g) = ([0f32; 1], [0f32; 4]);
            if inplace {
                cross_entropy_with_grad_inplace(
                    &mut x,
                    1,
                    4,
                    Target::Classes(&[0]),
                    &o1,
                    GradOutput::Scalar(1.0),
                    &mut l,
                )
                .unwrap();
            } else {
                cross_entropy_with_grad(
                    &x,
                    &mut g,
                    1,
                    4,
                    Target::Classes(&[0]),
                    &o1,
                    GradOutput::Scalar(1.0),
                    &mut l,
                )
                .unwrap();
            }
            assert!(
                (l[0] as f64 / want - 1.0).abs() < 1e-6,
                "{} vs {want}",
                l[0]
            );
            let mut only = [0f32];
            cross_entropy(
                &[20f32, 0.0, 0.0, 0.0],
                1,
                4,
                Target::Classes(&[0]),
                &o1,
                &mut only,
            )
            .unwrap();
            assert_eq!(only[0], l[0]);
        }
    }

    #[test]
    fn mean_over_nothing_is_nan_with_zero_gradient() {
        let x = vec![0.5; 6];
        let t = vec![-100i64; 3];
        for eps in [0.0, 0.3] {
            let opts = Options {
                label_smoothing: eps,
                ..Options::default()
            };
            let mut loss = [0.0];
            let mut grad = vec![1.0; 6];
            cross_entropy_with_grad(
                &x,
                &mut grad,
                3,
                2,
                Target::Classes(&t),
                &opts,
                GradOutput::Scalar(1.0),
                &mut loss,
            )
            .unwrap();
            assert!(loss[0].is_nan());
            assert!(grad.iter().all(|&v| v == 0.0));
        }
        let mut loss = [0.0];
        cross_entropy::<f64>(
            &[],
            0,
            5,
            Target::Classes(&[]),
            &Options::default(),
            &mut loss,
        )
        .unwrap();
        assert!(loss[0].is_nan());
    }

    #[test]
    fn bad_input_is_an_error() {
        let x = vec![0.0; 6];
        let mut loss = [0.0];
        let o = Options::default();
        let e = cross_entropy(&x, 2, 3, Target::Classes(&[0, 3]), &o, &mut loss).unwrap_err();
        assert!(
            matches!(&e, Error::Index(m) if m.contains("target 3 at position 1")),
            "{e}"
        );
        let e = cross_entropy(&x, 2, 3, Target::Classes(&[-1, 0]), &o, &mut loss).unwrap_err();
        assert!(matches!(e, Error::Index(_)));
        for (eps, z, cap) in [
            (-0.1, 0.0, None),
            (1.5, 0.0, None),
            (0.0, -1.0, None),
            (0.0, 0.0, Some(0.0)),
        ] {
            let o = Options {
                label_smoothing: eps,
                z_loss: z,
                softcap: cap,
                ..Options::default()
            };
            assert!(matches!(
                cross_entropy(&x, 2, 3, Target::Classes(&[0, 1]), &o, &mut loss),
                Err(Error::Value(_))
            ));
        }
        let w = [1.0, 2.0];
        let o = Options {
            weight: Some(&w[..]),
            ..Options::default()
        };
        assert!(cross_entropy(&x, 2, 3, Target::Classes(&[0, 1]), &o, &mut loss).is_err());
        assert!(cross_entropy(
            &x,
            2,
            3,
            Target::Classes(&[0]),
            &Options::default(),
            &mut loss
        )
        .is_err());
    }

    #[test]
    fn same_result_for_any_thread_count_and_in_place() {
        let _g = lock();
        isa::set_active(isa::best()).unwrap();
        let mut rng = Lcg(4);
        let (rows, c) = (3000, 67);
        let x: Vec<f32> = rng.vec(rows * c, 6.0).iter().map(|&v| v as f32).collect();
        let t: Vec<i64> = (0..rows).map(|_| rng.below(c) as i64).collect();
        let opts = Options {
            label_smoothing: 0.05,
            ..Options::default()
        };
        let run = |threads: usize| {
            threads::set_num_threads(threads).unwrap();
            let mut loss = [0f32];
            let mut grad = vec![0f32; x.len()];
            cross_entropy_with_grad(
                &x,
                &mut grad,
                rows,
                c,
                Target::Classes(&t),
                &opts,
                GradOutput::Scalar(1.0),
                &mut loss,
            )
            .unwrap();
            (loss[0], grad)
        };
        let one = run(1);
        let three = run(3);
        assert_eq!(one.0.to_bits(), three.0.to_bits());
        assert!(one.1 == three.1);
        let mut inplace = x.clone();
        let mut loss = [0f32];
        cross_entropy_with_grad_inplace(
            &mut inplace,
            rows,
            c,
            Target::Classes(&t),
            &opts,
            GradOutput::Scalar(1.0),
            &mut loss,
        )
        .unwrap();
        assert_eq!(loss[0].to_bits(), three.0.to_bits());
        assert!(inplace == three.1);
        threads::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .unwrap();
    }

    #[test]
    fn tanh_is_accurate() {
        let _g = lock();
        for isa in isa::supported() {
            isa::set_active(isa).unwrap();
            let mut xs: Vec<f32> = (0..200_000)
                .map(|i| (i as f32 - 100_000.0) * 2.5e-4)
                .collect();
            xs.extend([
                0.0,
                -0.0,
                1e-30,
                -1e-30,
                9.0,
                30.0,
                -30.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::NAN,
            ]);
            let mut ys = vec![0f32; xs.len()];
            struct K<'a>(&'a [f32], &'a mut [f32]);
            impl Kernel<f32> for K<'_> {
                type Output = ();
                fn run<V: Vector<Elem = f32>>(self) {
                    unsafe {
                        map_elements::<V>(self.0.as_ptr(), self.1.as_mut_ptr(), self.0.len(), tanh)
                    }
                }
            }
            dispatch(K(&xs, &mut ys));
            for (x, y) in xs.iter().zip(&ys) {
                let want = (*x as f64).tanh();
                if x.is_nan() {
                    assert!(y.is_nan());
                    continue;
                }
                let ulp = (want as f32).abs().max(f32::MIN_POSITIVE) * f32::EPSILON;
                assert!(
                    ((*y as f64) - want).abs() <= 3.0 * ulp as f64,
                    "{} tanh({x}) = {y}, want {want}",
                    isa.name()
                );
            }
        }
        isa::set_active(isa::best()).unwrap();
    }

    fn linear_reference(
        hidden: &[f64],
        weight: &[f64],
        bias: Option<&[f64]>,
        (n, h, v): (usize, usize, usize),
    ) -> Vec<f64> {
        let mut x = vec![0.0; n * v];
        for i in 0..n {
            for j in 0..v {
                x[i * v + j] = bias.map_or(0.0, |b| b[j])
                    + (0..h)
                        .map(|k| hidden[i * h + k] * weight[j * h + k])
                        .sum::<f64>();
            }
        }
        x
    }

    #[test]
    fn linear_matches_logits_then_cross_entropy() {
        let _g = lock();
        let mut rng = Lcg(5);
        let (n, h, v) = (37, 9, 50);
        let hidden = rng.vec(n * h, 1.0);
        let weight = rng.vec(v * h, 1.0);
        let bias = rng.vec(v, 1.0);
        for &(eps, z, cap, red) in &[
            (0.0, 0.0, None, Reduction::Mean),
            (0.1, 1e-3, Some(3.0), Reduction::Sum),
            (0.3, 0.0, None, Reduction::None),
        ] {
            for with_bias in [false, true] {
                let b = with_bias.then_some(&bias[..]);
                let logits = linear_reference(&hidden, &weight, b, (n, h, v));
                let t: Vec<i64> = (0..n)
                    .map(|i| {
                        if i % 5 == 2 {
                            -100
                        } else {
                            rng.below(v) as i64
                        }
                    })
                    .collect();
                let opts = Options {
                    ignore_index: -100,
                    reduction: red,
                    label_smoothing: eps,
                    z_loss: z,
                    softcap: cap,
                    weight: None,
                };
                let go: Vec<f64> = (0..n).map(|i| 1.0 + 0.1 * i as f64).collect();
                let gout = if red == Reduction::None {
                    GradOutput::Rows(&go[..])
                } else {
                    GradOutput::Scalar(0.7)
                };
                let mut want_loss = vec![0.0; loss_len(red, n)];
                let mut dlogits = vec![0.0; n * v];
                cross_entropy_with_grad(
                    &logits,
                    &mut dlogits,
                    n,
                    v,
                    Target::Classes(&t),
                    &opts,
                    gout,
                    &mut want_loss,
                )
                .unwrap();
                // dhidden = dlogits @ weight, dweight = dlogits^T @ hidden, dbias = column sums.
                let want_dh: Vec<f64> = (0..n * h)
                    .map(|e| {
                        (0..v)
                            .map(|j| dlogits[e / h * v + j] * weight[j * h + e % h])
                            .sum()
                    })
                    .collect();
                let want_dw: Vec<f64> = (0..v * h)
                    .map(|e| {
                        (0..n)
                            .map(|i| dlogits[i * v + e / h] * hidden[i * h + e % h])
                            .sum()
                    })
                    .collect();
                let want_db: Vec<f64> = (0..v)
                    .map(|j| (0..n).map(|i| dlogits[i * v + j]).sum())
                    .collect();
                // One block, then vocabulary blocks of several shapes (and rows blocks).
                for chunk in [None, Some(v * 10), Some(64), Some(7), Some(1)] {
                    for threads in [1, 2] {
                        threads::set_num_threads(threads).unwrap();
                        let mut loss = vec![0.0; want_loss.len()];
                        let (mut dh, mut dw, mut db) =
                            (vec![9.0; n * h], vec![9.0; v * h], vec![9.0; v]);
                        let grads = LinearGrads {
                            dhidden: &mut dh,
                            dweight: &mut dw,
                            dbias: with_bias.then_some(&mut db[..]),
                        };
                        linear_cross_entropy(
                            &hidden,
                            &weight,
                            b,
                            &t,
                            (n, h, v),
                            &opts,
                            chunk,
                            Some((gout, grads)),
                            &mut loss,
                        )
                        .unwrap();
                        let ok = |a: &[f64], b: &[f64]| {
                            a.iter().zip(b).all(|(a, b)| close(*a, *b, 1e-11))
                        };
                        assert!(
                            ok(&loss, &want_loss),
                            "{chunk:?} loss {loss:?} vs {want_loss:?}"
                        );
                        assert!(ok(&dh, &want_dh), "{chunk:?} dhidden");
                        assert!(ok(&dw, &want_dw), "{chunk:?} dweight");
                        if with_bias {
                            assert!(ok(&db, &want_db), "{chunk:?} dbias");
                        }
                        let mut loss_only = vec![0.0; want_loss.len()];
                        linear_cross_entropy(
                            &hidden,
                            &weight,
                            b,
                            &t,
                            (n, h, v),
                            &opts,
                            chunk,
                            None,
                            &mut loss_only,
                        )
                        .unwrap();
                        assert!(ok(&loss_only, &want_loss), "{chunk:?} loss only");
                    }
                }
            }
        }
        threads::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))
            .unwrap();
    }

    #[test]
    fn linear_block_respects_the_budget() {
        assert_eq!(linear_block(8192, 32768, None), (512, 32768));
        assert_eq!(linear_block(10, 100, None), (10, 100));
        let (r, c) = linear_block(8192, 128256, Some(1 << 20));
        assert!(r * c <= 1 << 20 && r == 128);
        assert_eq!(linear_block(5, 10, Some(1)), (1, 1));
        assert_eq!(linear_block(0, 10, None), (1, 10));
    }
}
