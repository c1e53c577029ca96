// Cross-entropy per row of logits with an integer class target, and optionally its gradient.
// The formulas are normax-core's (rust/normax-core/src/cross_entropy/mod.rs), with x the logits after
// the optional softcap (x -> cap * tanh(x / cap)), lse the row's log-sum-exp, w the class weights
// (ones without), eps the label smoothing, z the z-loss weight, C the classes, y the target:
//
//   loss    = (1 - eps) * w_y * (lse - x_y) + eps / C * sum_c w_c (lse - x_c) + z * lse^2
//   grad_c  = s * (p_c * A - w_c * (eps / C + (1 - eps) * [c == y])) * (1 - (x_c / cap)^2)
//   A       = (1 - eps) * w_y + eps / C * sum_c w_c + 2 * z * lse,      p = softmax(x)
//
// with s the row's gradient scale (grad_output, over the mean's denominator). The smoothing and
// z-loss terms are left out when switched off, so an infinite sum is not turned into NaN by a zero
// factor. lse - x_c is formed as (max - x_c) + log(sum): no cancellation near the loss's zero.
// Ignored rows (target < 0, resolved on the host) get loss 0 and a zero gradient. Rows with NaN,
// +inf (after the cap) or only -inf get NaN.

struct Params {
    rows: u32,
    cols: u32,
    nx: u32,
    has_weight: u32,
    with_grad: u32,
    has_cap: u32,
    zero: u32,
    // label smoothing
    eps: f32,
    z: f32,
    cap: f32,
    // sum_c w_c (C without weights)
    w_sum: f32,
    inv_c: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read> weight: array<f32>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;
@group(0) @binding(6) var<storage, read_write> grad: array<f32>;

var<workgroup> row_target: i32;

// tanh without exp overflow: odd series near 0 (where 1 - 2 / (e^2a + 1) would cancel), the
// exponential form elsewhere (e^2a = inf gives exactly 1). NaN stays NaN.
fn tanh_(u: f32) -> f32 {
    if is_nan(u) {
        return u;
    }
    let a = abs(u);
    var t: f32;
    if a < 0.25 {
        let a2 = a * a;
        t = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (62.0 / 2835.0)))));
    } else {
        t = 1.0 - 2.0 / (exp(2.0 * a) + 1.0);
    }
    return select(t, -t, u < 0.0);
}

fn logit(i: u32) -> f32 {
    let v = x[i];
    if P.has_cap != 0u {
        return P.cap * tanh_(v / P.cap);
    }
    return v;
}

fn weight_of(c: u32) -> f32 {
    if P.has_weight != 0u {
        return weight[c];
    }
    return 1.0;
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wg, P.nx);
    if row >= P.rows {
        return;
    }
    let cols = P.cols;
    let base = row * cols;
    if lid == 0u {
        row_target = targets[row];
    }
    let t = workgroupUniformLoad(&row_target);
    if t < 0 {
        if lid == 0u {
            loss[row] = 0.0;
        }
        if P.with_grad != 0u {
            for (var i = lid; i < cols; i += WG) {
                grad[base + i] = 0.0;
            }
        }
        return;
    }
    let ty = u32(t);

    var scan = scan_start(P.zero);
    for (var i = lid; i < cols; i += WG) {
        scan = scan_value(scan, logit(base + i));
    }
    scan = row_scan(lid, scan);
    let mx = scan.max;
    let fl = scan.flags;

    // sum_c exp(x_c - max), and (smoothing only) sum_c w_c (max - x_c).
    var acc_e = vec2<f32>(0.0, 0.0);
    var acc_w = vec2<f32>(0.0, 0.0);
    let smoothing = P.eps > 0.0;
    for (var i = lid; i < cols; i += WG) {
        let v = logit(base + i);
        acc_e = kahan_add(acc_e, exp_term(v - mx));
        if smoothing {
            acc_w = kahan_add(acc_w, weight_of(i) * (mx - v));
        }
    }
    let sums = reduce_sum2(lid, vec2<f32>(kahan_value(acc_e), kahan_value(acc_w)));
    let sum = sums.x;
    let log_sum = log(sum);
    let lse = mx + log_sum;
    let bad = fl != 0u || is_neg_inf(mx);
    let x_y = logit(base + ty);
    let w_y = weight_of(ty);

    if lid == 0u {
        var l = (1.0 - P.eps) * (w_y * ((mx - x_y) + log_sum));
        if smoothing {
            l += P.eps * P.inv_c * (sums.y + P.w_sum * log_sum);
        }
        if P.z > 0.0 {
            l += P.z * lse * lse;
        }
        loss[row] = select(l, nan(P.zero), bad);
    }
    if P.with_grad == 0u {
        return;
    }

    let s = scale[row];
    var a = (1.0 - P.eps) * w_y;
    if smoothing {
        a += P.eps * P.w_sum * P.inv_c;
    }
    if P.z > 0.0 {
        a += 2.0 * P.z * lse;
    }
    a *= s;
    let b = s * P.eps * P.inv_c;
    let ct = s * (1.0 - P.eps);
    let inv = 1.0 / sum;
    for (var i = lid; i < cols; i += WG) {
        let v = logit(base + i);
        let p = exp_term(v - mx) * inv;
        var g = p * a - weight_of(i) * (b + select(0.0, ct, i == ty));
        if P.has_cap != 0u {
            let u = v / P.cap;
            g *= 1.0 - u * u;
        }
        grad[base + i] = select(g, nan(P.zero), bad);
    }
}
