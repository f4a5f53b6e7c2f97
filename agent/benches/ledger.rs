//! Ledger ingest rate: one batch per simulated second, as the agent writes it, for 100 and 1,000
//! keys over 120 s with 60 s windows (so every key closes two windows). Each batch is one
//! transaction with a synchronous fsync, so the numbers include the disk's flush latency.
//!
//! `cargo bench -p caas-agent --bench ledger`

use std::time::{Duration, Instant};

use caas_agent::ledger::{Ledger, LedgerConfig};
use caas_agent::meter::{Counters, MeterKey, Sample};

const SECONDS: u64 = 120;
const START: u64 = 1_700_000_000;

struct Row {
    keys: usize,
    samples_per_s: f64,
    median: Duration,
    p99: Duration,
    max: Duration,
    records: usize,
    db_bytes: u64,
}

fn run(keys: usize) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let mut ledger = Ledger::open(
        dir.path().join("ledger.db"),
        LedgerConfig::new("bench-node"),
    )?;
    let meter_keys: Vec<MeterKey> = (0..keys)
        .map(|i| MeterKey {
            tenant: format!("tenant-{}", i / 10),
            container: Some(format!("container-{i}")),
        })
        .collect();
    let mut cpu = vec![0u64; keys];
    let mut times = Vec::new();
    let mut records = 0;
    let mut total = Duration::ZERO;
    for s in 0..SECONDS {
        let batch: Vec<Sample> = meter_keys
            .iter()
            .zip(cpu.iter_mut())
            .zip(0u64..)
            .map(|((key, cpu), i)| {
                *cpu += 1_000_000 + (i * 7919 + s * 104_729) % 50_000_000;
                Sample {
                    key: key.clone(),
                    at_unix_s: START + s,
                    read_at_ns: 0,
                    counters: Counters {
                        cpu_ns: *cpu,
                        memory_working_set: (64 << 20) + (i % 100) * 4096,
                        memory_peak: 128 << 20,
                        oom_kills: 0,
                        pids: 3,
                        net: None,
                    },
                    last: false,
                }
            })
            .collect();
        let t = Instant::now();
        records += ledger.ingest(&batch)?.len();
        let took = t.elapsed();
        total += took;
        times.push(took);
    }
    times.sort();
    let at = |percent: usize| times[(times.len() - 1) * percent / 100];
    Ok(Row {
        keys,
        samples_per_s: (keys as f64 * SECONDS as f64) / total.as_secs_f64(),
        median: at(50),
        p99: at(99),
        max: at(100),
        records,
        db_bytes: ledger.stats()?.db_bytes,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() -> anyhow::Result<()> {
    println!("ledger ingest: {SECONDS} one-second batches, window 60 s, synchronous=FULL, WAL\n");
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>10} {:>8} {:>10}",
        "keys", "samples/s", "median ms", "p99 ms", "max ms", "records", "db MiB"
    );
    for keys in [100, 1000] {
        let r = run(keys)?;
        println!(
            "{:>6} {:>12.0} {:>10} {:>10} {:>10} {:>8} {:>10.2}",
            r.keys,
            r.samples_per_s,
            ms(r.median),
            ms(r.p99),
            ms(r.max),
            r.records,
            r.db_bytes as f64 / f64::from(1 << 20),
        );
    }
    Ok(())
}
