//! The row kernels: the SIMD passes over one row (or one vocabulary block of it), and
//! [`run_rows`], which runs them over the driver's fixed blocks of rows.

use super::rule::{minus, Coef, RowLse, Rule, Scale};
use crate::driver::{self, Ptr};
use crate::float::Float;
use crate::isa::{dispatch, Kernel};
use crate::lse::{
    refined_lse, refined_lse_from_terms, sum_in_cache, ExpSum, Lse, ScaledExp, IN_CACHE_MAX_LEN,
};
use crate::rows::{dot, fill, load_n, map_elements, store_n};
use crate::simd::{tanh, Vector, MAX_LANES};
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
        if self.steps == SHORT_FOLD {
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
pub(super) unsafe fn pass2<V: Vector, const GRAD: bool>(
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
pub(super) unsafe fn pass2_exact<T: Float, const GRAD: bool>(
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

/// Runs every row of `x` (rows x len, contiguous) in the driver's fixed blocks; returns the loss
/// total, the block sums added in order.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_rows<T: Float>(
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
    driver::sum_fixed_row_blocks(rows, len, |rows| {
        dispatch(RowBlock {
            rule,
            x,
            grad,
            targets,
            scale,
            losses,
            len,
            rows,
            row0,
        })
    })
}
