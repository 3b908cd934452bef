//! The host tier is an LRU under its byte budget, and loads happen off the calling thread.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use quiver_engine::adapters::{Acquire, AdapterManager, Tier};
use quiver_engine::memory::MemoryBudget;
use quiver_model::{lora_page_size, BlockAllocator, ModelConfig};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{Backend, DType};

fn tier(m: &AdapterManager<CpuBackend>, name: &str) -> Option<Tier> {
    m.info().into_iter().find(|a| a.name == name).map(|a| a.tier)
}

fn wait_loaded(m: &mut AdapterManager<CpuBackend>, name: &str) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        m.poll();
        if tier(m, name) == Some(Tier::Host) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("{name} never reached the host tier")
}

#[test]
fn host_tier_evicts_the_least_recently_used() -> Result<()> {
    let (dir, _) = quiver_testkit::materialize_lora("llama-f32")?;
    let cfg = ModelConfig::from_dir(&dir.path().join("base"))?;
    let page = lora_page_size(&cfg);
    let pages = BlockAllocator::new(1 << 14, page);
    let pool = CpuBackend::default().new_page_pool(page, pages.total(), DType::F32)?;
    // Host copies are f32: r8 all-linear is 65,536 B; a 150 kB host budget holds two of these
    // adapters but not all three.
    let mut m = AdapterManager::new(CpuBackend::default(), cfg, pool, pages, page * 4, 150_000, 64);
    let names = [
        "llama-r8-all-linear",
        "llama-rank-alpha-pattern",
        "llama-r16-rslora-qkvo",
    ];
    for n in names {
        m.register(n, dir.path().join("adapters").join(n), false, None)?;
    }
    let mut budget = MemoryBudget::new(10 << 20);
    m.prefetch(names[0]);
    wait_loaded(&mut m, names[0])?;
    m.prefetch(names[1]);
    wait_loaded(&mut m, names[1])?;
    // Use the older one: it becomes the most recent.
    ensure!(
        matches!(m.acquire(names[0], &mut budget), Acquire::Ready(_)),
        "upload from host failed"
    );
    m.prefetch(names[2]);
    let t = Instant::now();
    while tier(&m, names[2]) != Some(Tier::Host) && t.elapsed() < Duration::from_secs(30) {
        m.poll();
        std::thread::sleep(Duration::from_millis(2));
    }
    let tiers: Vec<_> = names.iter().map(|n| tier(&m, n)).collect();
    ensure!(tiers[2] == Some(Tier::Host), "{tiers:?}");
    ensure!(
        tiers[0] == Some(Tier::Device),
        "the used adapter is on the device: {tiers:?}"
    );
    ensure!(
        tiers[1] == Some(Tier::Disk),
        "the least recently used host copy goes: {tiers:?}"
    );
    ensure!(m.stats.host_evictions >= 1 && m.stats.loads == 3, "{:?}", m.stats);
    Ok(())
}
