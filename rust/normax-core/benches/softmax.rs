//! Criterion benches of the softmax family: every op on every ISA this CPU runs, and the two row
//! algorithms (in-cache vs two-pass) across row lengths, to show where each wins.
//! Single-threaded, so kernels are compared and not the thread pool.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use normax_core::lse::Algorithm;
use normax_core::softmax::{
    log_softmax, log_softmax_backward, logsumexp, softmax, softmax_backward, softmax_with,
};
use normax_core::{isa, threads, Layout};
use std::hint::black_box;

fn data(n: usize) -> Vec<f32> {
    // Deterministic N(0, 5)-ish values without a random-number dependency.
    (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 17.0)
        .collect()
}

/// About 4 MiB of f32 per measurement: rows x len.
fn shape(len: usize) -> Layout {
    Layout::rows(((1 << 20) / len).max(1), len)
}

fn ops(c: &mut Criterion) {
    threads::set_num_threads(1).unwrap();
    let layout = Layout::rows(256, 4096);
    let n = layout.size().unwrap();
    let x = data(n);
    let dy = data(n);
    let mut y = vec![0f32; n];
    let mut lse = vec![0f32; layout.rows_count()];
    let mut g = c.benchmark_group("f32 256x4096");
    g.throughput(Throughput::Bytes((n * 4) as u64));
    for isa in isa::supported() {
        isa::set_active(isa).unwrap();
        let name = isa.name();
        g.bench_function(BenchmarkId::new("softmax", name), |b| {
            b.iter(|| softmax(black_box(&x), &mut y, layout).unwrap())
        });
        g.bench_function(BenchmarkId::new("log_softmax", name), |b| {
            b.iter(|| log_softmax(black_box(&x), &mut y, layout).unwrap())
        });
        g.bench_function(BenchmarkId::new("logsumexp", name), |b| {
            b.iter(|| logsumexp(black_box(&x), None, &mut lse, None, layout).unwrap())
        });
        g.bench_function(BenchmarkId::new("softmax_backward", name), |b| {
            b.iter(|| softmax_backward(black_box(&x), &dy, &mut y, layout).unwrap())
        });
        g.bench_function(BenchmarkId::new("log_softmax_backward", name), |b| {
            b.iter(|| log_softmax_backward(black_box(&x), &dy, &mut y, layout).unwrap())
        });
    }
    isa::set_active(isa::best()).unwrap();
    g.finish();
}

fn algorithms(c: &mut Criterion) {
    threads::set_num_threads(1).unwrap();
    let mut g = c.benchmark_group("softmax f32 algorithm by row length");
    for len in [64usize, 1024, 4096, 16384, 65536, 262_144 - 1] {
        let layout = shape(len);
        let n = layout.size().unwrap();
        let x = data(n);
        let mut y = vec![0f32; n];
        g.throughput(Throughput::Bytes((n * 4) as u64));
        for (name, algorithm) in [
            ("in-cache", Algorithm::InCache),
            ("two-pass", Algorithm::TwoPass),
        ] {
            g.bench_function(BenchmarkId::new(name, len), |b| {
                b.iter(|| softmax_with(black_box(&x), &mut y, layout, algorithm).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1));
    targets = ops, algorithms
}
criterion_main!(benches);
