// Shared by every kernel (prepended to each shader's source): one workgroup per row, each
// invocation strides over the row, partial results meet in a shared-memory tree reduction.
//
// NaN and infinities are detected from the bits: WGSL lets implementations assume floats are
// finite, so `v != v` or comparisons with infinity could be folded away by a shader compiler.

const WG: u32 = 256u;

var<workgroup> red_a: array<f32, WG>;
var<workgroup> red_b: array<f32, WG>;
var<workgroup> red_u: array<u32, WG>;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

fn is_pos_inf(v: f32) -> bool {
    return bitcast<u32>(v) == 0x7f800000u;
}

fn is_neg_inf(v: f32) -> bool {
    return bitcast<u32>(v) == 0xff800000u;
}

fn is_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) != 0x7f800000u;
}

// Built from a runtime value: constant expressions must not evaluate to a non-finite float.
fn neg_inf(zero: u32) -> f32 {
    return bitcast<f32>(0xff800000u | zero);
}

fn pos_inf(zero: u32) -> f32 {
    return bitcast<f32>(0x7f800000u | zero);
}

fn nan(zero: u32) -> f32 {
    return bitcast<f32>(0x7fc00000u | zero);
}

// exp(d) for d <= 0 (a term of a max-subtracted sum); -inf gives 0 whatever exp(-inf) does.
fn exp_term(d: f32) -> f32 {
    return select(exp(d), 0.0, is_neg_inf(d));
}

// Compensated (Kahan) running sum: .x the sum, .y the lost low part. Once the sum is no longer
// finite the compensation is dropped, so an infinite sum stays infinite instead of turning NaN.
fn kahan_add(acc: vec2<f32>, v: f32) -> vec2<f32> {
    let y = v - acc.y;
    let t = acc.x + y;
    let c = select(0.0, (t - acc.x) - y, is_finite(t));
    return vec2<f32>(t, c);
}

fn kahan_value(acc: vec2<f32>) -> f32 {
    return select(acc.x, acc.x - acc.y, is_finite(acc.x));
}

// The reductions below must be reached by the whole workgroup (uniform control flow). Each ends
// with a barrier so the shared arrays can be reused right away.

fn reduce_max(lid: u32, v: f32) -> f32 {
    red_a[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lid < s {
            red_a[lid] = max(red_a[lid], red_a[lid + s]);
        }
        workgroupBarrier();
    }
    let r = red_a[0];
    workgroupBarrier();
    return r;
}

fn reduce_or(lid: u32, v: u32) -> u32 {
    red_u[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lid < s {
            red_u[lid] = red_u[lid] | red_u[lid + s];
        }
        workgroupBarrier();
    }
    let r = red_u[0];
    workgroupBarrier();
    return r;
}

// Two sums at once (pairwise over the invocations).
fn reduce_sum2(lid: u32, v: vec2<f32>) -> vec2<f32> {
    red_a[lid] = v.x;
    red_b[lid] = v.y;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if lid < s {
            red_a[lid] = red_a[lid] + red_a[lid + s];
            red_b[lid] = red_b[lid] + red_b[lid + s];
        }
        workgroupBarrier();
    }
    let r = vec2<f32>(red_a[0], red_b[0]);
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    return reduce_sum2(lid, vec2<f32>(v, 0.0)).x;
}

// A row's max over its non-NaN values, and whether it holds NaN or +inf: each invocation folds
// its values in with scan_value, then row_scan combines the invocations.
const HAS_NAN: u32 = 1u;
const HAS_POS_INF: u32 = 2u;

struct Scan {
    max: f32,
    flags: u32,
}

fn scan_start(zero: u32) -> Scan {
    return Scan(neg_inf(zero), 0u);
}

fn scan_value(s: Scan, v: f32) -> Scan {
    if is_nan(v) {
        return Scan(s.max, s.flags | HAS_NAN);
    }
    return Scan(max(s.max, v), select(s.flags, s.flags | HAS_POS_INF, is_pos_inf(v)));
}

fn row_scan(lid: u32, s: Scan) -> Scan {
    let m = reduce_max(lid, s.max);
    return Scan(m, reduce_or(lid, s.flags));
}

// The row a workgroup handles: dispatches are 2-D (x up to the per-dimension limit).
fn row_of(wg: vec3<u32>, nx: u32) -> u32 {
    return wg.y * nx + wg.x;
}
