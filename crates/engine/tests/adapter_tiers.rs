//! The host tier is an LRU under its byte budget (copies that the device backs go first), and
//! loads happen off the calling thread.

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
fn host_tier_evicts_device_backed_then_least_recently_used() -> Result<()> {
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
    let mut budget = MemoryBudget::new(10 << 20);
    for n in names {
        m.register(n, dir.path().join("adapters").join(n), false, None, &mut budget)?;
    }
    let load = |m: &mut AdapterManager<CpuBackend>, name: &str| -> Result<()> {
        m.prefetch(name);
        wait_loaded(m, name)
    };
    let tiers = |m: &AdapterManager<CpuBackend>| -> Vec<Option<Tier>> { names.iter().map(|n| tier(m, n)).collect() };
    // Three loads into room for two: the least recently loaded goes.
    load(&mut m, names[0])?;
    load(&mut m, names[1])?;
    load(&mut m, names[2])?;
    let t = tiers(&m);
    ensure!(
        t == [Some(Tier::Disk), Some(Tier::Host), Some(Tier::Host)],
        "the least recently used host copy goes: {t:?}"
    );
    // Uploading names[1] makes its host copy the first to go: loading names[0] again evicts it,
    // not names[2], which no device copy backs.
    ensure!(
        matches!(m.acquire(names[1], &mut budget), Acquire::Ready(_)),
        "upload from host failed"
    );
    load(&mut m, names[0])?;
    let t = tiers(&m);
    ensure!(
        t == [Some(Tier::Host), Some(Tier::Device), Some(Tier::Host)],
        "the copy the device backs goes first: {t:?}"
    );
    let host_copies = m.info().iter().filter(|a| a.tier == Tier::Host).count();
    ensure!(host_copies == 2, "{host_copies} host copies");
    ensure!(m.stats.host_evictions == 2 && m.stats.loads == 4, "{:?}", m.stats);
    Ok(())
}
