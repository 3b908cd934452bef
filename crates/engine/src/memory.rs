//! One byte budget shared by KV blocks and adapter pages (S-LoRA's unified memory): neither has a
//! fixed share; whichever needs memory takes it while the total stays under the budget.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    total: usize,
    kv: usize,
    adapters: usize,
}

impl MemoryBudget {
    pub fn new(total: usize) -> Self {
        MemoryBudget {
            total,
            kv: 0,
            adapters: 0,
        }
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn free(&self) -> usize {
        self.total - self.kv - self.adapters
    }
    pub fn kv_bytes(&self) -> usize {
        self.kv
    }
    pub fn adapter_bytes(&self) -> usize {
        self.adapters
    }
    pub fn take_kv(&mut self, bytes: usize) -> bool {
        let ok = bytes <= self.free();
        if ok {
            self.kv += bytes;
        }
        ok
    }
    pub fn give_kv(&mut self, bytes: usize) {
        self.kv -= bytes.min(self.kv);
    }
    pub fn take_adapter(&mut self, bytes: usize) -> bool {
        let ok = bytes <= self.free();
        if ok {
            self.adapters += bytes;
        }
        ok
    }
    pub fn give_adapter(&mut self, bytes: usize) {
        self.adapters -= bytes.min(self.adapters);
    }
}
