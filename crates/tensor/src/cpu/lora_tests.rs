//! `lora_apply` against the dense reference on shapes that take the SIMD tiles (AVX-512 for pages
//! of a multiple of 16 floats, AVX2 for other multiples of 8) and the portable path (other pages): every tile size 1..=8, long runs
//! cut into several tiles, ranks from 1 to 100 (whose h no longer fits the stack buffer),
//! scattered pages, f32 and bf16 pages, several threads.

use half::bf16;

use super::{lora_apply, lora_ref, CpuPagePool, DenseLora};
use crate::backend::{LoraModule, LoraSegment};
use crate::storage::DType;

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % 20001) as f32 / 10000.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

struct Adapter {
    a: Vec<f32>,
    b: Vec<f32>,
    module: LoraModule,
}

/// Adapters of `ranks` in a pool of pages handed out in a scrambled order.
fn adapters(
    page: usize,
    in_f: usize,
    out_f: usize,
    ranks: &[usize],
    dtype: DType,
    rng: &mut Rng,
) -> (CpuPagePool, Vec<Adapter>) {
    let need: usize = ranks.iter().map(|r| r * (in_f + out_f) / page).sum::<usize>() + 3;
    let mut pool = CpuPagePool::new(page, need, dtype).unwrap();
    let mut free: Vec<u32> = (0..need).map(|i| ((i * 37 + 11) % need) as u32).collect();
    // 37 is coprime to need unless need is a multiple of 37: fall back to reversed order.
    if need.is_multiple_of(37) {
        free = (0..need as u32).rev().collect();
    }
    let round = |v: Vec<f32>| -> Vec<f32> {
        match dtype {
            DType::BF16 => v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect(),
            _ => v,
        }
    };
    let mut out = Vec::new();
    for (i, &rank) in ranks.iter().enumerate() {
        let a = round(rng.vec(rank * in_f));
        let b = round(rng.vec(out_f * rank));
        let a_pages: Vec<u32> = free.drain(..rank * in_f / page).collect();
        let b_pages: Vec<u32> = free.drain(..rank * out_f / page).collect();
        for (c, &id) in a_pages.iter().enumerate() {
            pool.write(id, &a[c * page..(c + 1) * page]);
        }
        let bt: Vec<f32> = (0..rank)
            .flat_map(|j| (0..out_f).map(move |o| (o, j)))
            .map(|(o, j)| b[o * rank + j])
            .collect();
        for (c, &id) in b_pages.iter().enumerate() {
            pool.write(id, &bt[c * page..(c + 1) * page]);
        }
        let scale = 0.5 + i as f32 * 0.25;
        out.push(Adapter {
            a,
            b,
            module: LoraModule {
                rank,
                scale,
                a_pages,
                b_pages,
            },
        });
    }
    (pool, out)
}

/// Runs `(start, len, adapter)` segments through `lora_apply` and the reference; rows outside
/// every run must stay bit-for-bit untouched.
fn check(page: usize, in_f: usize, out_f: usize, ranks: &[usize], runs: &[(usize, usize, usize)], dtype: DType) {
    let mut rng = Rng(page as u64 * 1000 + in_f as u64 + out_f as u64);
    let (pool, ads) = adapters(page, in_f, out_f, ranks, dtype, &mut rng);
    let tokens = runs.iter().map(|r| r.0 + r.1).max().unwrap_or(0) + 2;
    let x = rng.vec(tokens * in_f);
    let y0 = rng.vec(tokens * out_f);
    let segments: Vec<LoraSegment> = runs
        .iter()
        .map(|&(start, len, a)| LoraSegment {
            start,
            len,
            module: &ads[a].module,
        })
        .collect();
    let mut y = y0.clone();
    lora_apply(&pool, &x, &mut y, in_f, out_f, &segments);
    let mut want = y0.clone();
    for &(start, len, a) in runs {
        let d = &ads[a];
        let w = DenseLora {
            a: &d.a,
            b: &d.b,
            rank: d.module.rank,
            scale: d.module.scale,
        };
        lora_ref(&x, &mut want, in_f, out_f, start, len, &w);
    }
    let covered = |t: usize| runs.iter().any(|&(s, l, _)| (s..s + l).contains(&t));
    for t in 0..tokens {
        let (g, w0) = (&y[t * out_f..(t + 1) * out_f], &want[t * out_f..(t + 1) * out_f]);
        if !covered(t) {
            assert_eq!(
                g,
                &y0[t * out_f..(t + 1) * out_f],
                "page {page} {dtype}: token {t} was touched"
            );
            continue;
        }
        // The deltas sum rank · (in_f + 1) products of values in [-1, 1]: scale the tolerance.
        let tol = 2e-6 * (in_f as f32).sqrt() * 4.0;
        for (o, (a, b)) in g.iter().zip(w0).enumerate() {
            assert!(
                (a - b).abs() <= tol * (1.0 + b.abs()),
                "page {page} {dtype}: y[{t}, {o}] = {a}, want {b}"
            );
        }
    }
}

/// Every tile size once (runs of 1..=8 tokens), a 13-token run (tiles 8 + 5), base rows between.
fn mixed_runs(adapters: usize) -> Vec<(usize, usize, usize)> {
    let mut runs = Vec::new();
    let mut start = 1;
    for len in (1..=8).chain([13, 21]) {
        runs.push((start, len, runs.len() % adapters));
        start += len + 1 + len % 2;
    }
    runs
}

#[test]
fn simd_tiles_match_reference_f32_and_bf16() {
    for dtype in [DType::F32, DType::BF16] {
        // (page, in, out): one page per row, several pages, out < in and out > in, page 128.
        // Pages of 8, 24 and 40 floats take the AVX2 tiles even where AVX-512 is present.
        for (page, in_f, out_f) in [
            (8, 8, 16),
            (16, 48, 32),
            (24, 72, 120),
            (32, 64, 224),
            (40, 80, 120),
            (128, 256, 640),
        ] {
            check(page, in_f, out_f, &[1, 3, 8, 16, 5], &mixed_runs(5), dtype);
        }
    }
}

#[test]
fn simd_tiles_mixed_and_large_ranks() {
    // Rank 100 · 8 tokens overflows the stack buffer for h; 64 is the largest bench rank.
    for dtype in [DType::F32, DType::BF16] {
        check(16, 32, 48, &[100, 64, 2, 33], &mixed_runs(4), dtype);
    }
}

#[test]
fn bgmv_each_token_its_own_adapter() {
    // The decode shape: 32 single-token segments, each on its own adapter of mixed rank.
    let ranks: Vec<usize> = (0..32).map(|i| [8, 16, 32, 64][i % 4]).collect();
    let runs: Vec<(usize, usize, usize)> = (0..32).map(|i| (i, 1, i)).collect();
    for dtype in [DType::F32, DType::BF16] {
        check(32, 64, 96, &ranks, &runs, dtype);
        check(24, 48, 72, &ranks, &runs, dtype);
    }
}

#[test]
fn portable_path_for_odd_pages() {
    for dtype in [DType::F32, DType::BF16] {
        check(7, 21, 35, &[1, 3, 8], &mixed_runs(3), dtype);
        check(12, 36, 24, &[2, 5], &mixed_runs(2), dtype);
    }
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    // One run per thread or several: every tile computes the same sums in the same order.
    let ranks = [16usize; 6];
    let runs: Vec<(usize, usize, usize)> = (0..6).map(|i| (i * 5, 1 + i % 3, i)).collect();
    let mut rng = Rng(5);
    let (pool, ads) = adapters(32, 64, 96, &ranks, DType::BF16, &mut rng);
    let x = rng.vec(40 * 64);
    let segments: Vec<LoraSegment> = runs
        .iter()
        .map(|&(start, len, a)| LoraSegment {
            start,
            len,
            module: &ads[a].module,
        })
        .collect();
    let go = |threads: usize| {
        let mut y = vec![0.0f32; 40 * 96];
        let pool_t = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool_t.install(|| lora_apply(&pool, &x, &mut y, 64, 96, &segments));
        y
    };
    assert_eq!(go(1), go(3));
}
