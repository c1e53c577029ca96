//! The row kernels of the log-probabilities: a row's (or one vocabulary block of a row's)
//! statistics folded into a [`Part`], and the gradient pass that takes them.

use super::LogprobGrads;
use crate::driver::Ptr;
use crate::float::Float;
use crate::isa::Kernel;
use crate::lse::{exact_stats, refined_lse, row_sum, Algorithm, Lse, ScaledExp};
use crate::rows::{fill, for_each_vector, load_n, map_elements, row_sums, scratch_row, store_n};
use crate::simd::Vector;
use std::f64::consts::LN_2;

/// lse - x, the large parts cancelled first: exact where x is close to hi.
fn minus(l: Lse, x: f64) -> f64 {
    (l.hi - x) + l.lo
}

/// The logits of a row divided by the temperature: the row itself at 1, else the thread's scratch
/// row (which the row's later passes read while it is in cache).
///
/// # Safety
/// `x` readable for `len` elements.
#[inline(always)]
unsafe fn tempered<V: Vector>(x: *const V::Elem, len: usize, temperature: f64) -> *const V::Elem {
    if temperature == 1.0 {
        return x;
    }
    let z = scratch_row::<V::Elem>(len);
    let t = V::splat(V::Elem::from_f64(temperature));
    map_elements::<V>(
        x,
        z,
        len,
        #[inline(always)]
        |v| v.div(t),
    );
    z
}

/// p = softmax(z) from the row's log-sum-exp: exp(z) * 2^-top (top = lse's exponent, so the
/// terms never overflow) times `factor` = 2^top / e^lse, and d = lse - z as (hi - z) + lo.
struct LseProbs<V> {
    scaled: ScaledExp<V>,
    factor: f64,
    hi: V,
    lo: V,
}

impl<V: Vector> LseProbs<V> {
    #[inline(always)]
    fn new(lse: Lse) -> Self {
        let hi = V::Elem::from_f64(lse.hi);
        let top = (hi * V::Elem::LOG2E).round_even();
        // top ln 2 - lse with one rounding (fma), so p keeps the exp's accuracy.
        let gap = top.to_f64().mul_add(LN_2, -lse.hi) - lse.lo;
        LseProbs {
            scaled: ScaledExp::new(top),
            factor: gap.exp(),
            hi: V::splat(hi),
            lo: V::splat(V::Elem::from_f64((lse.hi - hi.to_f64()) + lse.lo)),
        }
    }

    /// (p / factor, lse - z) for the elements of `z`.
    #[inline(always)]
    fn of(&self, z: V) -> (V, V) {
        (self.scaled.apply(z), self.hi.sub(z).add(self.lo))
    }
}

/// One block of a row: its log-sum-exp and entropy, nothing (every element -inf), or NaN (a NaN
/// or +inf element).
#[derive(Clone, Copy, Debug)]
enum Block {
    Stats { lse: Lse, entropy: f64, exact: bool },
    Empty,
    Nan,
}

/// The statistics of z[..len]; the entropy only where asked for (else 0).
///
/// # Safety
/// `z` readable for `len` elements.
#[inline(always)]
unsafe fn block_stats<V: Vector>(z: *const V::Elem, len: usize, entropy: bool) -> Block {
    let Some(e) = row_sum::<V>(z, len, Algorithm::Auto).usable::<V::Elem>() else {
        return exact_block(z, len, entropy);
    };
    let lse = refined_lse::<V>(z, len, e);
    let h = if entropy {
        let probs = LseProbs::<V>::new(lse);
        let zero = V::splat(V::Elem::ZERO);
        let [s] = row_sums::<V, 1>(
            len,
            #[inline(always)]
            |i, n| {
                let (t, d) = probs.of(load_n::<V>(z.add(i), n));
                // t = 0 (z = -inf, or underflow) adds 0, not 0 * inf.
                [t.mul(d).keep(zero.lt(t))]
            },
        );
        s * probs.factor
    } else {
        0.0
    };
    Block::Stats {
        lse,
        entropy: h,
        exact: false,
    }
}

/// [`block_stats`] in f64, for blocks with NaN, inf or values beyond the fast path's range.
unsafe fn exact_block<T: Float>(z: *const T, len: usize, entropy: bool) -> Block {
    let st = exact_stats(z, len);
    if st.nan || st.max == f64::INFINITY {
        return Block::Nan;
    }
    if st.max == f64::NEG_INFINITY {
        return Block::Empty;
    }
    let lse = Lse {
        hi: st.max,
        lo: st.sum.ln(),
    };
    let mut h = 0.0;
    if entropy {
        for c in 0..len {
            let d = minus(lse, (*z.add(c)).to_f64());
            let p = (-d).exp();
            if p > 0.0 {
                h += p * d;
            }
        }
    }
    Block::Stats {
        lse,
        entropy: h,
        exact: true,
    }
}

/// A row's statistics folded over the vocabulary blocks seen so far.
#[derive(Clone, Copy, Debug)]
pub(super) struct Part {
    /// hi = -inf while nothing is seen.
    lse: Lse,
    entropy: f64,
    /// The target's tempered logit, once its block is seen.
    z_y: f64,
    nan: bool,
    /// Some block took the exact path: the gradient's probabilities come from f64 exp.
    exact: bool,
}

impl Part {
    pub(super) const EMPTY: Part = Part {
        lse: Lse {
            hi: f64::NEG_INFINITY,
            lo: 0.0,
        },
        entropy: 0.0,
        z_y: 0.0,
        nan: false,
        exact: false,
    };

    /// Adds a block. The entropy of the union is the blocks' entropies weighted by their
    /// probability mass, each plus its own lse's distance to the union's (all terms >= 0).
    fn add(&mut self, b: Block) {
        let (lse, h, exact) = match b {
            Block::Nan => {
                self.nan = true;
                return;
            }
            Block::Empty => return,
            Block::Stats {
                lse,
                entropy,
                exact,
            } => (lse, entropy, exact),
        };
        self.exact |= exact;
        if self.lse.hi == f64::NEG_INFINITY {
            (self.lse, self.entropy) = (lse, h);
            return;
        }
        let ((big, h_big), (small, h_small)) = if lse.value() > self.lse.value() {
            ((lse, h), (self.lse, self.entropy))
        } else {
            ((self.lse, self.entropy), (lse, h))
        };
        let gap = (big.hi - small.hi) + (big.lo - small.lo);
        let r = (-gap).exp();
        let grow = r.ln_1p();
        self.lse = Lse {
            hi: big.hi,
            lo: big.lo + grow,
        };
        self.entropy = (h_big + grow + r * (h_small + grow + gap)) / (1.0 + r);
    }

    /// Whether the row's results are NaN: a NaN or +inf logit, or every logit -inf.
    fn is_nan(&self) -> bool {
        self.nan || self.lse.hi == f64::NEG_INFINITY
    }

    pub(super) fn logprob(&self) -> f64 {
        if self.is_nan() {
            f64::NAN
        } else {
            -minus(self.lse, self.z_y)
        }
    }

    pub(super) fn entropy(&self) -> f64 {
        if self.is_nan() {
            f64::NAN
        } else {
            self.entropy
        }
    }

    /// The gradient at the target's own class: g_logp (1 - p_y) - g_H p_y (z_y - lse + H), times
    /// 1/T, with 1 - p_y = -expm1(logprob): nonzero however large the target's margin.
    fn target_grad(&self, (g_logp, g_h): (f64, f64), inv_t: f64) -> f64 {
        let d = minus(self.lse, self.z_y);
        let p = (-d).exp();
        let spread = if p > 0.0 { p * (self.entropy - d) } else { 0.0 };
        inv_t * (-g_logp * (-d).exp_m1() - g_h * spread)
    }
}

/// The position of class `y` in the block of classes [v0, v0 + len), if there.
fn local(y: i64, v0: usize, len: usize) -> Option<usize> {
    let k = (y as u64).wrapping_sub(v0 as u64);
    (y >= v0 as i64 && k < len as u64).then_some(k as usize)
}

/// Folds one block of classes [v0, v0 + len) of rows `rows` of `x` (rows of `len` elements) into
/// their [`Part`]s (`state`, indexed like `x`'s rows); row i's target is targets[row0 + i].
pub(super) struct Fold<'a, T> {
    pub(super) x: Ptr<T>,
    pub(super) len: usize,
    pub(super) v0: usize,
    pub(super) temperature: f64,
    pub(super) targets: &'a [i64],
    pub(super) ignore: i64,
    pub(super) row0: usize,
    pub(super) state: Ptr<Part>,
    pub(super) entropy: bool,
    pub(super) rows: std::ops::Range<usize>,
}

impl<T: Float> Kernel<T> for Fold<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        for i in self.rows {
            let y = self.targets[self.row0 + i];
            if y == self.ignore {
                continue;
            }
            unsafe {
                let z = tempered::<V>(self.x.at(i * self.len), self.len, self.temperature);
                let part = &mut *self.state.at(i);
                if let Some(k) = local(y, self.v0, self.len) {
                    part.z_y = (*z.add(k)).to_f64();
                }
                part.add(block_stats::<V>(z, self.len, self.entropy));
            }
        }
    }
}

/// Writes the gradient of one block of classes [v0, v0 + len) of rows `rows` of `x` into `grad`
/// (same layout; it may be `x`). With `folded`, the rows' statistics over the whole vocabulary
/// (indexed like `x`'s rows); without, each row is whole and its statistics are found first.
pub(super) struct Grad<'a, T> {
    pub(super) x: Ptr<T>,
    pub(super) len: usize,
    pub(super) v0: usize,
    pub(super) temperature: f64,
    pub(super) targets: &'a [i64],
    pub(super) ignore: i64,
    pub(super) row0: usize,
    pub(super) folded: Option<&'a [Part]>,
    pub(super) grads: LogprobGrads<'a, T>,
    pub(super) grad: Ptr<T>,
    pub(super) rows: std::ops::Range<usize>,
}

impl<T: Float> Kernel<T> for Grad<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: Vector<Elem = T>>(self) {
        let len = self.len;
        let inv_t = 1.0 / self.temperature;
        for i in self.rows {
            let r = self.row0 + i;
            let y = self.targets[r];
            unsafe {
                let out = self.grad.at(i * len);
                if y == self.ignore {
                    fill(out, len, T::ZERO);
                    continue;
                }
                let g = self.grads.at(r);
                let z = tempered::<V>(self.x.at(i * len), len, self.temperature);
                let target = local(y, self.v0, len);
                let part = match self.folded {
                    Some(parts) => parts[i],
                    None => {
                        let mut p = Part::EMPTY;
                        if let Some(k) = target {
                            p.z_y = (*z.add(k)).to_f64();
                        }
                        p.add(block_stats::<V>(z, len, g.1 != 0.0));
                        p
                    }
                };
                grad_pass::<V>(&part, z, len, g, inv_t, out);
                if let Some(k) = target {
                    if !part.is_nan() {
                        *out.add(k) = T::from_f64(part.target_grad(g, inv_t));
                    }
                }
            }
        }
    }
}

/// grad_c = -(1/T) p_c (g_logp + g_H (H - (lse - z_c))) over z[..len] (the target's entry is
/// written afterwards); NaN for a NaN row. `out` may be `z`.
///
/// # Safety
/// `z` readable and `out` writable for `len` elements.
#[inline(always)]
unsafe fn grad_pass<V: Vector>(
    part: &Part,
    z: *const V::Elem,
    len: usize,
    (g_logp, g_h): (f64, f64),
    inv_t: f64,
    out: *mut V::Elem,
) {
    if part.is_nan() {
        fill(out, len, V::Elem::NAN);
        return;
    }
    let a = -inv_t * (g_logp + g_h * part.entropy);
    let b = inv_t * g_h;
    if part.exact {
        for c in 0..len {
            let d = minus(part.lse, (*z.add(c)).to_f64());
            let p = (-d).exp();
            let g = if p > 0.0 { p * d.mul_add(b, a) } else { 0.0 };
            *out.add(c) = V::Elem::from_f64(g);
        }
        return;
    }
    let probs = LseProbs::<V>::new(part.lse);
    let (ca, cb) = (
        V::splat(V::Elem::from_f64(a * probs.factor)),
        V::splat(V::Elem::from_f64(b * probs.factor)),
    );
    let zero = V::splat(V::Elem::ZERO);
    for_each_vector::<V>(
        len,
        #[inline(always)]
        |i, n| {
            let (t, d) = probs.of(load_n::<V>(z.add(i), n));
            store_n(t.mul(d.mul_add(cb, ca)).keep(zero.lt(t)), out.add(i), n);
        },
    );
}
