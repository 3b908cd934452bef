//! The CPU KV cache in each dtype: what `write_kv` stores, how far 16-bit K/V move attention
//! from the f32 cache's, and that released blocks and pages give their memory back.

use half::{bf16, f16};
use quiver_tensor::cpu::{CpuBackend, KvData};
use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn layout(dtype: DType, num_layers: usize, num_blocks: usize) -> KvLayout {
    KvLayout {
        num_layers,
        num_blocks,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 64,
        dtype,
    }
}

#[test]
fn bytes_per_block_follow_the_dtype() {
    let f32_block = layout(DType::F32, 24, 1).bytes_per_block();
    assert_eq!(f32_block, 2 * 24 * 16 * 2 * 64 * 4);
    assert_eq!(layout(DType::BF16, 24, 1).bytes_per_block() * 2, f32_block);
    assert_eq!(layout(DType::F16, 24, 1).bytes_per_block() * 2, f32_block);
}

/// V is row-major, so slot `s`'s row is entries `s * width ..`: each holds the input rounded to
/// nearest even, the value `half` (and torch's `.to(bfloat16)`) gives, ties included.
#[test]
fn write_kv_rounds_to_nearest_even() {
    let cpu = CpuBackend::default();
    let width = 2 * 64;
    let mut r = Rng(3);
    let mut v = r.vec(2 * width);
    // Exact ties: 1 + 2^-8 lies halfway between two bf16 values, 1 + 2^-11 between two f16.
    v[0] = 1.0 + 1.0 / 256.0;
    v[1] = 1.0 + 3.0 / 256.0;
    v[2] = 1.0 + 1.0 / 2048.0;
    v[3] = 1e-30;
    let k = r.vec(2 * width);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut pool = cpu.new_kv_pool(layout(dtype, 1, 4)).unwrap();
        let slots = [17, 40];
        cpu.write_kv(&mut pool, 0, &k, &v, &slots).unwrap();
        for (t, &s) in slots.iter().enumerate() {
            for i in 0..width {
                let x = v[t * width + i];
                let want = match dtype {
                    DType::F32 => x,
                    DType::BF16 => bf16::from_f32(x).to_f32(),
                    DType::F16 => f16::from_f32(x).to_f32(),
                };
                let got = pool.v[0].get(s as usize * width + i);
                assert_eq!(got.to_bits(), want.to_bits(), "{dtype} slot {s} entry {i}: {x}");
            }
        }
    }
    assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
    assert_eq!(bf16::from_f32(1.0 + 3.0 / 256.0).to_f32(), 1.0 + 4.0 / 256.0);
}

/// Attention over a 16-bit cache against the f32 cache's on the same unrounded K/V (values in
/// [-1, 1], queries scaled to give peaked softmaxes, 300 positions). bf16 keeps 8 significant
/// bits (relative error ≤ 2^-9 per value), f16 11 (≤ 2^-12): a score q·k/√d moves by at most
/// 2^-9 · Σ|q_d k_d|/√d (≤ 0.03 here, ≈ 0.002 for random signs), so outputs (convex
/// combinations of V rows within [-1, 1], each off by ≤ 2^-9) move by a few 2^-9 at most; f16
/// 8× less. Bounds: 2^-8 (bf16) and 2^-11 (f16), about 9× and 7× the measured worst cases
/// (4.5e-4, 7e-5), so a wrong row or a conversion that truncates instead of rounding shows.
#[test]
fn attention_over_16_bit_kv_stays_close_to_f32() {
    let cpu = CpuBackend::default();
    let (heads, ctx) = (6, 300);
    let l = layout(DType::F32, 1, ctx / 16 + 1);
    let width = l.num_kv_heads * l.head_dim;
    let mut r = Rng(11);
    let (k, v) = (r.vec(ctx * width), r.vec(ctx * width));
    let q: Vec<f32> = r.vec(2 * heads * l.head_dim).iter().map(|x| 3.0 * x).collect();
    let slots: Vec<u32> = (0..ctx as u32).collect();
    let batch = AttentionBatch {
        positions: vec![150, ctx as u32 - 1],
        slots: vec![0, 0],
        seq: vec![0, 0],
        block_tables: vec![(0..l.num_blocks as u32).collect()],
    };
    let run = |dtype: DType| {
        let mut pool = cpu.new_kv_pool(KvLayout { dtype, ..l }).unwrap();
        cpu.write_kv(&mut pool, 0, &k, &v, &slots).unwrap();
        let mut out = vec![0.0; q.len()];
        cpu.attention(&pool, 0, &q, heads, &batch, &mut out).unwrap();
        out
    };
    let exact = run(DType::F32);
    for (dtype, tol) in [(DType::BF16, 1.0 / 256.0), (DType::F16, 1.0 / 2048.0)] {
        let got = run(dtype);
        let worst = got
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tol, "{dtype}: worst |Δ| {worst} > {tol}");
        assert!(worst > 0.0, "{dtype}: identical to f32, so nothing was rounded");
        eprintln!("{dtype} KV: worst |Δ| vs f32 {worst:.2e} (bound {tol:.2e})");
    }
}

fn resident(d: &KvData) -> usize {
    d.resident_bytes().expect("the pool is an anonymous mapping")
}

/// Writing every block commits the pool; releasing half of them gives back those blocks' pages
/// in every layer (mincore over the mapping, which other tests' threads cannot disturb), and
/// they read as zeros afterwards until written again.
#[test]
fn released_kv_blocks_return_their_memory_and_read_as_zeros() {
    let cpu = CpuBackend::default();
    for dtype in [DType::F32, DType::BF16] {
        let l = layout(dtype, 2, 256);
        let mut pool = cpu.new_kv_pool(l).unwrap();
        let per_layer = l.num_blocks * l.block_elems() * dtype.size();
        assert!(resident(&pool.v[0]) < per_layer / 8, "a new pool commits nothing");
        let width = l.num_kv_heads * l.head_dim;
        let slots: Vec<u32> = (0..(l.num_blocks * l.block_size) as u32).collect();
        let mut r = Rng(5);
        let (k, v) = (r.vec(slots.len() * width), r.vec(slots.len() * width));
        for layer in 0..l.num_layers {
            cpu.write_kv(&mut pool, layer, &k, &v, &slots).unwrap();
        }
        for data in pool.k.iter().chain(&pool.v) {
            assert_eq!(resident(data), per_layer, "{dtype}: every block written");
        }
        // Blocks 0..128, in shuffled order (adjacent ids are merged into one range).
        let released: Vec<u32> = (0..128u32).map(|i| (i * 37) % 128).collect();
        cpu.release_kv_blocks(&mut pool, &released).unwrap();
        for data in pool.k.iter().chain(&pool.v) {
            assert_eq!(resident(data), per_layer / 2, "{dtype}: half the pool given back");
        }
        for i in 0..128 * l.block_elems() {
            assert_eq!(pool.v[1].get(i), 0.0, "released entries read as zeros");
            assert_eq!(pool.k[0].get(i), 0.0, "released entries read as zeros");
        }
        let kept = 200 * l.block_size * width + 3;
        assert_eq!(
            pool.v[1].get(kept),
            match dtype {
                DType::BF16 => bf16::from_f32(v[kept]).to_f32(),
                _ => v[kept],
            }
        );
        // Written again, a released block holds its new values.
        cpu.write_kv(&mut pool, 0, &k[..width].to_vec(), &v[..width].to_vec(), &[5])
            .unwrap();
        assert_ne!(pool.v[0].get(5 * width), 0.0);
        assert!(cpu.release_kv_blocks(&mut pool, &[256]).is_err(), "block 256 of 256");
    }
}

/// Adapter pages: released pages read as zeros and their memory goes back (pages of 1,000
/// values, not a multiple of an OS page: the run of adjacent ids is released as one range).
#[test]
fn released_adapter_pages_return_their_memory() {
    let cpu = CpuBackend::default();
    for dtype in [DType::F32, DType::BF16] {
        let (page, pages) = (1000, 2048);
        let mut pool = cpu.new_page_pool(page, pages, dtype).unwrap();
        let ids: Vec<u32> = (0..pages as u32).collect();
        let data = vec![0.5f32; page * pages];
        cpu.write_pages(&mut pool, &ids, &data).unwrap();
        let before = pool.resident_bytes().expect("mapped");
        assert!(before >= page * pages * dtype.size(), "{dtype}: all pages written");
        cpu.release_pages(&mut pool, &ids[..1024]).unwrap();
        let after = pool.resident_bytes().expect("mapped");
        let freed = 1024 * page * dtype.size();
        // All but the partial OS pages at the ends of the range.
        assert!(
            after + freed <= before + 2 * 4096,
            "{dtype}: {before} → {after} B resident after releasing {freed} B"
        );
        assert!(pool.page_values(0).iter().all(|&x| x == 0.0));
        assert!(pool.page_values(1023).iter().all(|&x| x == 0.0));
        assert!(pool.page_values(1024).iter().all(|&x| x == 0.5));
        assert!(cpu.release_pages(&mut pool, &[pages as u32]).is_err());
    }
}
