//! A property test: random sample sequences, with crashes, restarts and replays at random
//! points, bill exactly what the counters say. Tenants also have a network link, read or not
//! at random, and now and then created again.

use std::collections::HashSet;

use super::*;

/// xorshift64*: deterministic, so a failure names a seed that reproduces it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// One simulated cgroup per key: its true counter, and what the model expects to be billed.
#[derive(Default)]
struct Sim {
    alive: bool,
    cpu: u64,
    /// Billed so far by the model: the last sampled counter of every past incarnation plus the
    /// current one's.
    billed_before: u64,
    sampled: u64,
    memory: u64,
    prev_at: Option<u64>,
    /// The tenant link's received-bytes counter (sent bytes are twice it, so both go back
    /// together when the link is created again).
    link: u64,
    /// Network bytes billed by the model for past links, and the last reading of the current one.
    link_billed_before: u64,
    link_sampled: u64,
}

#[test]
fn random_sequences_with_random_crashes_bill_exactly() -> TestResult {
    for seed in 1..=16u64 {
        eprintln!("seed {seed}"); // shown when the test fails
        run_random(seed).map_err(|e| anyhow::anyhow!("seed {seed}: {e:#}"))?;
    }
    Ok(())
}

fn run_random(seed: u64) -> TestResult {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let window = [1, 5, 60][usize::try_from(seed % 3)?];
    let dir = tempfile::tempdir()?;
    let mut path = db(&dir);
    let keys: Vec<MeterKey> = (0..4)
        .map(|i| {
            key(
                &format!("t{}", i % 2),
                (i > 0).then(|| format!("c{i}")).as_deref(),
            )
        })
        .collect();
    let mut sims: Vec<Sim> = keys.iter().map(|_| Sim::default()).collect();
    let mut ledger = Ledger::open(&path, config(window))?;
    let mut history: Vec<Vec<Sample>> = Vec::new();
    let start = T0 + rng.below(1000);
    let end = start + 150;
    for at in start..end {
        let mut batch = Vec::new();
        for (k, sim) in keys.iter().zip(sims.iter_mut()) {
            if !sim.alive {
                if rng.chance(20) {
                    // A new cgroup, and for a tenant a new link.
                    *sim = Sim {
                        alive: true,
                        billed_before: sim.billed_before + sim.sampled,
                        memory: sim.memory,
                        link_billed_before: sim.link_billed_before + sim.link_sampled,
                        ..Sim::default()
                    };
                } else {
                    continue;
                }
            }
            sim.cpu += rng.below(4_000_000_000);
            sim.link += rng.below(1 << 20);
            if sim.prev_at.is_some() && sim.sampled > 0 && rng.chance(3) {
                // Recreated behind the meter's back, and sampled while its counter is still
                // below the old one (otherwise nothing could tell): the old cgroup's unsampled
                // usage is gone with it.
                sim.billed_before += sim.sampled;
                sim.cpu = rng.below(sim.sampled);
            } else if rng.chance(15) {
                continue; // a missed second: a gap
            }
            let ws = rng.below(1 << 34);
            let mut s = sample(k, at, sim.cpu, ws);
            if k.container.is_none() {
                let mut read = rng.chance(80);
                if sim.link_sampled > 0 && rng.chance(3) {
                    // The link is created again, and read while it is still below the old one's
                    // last reading (as for the cgroup above).
                    let old = std::mem::take(&mut sim.link_sampled);
                    sim.link_billed_before += old;
                    sim.link = rng.below(old);
                    read = true;
                }
                if read {
                    s.counters.net = Some(crate::meter::NetBytes {
                        rx_bytes: sim.link,
                        tx_bytes: 2 * sim.link,
                    });
                    sim.link_sampled = sim.link;
                }
            }
            s.last = rng.chance(5);
            sim.sampled = sim.cpu;
            sim.memory += ws * sim.prev_at.map_or(1, |p| at - p);
            sim.prev_at = Some(at);
            if s.last {
                sim.alive = false;
                sim.prev_at = None;
            }
            batch.push(s);
        }
        ledger.ingest(&batch)?;
        history.push(batch);
        if rng.chance(8) {
            // Crash (or clean stop), restart, and replay a few batches already counted.
            if rng.chance(50) {
                let crash_dir = dir.path().join(format!("crash-{at}"));
                std::fs::create_dir(&crash_dir)?;
                path = crash_copy(&path, &crash_dir)?;
            }
            drop(ledger);
            ledger = Ledger::open(&path, config(window))?;
            let n = usize::try_from(rng.below(4))?.min(history.len());
            for b in &history[history.len() - n..] {
                assert!(ledger.ingest(b)?.is_empty(), "replay made records");
            }
        }
        if rng.chance(10) {
            ledger.close_idle(at + rng.below(2 * u64::from(window) + IDLE_GRACE_SECS))?;
        }
    }
    // Early idle closes, and cgroups recreated within a window their predecessor's `last` sample
    // closed, push a key's later windows ahead of time: close everything.
    let tail = ledger.close_idle(u64::MAX / 2)?;
    assert_eq!(ledger.stats()?.open_windows, 0, "{tail:?}");
    let records = all_records(&ledger)?;
    let ids: HashSet<&str> = records.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), records.len(), "a record id appears twice");
    for (k, sim) in keys.iter().zip(&sims) {
        let mine: Vec<&Record> = records
            .iter()
            .filter(|r| r.tenant == k.tenant && r.container == k.container)
            .collect();
        assert!(
            mine.windows(2)
                .all(|w| w[0].window_start_unix_s + u64::from(w[0].window_secs)
                    <= w[1].window_start_unix_s),
            "windows of {k:?} overlap"
        );
        let cpu: u64 = mine.iter().map(|r| r.cpu_ns).sum();
        assert_eq!(cpu, sim.billed_before + sim.sampled, "cpu of {k:?}");
        let memory: u64 = mine.iter().map(|r| r.memory_byte_seconds).sum();
        assert_eq!(memory, sim.memory, "memory of {k:?}");
        let per_second = ledger.usage(&k.tenant, k.container.as_deref(), 0, end, Per::Second)?;
        assert_eq!(per_second.total.cpu_ns, cpu, "per-second cpu of {k:?}");
        let rx: u64 = mine.iter().map(|r| r.rx_bytes).sum();
        let tx: u64 = mine.iter().map(|r| r.tx_bytes).sum();
        let link = sim.link_billed_before + sim.link_sampled;
        assert_eq!((rx, tx), (link, 2 * link), "network bytes of {k:?}");
        assert_eq!(
            (per_second.total.rx_bytes, per_second.total.tx_bytes),
            (rx, tx),
            "per-second network bytes of {k:?}"
        );
    }
    Ok(())
}
