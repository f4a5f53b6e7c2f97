//! Tests of the sampler thread, on fixture trees (and one real cgroup when root). Kept apart
//! from `sampler.rs` to keep that file readable.

use std::{fs, path::Path};

use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::*;
use crate::meter::{
    Counters, LINK_RETRY_EVERY, NetBytes,
    fixture::{
        FixtureCounters, ScratchCgroup, remove_link_fixture, write_fixture, write_link_fixture,
    },
};

const PERIOD: Duration = Duration::from_millis(100);

fn key(tenant: &str, container: Option<&str>) -> MeterKey {
    MeterKey {
        tenant: tenant.into(),
        container: container.map(Into::into),
    }
}

fn numbers(pids: u64) -> FixtureCounters {
    FixtureCounters {
        cpu_ns: 5_000_000,
        memory_usage: 3_000_000,
        inactive_file: 1_000_000,
        memory_peak: Some(4_000_000),
        oom_kills: 0,
        pids,
    }
}

fn start(root: &Path, layout: CgroupLayout) -> (SamplerHandle, UnboundedReceiver<Vec<Sample>>) {
    let (tx, rx) = unbounded_channel();
    let config = SamplerConfig {
        period: PERIOD,
        net_root: net_root(root),
        ..SamplerConfig::new(root, layout)
    };
    (Sampler::spawn(config, tx).unwrap(), rx)
}

/// Where [`start`]'s sampler finds network links: a stand-in for `/sys/class/net`.
fn net_root(root: &Path) -> PathBuf {
    root.join("class-net")
}

async fn next_batch(rx: &mut UnboundedReceiver<Vec<Sample>>) -> Vec<Sample> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a batch within 5 s")
        .expect("the channel is open")
}

/// The next tick's batch that has `n` samples (a batch may come from a tick that ran before
/// the last change reached the fixture).
async fn batch_of(rx: &mut UnboundedReceiver<Vec<Sample>>, n: usize) -> Vec<Sample> {
    for _ in 0..20 {
        let b = next_batch(rx).await;
        if b.len() == n {
            return b;
        }
    }
    panic!("no batch of {n} samples");
}

fn pids_of(batch: &[Sample]) -> Vec<(MeterKey, u64)> {
    let mut v: Vec<_> = batch
        .iter()
        .map(|s| (s.key.clone(), s.counters.pids))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn samples_every_target_on_each_tick_past_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::V2;
    for (rel, pids) in [
        ("s/tenant-a", 3),
        ("s/tenant-a/c-x", 1),
        ("s/tenant-a/c-y", 2),
    ] {
        write_fixture(dir.path(), layout, rel, &numbers(pids)).unwrap();
    }
    let (h, mut rx) = start(dir.path(), layout);
    h.add(key("a", None), "s/tenant-a".into()).await.unwrap();
    h.add(key("a", Some("x")), "s/tenant-a/c-x".into())
        .await
        .unwrap();
    h.add(key("a", Some("y")), "s/tenant-a/c-y".into())
        .await
        .unwrap();

    let b = batch_of(&mut rx, 3).await;
    assert_eq!(
        pids_of(&b),
        vec![
            (key("a", None), 3),
            (key("a", Some("x")), 1),
            (key("a", Some("y")), 2)
        ]
    );
    assert!(b.iter().all(|s| !s.last && s.at_unix_s == b[0].at_unix_s));
    assert_eq!(
        b[0].counters,
        Counters {
            cpu_ns: 5_000_000,
            memory_working_set: 2_000_000,
            memory_peak: 4_000_000,
            oom_kills: 0,
            pids: b[0].counters.pids,
            net: None,
        }
    );

    // One cgroup turns unreadable: the others are still sampled, the broken one is kept.
    fs::write(
        dir.path().join("s/tenant-a/c-y/memory.current"),
        "garbage\n",
    )
    .unwrap();
    let b = batch_of(&mut rx, 2).await;
    assert_eq!(
        pids_of(&b),
        vec![(key("a", None), 3), (key("a", Some("x")), 1)]
    );
    let st = h.stats();
    assert!(st.read_errors >= 1, "{st:?}");
    assert_eq!((st.targets, st.failing, st.gone), (3, 1, 0), "{st:?}");

    write_fixture(dir.path(), layout, "s/tenant-a/c-y", &numbers(2)).unwrap();
    batch_of(&mut rx, 3).await;
    let st = h.stats();
    assert!(st.ticks >= 3, "{st:?}");
    assert!(st.last_lag <= PERIOD / 2, "{st:?}");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn add_reports_errors_to_the_caller_only() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::V1;
    write_fixture(dir.path(), layout, "s/tenant-b", &numbers(1)).unwrap();
    write_fixture(dir.path(), layout, "s/tenant-b/c-broken", &numbers(1)).unwrap();
    fs::remove_file(
        dir.path()
            .join("memory/s/tenant-b/c-broken/memory.oom_control"),
    )
    .unwrap();
    let (h, mut rx) = start(dir.path(), layout);
    h.add(key("b", None), "s/tenant-b".into()).await.unwrap();

    let e = h
        .add(key("b", Some("gone")), "s/tenant-b/c-gone".into())
        .await;
    assert!(e.unwrap_err().is_gone());
    let e = h
        .add(key("b", Some("broken")), "s/tenant-b/c-broken".into())
        .await;
    let e = e.unwrap_err();
    assert!(e.to_string().contains("c-broken/memory.oom_control"), "{e}");
    let e = h
        .add(key("b", None), "s/tenant-b".into())
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "tenant b is already metered");

    assert_eq!(
        pids_of(&next_batch(&mut rx).await),
        vec![(key("b", None), 1)]
    );
    assert_eq!(h.stats().targets, 1);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn finish_emits_a_last_sample_and_stops_sampling_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::Hybrid;
    write_fixture(dir.path(), layout, "s/tenant-c", &numbers(2)).unwrap();
    write_fixture(dir.path(), layout, "s/tenant-c/c-short", &numbers(1)).unwrap();
    let (h, mut rx) = start(dir.path(), layout);
    h.add(key("c", None), "s/tenant-c".into()).await.unwrap();
    h.add(key("c", Some("short")), "s/tenant-c/c-short".into())
        .await
        .unwrap();

    // The container's inactive cache changes; the final reading must see it at once.
    let mut late = numbers(1);
    late.inactive_file = 0;
    late.cpu_ns = 9_000_000;
    write_fixture(dir.path(), layout, "s/tenant-c/c-short", &late).unwrap();
    let last = h.finish(key("c", Some("short"))).await.unwrap();
    assert!(last.last);
    assert_eq!(last.counters.cpu_ns, 9_000_000);
    assert_eq!(last.counters.memory_working_set, 3_000_000);

    // It reaches the channel, after any earlier sample of the key and before none later.
    let mut seen_last = false;
    for _ in 0..5 {
        for s in next_batch(&mut rx).await {
            if s.key == key("c", Some("short")) {
                assert!(!seen_last, "sampled after its final reading");
                if s.last {
                    assert_eq!(s, last);
                    seen_last = true;
                }
            }
        }
    }
    assert!(seen_last);
    assert_eq!(h.stats().targets, 1);

    let e = h.finish(key("c", Some("short"))).await.unwrap_err();
    assert!(matches!(e, MeterError::NotMetered { .. }), "{e}");
    assert!(h.remove(key("c", None)).await.unwrap());
    assert!(!h.remove(key("c", None)).await.unwrap());
    assert_eq!(h.stats().targets, 0);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_joins_and_later_requests_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (h, mut rx) = start(dir.path(), CgroupLayout::V2);
    let other = h.clone();
    h.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    let e = other.add(key("d", None), "x".into()).await.unwrap_err();
    assert!(matches!(e, MeterError::Stopped), "{e}");
    assert!(rx.recv().await.is_none(), "the thread dropped its sender");
}

#[tokio::test]
async fn a_closed_channel_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path(), CgroupLayout::V2, "t", &numbers(1)).unwrap();
    let (h, rx) = start(dir.path(), CgroupLayout::V2);
    drop(rx);
    h.add(key("e", None), "t".into()).await.unwrap();
    let sample = h.finish(key("e", None)).await.unwrap();
    assert!(sample.last);
    assert_eq!(h.stats().undelivered, 1);
    h.shutdown().await.unwrap();
}

#[test]
fn periods_are_bounded() {
    let (tx, _rx) = unbounded_channel();
    let config = SamplerConfig {
        period: Duration::ZERO,
        ..SamplerConfig::new("/sys/fs/cgroup", CgroupLayout::V2)
    };
    let e = Sampler::spawn(config, tx).unwrap_err();
    assert!(matches!(e, MeterError::BadPeriod(_)), "{e}");
}

/// A real cgroup removed while metered is dropped as gone, and the others go on.
#[tokio::test]
async fn a_removed_real_cgroup_is_dropped() {
    if !crate::testing::require_root("meter::sampler::a_removed_real_cgroup") {
        return;
    }
    let root = Path::new("/sys/fs/cgroup");
    let layout = crate::cgroups::detect_layout(root).unwrap();
    let tag = rand::random::<u32>();
    let (rel_a, rel_b) = (
        format!("caas-meter-test-{tag:08x}-a"),
        format!("caas-meter-test-{tag:08x}-b"),
    );
    let mut removed = ScratchCgroup::create(root, layout, &rel_a).unwrap();
    let _kept = ScratchCgroup::create(root, layout, &rel_b).unwrap();

    let (h, mut rx) = start(root, layout);
    h.add(key("real", Some("a")), rel_a).await.unwrap();
    h.add(key("real", Some("b")), rel_b).await.unwrap();
    batch_of(&mut rx, 2).await;
    removed.remove().unwrap();
    let b = batch_of(&mut rx, 1).await;
    assert_eq!(b[0].key, key("real", Some("b")));
    let st = h.stats();
    assert_eq!((st.gone, st.targets, st.read_errors), (1, 1, 0), "{st:?}");
    h.shutdown().await.unwrap();
}

const LINK: &str = "caas-00c0ffee00";

fn net_of(batch: &[Sample], k: &MeterKey) -> Option<Option<NetBytes>> {
    batch.iter().find(|s| &s.key == k).map(|s| s.counters.net)
}

#[tokio::test]
async fn a_tenant_link_is_read_with_each_tenant_sample_only() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::V2;
    write_fixture(dir.path(), layout, "s/tenant-n", &numbers(1)).unwrap();
    write_fixture(dir.path(), layout, "s/tenant-n/c-x", &numbers(1)).unwrap();
    // The host side received 9000 bytes (the tenant sent them) and sent 300.
    write_link_fixture(&net_root(dir.path()), LINK, 9000, 300).unwrap();
    let (h, mut rx) = start(dir.path(), layout);
    let (t, c) = (key("n", None), key("n", Some("x")));
    h.add(t.clone(), "s/tenant-n".into()).await.unwrap();
    h.add(c.clone(), "s/tenant-n/c-x".into()).await.unwrap();

    let e = h.set_link(c.clone(), LINK.into()).await.unwrap_err();
    assert!(matches!(e, MeterError::LinkOnContainer { .. }), "{e}");
    let e = h.set_link(t.clone(), "../x".into()).await.unwrap_err();
    assert!(matches!(e, MeterError::InvalidLink { .. }), "{e}");
    let e = h
        .set_link(key("other", None), LINK.into())
        .await
        .unwrap_err();
    assert!(matches!(e, MeterError::NotMetered { .. }), "{e}");
    h.set_link(t.clone(), LINK.into()).await.unwrap();
    h.set_link(t.clone(), LINK.into()).await.unwrap();

    let want = NetBytes {
        rx_bytes: 300,
        tx_bytes: 9000,
    };
    let b = batch_of(&mut rx, 2).await;
    assert_eq!(net_of(&b, &t), Some(Some(want)));
    assert_eq!(
        net_of(&b, &c),
        Some(None),
        "containers share the tenant's link"
    );

    // A reading before a delete and the final reading carry the link's latest counters.
    write_link_fixture(&net_root(dir.path()), LINK, 9100, 350).unwrap();
    let now = h.read_now(t.clone()).await.unwrap();
    assert_eq!(
        now.counters.net.map(|n| (n.rx_bytes, n.tx_bytes)),
        Some((350, 9100))
    );
    write_link_fixture(&net_root(dir.path()), LINK, 9200, 400).unwrap();
    let last = h.finish(t.clone()).await.unwrap();
    assert_eq!(
        last.counters.net.map(|n| (n.rx_bytes, n.tx_bytes)),
        Some((400, 9200))
    );
    assert_eq!(h.stats().link_errors, 0);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_link_never_fails_the_tenant_sample() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::V1;
    write_fixture(dir.path(), layout, "s/tenant-m", &numbers(2)).unwrap();
    let (h, mut rx) = start(dir.path(), layout);
    let t = key("m", None);
    h.add(t.clone(), "s/tenant-m".into()).await.unwrap();
    // The link does not exist yet: accepted, and the samples go on without network bytes.
    h.set_link(t.clone(), LINK.into()).await.unwrap();
    let b = batch_of(&mut rx, 1).await;
    assert_eq!(pids_of(&b), vec![(t.clone(), 2)]);
    assert_eq!(net_of(&b, &t), Some(None));
    let st = h.stats();
    assert!(st.link_errors >= 1, "{st:?}");
    assert_eq!((st.failing, st.read_errors), (0, 0), "{st:?}");

    // It appears: read once the retry is due.
    write_link_fixture(&net_root(dir.path()), LINK, 10, 20).unwrap();
    let mut seen = None;
    for _ in 0..2 * LINK_RETRY_EVERY + 2 {
        if let Some(Some(n)) = net_of(&next_batch(&mut rx).await, &t) {
            seen = Some(n);
            break;
        }
    }
    assert_eq!(seen.map(|n| (n.rx_bytes, n.tx_bytes)), Some((20, 10)));

    // It goes away: the tenant is still sampled, without network bytes.
    remove_link_fixture(&net_root(dir.path()), LINK).unwrap();
    let mut without = false;
    for _ in 0..5 {
        let b = next_batch(&mut rx).await;
        assert_eq!(pids_of(&b), vec![(t.clone(), 2)]);
        without |= net_of(&b, &t) == Some(None);
    }
    assert!(without);
    // The final reading looks for the link at once: created again, it counts from 0.
    write_link_fixture(&net_root(dir.path()), LINK, 5, 1).unwrap();
    let last = h.finish(t).await.unwrap();
    assert_eq!(
        last.counters.net.map(|n| (n.rx_bytes, n.tx_bytes)),
        Some((1, 5))
    );
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_link_removed_with_its_tenant_is_no_failure() {
    let dir = tempfile::tempdir().unwrap();
    let layout = CgroupLayout::V2;
    write_fixture(dir.path(), layout, "s/tenant-r", &numbers(1)).unwrap();
    write_link_fixture(&net_root(dir.path()), LINK, 64, 32).unwrap();
    let (h, _rx) = start(dir.path(), layout);
    let t = key("r", None);
    h.add(t.clone(), "s/tenant-r".into()).await.unwrap();
    h.set_link(t.clone(), LINK.into()).await.unwrap();
    // The delete: a reading before, the link removed, then the final reading.
    let before = h.read_now(t.clone()).await.unwrap();
    assert_eq!(
        before.counters.net.map(|n| (n.rx_bytes, n.tx_bytes)),
        Some((32, 64))
    );
    remove_link_fixture(&net_root(dir.path()), LINK).unwrap();
    let last = h.finish(t).await.unwrap();
    assert!(last.last);
    assert_eq!(last.counters.net, None, "the link is gone: no bytes, not 0");
    assert_eq!(h.stats().link_errors, 0, "an expected removal is no error");
    h.shutdown().await.unwrap();
}
