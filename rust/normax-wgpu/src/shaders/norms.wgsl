// rms_norm and layer_norm over contiguous rows.
//
// rms_norm:   y = x * rstd * w,                      rstd = 1 / sqrt(mean(x^2) + eps)
// layer_norm: y = ((x - m0) * rstd - dm * rstd) * w + b
// LayerNorm's statistics are two-pass and corrected, as the CPU kernels: m0 = mean(x) from the
// first pass, then d = x - m0 gives dm = mean(d) (tiny) and var = mean(d^2) - dm^2, so nothing
// cancels when |mean| >> std. Sums are compensated per invocation, then reduced pairwise.

struct Params {
    rows: u32,
    cols: u32,
    nx: u32,
    // 0 rms_norm, 1 layer_norm
    op: u32,
    eps: f32,
    has_weight: u32,
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wg, P.nx);
    if row >= P.rows {
        return;
    }
    let cols = P.cols;
    let base = row * cols;
    let n = f32(cols);

    var m0 = 0.0;
    if P.op == 1u {
        var acc = vec2<f32>(0.0, 0.0);
        for (var i = lid; i < cols; i += WG) {
            acc = kahan_add(acc, x[base + i]);
        }
        m0 = reduce_sum(lid, kahan_value(acc)) / n;
    }

    // Sum of d and of d^2, d = x - m0 (m0 = 0 for rms_norm).
    var acc_d = vec2<f32>(0.0, 0.0);
    var acc_d2 = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < cols; i += WG) {
        let d = x[base + i] - m0;
        acc_d = kahan_add(acc_d, d);
        acc_d2 = kahan_add(acc_d2, d * d);
    }
    let sums = reduce_sum2(lid, vec2<f32>(kahan_value(acc_d), kahan_value(acc_d2)));
    var dm = 0.0;
    var var_ = sums.y / n;
    if P.op == 1u {
        dm = sums.x / n;
        var_ = max(var_ - dm * dm, 0.0);
    }
    let rstd = 1.0 / sqrt(var_ + P.eps);
    let shift = dm * rstd;

    for (var i = lid; i < cols; i += WG) {
        var r = (x[base + i] - m0) * rstd - shift;
        if P.has_weight != 0u {
            r = r * weight[i];
        }
        if P.has_bias != 0u {
            r = r + bias[i];
        }
        y[base + i] = r;
    }
}
