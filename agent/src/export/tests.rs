//! Tests of the exporter against a real HTTP sink on 127.0.0.1 that misbehaves on purpose.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ledger::{LedgerConfig, Record};
use crate::meter::{Counters, MeterKey, Sample};

type TestResult = anyhow::Result<()>;

const T0: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------------
// The sink: a minimal HTTP/1.1 server that answers each request as its policy says.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Accept,
    /// 503 with a body.
    Busy,
    /// Close the connection without answering.
    Close,
    /// Say nothing for a while, then close: the client's timeout must fire.
    Hang,
}

type Policy = Arc<dyn Fn(u64, Duration) -> Answer + Send + Sync>;

#[derive(Debug, Default)]
struct Seen {
    /// Every event of every accepted batch, in arrival order: (id, cursor).
    accepted: Vec<(String, u64)>,
    requests: u64,
    refused: u64,
    /// Requests whose content type or events were not what the exporter must send.
    malformed: Vec<String>,
}

struct Sink {
    url: String,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    async fn start(policy: Policy) -> anyhow::Result<Sink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/usage?src=test", listener.local_addr()?);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let started = Instant::now();
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                let mut conns = tokio::task::JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let (seen, policy) = (Arc::clone(&seen), Arc::clone(&policy));
                    conns.spawn(async move {
                        let _ = serve_conn(stream, seen, policy, started).await;
                    });
                }
            }
        });
        Ok(Sink { url, seen, task })
    }

    fn seen<T>(&self, f: impl FnOnce(&Seen) -> T) -> T {
        f(&self.seen.lock().unwrap())
    }
}

async fn serve_conn(
    stream: TcpStream,
    seen: Arc<Mutex<Seen>>,
    policy: Policy,
    started: Instant,
) -> anyhow::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if stream.read_line(&mut request_line).await? == 0 {
            return Ok(());
        }
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut line = String::new();
            stream.read_line(&mut line).await?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse()?,
                "content-type" => value.trim().clone_into(&mut content_type),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        stream.read_exact(&mut body).await?;
        let n = {
            let mut s = seen.lock().unwrap();
            s.requests += 1;
            s.requests
        };
        let answer = policy(n, started.elapsed());
        if answer != Answer::Accept {
            seen.lock().unwrap().refused += 1;
        }
        match answer {
            Answer::Close => return Ok(()),
            Answer::Hang => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                return Ok(());
            }
            Answer::Busy => {
                stream
                    .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 15\r\n\r\nbusy,\ntry later")
                    .await?;
            }
            Answer::Accept => {
                {
                    let mut s = seen.lock().unwrap();
                    if !request_line.starts_with("POST /v1/usage?src=test HTTP/1.1") {
                        s.malformed.push(format!("request line {request_line:?}"));
                    }
                    if content_type != BATCH_CONTENT_TYPE {
                        s.malformed.push(format!("content type {content_type:?}"));
                    }
                    let events: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
                    for e in events {
                        if e["specversion"] != "1.0" || e["type"] != EVENT_TYPE {
                            s.malformed.push(format!("event {e}"));
                        }
                        let id = e["id"].as_str().unwrap_or_default().to_owned();
                        let cursor = e["data"]["cursor"].as_u64().unwrap_or_default();
                        s.accepted.push((id, cursor));
                    }
                }
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await?;
            }
        }
        stream.flush().await?;
    }
}

// ---------------------------------------------------------------------------------------------
// Ledger helpers.

fn key(tenant: &str, container: Option<&str>) -> MeterKey {
    MeterKey {
        tenant: tenant.to_owned(),
        container: container.map(str::to_owned),
    }
}

fn keys() -> Vec<MeterKey> {
    vec![
        key("acme", None),
        key("acme", Some("web")),
        key("beta", Some("db")),
    ]
}

fn open(path: &Path) -> anyhow::Result<Ledger> {
    // One-second windows: every sample after the first closes a record per key.
    let config = LedgerConfig {
        window_secs: 1,
        ..LedgerConfig::new("node-1")
    };
    Ok(Ledger::open(path, config)?)
}

/// Samples every key at each second of `seconds`, and returns the newest cursor.
async fn fill(ledger: &Arc<Mutex<Ledger>>, seconds: std::ops::Range<u64>) -> anyhow::Result<u64> {
    let ledger = Arc::clone(ledger);
    tokio::task::spawn_blocking(move || {
        let mut l = ledger.lock().unwrap();
        for at in seconds {
            let batch: Vec<Sample> = keys()
                .into_iter()
                .enumerate()
                .map(|(i, key)| Sample {
                    key,
                    at_unix_s: T0 + at,
                    read_at_ns: 0,
                    counters: Counters {
                        cpu_ns: (at + 1) * 1_000_000 * (i as u64 + 1),
                        memory_working_set: 1 << 20,
                        ..Counters::default()
                    },
                    last: false,
                })
                .collect();
            l.ingest(&batch)?;
        }
        Ok(l.last_cursor()?)
    })
    .await?
}

async fn on_ledger<T: Send + 'static>(
    ledger: &Arc<Mutex<Ledger>>,
    f: impl FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
) -> anyhow::Result<T> {
    let ledger = Arc::clone(ledger);
    Ok(tokio::task::spawn_blocking(move || f(&ledger.lock().unwrap())).await??)
}

fn config(url: &str, batch_max: usize, retry_max_ms: u64) -> ExportConfig {
    ExportConfig {
        endpoint: Some(url.to_owned()),
        batch_max,
        timeout_secs: 1,
        retry_initial_ms: 20,
        retry_max_ms,
    }
}

struct Running {
    shutdown: CancellationToken,
    status: Arc<ExportStatus>,
    task: JoinHandle<Result<(), ExportError>>,
}

fn start(cfg: ExportConfig, ledger: &Arc<Mutex<Ledger>>, written: watch::Receiver<u64>) -> Running {
    let shutdown = CancellationToken::new();
    let status = Arc::new(ExportStatus::default());
    let task = tokio::spawn(run(
        cfg,
        Arc::clone(ledger),
        written,
        shutdown.clone(),
        Arc::clone(&status),
    ));
    Running {
        shutdown,
        status,
        task,
    }
}

impl Running {
    async fn until_cursor(&self, cursor: u64, within: Duration) -> TestResult {
        let deadline = Instant::now() + within;
        while self.status.cursor() < cursor {
            anyhow::ensure!(
                Instant::now() < deadline,
                "exporter at cursor {} after {within:?}, wanted {cursor}; last error: {}",
                self.status.cursor(),
                self.status.last_error()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops the exporter, and fails if it takes longer than a second.
    async fn stop(self) -> TestResult {
        let t = Instant::now();
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), self.task).await???;
        anyhow::ensure!(t.elapsed() < Duration::from_secs(1));
        Ok(())
    }
}

fn ids(records: &[Record]) -> Vec<(String, u64)> {
    records.iter().map(|r| (r.id.clone(), r.cursor)).collect()
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_once_through_an_outage() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ledger = Arc::new(Mutex::new(open(&dir.path().join("ledger.db"))?));
    let first = fill(&ledger, 0..60).await?;
    assert_eq!(first, 59 * 3);
    // Refused for two seconds, in every way a sink can refuse; then accepted.
    let sink = Sink::start(Arc::new(|n, elapsed| match n {
        _ if elapsed >= Duration::from_secs(2) => Answer::Accept,
        3 => Answer::Hang,
        n if n % 2 == 0 => Answer::Close,
        _ => Answer::Busy,
    }))
    .await?;
    let (written_tx, written_rx) = watch::channel(first);
    let exporter = start(config(&sink.url, 7, 200), &ledger, written_rx);

    // More records while the outage lasts, announced as the agent does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    written_tx.send_replace(fill(&ledger, 60..80).await?);
    exporter
        .until_cursor(79 * 3, Duration::from_secs(20))
        .await?;
    // And more once caught up: the notice wakes the idle exporter.
    written_tx.send_replace(fill(&ledger, 80..90).await?);
    let last = on_ledger(&ledger, |l| l.last_cursor()).await?;
    exporter.until_cursor(last, Duration::from_secs(5)).await?;

    let status = Arc::clone(&exporter.status);
    exporter.stop().await?;
    let all = on_ledger(&ledger, |l| l.read_records(0, usize::MAX, None)).await?;
    let (accepted, refused, malformed) =
        sink.seen(|s| (s.accepted.clone(), s.refused, s.malformed.clone()));
    assert!(malformed.is_empty(), "{malformed:?}");
    assert!(refused >= 3, "the outage refused only {refused} requests");
    // In order, no gap, no duplicate: exactly the ledger.
    assert_eq!(accepted, ids(&all));
    assert_eq!(
        accepted.iter().map(|a| &a.0).collect::<HashSet<_>>().len(),
        all.len()
    );
    assert_eq!(status.delivered(), u64::try_from(all.len())?);
    assert!(
        status.failures() >= refused,
        "{} < {refused}",
        status.failures()
    );
    assert!(!status.last_error().is_empty());
    assert_eq!(status.backlog(last), 0);
    assert_eq!(on_ledger(&ledger, |l| l.cursor(CURSOR_NAME)).await?, last);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_the_persisted_cursor() -> TestResult {
    const BATCH: usize = 10;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ledger.db");
    let ledger = Arc::new(Mutex::new(open(&path)?));
    let last = fill(&ledger, 0..41).await?;
    assert_eq!(last, 120);

    // The first sink takes six batches, then is down for good (with long backoff: the
    // exporter must still stop at once).
    let down = Sink::start(Arc::new(
        |n, _| {
            if n <= 6 { Answer::Accept } else { Answer::Busy }
        },
    ))
    .await?;
    let (_written_tx, written_rx) = watch::channel(last);
    let exporter = start(
        config(&down.url, BATCH, 60_000),
        &ledger,
        written_rx.clone(),
    );
    exporter.until_cursor(60, Duration::from_secs(10)).await?;
    while down.seen(|s| s.refused) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    exporter.stop().await?;
    let first_run = down.seen(|s| s.accepted.clone());
    assert_eq!(first_run.len(), 60);

    // Reopened, as after a restart of the agent.
    drop(ledger);
    let ledger = Arc::new(Mutex::new(open(&path)?));
    assert_eq!(on_ledger(&ledger, |l| l.cursor(CURSOR_NAME)).await?, 60);
    let up = Sink::start(Arc::new(|_, _| Answer::Accept)).await?;
    let exporter = start(config(&up.url, BATCH, 200), &ledger, written_rx);
    exporter.until_cursor(last, Duration::from_secs(10)).await?;
    exporter.stop().await?;
    let second_run = up.seen(|s| s.accepted.clone());

    let first_ids: HashSet<_> = first_run.iter().map(|a| &a.0).collect();
    let resent = second_run
        .iter()
        .filter(|a| first_ids.contains(&a.0))
        .count();
    assert!(resent <= BATCH, "{resent} events sent twice");
    assert_eq!(resent, 0, "the cursor was persisted before the stop");
    let all = on_ledger(&ledger, |l| l.read_records(0, usize::MAX, None)).await?;
    let mut union: Vec<_> = first_run.into_iter().chain(second_run).collect();
    union.sort_by_key(|a| a.1);
    union.dedup();
    assert_eq!(union, ids(&all));
    Ok(())
}

#[tokio::test]
async fn no_endpoint_means_off_and_bad_config_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let ledger = Arc::new(Mutex::new(open(&dir.path().join("ledger.db"))?));
    let (_tx, rx) = watch::channel(0);
    let status = Arc::new(ExportStatus::default());
    let off = ExportConfig::default();
    run(
        off,
        Arc::clone(&ledger),
        rx.clone(),
        CancellationToken::new(),
        Arc::clone(&status),
    )
    .await?;
    let bad = ExportConfig {
        endpoint: Some("https://billing.example/usage".to_owned()),
        ..ExportConfig::default()
    };
    let err = run(bad, ledger, rx, CancellationToken::new(), status)
        .await
        .unwrap_err();
    assert!(err.to_string().starts_with("export.endpoint: "), "{err}");
    Ok(())
}

#[test]
fn config_defaults_limits_and_unknown_keys() {
    let d = ExportConfig::default();
    assert_eq!(d.validate(), Ok(()));
    assert_eq!(
        (d.endpoint.as_deref(), d.batch_max, d.timeout_secs),
        (None, 500, 10)
    );
    assert_eq!((d.retry_initial_ms, d.retry_max_ms), (500, 30_000));
    let with = |f: fn(&mut ExportConfig)| {
        let mut c = ExportConfig::default();
        f(&mut c);
        c.validate().map_err(|e| e.field)
    };
    assert_eq!(with(|c| c.batch_max = 0), Err("export.batch_max".into()));
    assert_eq!(
        with(|c| c.timeout_secs = 0),
        Err("export.timeout_secs".into())
    );
    assert_eq!(
        with(|c| c.retry_max_ms = 100),
        Err("export.retry_max_ms".into())
    );
    for url in [
        "https://x/y",
        "ftp://x",
        "x:80",
        "http://user:pw@x/",
        "/path",
    ] {
        let c = ExportConfig {
            endpoint: Some(url.to_owned()),
            ..ExportConfig::default()
        };
        let err = c.validate().unwrap_err();
        assert_eq!(err.field, "export.endpoint", "{url}");
        assert!(err.to_string().starts_with("export.endpoint: "), "{err}");
    }
    let parsed: ExportConfig =
        toml::from_str("endpoint = \"http://[::1]:8080/u\"\nbatch_max = 9").unwrap();
    assert_eq!(parsed.batch_max, 9);
    assert_eq!(parsed.validate(), Ok(()));
    assert!(toml::from_str::<ExportConfig>("endpont = \"http://x\"").is_err());
}

#[test]
fn endpoints_parse_to_host_port_and_target() {
    let e = Endpoint::parse("http://[::1]:8080/v1/u?a=b").unwrap();
    assert_eq!(e.to_string(), "http://[::1]:8080/v1/u?a=b");
    let e = Endpoint::parse("http://billing.internal").unwrap();
    assert_eq!(e.to_string(), "http://billing.internal/");
}

#[test]
fn a_record_becomes_a_cloudevent() {
    let record = Record {
        cursor: 42,
        id: "node-1/acme/-/1700000000".to_owned(),
        node: "node-1".to_owned(),
        tenant: "acme".to_owned(),
        container: None,
        window_start_unix_s: 1_700_000_000,
        window_secs: 60,
        cpu_ns: 1_500_000_000,
        memory_byte_seconds: 3 << 30,
        memory_peak_bytes: 1 << 20,
        oom_kills: 1,
        rx_bytes: 1500,
        tx_bytes: 64,
    };
    let body = encode_batch(std::slice::from_ref(&record)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let expected = serde_json::json!([{
        "specversion": "1.0",
        "type": "io.caas.usage.v1",
        "source": "caas-agent/node-1",
        "subject": "acme",
        "id": "node-1/acme/-/1700000000",
        "time": "2023-11-14T22:14:20Z",
        "datacontenttype": "application/json",
        "data": {
            "node": "node-1",
            "tenant": "acme",
            "container": null,
            "window_start": "2023-11-14T22:13:20Z",
            "window_seconds": 60,
            "cpu_seconds": 1.5,
            "cpu_ns": 1_500_000_000u64,
            "memory_gib_seconds": 3.0,
            "memory_byte_seconds": 3u64 << 30,
            "memory_peak_bytes": 1u64 << 20,
            "oom_kills": 1,
            "rx_bytes": 1500,
            "tx_bytes": 64,
            "cursor": 42,
        }
    }]);
    assert_eq!(v, expected);
    let container = Record {
        container: Some("web".to_owned()),
        ..record
    };
    let v: serde_json::Value =
        serde_json::from_slice(&encode_batch(&[container]).unwrap()).unwrap();
    assert_eq!(v[0]["data"]["container"], "web");
    assert_eq!(encode_batch(&[]).unwrap(), b"[]");
}
