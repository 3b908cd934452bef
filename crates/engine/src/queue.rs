//! The waiting queue. FCFS, or one FIFO per adapter served in rotation so that a flood of
//! requests for one popular adapter cannot starve the others (LoRAX's approach). Either way a
//! request whose adapter is not ready yet is skipped, not waited for.

use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    Fcfs,
    #[default]
    AdapterRoundRobin,
}

/// Queue key: the adapter name, `None` for the base model.
pub type Key = Option<String>;

pub struct FairQueue<T> {
    policy: Policy,
    fifo: VecDeque<(Key, T)>,
    per: HashMap<Key, VecDeque<T>>,
    rotation: VecDeque<Key>,
    len: usize,
}

impl<T> FairQueue<T> {
    pub fn new(policy: Policy) -> Self {
        FairQueue {
            policy,
            fifo: VecDeque::new(),
            per: HashMap::new(),
            rotation: VecDeque::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn push_back(&mut self, key: Key, item: T) {
        self.push(key, item, false)
    }

    /// Preempted requests go back to the front of their queue.
    pub fn push_front(&mut self, key: Key, item: T) {
        self.push(key, item, true)
    }

    fn push(&mut self, key: Key, item: T, front: bool) {
        self.len += 1;
        match self.policy {
            Policy::Fcfs if front => self.fifo.push_front((key, item)),
            Policy::Fcfs => self.fifo.push_back((key, item)),
            Policy::AdapterRoundRobin => {
                let q = self.per.entry(key.clone()).or_default();
                if q.is_empty() {
                    if front {
                        self.rotation.push_front(key);
                    } else {
                        self.rotation.push_back(key);
                    }
                }
                if front {
                    q.push_front(item)
                } else {
                    q.push_back(item)
                }
            }
        }
    }

    /// Removes and returns the first request, in policy order, that `ready` accepts. In
    /// round-robin, only the head of each adapter's queue is considered and the adapter served
    /// moves to the back of the rotation.
    pub fn pop_ready(&mut self, mut ready: impl FnMut(&Key, &mut T) -> bool) -> Option<(Key, T)> {
        let found = match self.policy {
            Policy::Fcfs => {
                let i = self.fifo.iter_mut().position(|(k, t)| ready(k, t))?;
                self.fifo.remove(i)
            }
            Policy::AdapterRoundRobin => {
                let i = (0..self.rotation.len()).find(|&i| {
                    let key = &self.rotation[i];
                    self.per
                        .get_mut(key)
                        .and_then(|q| q.front_mut())
                        .is_some_and(|t| ready(key, t))
                })?;
                let key = self.rotation.remove(i)?;
                let q = self.per.get_mut(&key)?;
                let item = q.pop_front()?;
                if q.is_empty() {
                    self.per.remove(&key);
                } else {
                    self.rotation.push_back(key.clone());
                }
                Some((key, item))
            }
        };
        if found.is_some() {
            self.len -= 1;
        }
        found
    }

    /// Removes every request `drop` selects (cancelled ones), returning them. Called every step:
    /// when nothing is selected the queues are only read, not rebuilt.
    pub fn drain_where(&mut self, mut drop: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        if !self.iter().any(|(_, t)| drop(t)) {
            return out;
        }
        let fifo = std::mem::take(&mut self.fifo);
        for (k, t) in fifo {
            if drop(&t) {
                out.push(t)
            } else {
                self.fifo.push_back((k, t))
            }
        }
        for q in self.per.values_mut() {
            let items = std::mem::take(q);
            for t in items {
                if drop(&t) {
                    out.push(t)
                } else {
                    q.push_back(t)
                }
            }
        }
        self.per.retain(|_, q| !q.is_empty());
        let per = &self.per;
        self.rotation.retain(|k| per.contains_key(k));
        self.len -= out.len();
        out
    }

    /// Adapter names of the first `n` waiting requests (for prefetching).
    pub fn upcoming_adapters(&self, n: usize) -> Vec<String> {
        match self.policy {
            Policy::Fcfs => self.fifo.iter().filter_map(|(k, _)| k.clone()).take(n).collect(),
            Policy::AdapterRoundRobin => self.rotation.iter().flatten().take(n).cloned().collect(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Key, &T)> {
        let fifo = self.fifo.iter().map(|(k, t)| (k, t));
        let per = self.per.iter().flat_map(|(k, q)| q.iter().map(move |t| (k, t)));
        fifo.chain(per)
    }
}
