//! The waiting queue's policies: round-robin across adapters against a flood, FCFS order,
//! skipping requests whose adapter is not ready, and preempted requests going first.

use quiver_engine::queue::{FairQueue, Policy};

fn key(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

#[test]
fn a_flood_on_one_adapter_does_not_starve_the_others() {
    let mut q = FairQueue::new(Policy::AdapterRoundRobin);
    for i in 0..100 {
        q.push_back(key("popular"), i);
    }
    q.push_back(key("rare"), 1000);
    q.push_back(key(""), 2000);
    let first: Vec<i32> = (0..3)
        .filter_map(|_| q.pop_ready(|_, _| true).map(|(_, v)| v))
        .collect();
    assert_eq!(
        first,
        vec![0, 1000, 2000],
        "each adapter gets a turn before the popular one's second"
    );
    assert_eq!(q.len(), 99);
}

#[test]
fn fcfs_keeps_arrival_order_but_skips_unready() {
    let mut q = FairQueue::new(Policy::Fcfs);
    q.push_back(key("cold"), 1);
    q.push_back(key("warm"), 2);
    q.push_back(key("warm"), 3);
    let got = q.pop_ready(|k, _| k.as_deref() != Some("cold")).map(|(_, v)| v);
    assert_eq!(got, Some(2), "the cold adapter's request must not block the rest");
    assert_eq!(q.pop_ready(|_, _| true).map(|(_, v)| v), Some(1));
}

#[test]
fn round_robin_skips_an_adapter_that_is_not_ready() {
    let mut q = FairQueue::new(Policy::AdapterRoundRobin);
    q.push_back(key("cold"), 1);
    q.push_back(key("warm"), 2);
    assert_eq!(
        q.pop_ready(|k, _| k.as_deref() == Some("warm")).map(|(_, v)| v),
        Some(2)
    );
    assert_eq!(q.pop_ready(|k, _| k.as_deref() == Some("warm")), None);
    assert_eq!(q.upcoming_adapters(4), vec!["cold".to_string()]);
}

#[test]
fn preempted_requests_go_first_and_cancelled_ones_leave() {
    for policy in [Policy::Fcfs, Policy::AdapterRoundRobin] {
        let mut q = FairQueue::new(policy);
        q.push_back(key("a"), 1);
        q.push_back(key("a"), 2);
        q.push_front(key("a"), 0);
        assert_eq!(q.drain_where(|v| *v == 1), vec![1]);
        assert_eq!(q.pop_ready(|_, _| true).map(|(_, v)| v), Some(0), "{policy:?}");
        assert_eq!(q.pop_ready(|_, _| true).map(|(_, v)| v), Some(2), "{policy:?}");
        assert!(q.is_empty());
    }
}
