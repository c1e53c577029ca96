use normax_core::softmax::{logsumexp, softmax};
use normax_core::{threads, Layout};
use std::time::Instant;
extern "C" {
    fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32;
}
fn huge(n: usize) -> &'static mut [f32] {
    let bytes = (n * 4).div_ceil(1 << 21) << 21;
    let layout = std::alloc::Layout::from_size_align(bytes, 1 << 21).unwrap();
    unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        if std::env::var("HUGE").is_ok() { madvise(p, bytes, 14); }
        std::slice::from_raw_parts_mut(p as *mut f32, n)
    }
}
fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (r, c, th) = (args[0], args[1], args[2]);
    threads::set_num_threads(th).ok();
    let x = huge(r * c);
    for (i, v) in x.iter_mut().enumerate() { *v = ((i * 7919) % 1000) as f32 / 100.0; }
    let x: &[f32] = x;
    let y = huge(r * c);
    let mut l = vec![0f32; c];
    let col = Layout { outer: 1, len: r, inner: c };
    let row = Layout::rows(c, r);
    let mut best = [f64::MAX; 4];
    for _ in 0..15 {
        let t = Instant::now(); softmax(x, y, col).unwrap(); best[0] = best[0].min(t.elapsed().as_secs_f64());
        let t = Instant::now(); softmax(x, y, row).unwrap(); best[1] = best[1].min(t.elapsed().as_secs_f64());
        let t = Instant::now(); logsumexp(x, None, &mut l, None, col).unwrap(); best[2] = best[2].min(t.elapsed().as_secs_f64());
        let t = Instant::now(); logsumexp(x, None, &mut l, None, row).unwrap(); best[3] = best[3].min(t.elapsed().as_secs_f64());
    }
    println!("softmax col {:.3} row {:.3} ratio {:.2} | lse col {:.3} row {:.3} ratio {:.2}", best[0]*1e3, best[1]*1e3, best[0]/best[1], best[2]*1e3, best[3]*1e3, best[2]/best[3]);
}
