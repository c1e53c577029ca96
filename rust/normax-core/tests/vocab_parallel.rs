//! The vocabulary-parallel kernels (vocab_parallel_stats, vocab_parallel_combine,
//! vocab_parallel_backward and the linear pair) against the single-process cross-entropy: the
//! shards' statistics, gathered by hand in rank order, give the same loss, and each shard's
//! gradient is its slice of the whole one.

mod common;

use common::Rng;
use normax_core::cross_entropy::{
    cross_entropy_with_grad, linear_cross_entropy, vocab_parallel_backward, vocab_parallel_combine,
    vocab_parallel_fields, vocab_parallel_linear_backward, vocab_parallel_linear_stats,
    vocab_parallel_stats, LinearGrads, Shard, ShardLinear,
};
use normax_core::spec::{CeOptions, GradOutput, Reduction, Target};
use normax_core::Error;

fn opts(
    weight: Option<&[f32]>,
    reduction: Reduction,
    eps: f64,
    z: f64,
    cap: Option<f64>,
) -> CeOptions<&[f32]> {
    CeOptions {
        weight,
        ignore_index: -100,
        reduction,
        label_smoothing: eps,
        z_loss: z,
        softcap: cap,
        ..CeOptions::default()
    }
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    let err = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    err / scale.max(1e-30)
}

/// Every shard's statistics, laid out as the all-gather would.
fn gather(
    x: &[f32],
    rows: usize,
    v: usize,
    shards: &[Shard],
    t: &[i64],
    o: &CeOptions<&[f32]>,
) -> Vec<f32> {
    let f = vocab_parallel_fields(o.label_smoothing);
    let mut out = vec![];
    for s in shards {
        let local: Vec<f32> = (0..rows)
            .flat_map(|r| x[r * v + s.start..r * v + s.start + s.len].to_vec())
            .collect();
        let mut packed = vec![0f32; rows * f];
        vocab_parallel_stats(&local, rows, *s, t, o, &mut packed).unwrap();
        out.extend(packed);
    }
    out
}

#[test]
fn shards_match_the_whole_vocabulary() {
    let (rows, v) = (7, 53);
    let mut rng = Rng(3);
    let x: Vec<f32> = (0..rows * v).map(|_| rng.normal(3.0) as f32).collect();
    let mut t: Vec<i64> = (0..rows).map(|r| ((r * 17) % v) as i64).collect();
    t[0] = v as i64 - 1;
    t[2] = -100;
    let w: Vec<f32> = (0..v).map(|c| 0.5 + (c % 5) as f32 * 0.25).collect();
    let shards = [
        Shard { start: 0, len: 10 },
        Shard { start: 10, len: 20 },
        Shard { start: 30, len: 23 },
    ];
    for (weight, reduction, eps, z, cap) in [
        (None, Reduction::Mean, 0.0, 0.0, None),
        (Some(&w[..]), Reduction::Sum, 0.1, 1e-3, Some(4.0)),
        (Some(&w[..]), Reduction::None, 0.2, 0.0, None),
    ] {
        let o = opts(weight, reduction, eps, z, cap);
        let n_loss = reduction.loss_len(rows);
        let (mut loss, mut grad) = (vec![0f32; n_loss], vec![0f32; rows * v]);
        let go = GradOutput::Scalar(1.0);
        cross_entropy_with_grad(
            &x,
            &mut grad,
            rows,
            v,
            Target::Classes(&t),
            &o,
            go,
            &mut loss,
        )
        .unwrap();

        let g = gather(&x, rows, v, &shards, &t, &o);
        let stride = rows * vocab_parallel_fields(eps);
        let (mut l2, mut lse) = (vec![0f32; n_loss], vec![0f64; rows * 2]);
        let denom =
            vocab_parallel_combine(&g, stride, &shards, rows, &t, &o, &mut l2, &mut lse).unwrap();
        assert!(max_rel(&l2, &loss) < 1e-6, "{l2:?} vs {loss:?}");
        for s in &shards {
            let local: Vec<f32> = (0..rows)
                .flat_map(|r| x[r * v + s.start..r * v + s.start + s.len].to_vec())
                .collect();
            let want: Vec<f32> = (0..rows)
                .flat_map(|r| grad[r * v + s.start..r * v + s.start + s.len].to_vec())
                .collect();
            let mut gs = vec![0f32; local.len()];
            vocab_parallel_backward(&local, rows, *s, v, &t, &o, &lse, denom, go, &mut gs).unwrap();
            assert!(max_rel(&gs, &want) < 1e-6, "shard {s:?}");
        }
    }
}

#[test]
fn linear_shards_match_the_linear_cross_entropy() {
    let (n, h, v) = (9, 6, 31);
    let mut rng = Rng(5);
    let hidden: Vec<f32> = (0..n * h).map(|_| rng.normal(1.0) as f32).collect();
    let weight: Vec<f32> = (0..v * h).map(|_| rng.normal(1.0) as f32).collect();
    let mut t: Vec<i64> = (0..n).map(|r| ((r * 7) % v) as i64).collect();
    t[1] = -100;
    let o = opts(None, Reduction::Mean, 0.1, 1e-3, None);
    let mut loss = vec![0f32; 1];
    let (mut dh, mut dw) = (vec![0f32; n * h], vec![0f32; v * h]);
    let grads = LinearGrads {
        dhidden: &mut dh,
        dweight: &mut dw,
        dbias: None,
    };
    let go = GradOutput::Scalar(1.0);
    linear_cross_entropy(
        &hidden,
        &weight,
        None,
        &t,
        (n, h, v),
        &o,
        None,
        Some((go, grads)),
        &mut loss,
        None,
    )
    .unwrap();

    let shards = [Shard { start: 0, len: 16 }, Shard { start: 16, len: 15 }];
    let f = vocab_parallel_fields(0.1);
    let mut g = vec![];
    for s in &shards {
        let lin = ShardLinear {
            hidden: &hidden,
            weight: &weight[s.start * h..(s.start + s.len) * h],
            bias: None,
            h,
        };
        let mut packed = vec![0f32; n * f];
        vocab_parallel_linear_stats(lin, n, *s, &t, &o, Some(20), &mut packed).unwrap();
        g.extend(packed);
    }
    let (mut l2, mut lse) = (vec![0f32; 1], vec![0f64; n * 2]);
    let denom = vocab_parallel_combine(&g, n * f, &shards, n, &t, &o, &mut l2, &mut lse).unwrap();
    assert!(max_rel(&l2, &loss) < 1e-6);
    let mut dh_sum = vec![0f32; n * h];
    for s in &shards {
        let ws = &weight[s.start * h..(s.start + s.len) * h];
        let lin = ShardLinear {
            hidden: &hidden,
            weight: ws,
            bias: None,
            h,
        };
        let (mut dhs, mut dws) = (vec![0f32; n * h], vec![0f32; ws.len()]);
        vocab_parallel_linear_backward(
            lin,
            n,
            *s,
            v,
            &t,
            &o,
            Some(20),
            &lse,
            denom,
            go,
            &mut dhs,
            &mut dws,
            None,
        )
        .unwrap();
        assert!(max_rel(&dws, &dw[s.start * h..(s.start + s.len) * h]) < 1e-5);
        for (a, b) in dh_sum.iter_mut().zip(&dhs) {
            *a += b;
        }
    }
    assert!(max_rel(&dh_sum, &dh) < 1e-5);
}

#[test]
fn combine_rejects_bad_layouts_and_classes() {
    let (rows, v) = (2, 8);
    let x = vec![0.5f32; rows * v];
    let o = opts(None, Reduction::Mean, 0.0, 0.0, None);
    let shards = [Shard { start: 0, len: 4 }, Shard { start: 4, len: 4 }];
    let t = [1i64, 9];
    let g = gather(&x, rows, v, &shards, &t, &o);
    let (mut l, mut lse) = (vec![0f32; 1], vec![0f64; rows * 2]);
    let f = vocab_parallel_fields(0.0);
    match vocab_parallel_combine(&g, rows * f, &shards, rows, &t, &o, &mut l, &mut lse) {
        Err(Error::Index(m)) => assert!(m.contains('9'), "{m}"),
        other => panic!("{other:?}"),
    }
    let gap = [Shard { start: 0, len: 4 }, Shard { start: 5, len: 3 }];
    let t = [1i64, 2];
    assert!(matches!(
        vocab_parallel_combine(&g, rows * f, &gap, rows, &t, &o, &mut l, &mut lse),
        Err(Error::Value(_))
    ));
}
