//! Ledger records as CloudEvents 1.0, in the JSON batch format (a JSON array of structured events).

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::ExportError;
use crate::ledger::Record;

/// The CloudEvents version the events follow.
pub const SPEC_VERSION: &str = "1.0";
/// The `type` of a usage event. The `v1` names the shape of `data`: a change that breaks
/// consumers gets a new type.
pub const EVENT_TYPE: &str = "io.caas.usage.v1";
/// The media type of a batch (CloudEvents JSON format, batched mode).
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";
/// The media type of each event's `data`.
pub const DATA_CONTENT_TYPE: &str = "application/json";
/// Prefix of `source`: `caas-agent/<node>`.
pub const SOURCE_PREFIX: &str = "caas-agent/";

/// One usage event.
#[derive(Debug, Serialize)]
struct Event<'a> {
    specversion: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    source: String,
    /// The tenant: consumers route and filter on it without reading `data`.
    subject: &'a str,
    /// The record id, unique per source and stable across resends: the consumer's dedup key.
    id: &'a str,
    /// The end of the window: the instant the usage it reports was complete.
    time: String,
    datacontenttype: &'static str,
    data: Usage<'a>,
}

/// `data` of a usage event. The integers are exact and are what billing should sum; the float
/// fields are the same quantities in base units, for humans and dashboards.
#[derive(Debug, Serialize)]
struct Usage<'a> {
    node: &'a str,
    tenant: &'a str,
    /// `null` for the tenant's whole subtree.
    container: Option<&'a str>,
    /// RFC 3339, UTC.
    window_start: String,
    window_seconds: u32,
    cpu_seconds: f64,
    cpu_ns: u64,
    memory_gib_seconds: f64,
    memory_byte_seconds: u64,
    memory_peak_bytes: u64,
    oom_kills: u64,
    /// Bytes the tenant received over its network link in the window, L2 headers included (0
    /// for a container: its traffic is in its tenant's event).
    rx_bytes: u64,
    /// Bytes the tenant sent over its network link in the window, L2 headers included.
    tx_bytes: u64,
    /// The record's position in the node's ledger: increases with every record.
    cursor: u64,
}

fn rfc3339(unix_s: u64) -> Result<String, ExportError> {
    let bad = || ExportError::Time { unix_s };
    let secs = i64::try_from(unix_s).map_err(|_| bad())?;
    OffsetDateTime::from_unix_timestamp(secs)
        .map_err(|_| bad())?
        .format(&Rfc3339)
        .map_err(|_| bad())
}

fn event(r: &Record) -> Result<Event<'_>, ExportError> {
    let end = r
        .window_start_unix_s
        .checked_add(u64::from(r.window_secs))
        .ok_or(ExportError::Time {
            unix_s: r.window_start_unix_s,
        })?;
    Ok(Event {
        specversion: SPEC_VERSION,
        kind: EVENT_TYPE,
        source: format!("{SOURCE_PREFIX}{}", r.node),
        subject: &r.tenant,
        id: &r.id,
        time: rfc3339(end)?,
        datacontenttype: DATA_CONTENT_TYPE,
        data: Usage {
            node: &r.node,
            tenant: &r.tenant,
            container: r.container.as_deref(),
            window_start: rfc3339(r.window_start_unix_s)?,
            window_seconds: r.window_secs,
            cpu_seconds: r.cpu_seconds(),
            cpu_ns: r.cpu_ns,
            memory_gib_seconds: r.memory_gib_seconds(),
            memory_byte_seconds: r.memory_byte_seconds,
            memory_peak_bytes: r.memory_peak_bytes,
            oom_kills: r.oom_kills,
            rx_bytes: r.rx_bytes,
            tx_bytes: r.tx_bytes,
            cursor: r.cursor,
        },
    })
}

/// The body of one POST: `records` as a CloudEvents JSON batch, in cursor order.
pub fn encode_batch(records: &[Record]) -> Result<Vec<u8>, ExportError> {
    let events = records.iter().map(event).collect::<Result<Vec<_>, _>>()?;
    serde_json::to_vec(&events).map_err(ExportError::Encode)
}
