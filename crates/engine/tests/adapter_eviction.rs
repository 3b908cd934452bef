//! Evicting a just-in-time adapter: the first idle candidate goes; one a request is running or
//! waiting on, one a running request leases, or a pinned one stays.

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::{ensure, Result};
use quiver_adapters::load_peft_adapter;
use quiver_engine::adapters::{Acquire, AdapterManager};
use quiver_engine::memory::MemoryBudget;
use quiver_model::{lora_page_size, BlockAllocator, ModelConfig};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{Backend, DType};

#[test]
fn only_idle_unpinned_adapters_are_unregistered_in_the_given_order() -> Result<()> {
    let (dir, _) = quiver_testkit::materialize_lora("llama-f32")?;
    let cfg = ModelConfig::from_dir(&dir.path().join("base"))?;
    let page = lora_page_size(&cfg);
    let pages = BlockAllocator::new(1 << 12, page);
    let pool = CpuBackend::default().new_page_pool(page, pages.total(), DType::F32)?;
    let mut m = AdapterManager::new(CpuBackend::default(), cfg.clone(), pool, pages, page * 4, 1 << 30, 64);
    let path = dir.path().join("adapters").join("llama-r1-qv");
    let host = Arc::new(load_peft_adapter("x", &path, &cfg)?);
    let mut budget = MemoryBudget::new(64 << 20);
    for n in ["queued", "leased", "pinned", "idle-1", "idle-2"] {
        m.register(n, path.clone(), n == "pinned", Some(host.clone()), &mut budget)?;
    }
    // The pinned adapter was uploaded when it was registered.
    let pinned_pages = m.pages_in_use();
    ensure!(
        pinned_pages > 0 && budget.adapter_bytes() > 0,
        "pinned adapter not resident"
    );
    let Acquire::Ready(lease) = m.acquire("leased", &mut budget) else {
        anyhow::bail!("upload failed")
    };
    let in_use: HashSet<&str> = ["queued"].into();
    let all: Vec<String> = ["queued", "leased", "pinned", "idle-1", "idle-2", "unknown"]
        .map(String::from)
        .into();
    let gone = m.unregister_first_idle(&all, &in_use, &mut budget);
    ensure!(gone.as_deref() == Some("idle-1"), "{gone:?}");
    ensure!(!m.is_registered("idle-1") && m.is_registered("idle-2"));
    let busy: Vec<String> = ["queued", "leased", "pinned"].map(String::from).into();
    let gone = m.unregister_first_idle(&busy, &in_use, &mut budget);
    ensure!(gone.is_none(), "evicted a busy adapter: {gone:?}");
    // The lease ends: the adapter is idle now, and its pages come back.
    drop(lease);
    let gone = m.unregister_first_idle(&busy, &in_use, &mut budget);
    ensure!(gone.as_deref() == Some("leased"), "{gone:?}");
    ensure!(
        m.pages_in_use() == pinned_pages,
        "{} pages in use, the pinned adapter's {pinned_pages} expected",
        m.pages_in_use()
    );
    Ok(())
}
