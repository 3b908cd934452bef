//! The paged LoRA gather kernel against the dense reference: mixed ranks, scattered pages,
//! long runs (SGMV) and single-token runs (BGMV) in one batch, rows without an adapter untouched.

use quiver_tensor::cpu::lora::{lora_ref, DenseLora};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{Backend, DType, LoraModule, LoraSegment};

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn f(&mut self) -> f32 {
        (self.next_u64() % 20001) as f32 / 10000.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

struct Dense {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
    module: LoraModule,
}

#[test]
fn paged_lora_matches_dense_reference() {
    check_against_reference(DType::F32);
}

/// bf16 pages: the reference uses the same bf16-rounded weights, so only summation order differs.
#[test]
fn bf16_pages_match_dense_reference() {
    check_against_reference(DType::BF16);
}

fn round(v: Vec<f32>, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect(),
        _ => v,
    }
}

fn check_against_reference(dtype: DType) {
    let cpu = CpuBackend::default();
    let (page, in_f, out_f) = (7, 21, 35); // odd sizes; the page divides both
    let mut rng = Rng(9);
    let mut pool = cpu.new_page_pool(page, 400, dtype).unwrap();
    // Hand out pages in a scrambled order so no module is contiguous.
    let mut free: Vec<u32> = (0..400).map(|i| (i * 37 % 400) as u32).collect();
    let mut adapters = Vec::new();
    for (rank, scale) in [(1usize, 2.0f32), (3, 0.5), (8, 0.25)] {
        let a = round(rng.vec(rank * in_f), dtype);
        let b = round(rng.vec(out_f * rank), dtype);
        let a_pages: Vec<u32> = free.drain(..rank * in_f / page).collect();
        let b_pages: Vec<u32> = free.drain(..rank * out_f / page).collect();
        cpu.write_pages(&mut pool, &a_pages, &a).unwrap();
        // Bᵀ rows: row j holds column j of B.
        let bt: Vec<f32> = (0..rank)
            .flat_map(|j| (0..out_f).map(move |o| (o, j)))
            .map(|(o, j)| b[o * rank + j])
            .collect();
        cpu.write_pages(&mut pool, &b_pages, &bt).unwrap();
        adapters.push(Dense {
            a,
            b,
            rank,
            scale,
            module: LoraModule {
                rank,
                scale,
                a_pages,
                b_pages,
            },
        });
    }
    let tokens = 40;
    let x = rng.vec(tokens * in_f);
    let y0 = rng.vec(tokens * out_f);
    // Runs: a 13-token prefill on rank 8, base rows, single decode tokens on each adapter,
    // a 9-token run on rank 1.
    let runs = [
        (0usize, 13usize, 2usize),
        (15, 1, 0),
        (16, 1, 1),
        (17, 1, 2),
        (20, 9, 0),
        (39, 1, 1),
    ];
    let segments: Vec<LoraSegment> = runs
        .iter()
        .map(|&(start, len, a)| LoraSegment {
            start,
            len,
            module: &adapters[a].module,
        })
        .collect();
    let mut y = y0.clone();
    cpu.lora(&pool, &x, &mut y, in_f, out_f, &segments).unwrap();
    let mut want = y0.clone();
    for &(start, len, a) in &runs {
        let d = &adapters[a];
        lora_ref(
            &x,
            &mut want,
            in_f,
            out_f,
            start,
            len,
            &DenseLora {
                a: &d.a,
                b: &d.b,
                rank: d.rank,
                scale: d.scale,
            },
        );
    }
    for (i, (g, w)) in y.iter().zip(&want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "y[{i}] (token {}): {g} vs {w}",
            i / out_f
        );
    }
    // Rows outside every run are bit-for-bit untouched.
    for t in [13, 14, 18, 19, 29, 38] {
        assert_eq!(
            &y[t * out_f..(t + 1) * out_f],
            &y0[t * out_f..(t + 1) * out_f],
            "token {t}"
        );
    }
}

#[test]
fn lora_rejects_overlapping_or_out_of_pool_segments() {
    let cpu = CpuBackend::default();
    let pool = cpu.new_page_pool(2, 4, DType::F32).unwrap();
    assert!(
        cpu.new_page_pool(2, 4, DType::F16).is_err(),
        "f16 pages are not supported and must say so"
    );
    let m = LoraModule {
        rank: 1,
        scale: 1.0,
        a_pages: vec![0],
        b_pages: vec![1],
    };
    let bad = LoraModule {
        rank: 1,
        scale: 1.0,
        a_pages: vec![0],
        b_pages: vec![9],
    };
    let (x, mut y) = (vec![1.0; 6], vec![0.0; 6]);
    let overlap = [
        LoraSegment {
            start: 0,
            len: 2,
            module: &m,
        },
        LoraSegment {
            start: 1,
            len: 1,
            module: &m,
        },
    ];
    assert!(cpu.lora(&pool, &x, &mut y, 2, 2, &overlap).is_err());
    assert!(cpu
        .lora(
            &pool,
            &x,
            &mut y,
            2,
            2,
            &[LoraSegment {
                start: 0,
                len: 1,
                module: &bad
            }]
        )
        .is_err());
    assert!(cpu
        .lora(
            &pool,
            &x,
            &mut y,
            2,
            2,
            &[LoraSegment {
                start: 2,
                len: 2,
                module: &m
            }]
        )
        .is_err());
}
