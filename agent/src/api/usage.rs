//! `caas.v1.UsageService`: usage series and billing records from the ledger.
//!
//! Every ledger call is blocking SQLite work and runs through [`crate::blocking::run`]. A
//! `tenant:<id>` caller reads only its own tenant: node-wide reads are narrowed to it.

use std::{pin::Pin, sync::Arc};

use caas_proto::v1::{self as pb, usage_service_server::UsageService};
use futures::Stream;
use tonic::{Request, Response, Status};

use super::{AgentState, auth::Ctx, convert, status};
use crate::{
    authz::{self, Action, Scope},
    ledger::{Ledger, LedgerError, Per, Record, UsagePoint},
    usage::{LEDGER_TIMEOUT, lock, now_unix_s},
};

/// Records per `ReadRecords` answer when the client asks for 0.
pub const DEFAULT_RECORDS_LIMIT: u32 = 500;
/// Most records per `ReadRecords` answer, and per read of a stream.
pub const MAX_RECORDS_LIMIT: u32 = 5000;
/// Most per-second points one `GetUsage` answers with (a day).
pub const MAX_USAGE_SECONDS: u64 = 86_400;

#[derive(Debug, Clone)]
pub struct UsageApi {
    state: Arc<AgentState>,
}

impl UsageApi {
    pub fn new(state: Arc<AgentState>) -> Self {
        Self { state }
    }

    /// Runs `f` on the ledger off the runtime.
    async fn ledger<T, F>(&self, what: &'static str, ctx: &Ctx, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&mut Ledger) -> Result<T, LedgerError> + Send + 'static,
    {
        let l = self.state.metering.ledger.clone();
        match crate::blocking::run(what, LEDGER_TIMEOUT, move || f(&mut lock(&l))).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(status::ledger(e, ctx)),
            Err(e) => Err(status::internal(&e, ctx)),
        }
    }
}

fn scope_of(tenant: &str) -> Scope<'_> {
    if tenant.is_empty() {
        Scope::Node
    } else {
        Scope::Tenant(tenant)
    }
}

/// The tenant filter in force: the one asked for, narrowed to a tenant caller's own.
fn effective_tenant(ctx: &Ctx, asked: Option<String>) -> Option<String> {
    asked.or_else(|| authz::visible_tenant(&ctx.caller).map(str::to_string))
}

pub fn record_out(r: Record) -> pb::BillingRecord {
    pb::BillingRecord {
        cpu_seconds: r.cpu_seconds(),
        memory_gib_seconds: r.memory_gib_seconds(),
        id: r.id,
        cursor: r.cursor,
        node: r.node,
        tenant: r.tenant,
        container: r.container.unwrap_or_default(),
        window_start_unix_s: r.window_start_unix_s,
        window_seconds: r.window_secs,
        memory_peak_bytes: r.memory_peak_bytes,
        oom_kills: r.oom_kills,
        rx_bytes: r.rx_bytes,
        tx_bytes: r.tx_bytes,
    }
}

fn point_out(p: UsagePoint) -> pb::UsagePoint {
    const NS: f64 = 1e9;
    const GIB: f64 = (1u64 << 30) as f64;
    pb::UsagePoint {
        time_unix_s: p.time_unix_s,
        seconds: u32::try_from(p.seconds).unwrap_or(u32::MAX),
        cpu_seconds: p.cpu_ns as f64 / NS,
        memory_gib_seconds: p.memory_byte_seconds as f64 / GIB,
        memory_working_set_bytes: p.memory_working_set,
        memory_peak_bytes: p.memory_peak,
        oom_kills: p.oom_kills,
        rx_bytes: p.rx_bytes,
        tx_bytes: p.tx_bytes,
    }
}

fn records_limit(limit: u32) -> Result<usize, Status> {
    let n = match limit {
        0 => DEFAULT_RECORDS_LIMIT,
        n if n > MAX_RECORDS_LIMIT => {
            return Err(Status::invalid_argument(format!(
                "limit: {n} is above the maximum of {MAX_RECORDS_LIMIT}; page with after_cursor"
            )));
        }
        n => n,
    };
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn get_usage(
        &self,
        req: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::UsageRead, Scope::Tenant(&r.tenant))
            .map_err(status::denied)?;
        let tenant = convert::id("tenant", r.tenant)?;
        let container = if r.container.is_empty() {
            None
        } else {
            let c = convert::id("container", r.container)?;
            Some(self.state.metering.container_id(&tenant, &c))
        };
        let end = if r.end_unix_s == 0 {
            now_unix_s() + 1
        } else {
            r.end_unix_s
        };
        if r.start_unix_s >= end {
            return Err(Status::invalid_argument(format!(
                "start_unix_s: {} is not before end_unix_s {end}",
                r.start_unix_s
            )));
        }
        let per = match pb::Granularity::try_from(r.granularity) {
            Ok(pb::Granularity::Second) => Per::Second,
            Ok(pb::Granularity::Window | pb::Granularity::Unspecified) => Per::Window,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "granularity: unknown value {}",
                    r.granularity
                )));
            }
        };
        // No start, per second: the last day at most (samples are kept for a bounded time).
        let start = if r.start_unix_s == 0 && per == Per::Second {
            end.saturating_sub(MAX_USAGE_SECONDS)
        } else {
            r.start_unix_s
        };
        if per == Per::Second && end - start > MAX_USAGE_SECONDS {
            return Err(Status::invalid_argument(format!(
                "start_unix_s..end_unix_s: per-second usage covers at most {MAX_USAGE_SECONDS} \
                 seconds per call; narrow the range or ask per window"
            )));
        }
        let (t, c) = (tenant.clone(), container.clone());
        let series = self
            .ledger("reading usage", &ctx, move |l| {
                l.usage(&t, c.as_deref(), start, end, per)
            })
            .await?;
        Ok(Response::new(pb::GetUsageResponse {
            tenant,
            container: container.unwrap_or_default(),
            points: series.points.into_iter().map(point_out).collect(),
            total: Some(point_out(series.total)),
        }))
    }

    async fn read_records(
        &self,
        req: Request<pb::ReadRecordsRequest>,
    ) -> Result<Response<pb::ReadRecordsResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::UsageRead, scope_of(&r.tenant))
            .map_err(status::denied)?;
        let tenant = effective_tenant(&ctx, convert::tenant_filter_id(r.tenant)?);
        let limit = records_limit(r.limit)?;
        let after = r.after_cursor;
        let (records, last) = self
            .ledger("reading billing records", &ctx, move |l| {
                let recs = l.read_records(after, limit, tenant.as_deref())?;
                Ok((recs, l.last_cursor()?))
            })
            .await?;
        // With a tenant filter the cursor still moves over other tenants' records.
        let next_cursor = match records.last() {
            Some(rec) if records.len() == limit => rec.cursor,
            _ => last.max(after),
        };
        Ok(Response::new(pb::ReadRecordsResponse {
            records: records.into_iter().map(record_out).collect(),
            next_cursor,
        }))
    }

    type StreamRecordsStream =
        Pin<Box<dyn Stream<Item = Result<pb::BillingRecord, Status>> + Send>>;

    async fn stream_records(
        &self,
        req: Request<pb::StreamRecordsRequest>,
    ) -> Result<Response<Self::StreamRecordsStream>, Status> {
        let ctx = Ctx::of(&req)?;
        let r = req.into_inner();
        authz::authorize(&ctx.caller, Action::UsageRead, scope_of(&r.tenant))
            .map_err(status::denied)?;
        let tenant = effective_tenant(&ctx, convert::tenant_filter_id(r.tenant)?);
        let mut written = self.state.metering.written();
        let shutdown = self.state.shutdown.clone();
        let api = self.clone();
        let mut cursor = r.after_cursor;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let limit = usize::try_from(MAX_RECORDS_LIMIT).unwrap_or(usize::MAX);
            loop {
                // Mark the current value seen before reading, so no write is missed.
                written.borrow_and_update();
                let t = tenant.clone();
                let after = cursor;
                let read = api
                    .ledger("streaming billing records", &ctx, move |l| {
                        l.read_records(after, limit, t.as_deref())
                    })
                    .await;
                let records = match read {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                let full = records.len() == limit;
                for rec in records {
                    cursor = rec.cursor;
                    if tx.send(Ok(record_out(rec))).await.is_err() {
                        return; // the client went away
                    }
                }
                if full {
                    continue;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = written.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack_records(
        &self,
        req: Request<pb::AckRecordsRequest>,
    ) -> Result<Response<pb::AckRecordsResponse>, Status> {
        let ctx = Ctx::of(&req)?;
        authz::authorize(&ctx.caller, Action::UsageAck, Scope::Node).map_err(status::denied)?;
        let cursor = req.into_inner().cursor;
        let acked = self
            .ledger("acknowledging billing records", &ctx, move |l| {
                l.ack(cursor)
            })
            .await?;
        tracing::info!(cursor, acked, caller = %ctx.caller.identity, "billing records acknowledged");
        Ok(Response::new(pb::AckRecordsResponse {
            acked_cursor: acked,
        }))
    }
}
