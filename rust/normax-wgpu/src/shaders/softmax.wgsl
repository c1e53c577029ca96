// softmax, log_softmax and logsumexp over contiguous rows, max-subtracted in three passes:
// the row's max (and whether it holds NaN or +inf), the sum of exp(x - max), the output.
//
// Special rows follow normax's CPU kernels: NaN anywhere makes the row NaN (logsumexp NaN); +inf
// makes softmax/log_softmax NaN and logsumexp +inf; a row of only -inf gives NaN
// (softmax/log_softmax) and -inf (logsumexp).

struct Params {
    rows: u32,
    cols: u32,
    nx: u32,
    // 0 softmax, 1 log_softmax, 2 logsumexp (one value per row)
    op: u32,
    // Always 0: see neg_inf().
    zero: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = row_of(wg, P.nx);
    if row >= P.rows {
        return;
    }
    let cols = P.cols;
    let base = row * cols;

    var scan = scan_start(P.zero);
    for (var i = lid; i < cols; i += WG) {
        scan = scan_value(scan, x[base + i]);
    }
    scan = row_scan(lid, scan);
    let mx = scan.max;
    let fl = scan.flags;

    var acc = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < cols; i += WG) {
        acc = kahan_add(acc, exp_term(x[base + i] - mx));
    }
    let sum = reduce_sum(lid, kahan_value(acc));
    let log_sum = log(sum);
    // NaN rows for softmax/log_softmax: NaN, +inf, or nothing but -inf.
    let bad = fl != 0u || is_neg_inf(mx);

    if P.op == 2u {
        if lid == 0u {
            var r = mx + log_sum;
            if (fl & HAS_NAN) != 0u {
                r = nan(P.zero);
            } else if (fl & HAS_POS_INF) != 0u {
                r = pos_inf(P.zero);
            } else if is_neg_inf(mx) {
                r = neg_inf(P.zero);
            }
            y[row] = r;
        }
        return;
    }
    let inv = 1.0 / sum;
    for (var i = lid; i < cols; i += WG) {
        let d = x[base + i] - mx;
        var r: f32;
        if P.op == 0u {
            r = exp_term(d) * inv;
        } else {
            r = d - log_sum;
        }
        y[base + i] = select(r, nan(P.zero), bad);
    }
}
