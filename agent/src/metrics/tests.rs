//! Tests of the exposition format (checked by a small parser here, and by `promtool` when
//! installed) and of the HTTP endpoints on 127.0.0.1.

use std::collections::HashSet;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ledger::LedgerStats;
use crate::meter::{Counters, MeterKey, NetBytes, SamplerStats};

type TestResult = anyhow::Result<()>;

fn key(tenant: &str, container: Option<&str>) -> MeterKey {
    MeterKey {
        tenant: tenant.to_owned(),
        container: container.map(str::to_owned),
    }
}

fn counters(cpu_ns: u64) -> Counters {
    Counters {
        cpu_ns,
        memory_working_set: 123 << 20,
        memory_peak: 456 << 20,
        oom_kills: 2,
        pids: 7,
        net: None,
    }
}

/// A tenant's counters with its network link's bytes.
fn with_net(mut c: Counters, rx_bytes: u64, tx_bytes: u64) -> Counters {
    c.net = Some(NetBytes { rx_bytes, tx_bytes });
    c
}

/// A snapshot with every optional part, and label values that need escaping.
fn awkward() -> MetricsSnapshot {
    MetricsSnapshot {
        node: "node \"one\"\\".to_owned(),
        cgroups: vec![
            (
                key("acme", None),
                with_net(counters(1_500_000_001), 4096, 1 << 40),
            ),
            // A container never shows network bytes, even if a reading had some.
            (key("acme", Some("web")), with_net(counters(999), 1, 1)),
            (key("we\"ird\\ten\nant", None), counters(0)),
            (
                key("we\"ird\\ten\nant", Some("c\n\"x\"")),
                counters(u64::MAX),
            ),
            // Listed twice: must not make a duplicate series.
            (key("acme", None), counters(5)),
        ],
        sampler: SamplerStats {
            targets: 4,
            failing: 1,
            ticks: 1000,
            missed_ticks: 3,
            last_tick: Duration::from_micros(1234),
            last_lag: Duration::from_millis(2),
            read_errors: 5,
            gone: 6,
            undelivered: 0,
            link_errors: 8,
        },
        ledger: Some(LedgerStats {
            db_bytes: 1 << 20,
            records: 100,
            unacked_records: 10,
            open_windows: 4,
            keys: 4,
        }),
        export: Some(ExportMetrics {
            delivered: 90,
            failures: 3,
            backlog: 10,
        }),
    }
}

/// One parsed sample line: name, labels (unescaped), value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parses a sample line of the text format strictly, or says what is wrong with it.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let valid_name = |s: &str| {
        !s.is_empty()
            && !s.starts_with(|c: char| c.is_ascii_digit())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    let mut it = line.chars().peekable();
    let mut name = String::new();
    while let Some(&c) = it.peek() {
        if c == '{' || c == ' ' {
            break;
        }
        name.push(c);
        it.next();
    }
    if !valid_name(&name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = Vec::new();
    if it.peek() == Some(&'{') {
        it.next();
        loop {
            let mut label = String::new();
            loop {
                match it.next().ok_or("unterminated labels")? {
                    '=' => break,
                    c => label.push(c),
                }
            }
            if !valid_name(&label) || label.contains(':') {
                return Err(format!("bad label name {label:?}"));
            }
            if it.next() != Some('"') {
                return Err(format!("value of {label} not quoted"));
            }
            let mut value = String::new();
            loop {
                match it.next().ok_or("unterminated label value")? {
                    '"' => break,
                    '\\' => match it.next() {
                        Some('n') => value.push('\n'),
                        Some(c @ ('\\' | '"')) => value.push(c),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            labels.push((label, value));
            match it.next() {
                Some(',') => {}
                Some('}') => break,
                other => return Err(format!("expected ',' or '}}', found {other:?}")),
            }
        }
    }
    if it.next() != Some(' ') {
        return Err("no space before the value".into());
    }
    let value: String = it.collect();
    let parsed: f64 = value.parse().map_err(|_| format!("bad value {value:?}"))?;
    Ok((name, labels, parsed))
}

/// Checks the whole exposition: every family has one HELP then one TYPE, its samples follow it
/// and carry its name, no series appears twice, counters end in `_total`. Returns the samples.
fn check_exposition(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "must end with a newline");
    let mut families = HashSet::new();
    let mut series = HashSet::new();
    let mut family: Option<(String, String)> = None;
    let mut help: Option<String> = None;
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP without text");
            assert!(families.insert(name.to_owned()), "second HELP for {name}");
            help = Some(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE without type");
            assert_eq!(
                help.take().as_deref(),
                Some(name),
                "TYPE {name} not after its HELP"
            );
            assert!(matches!(kind, "counter" | "gauge"), "{line}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            family = Some((name.to_owned(), kind.to_owned()));
        } else {
            let sample = parse_sample(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
            let (fam, _) = family.as_ref().expect("sample before any TYPE");
            assert_eq!(&sample.0, fam, "sample outside its family");
            assert!(
                series.insert((sample.0.clone(), sample.1.clone())),
                "duplicate series {line}"
            );
            assert!(sample.2 >= 0.0 && sample.2.is_finite(), "{line}");
            samples.push(sample);
        }
    }
    samples
}

fn value_of(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && l.len() == labels.len()
                && l.iter().zip(labels).all(|(a, b)| a.0 == b.0 && a.1 == b.1)
        })
        .map(|s| s.2)
}

#[test]
fn render_is_well_formed_and_escapes_labels() {
    let text = render(&awkward());
    let samples = check_exposition(&text);
    let v = |name, labels: &[(&str, &str)]| value_of(&samples, name, labels);
    assert_eq!(
        v(
            "caas_agent_info",
            &[("node", "node \"one\"\\"), ("version", crate::VERSION)]
        ),
        Some(1.0)
    );
    assert!(
        text.contains(r#"caas_agent_info{node="node \"one\"\\","#),
        "{text}"
    );
    // The first of two entries of a key wins; values are in base units.
    assert_eq!(
        v("caas_tenant_cpu_seconds_total", &[("tenant", "acme")]),
        Some(1.500_000_001)
    );
    assert!(text.contains("caas_tenant_cpu_seconds_total{tenant=\"acme\"} 1.500000001\n"));
    let weird = "we\"ird\\ten\nant";
    assert!(
        text.contains(r#"caas_tenant_pids{tenant="we\"ird\\ten\nant"} 7"#),
        "{text}"
    );
    assert_eq!(
        v(
            "caas_container_memory_working_set_bytes",
            &[("tenant", weird), ("container", "c\n\"x\"")]
        ),
        Some(f64::from(123u32 << 20))
    );
    assert_eq!(
        v(
            "caas_container_oom_kills_total",
            &[("tenant", "acme"), ("container", "web")]
        ),
        Some(2.0)
    );
    assert!(text.contains(&format!(
        "caas_container_cpu_seconds_total{{tenant=\"we\\\"ird\\\\ten\\nant\",container=\"c\\n\\\"x\\\"\"}} {}.{:09}\n",
        u64::MAX / 1_000_000_000,
        u64::MAX % 1_000_000_000
    )));
    // Network bytes: tenants with a link only, from the tenant's side.
    assert_eq!(
        v(
            "caas_tenant_network_receive_bytes_total",
            &[("tenant", "acme")]
        ),
        Some(4096.0)
    );
    assert!(
        text.contains("caas_tenant_network_transmit_bytes_total{tenant=\"acme\"} 1099511627776\n")
    );
    let net_series: Vec<_> = samples
        .iter()
        .filter(|s| s.0.contains("_network_"))
        .collect();
    assert_eq!(net_series.len(), 2, "{net_series:?}");
    // Tenant series carry no container label, container series always do.
    for (name, labels, _) in &samples {
        if name.starts_with("caas_tenant_") {
            assert_eq!(labels.len(), 1, "{name}");
        }
        if name.starts_with("caas_container_") {
            assert_eq!(labels.len(), 2, "{name}");
        }
    }
    for (name, value) in [
        ("caas_meter_targets", 4.0),
        ("caas_meter_ticks_total", 1000.0),
        ("caas_meter_missed_ticks_total", 3.0),
        ("caas_meter_last_tick_seconds", 0.001_234),
        ("caas_meter_lag_seconds", 0.002),
        ("caas_meter_read_errors_total", 5.0),
        ("caas_meter_link_errors_total", 8.0),
        ("caas_ledger_bytes", 1_048_576.0),
        ("caas_ledger_records", 100.0),
        ("caas_ledger_unacked_records", 10.0),
        ("caas_export_backlog_records", 10.0),
        ("caas_export_delivered_total", 90.0),
        ("caas_export_failures_total", 3.0),
    ] {
        assert_eq!(v(name, &[]), Some(value), "{name}");
    }
}

#[test]
fn optional_parts_are_left_out() {
    let text = render(&MetricsSnapshot::default());
    let samples = check_exposition(&text);
    assert!(!text.contains("caas_ledger_"), "{text}");
    assert!(!text.contains("caas_export_"), "{text}");
    assert!(!samples.iter().any(|s| s.0.starts_with("caas_tenant_")));
    assert_eq!(value_of(&samples, "caas_meter_ticks_total", &[]), Some(0.0));
}

/// Runs `promtool check metrics` on `text`: `None` when promtool is not installed.
fn promtool(text: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("wait for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), said))
}

#[test]
fn promtool_accepts_the_exposition() {
    const TEST: &str = "metrics::tests::promtool_accepts_the_exposition";
    for snapshot in [awkward(), MetricsSnapshot::default()] {
        let text = render(&snapshot);
        let Some((ok, said)) = promtool(&text) else {
            assert!(
                !crate::testing::privileged_required(),
                "{TEST}: promtool is not installed (Debian package prometheus), and \
                 CAAS_REQUIRE_PRIVILEGED=1 makes it mandatory"
            );
            crate::testing::skip(TEST, "promtool not on PATH (Debian package prometheus)");
            return;
        };
        assert!(
            ok && said.trim().is_empty(),
            "promtool check metrics: {said}\n{text}"
        );
    }
}

#[test]
fn config_defaults_to_off_and_refuses_unknown_keys() {
    assert_eq!(MetricsConfig::default().listen, None);
    let c: MetricsConfig = toml::from_str("listen = \"127.0.0.1:9464\"").unwrap();
    assert_eq!(c.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert!(toml::from_str::<MetricsConfig>("listen_addr = \"127.0.0.1:9464\"").is_err());
    assert!(toml::from_str::<MetricsConfig>("listen = \"localhost\"").is_err());
}

// ---------------------------------------------------------------------------------------------
// The HTTP endpoints.

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

async fn request(addr: std::net::SocketAddr, method: &str, path: &str) -> anyhow::Result<Reply> {
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw)).await??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{raw:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("{head:?}"))?
        .parse()?;
    Ok(Reply {
        status,
        headers: head.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_and_the_server_stops() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (ready_tx, ready_rx) = watch::channel(false);
    let fail = Arc::new(AtomicBool::new(false));
    let snapshot: Arc<dyn Fn() -> MetricsSnapshot + Send + Sync> = {
        let fail = Arc::clone(&fail);
        Arc::new(move || {
            assert!(
                !fail.load(Ordering::Relaxed),
                "snapshot failure injected by the test"
            );
            awkward()
        })
    };
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(serve(listener, snapshot, ready_rx, shutdown.clone()));

    let r = request(addr, "GET", "/metrics").await?;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        r.headers
    );
    assert_eq!(r.body, render(&awkward()));

    let r = request(addr, "GET", "/healthz").await?;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));

    let r = request(addr, "GET", "/readyz").await?;
    assert_eq!(r.status, 503);
    assert!(r.body.starts_with("not ready"), "{}", r.body);
    ready_tx.send_replace(true);
    let r = request(addr, "GET", "/readyz").await?;
    assert_eq!(r.status, 200);

    assert_eq!(request(addr, "GET", "/nope").await?.status, 404);
    assert_eq!(request(addr, "GET", "/metrics/x").await?.status, 404);
    let r = request(addr, "POST", "/metrics").await?;
    assert_eq!(r.status, 405);
    assert!(r.headers.contains("allow: get"), "{}", r.headers);
    assert_eq!(request(addr, "DELETE", "/healthz").await?.status, 405);

    fail.store(true, Ordering::Relaxed);
    let r = request(addr, "GET", "/metrics").await?;
    assert_eq!((r.status, r.body.as_str()), (500, "metrics unavailable\n"));
    assert_eq!(request(addr, "GET", "/healthz").await?.status, 200);

    // An idle keep-alive connection must not hold the shutdown up.
    let _idle = TcpStream::connect(addr).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t = Instant::now();
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), server).await??;
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "stopped after {:?}",
        t.elapsed()
    );
    assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    Ok(())
}
