//! Every `Backend` op of the CUDA backend against the CPU backend (the oracle) on the same fresh
//! random inputs, with odd sizes (no multiple of 8 where a shape allows it):
//!
//!     QUIVER_REQUIRE_GPU=1 cargo test --release -p quiver-cuda --test gpu_kernels -- --nocapture --test-threads=1
//!
//! * Inputs are seeded from the clock on every run; each test prints its seed, and
//!   `QUIVER_SEED=N` replays a run.
//! * Before each op that overwrites its output, the GPU output buffer is uploaded full of NaNs,
//!   so an element the kernel never writes fails the comparison. Ops that update in place (add,
//!   add_bias, silu_mul, rope, lora) start from the same random values on both sides instead.
//! * The metric is `common::verdict`: no NaN/inf ever passes, and the worst per-element relative
//!   error (judged against 1% of the output's scale for elements below it) must stay within 1e-4
//!   on pure-f32 paths and 1e-2 on paths through bf16/f16 values. Each op prints its worst error.
//!   Headroom on the f32 reductions (matmul k = 301, attention over ≤ 31 positions, rank-64 LoRA):
//!   measured on the CPU, the CPU backend is within 1.1e-5..1.5e-5 of an f64 reference on these
//!   shapes, and a plain sequential f32 sum within 3.3e-5 of the CPU backend, so a correct GPU
//!   kernel (any summation order) should land at about 3e-5 at worst, a third of the tolerance.
//! * Without a GPU the GPU tests print why and pass, unless `QUIVER_REQUIRE_GPU=1`. The tests of
//!   the comparison helper itself (at the end) always run.

mod common;

use anyhow::{ensure, Result};
use common::{check, gpu, verdict, Rng, TOL_F32, TOL_HALF};
use half::{bf16, f16};
use quiver_cuda::linear::GEMV_MAX_M;
use quiver_cuda::pool::units_per_chunk;
use quiver_cuda::{CudaBackend, CudaPagePool};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout, LoraModule, LoraSegment, Matrix, RopeTable};

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// A device buffer of `n` NaNs: whatever the op does not write stays NaN and fails.
fn poisoned(gpu: &CudaBackend, n: usize) -> Result<cudarc::driver::CudaSlice<f32>> {
    Ok(gpu.upload(&vec![f32::NAN; n])?)
}

/// `x` rounded to `dtype` and widened back (what the GPU's cuBLAS path feeds the GEMM).
fn rounded(dtype: DType, x: &[f32]) -> Vec<f32> {
    match dtype {
        DType::F32 => x.to_vec(),
        DType::BF16 => x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
    }
}

fn half_or_f32(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        TOL_F32
    } else {
        TOL_HALF
    }
}

#[test]
fn embed_matches_cpu() -> Result<()> {
    let Some(gpu) = gpu("embed") else { return Ok(()) };
    let mut rng = Rng::seeded("embed");
    let (rows, cols) = (157, 83);
    for dtype in DTYPES {
        let table = Matrix::from_f32_as(dtype, rows, cols, rng.vec(rows * cols, -2.0, 2.0))?;
        let mut ids: Vec<u32> = (0..13).map(|_| rng.below(rows) as u32).collect();
        ids[5] = ids[2]; // a repeated id
        ids[0] = rows as u32 - 1; // the last row
        let mut want = vec![0.0; ids.len() * cols];
        CpuBackend::default().embed(&table, &ids, &mut want)?;
        let w = gpu.upload_weight(table)?;
        let mut out = poisoned(&gpu, want.len())?;
        gpu.embed(&w, &ids, &mut out)?;
        // Widening is exact: any difference is a bug, 1e-4 is only the f32 default.
        check(&format!("embed {dtype} table"), &gpu.download(&out)?, &want, TOL_F32);
    }
    Ok(())
}

#[test]
fn matmul_matches_cpu_on_gemv_and_cublas_paths() -> Result<()> {
    let Some(gpu) = gpu("matmul") else { return Ok(()) };
    let mut rng = Rng::seeded("matmul");
    let (n, k) = (171, 301);
    for dtype in DTYPES {
        let wm = Matrix::from_f32_as(dtype, n, k, rng.vec(n * k, -1.0, 1.0))?;
        let w = gpu.upload_weight(wm.clone())?;
        for m in [1, 3, 8, 9, 33, 130] {
            let x = rng.vec(m * k, -1.0, 1.0);
            let cublas = m > GEMV_MAX_M;
            // The cuBLAS path rounds x to the weight's 16-bit type by design (crates/cuda/src/
            // linear.rs); the reference rounds it too, so only summation order differs. The gemv
            // path (m ≤ 8) keeps x in f32 like the CPU.
            let x_ref = if cublas { rounded(dtype, &x) } else { x.clone() };
            let mut want = vec![0.0; m * n];
            CpuBackend::default().matmul(&x_ref, m, &wm, &mut want)?;
            let xd = gpu.upload(&x)?;
            let mut out = poisoned(&gpu, m * n)?;
            gpu.matmul(&xd, m, &w, &mut out)?;
            let path = if cublas { "cuBLAS" } else { "gemv" };
            check(
                &format!("matmul {dtype} [{m}×{k}]·[{n}×{k}]ᵀ ({path})"),
                &gpu.download(&out)?,
                &want,
                half_or_f32(dtype),
            );
        }
    }
    Ok(())
}

#[test]
fn elementwise_ops_match_cpu() -> Result<()> {
    let Some(gpu) = gpu("elementwise") else { return Ok(()) };
    let mut rng = Rng::seeded("elementwise");

    // add_bias: x [7, 83] += bias [83].
    let (rows, width) = (7, 83);
    let x = rng.vec(rows * width, -3.0, 3.0);
    let bias = rng.vec(width, -1.0, 1.0);
    let mut want = x.clone();
    CpuBackend::default().add_bias(&mut want, &bias)?;
    let mut xd = gpu.upload(&x)?;
    gpu.add_bias(&mut xd, &gpu.upload(&bias)?)?;
    check("add_bias [7, 83]", &gpu.download(&xd)?, &want, TOL_F32);

    // add: acc += x over 1237 values.
    let acc = rng.vec(1237, -3.0, 3.0);
    let x = rng.vec(1237, -3.0, 3.0);
    let mut want = acc.clone();
    CpuBackend::default().add(&mut want, &x)?;
    let mut accd = gpu.upload(&acc)?;
    gpu.add(&mut accd, &gpu.upload(&x)?)?;
    check("add [1237]", &gpu.download(&accd)?, &want, TOL_F32);

    // silu_mul over 2049 values, gates well into both tails.
    let gate = rng.vec(2049, -12.0, 12.0);
    let up = rng.vec(2049, -2.0, 2.0);
    let mut want = gate.clone();
    CpuBackend::default().silu_mul(&mut want, &up)?;
    let mut gd = gpu.upload(&gate)?;
    gpu.silu_mul(&mut gd, &gpu.upload(&up)?)?;
    check("silu_mul [2049]", &gpu.download(&gd)?, &want, TOL_F32);

    // rms_norm: rows wider and narrower than the kernel's 256 threads.
    for (rows, width) in [(5, 899), (3, 83), (1, 1)] {
        let x = rng.vec(rows * width, -4.0, 4.0);
        let w = rng.vec(width, 0.5, 1.5);
        let eps = 1e-6;
        let mut want = vec![0.0; x.len()];
        CpuBackend::default().rms_norm(&x, &w, eps, &mut want)?;
        let mut out = poisoned(&gpu, x.len())?;
        gpu.rms_norm(&gpu.upload(&x)?, &gpu.upload(&w)?, eps, &mut out)?;
        check(
            &format!("rms_norm [{rows}, {width}]"),
            &gpu.download(&out)?,
            &want,
            TOL_F32,
        );
    }

    // gather_rows: 19 of 37 rows of 83, with repeats.
    let (n, width) = (37, 83);
    let x = rng.vec(n * width, -3.0, 3.0);
    let mut rows: Vec<u32> = (0..19).map(|_| rng.below(n) as u32).collect();
    rows[3] = rows[7];
    rows[0] = n as u32 - 1;
    let mut want = vec![0.0; rows.len() * width];
    CpuBackend::default().gather_rows(&x, width, &rows, &mut want)?;
    let mut out = poisoned(&gpu, want.len())?;
    gpu.gather_rows(&gpu.upload(&x)?, width, &rows, &mut out)?;
    check("gather_rows 19 of [37, 83]", &gpu.download(&out)?, &want, TOL_F32);
    Ok(())
}

#[test]
fn rope_matches_cpu() -> Result<()> {
    let Some(gpu) = gpu("rope") else { return Ok(()) };
    let mut rng = Rng::seeded("rope");
    // Full rotation (2 · half = head_dim) and a partial one (the last dims pass through).
    for (heads, head_dim, half) in [(5, 38, 17), (3, 34, 17), (2, 128, 64)] {
        let max_pos = 97;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..max_pos {
            for i in 0..half {
                let angle = p as f32 * 10000f32.powf(-((2 * i) as f32) / (2 * half) as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let table = RopeTable {
            half_dim: half,
            cos,
            sin,
        };
        let positions: Vec<u32> = (0..11).map(|_| rng.below(max_pos) as u32).collect();
        let x = rng.vec(positions.len() * heads * head_dim, -2.0, 2.0);
        let mut want = x.clone();
        CpuBackend::default().rope(&mut want, heads, head_dim, &positions, &table)?;
        let mut xd = gpu.upload(&x)?;
        gpu.rope(&mut xd, heads, head_dim, &positions, &table)?;
        check(
            &format!("rope {heads} heads × {head_dim}, rotary half {half}"),
            &gpu.download(&xd)?,
            &want,
            TOL_F32,
        );
    }
    Ok(())
}

/// Token `t` of sequence `seq` at position `pos`, cached through `table`.
fn push_token(b: &mut AttentionBatch, seq: u32, pos: u32, table: &[u32], block_size: usize) {
    let bs = block_size as u32;
    b.positions.push(pos);
    b.seq.push(seq);
    b.slots.push(table[(pos / bs) as usize] * bs + pos % bs);
}

/// Two sequences with random block tables spread over several pool chunks. Step 1 prefills both
/// (A: 9 tokens, B: 30); step 2 is ragged: B decodes one token while A prefills 13 more, B's
/// token first in the batch. Both layers get their own K/V, so a wrong layer plane shows.
fn attention_case(
    gpu: &CudaBackend,
    rng: &mut Rng,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    bs: usize,
    dtype: DType,
) -> Result<()> {
    let probe = KvLayout {
        num_layers: 2,
        num_blocks: 1,
        block_size: bs,
        num_kv_heads: kv_heads,
        head_dim,
        dtype,
    };
    let per_chunk = units_per_chunk(probe.bytes_per_block()) as usize;
    let layout = KvLayout {
        num_blocks: 2 * per_chunk + 3,
        ..probe
    };
    let mut cpu_kv = CpuBackend::default().new_kv_pool(layout)?;
    let mut gpu_kv = gpu.new_kv_pool(layout)?;
    let (a_hist, a_new, b_hist) = (9u32, 13u32, 30u32);
    let na = (a_hist + a_new).div_ceil(bs as u32) as usize;
    let nb = (b_hist + 1).div_ceil(bs as u32) as usize;
    let blocks = rng.distinct(na + nb, layout.num_blocks);
    let tables = vec![blocks[..na].to_vec(), blocks[na..].to_vec()];

    let mut step1 = AttentionBatch {
        block_tables: tables.clone(),
        ..Default::default()
    };
    for p in 0..a_hist {
        push_token(&mut step1, 0, p, &tables[0], bs);
    }
    for p in 0..b_hist {
        push_token(&mut step1, 1, p, &tables[1], bs);
    }
    let mut step2 = AttentionBatch {
        block_tables: tables.clone(),
        ..Default::default()
    };
    push_token(&mut step2, 1, b_hist, &tables[1], bs);
    for p in a_hist..a_hist + a_new {
        push_token(&mut step2, 0, p, &tables[0], bs);
    }

    for (name, batch) in [("prefill", &step1), ("ragged prefill + decode", &step2)] {
        let t = batch.num_tokens();
        for layer in 0..layout.num_layers {
            let kv_w = kv_heads * head_dim;
            let k = rng.vec(t * kv_w, -1.0, 1.0);
            let v = rng.vec(t * kv_w, -1.0, 1.0);
            let q = rng.vec(t * heads * head_dim, -1.0, 1.0);
            CpuBackend::default().write_kv(&mut cpu_kv, layer, &k, &v, &batch.slots)?;
            gpu.write_kv(&mut gpu_kv, layer, &gpu.upload(&k)?, &gpu.upload(&v)?, &batch.slots)?;
            let mut want = vec![0.0; q.len()];
            CpuBackend::default().attention(&cpu_kv, layer, &q, heads, batch, &mut want)?;
            let mut out = poisoned(gpu, q.len())?;
            gpu.attention(&gpu_kv, layer, &gpu.upload(&q)?, heads, batch, &mut out)?;
            check(
                &format!(
                    "attention {heads}/{kv_heads} heads × {head_dim}, blocks of {bs}, {dtype} KV: {name}, layer {layer}"
                ),
                &gpu.download(&out)?,
                &want,
                TOL_F32,
            );
        }
    }
    Ok(())
}

#[test]
fn write_kv_and_paged_attention_match_cpu() -> Result<()> {
    let Some(gpu) = gpu("attention") else { return Ok(()) };
    let mut rng = Rng::seeded("attention");
    // (query heads, KV heads, head_dim, block size): GQA 3:1, MQA 4:1, plain MHA at the
    // kernel's largest head size.
    // Both sides round K/V to the same 16-bit values (round to nearest even), so every dtype
    // meets the f32 tolerance: only the summation order differs.
    for (heads, kv_heads, head_dim, bs) in [(6, 2, 40, 7), (4, 1, 97, 16), (3, 3, 256, 5)] {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            attention_case(&gpu, &mut rng, heads, kv_heads, head_dim, bs, dtype)?;
        }
    }
    Ok(())
}

/// A module of `rank` on fresh pages taken from `free`, its A and Bᵀ written to both pools.
#[allow(clippy::too_many_arguments)]
fn lora_module(
    gpu: &CudaBackend,
    rng: &mut Rng,
    cpu_pool: &mut <CpuBackend as Backend>::PagePool,
    gpu_pool: &mut CudaPagePool,
    free: &mut Vec<u32>,
    rank: usize,
    (page, in_f, out_f): (usize, usize, usize),
) -> Result<LoraModule> {
    let a_pages: Vec<u32> = free.split_off(free.len() - rank * in_f / page);
    let b_pages: Vec<u32> = free.split_off(free.len() - rank * out_f / page);
    for ids in [&a_pages, &b_pages] {
        let data = rng.vec(ids.len() * page, -0.5, 0.5);
        CpuBackend::default().write_pages(cpu_pool, ids, &data)?;
        gpu.write_pages(gpu_pool, ids, &data)?;
    }
    Ok(LoraModule {
        rank,
        scale: rng.f32(0.25, 2.0),
        a_pages,
        b_pages,
    })
}

/// 12 tokens: base rows 0, 6 and 9 (no adapter) between segments; tokens 1..6 one adapter (SGMV
/// segment of 5 tokens); tokens 7, 8, 10, 11 one token each (BGMV), ranks 1, 64, random, and the
/// first module again. Pages drawn at random from a pool spanning two chunks.
fn lora_case(gpu: &CudaBackend, rng: &mut Rng, dtype: DType, page: usize, in_f: usize, out_f: usize) -> Result<()> {
    let units = units_per_chunk(page * dtype.size()) as usize * 3 / 2;
    let mut cpu_pool = CpuBackend::default().new_page_pool(page, units, dtype)?;
    let mut gpu_pool = gpu.new_page_pool(page, units, dtype)?;
    let odd_rank = 2 * rng.below(32) + 1; // 1..=63, odd
    let ranks = [odd_rank, 1, 64, 1 + rng.below(64)];
    let need: usize = ranks.iter().map(|r| r * (in_f + out_f) / page).sum();
    let mut free = rng.distinct(need, units);
    let dims = (page, in_f, out_f);
    let modules = ranks
        .iter()
        .map(|&r| lora_module(gpu, rng, &mut cpu_pool, &mut gpu_pool, &mut free, r, dims))
        .collect::<Result<Vec<_>>>()?;
    let tokens = 12;
    let plan = [(1, 5, 0), (7, 1, 1), (8, 1, 2), (10, 1, 3), (11, 1, 0)];
    let segments: Vec<LoraSegment> = plan
        .iter()
        .map(|&(start, len, m)| LoraSegment {
            start,
            len,
            module: &modules[m],
        })
        .collect();
    let x = rng.vec(tokens * in_f, -1.0, 1.0);
    let y0 = rng.vec(tokens * out_f, -1.0, 1.0);
    let mut want = y0.clone();
    CpuBackend::default().lora(&cpu_pool, &x, &mut want, in_f, out_f, &segments)?;
    let xd = gpu.upload(&x)?;
    let mut yd = gpu.upload(&y0)?;
    gpu.lora(&gpu_pool, &xd, &mut yd, in_f, out_f, &segments)?;
    let got = gpu.download(&yd)?;
    let label = format!("lora {dtype} pages of {page}, {in_f}→{out_f}, ranks {ranks:?}");
    check(&label, &got, &want, half_or_f32(dtype));
    for base_row in [0, 6, 9] {
        let r = base_row * out_f..(base_row + 1) * out_f;
        ensure!(got[r.clone()] == y0[r], "{label}: base row {base_row} changed");
    }
    // No segment at all: y untouched.
    gpu.lora(&gpu_pool, &xd, &mut yd, in_f, out_f, &[])?;
    ensure!(gpu.download(&yd)? == got, "{label}: a call without segments changed y");
    Ok(())
}

#[test]
fn lora_sgmv_and_bgmv_match_cpu() -> Result<()> {
    let Some(gpu) = gpu("lora") else { return Ok(()) };
    let mut rng = Rng::seeded("lora");
    for dtype in [DType::F32, DType::BF16] {
        for (page, in_f, out_f) in [(7, 133, 161), (32, 96, 224)] {
            lora_case(&gpu, &mut rng, dtype, page, in_f, out_f)?;
        }
    }
    Ok(())
}

/// The bytes of page `id` as stored on the device, read straight from its chunk.
fn read_page(gpu: &CudaBackend, pool: &CudaPagePool, id: u32) -> Result<Vec<u8>> {
    gpu.synchronize()?; // the copy and scatter ran on the backend's (non-blocking) streams
    let table = pool.pool.table();
    let chunks: Vec<u64> = table.stream().clone_dtoh(table)?;
    let per = pool.pool.per_chunk;
    let base = chunks[(id / per) as usize];
    ensure!(base != 0, "page {id}: chunk never committed");
    let ptr = base + (id % per) as u64 * pool.pool.unit_bytes as u64;
    let mut bytes = vec![0u8; pool.pool.unit_bytes];
    table.stream().context().bind_to_thread()?;
    // SAFETY: `ptr` lies inside a live chunk of `per_chunk * unit_bytes` bytes (id < units), and
    // every stream that wrote it was synchronized above.
    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bytes, ptr) }?;
    Ok(bytes)
}

#[test]
fn write_pages_and_download_weight_round_trip() -> Result<()> {
    let Some(gpu) = gpu("round trips") else { return Ok(()) };
    let mut rng = Rng::seeded("round trips");
    println!("  device: {}", gpu.name());
    let v = rng.vec(1237, -3.0, 3.0);
    ensure!(gpu.download(&gpu.upload(&v)?)? == v, "upload/download changed values");
    ensure!(gpu.download(&gpu.zeros(1237)?)? == vec![0.0; 1237], "zeros is not zero");
    for dtype in DTYPES {
        let m = Matrix::from_f32_as(dtype, 37, 83, rng.vec(37 * 83, -3.0, 3.0))?;
        let back = gpu.download_weight(&gpu.upload_weight(m.clone())?)?;
        ensure!(
            (back.rows, back.cols, back.dtype()) == (m.rows, m.cols, m.dtype()),
            "download_weight {dtype}: shape or dtype changed"
        );
        let (a, b) = (m.to_f32_vec(), back.to_f32_vec());
        ensure!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "download_weight {dtype}: values changed"
        );
        println!("  download_weight {dtype} [37, 83]: bit-exact");
    }
    for dtype in [DType::F32, DType::BF16] {
        let page = 5;
        let per = units_per_chunk(page * dtype.size());
        let mut pool = gpu.new_page_pool(page, 2 * per as usize + 2, dtype)?;
        // Pages at both ends of the first chunks, written twice (the second write wins).
        let ids = [0, per - 1, per, 2 * per + 1, 17];
        for round in 0..2 {
            let data = rng.vec(ids.len() * page, -3.0, 3.0);
            gpu.write_pages(&mut pool, &ids, &data)?;
            for (i, &id) in ids.iter().enumerate() {
                let values = &data[i * page..(i + 1) * page];
                let want: Vec<u8> = match dtype {
                    DType::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
                    _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                };
                ensure!(
                    read_page(&gpu, &pool, id)? == want,
                    "write_pages {dtype} round {round}: page {id} holds other bytes"
                );
            }
        }
        println!("  write_pages {dtype}: pages across 3 chunks bit-exact (rounded like the CPU pool)");
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors_on_both_backends() -> Result<()> {
    let Some(gpu) = gpu("errors") else { return Ok(()) };
    let table = Matrix::from_f32(4, 3, vec![0.0; 12])?;
    let w = gpu.upload_weight(table.clone())?;
    let mut out = gpu.zeros(3)?;
    ensure!(CpuBackend::default().embed(&table, &[4], &mut vec![0.0; 3]).is_err());
    ensure!(
        gpu.embed(&w, &[4], &mut out).is_err(),
        "embed: id beyond the vocabulary"
    );
    let x = gpu.upload(&[1.0; 6])?;
    ensure!(
        gpu.gather_rows(&x, 3, &[2], &mut out).is_err(),
        "gather_rows: row 2 of 2"
    );
    ensure!(gpu.new_page_pool(4, 8, DType::F16).is_err(), "f16 page pool");
    let mut pool = gpu.new_page_pool(4, 8, DType::F32)?;
    ensure!(
        gpu.write_pages(&mut pool, &[8], &[0.0; 4]).is_err(),
        "write_pages: page 8 of 8"
    );
    let module = LoraModule {
        rank: 1,
        scale: 1.0,
        a_pages: vec![0],
        b_pages: vec![8],
    };
    let seg = [LoraSegment {
        start: 0,
        len: 1,
        module: &module,
    }];
    let (xl, mut yl) = (gpu.upload(&[1.0; 4])?, gpu.upload(&[0.0; 4])?);
    ensure!(gpu.lora(&pool, &xl, &mut yl, 4, 4, &seg).is_err(), "lora: page 8 of 8");
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 2,
        block_size: 4,
        num_kv_heads: 1,
        head_dim: 8,
        dtype: DType::F32,
    };
    let kv = gpu.new_kv_pool(layout)?;
    let batch = AttentionBatch {
        positions: vec![4],
        slots: vec![0],
        seq: vec![0],
        block_tables: vec![vec![1]],
    };
    let (q, mut o) = (gpu.upload(&[0.0; 8])?, gpu.zeros(8)?);
    ensure!(
        gpu.attention(&kv, 0, &q, 1, &batch, &mut o).is_err(),
        "attention: position 4 beyond a one-block table"
    );
    Ok(())
}

// The comparison helper itself: runs everywhere, GPU or not.

#[test]
fn helper_rejects_nan_and_inf() {
    let want = [1.0, 2.0, 3.0];
    assert!(verdict(&[1.0, f32::NAN, 3.0], &want, 1.0).is_err());
    assert!(verdict(&[1.0, 2.0, f32::INFINITY], &want, 1.0).is_err());
    assert!(verdict(&[f32::NEG_INFINITY, 2.0, 3.0], &want, 1.0).is_err());
    // A poisoned output the kernel never wrote.
    assert!(verdict(&[f32::NAN; 3], &want, f32::MAX).is_err());
    // A non-finite reference is a test bug, never a pass.
    assert!(verdict(&want, &[1.0, f32::NAN, 3.0], 1.0).is_err());
}

#[test]
fn helper_passes_small_and_fails_large_relative_errors() {
    let want = [1.0, -2.0, 100.0];
    let w = verdict(&[1.000_01, -2.0, 100.0], &want, TOL_F32).expect("1e-5 relative passes 1e-4");
    assert_eq!(w.index, 0);
    assert!((w.err - 1e-5).abs() < 1e-6, "{}", w.err);
    assert!(verdict(&[1.001, -2.0, 100.0], &want, TOL_F32).is_err());
    assert!(verdict(&[1.0, -2.01, 100.0], &want, TOL_HALF).is_ok());
    assert!(verdict(&[1.0, -2.1, 100.0], &want, TOL_HALF).is_err());
    assert!(verdict(&[1.0, 2.0, 100.0], &want, TOL_HALF).is_err(), "sign flip");
    assert!(verdict(&[1.0, -2.0], &want, 1.0).is_err(), "length mismatch");
    assert_eq!(verdict(&[], &[], 0.0).map(|w| w.err), Ok(0.0));
}

#[test]
fn helper_judges_tiny_elements_against_the_output_scale() {
    // Elements below 1% of the largest magnitude (here 100 → floor 1) are judged against 1.
    let want = [100.0, 0.0, 1e-3];
    assert!(verdict(&[100.0, 5e-3, 1e-3], &want, TOL_HALF).is_ok());
    assert!(verdict(&[100.0, 0.5, 1e-3], &want, TOL_HALF).is_err());
    assert!(verdict(&[100.0, 0.0, 0.02], &want, TOL_HALF).is_err());
    // An all-zero reference: anything but zero fails.
    assert!(verdict(&[0.0, 0.0], &[0.0, 0.0], TOL_F32).is_ok());
    assert!(verdict(&[0.0, 1e-6], &[0.0, 0.0], TOL_F32).is_err());
}
