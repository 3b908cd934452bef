//! A step's prepared LoRA batch on the CPU: each slot applies exactly what a lone `lora` call
//! with that slot's segments does, and what does not fit is refused when the batch is built.

use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{Backend, DType, LoraModule, LoraPlan, LoraSlot};

fn module(rank: usize, in_f: usize, out_f: usize, page: usize, first: u32) -> LoraModule {
    let (a, b) = (rank * in_f / page, rank * out_f / page);
    LoraModule {
        rank,
        scale: 0.5 * rank as f32,
        a_pages: (first..first + a as u32).collect(),
        b_pages: (first + a as u32..first + (a + b) as u32).collect(),
    }
}

#[test]
fn each_slot_matches_a_lone_call() -> Result<(), quiver_tensor::TensorError> {
    let cpu = CpuBackend::default();
    let (page, tokens) = (8, 6);
    let mut pool = cpu.new_page_pool(page, 64, DType::F32)?;
    let ids: Vec<u32> = (0..64).collect();
    let data: Vec<f32> = (0..64 * page).map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5).collect();
    cpu.write_pages(&mut pool, &ids, &data)?;
    // Slot 0 is 16→8, slot 1 is 8→24.
    let (m0, n0) = (module(2, 16, 8, page, 0), module(1, 16, 8, page, 6));
    let m1 = module(3, 8, 24, page, 20);
    let plan = LoraPlan {
        tokens,
        runs: vec![(0, 3), (4, 2)],
        slots: vec![
            LoraSlot {
                in_f: 16,
                out_f: 8,
                modules: vec![Some(&m0), Some(&n0)],
            },
            LoraSlot {
                in_f: 8,
                out_f: 24,
                modules: vec![None, Some(&m1)],
            },
        ],
    };
    let lone: Vec<_> = plan.slots.iter().map(|s| plan.segments(s)).collect();
    let batch = cpu.lora_batch(&pool, plan.clone())?;
    for (slot, (in_f, out_f)) in [(16, 8), (8, 24)].into_iter().enumerate() {
        let x: Vec<f32> = (0..tokens * in_f).map(|i| (i % 13) as f32 * 0.1).collect();
        let y0 = vec![1.0; tokens * out_f];
        let (mut got, mut want) = (y0.clone(), y0.clone());
        cpu.lora_slot(&batch, slot, &x, &mut got)?;
        cpu.lora(&pool, &x, &mut want, in_f, out_f, &lone[slot])?;
        assert_eq!(got, want, "slot {slot}");
        assert_ne!(got, y0, "slot {slot} changes its rows");
        assert!(
            cpu.lora_slot(&batch, slot, &x[1..].to_vec(), &mut got).is_err(),
            "wrong x shape"
        );
    }
    let (x, mut y) = (vec![0.0; tokens * 16], vec![0.0; tokens * 8]);
    assert!(cpu.lora_slot(&batch, 2, &x, &mut y).is_err(), "no slot 2");

    // Out-of-pool pages, overlapping runs and a missing module entry fail at build time.
    let far = module(1, 16, 8, page, 63);
    let mut bad = plan.clone();
    bad.slots[0].modules[1] = Some(&far);
    assert!(cpu.lora_batch(&pool, bad).is_err());
    let mut overlap = plan.clone();
    overlap.runs[1] = (2, 2);
    assert!(cpu.lora_batch(&pool, overlap).is_err());
    let mut short = plan;
    short.slots[1].modules.pop();
    assert!(cpu.lora_batch(&pool, short).is_err());
    Ok(())
}
