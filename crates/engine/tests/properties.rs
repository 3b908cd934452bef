//! Property tests of the scheduler: random arrivals, prompt and output lengths, `n`, adapters,
//! adapter reloads and cancellations under a small memory budget (every prompt shares a prefix
//! with the others, so the prefix cache is busy) never lose a request, never leak a KV block, a
//! budget byte or an adapter lease, never exceed the budget, and every request ends. After every
//! step the KV bookkeeping is checked: no block is freed while a sequence holds it, each cached
//! block has as many references as holders, and at the end no reference is left.

use std::path::PathBuf;
use std::sync::OnceLock;

use proptest::prelude::*;
use quiver_engine::request::Command;
use quiver_engine::scheduler::Scheduler;
use quiver_engine::{EngineConfig, EngineStats, Event, GenerateRequest, Policy, Validator};
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use tokio::sync::mpsc::UnboundedReceiver;

const ADAPTERS: &[&str] = &["llama-r8-all-linear", "llama-r1-qv"];

fn fixture() -> &'static (tempfile::TempDir, PathBuf) {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let (dir, _) = quiver_testkit::materialize_lora("llama-f32").expect("fixture");
        let base = dir.path().join("base");
        (dir, base)
    })
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        prompt_len: usize,
        max_tokens: usize,
        adapter: usize,
        n: usize,
    },
    Cancel(usize),
    /// Unregisters and registers an adapter again: a new generation, so no cached block of the
    /// old one may be found.
    Reload(usize),
    Step(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..30, 1usize..10, 0usize..3, 1usize..4).prop_map(|(prompt_len, max_tokens, adapter, n)| Op::Submit { prompt_len, max_tokens, adapter, n }),
        1 => (0usize..20).prop_map(Op::Cancel),
        1 => (0usize..2).prop_map(Op::Reload),
        3 => (1usize..4).prop_map(Op::Step),
    ]
}

fn stats(s: &mut Scheduler<CpuBackend>) -> EngineStats {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    s.handle(Command::Stats { reply: tx });
    rx.try_recv().expect("stats reply")
}

struct Tracked {
    rx: Option<UnboundedReceiver<Event>>,
    max_tokens: usize,
    /// Per choice.
    tokens: Vec<usize>,
    finished: usize,
    ended: bool,
}

fn drain(t: &mut Tracked) -> Result<(), TestCaseError> {
    let Some(rx) = t.rx.as_mut() else { return Ok(()) };
    while let Ok(e) = rx.try_recv() {
        prop_assert!(!t.ended, "event after the end: {e:?}");
        match e {
            Event::Delta(d) => t.tokens[d.index] += d.tokens.len(),
            Event::Finished {
                index,
                completion_tokens,
                ..
            } => {
                prop_assert_eq!(completion_tokens, t.tokens[index]);
                prop_assert_eq!(t.tokens[index], t.max_tokens, "ignore_eos requests run to max_tokens");
                t.finished += 1;
                t.ended = t.finished == t.tokens.len();
            }
            Event::Error(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>, policy: Policy) -> Result<(), TestCaseError> {
    let (dir, base) = fixture();
    let bundle =
        ModelBundle::load(CpuBackend::default(), base, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
    // 2 KiB KV blocks; the budget holds both adapters and a few dozen blocks.
    let cfg = EngineConfig {
        memory_budget: 160 << 10,
        block_size: 4,
        max_batch_tokens: 16,
        max_num_seqs: 4,
        policy,
        ..Default::default()
    };
    let budget = cfg.memory_budget;
    let mut s = Scheduler::build(bundle.model, None, vec![], cfg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for name in ADAPTERS {
        let (tx, _rx) = tokio::sync::oneshot::channel();
        s.handle(Command::RegisterAdapter {
            name: (*name).into(),
            path: dir.path().join("adapters").join(name),
            pinned: false,
            preloaded: None,
            reply: tx,
        });
    }
    let mut tracked: Vec<Tracked> = Vec::new();
    let check_budget = |s: &mut Scheduler<CpuBackend>| -> Result<(), TestCaseError> {
        let st = stats(s);
        prop_assert!(st.kv_bytes + st.adapter_bytes <= budget, "budget exceeded: {st:?}");
        s.check_kv().map_err(TestCaseError::fail)?;
        Ok(())
    };
    for op in ops {
        match op {
            Op::Submit {
                prompt_len,
                max_tokens,
                adapter,
                n,
            } => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let request = GenerateRequest {
                    n,
                    adapter: (adapter > 0).then(|| ADAPTERS[adapter - 1].to_string()),
                    max_tokens: Some(max_tokens),
                    ignore_eos: true,
                    ..GenerateRequest::new((0..prompt_len as u32).map(|t| t * 7 % 300 + 3).collect())
                };
                let request = Validator::new(s.limits())
                    .validate(request)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                s.handle(Command::Submit {
                    request: request.into(),
                    events: tx,
                });
                tracked.push(Tracked {
                    rx: Some(rx),
                    max_tokens,
                    tokens: vec![0; n],
                    finished: 0,
                    ended: false,
                });
            }
            Op::Reload(a) => {
                let name = ADAPTERS[a];
                let (tx, _rx) = tokio::sync::oneshot::channel();
                s.handle(Command::UnregisterAdapter {
                    name: name.into(),
                    reply: tx,
                });
                let (tx, _rx) = tokio::sync::oneshot::channel();
                s.handle(Command::RegisterAdapter {
                    name: name.into(),
                    path: dir.path().join("adapters").join(name),
                    pinned: false,
                    preloaded: None,
                    reply: tx,
                });
            }
            Op::Cancel(k) => {
                if let Some(t) = tracked.get_mut(k) {
                    t.rx = None; // the client went away
                }
            }
            Op::Step(n) => {
                for _ in 0..n {
                    s.step().map_err(|e| TestCaseError::fail(e.to_string()))?;
                    check_budget(&mut s)?;
                }
            }
        }
        for t in tracked.iter_mut() {
            drain(t)?;
        }
    }
    let mut steps = 0;
    while s.has_work() {
        s.step().map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_budget(&mut s)?;
        for t in tracked.iter_mut() {
            drain(t)?;
        }
        steps += 1;
        prop_assert!(steps < 3000, "requests never finished");
    }
    for (i, t) in tracked.iter().enumerate() {
        prop_assert!(t.rx.is_none() || t.ended, "request {i} was lost");
    }
    let st = stats(&mut s);
    prop_assert_eq!(st.kv_blocks_used, 0, "KV blocks leaked");
    prop_assert_eq!(st.kv_bytes, st.prefix_cache_idle_bytes, "only idle cached blocks stay");
    prop_assert_eq!((st.running, st.waiting), (0, 0));
    s.check_kv().map_err(TestCaseError::fail)?;
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    s.handle(Command::Adapters { reply: tx });
    for a in rx.try_recv().map_err(|e| TestCaseError::fail(e.to_string()))? {
        prop_assert_eq!(a.in_flight, 0, "adapter {} still leased", a.name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn round_robin_never_loses_or_leaks(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, Policy::AdapterRoundRobin)?;
    }

    #[test]
    fn fcfs_never_loses_or_leaks(ops in prop::collection::vec(op(), 1..40)) {
        run(ops, Policy::Fcfs)?;
    }
}
