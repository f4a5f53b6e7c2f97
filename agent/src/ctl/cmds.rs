//! One function per command group: build the request, call, print.

use std::{io::Write, process::ExitCode};

use anyhow::Context;
use caas_proto::v1::{
    self as pb, container_service_client::ContainerServiceClient,
    image_service_client::ImageServiceClient, node_service_client::NodeServiceClient,
    tenant_service_client::TenantServiceClient, usage_service_client::UsageServiceClient,
};
use futures::StreamExt;
use tonic::transport::Channel;

use super::{
    Cmd, ContainerCmd, ContainerStateArg, CreateArgs, ExportFormat, ImageCmd, IsolationArg,
    NodeCmd, QuotaArgs, TenantCmd, TenantStateArg, UsageCmd, output as out, to_map,
};

pub(super) async fn dispatch(ch: Channel, cmd: Cmd, json: bool) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Node(c) => node(ch, c, json).await,
        Cmd::Tenant(c) => tenant(ch, c, json).await,
        Cmd::Container(c) => container(ch, c, json).await,
        Cmd::Image(c) => image(ch, c, json).await,
        Cmd::Usage(c) => usage(ch, c, json).await,
    }
}

async fn node(ch: Channel, cmd: NodeCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = NodeServiceClient::new(ch);
    match cmd {
        NodeCmd::Info => {
            let i = c
                .get_node_info(pb::GetNodeInfoRequest {})
                .await?
                .into_inner();
            if json {
                out::json(&i);
            } else {
                let cap = i.capacity.unwrap_or_default();
                out::fields(vec![
                    ("node", i.node),
                    ("version", i.version),
                    ("kernel", i.kernel),
                    ("cgroups", i.cgroup_layout),
                    ("vm accelerator", i.vm_accelerator),
                    (
                        "cpus",
                        format!("{} ({:.2} allocated)", cap.cpus, cap.allocated_cpus),
                    ),
                    (
                        "memory",
                        format!(
                            "{} ({} allocated)",
                            out::bytes(cap.memory_bytes),
                            out::bytes(cap.allocated_memory_bytes)
                        ),
                    ),
                    ("tenants", i.tenants.to_string()),
                    ("uptime", format!("{}s", i.uptime_seconds)),
                ]);
                for w in i.warnings {
                    println!("warning: {w}");
                }
            }
        }
        NodeCmd::Health => {
            let h = c.get_health(pb::GetHealthRequest {}).await?.into_inner();
            let ok = h.ok;
            if json {
                out::json(&h);
            } else {
                out::table(
                    &["CHECK", "OK", "MESSAGE"],
                    h.checks
                        .into_iter()
                        .map(|c| vec![c.name, c.ok.to_string(), c.message])
                        .collect(),
                );
            }
            if !ok {
                return Ok(ExitCode::FAILURE);
            }
        }
        NodeCmd::Whoami => {
            let w = c.who_am_i(pb::WhoAmIRequest {}).await?.into_inner();
            if json {
                out::json(&w);
            } else {
                out::fields(vec![("role", w.role), ("identity", w.identity)]);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn isolation(i: IsolationArg) -> i32 {
    match i {
        IsolationArg::Userns => pb::Isolation::Userns as i32,
        IsolationArg::Vm => pb::Isolation::Vm as i32,
    }
}

fn quotas(q: QuotaArgs) -> pb::Quotas {
    pb::Quotas {
        cpus: q.cpus,
        memory_bytes: q.memory,
        pids: q.pids,
        max_containers: q.max_containers,
    }
}

fn print_tenants(ts: Vec<pb::Tenant>, json: bool) {
    if json {
        out::json(&ts);
        return;
    }
    out::table(
        &[
            "ID",
            "ISOLATION",
            "STATE",
            "CPUS",
            "MEMORY",
            "PIDS",
            "LABELS",
            "CREATED",
        ],
        ts.into_iter()
            .map(|t| {
                let q = t.quotas.unwrap_or_default();
                vec![
                    t.id.clone(),
                    pb::Isolation::try_from(t.isolation)
                        .map(|i| {
                            i.as_str_name()
                                .trim_start_matches("ISOLATION_")
                                .to_lowercase()
                        })
                        .unwrap_or_default(),
                    pb::TenantState::try_from(t.state)
                        .map(|s| {
                            s.as_str_name()
                                .trim_start_matches("TENANT_STATE_")
                                .to_lowercase()
                        })
                        .unwrap_or_default(),
                    q.cpus.map(|c| c.to_string()).unwrap_or_default(),
                    q.memory_bytes.map(out::bytes).unwrap_or_default(),
                    q.pids.map(|p| p.to_string()).unwrap_or_default(),
                    out::labels(&t.labels),
                    out::time_ms(t.created_at_unix_ms),
                ]
            })
            .collect(),
    );
}

async fn tenant(ch: Channel, cmd: TenantCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = TenantServiceClient::new(ch);
    match cmd {
        TenantCmd::Create {
            id,
            isolation: iso,
            quotas: q,
            labels,
        } => {
            let t = c
                .create_tenant(pb::CreateTenantRequest {
                    id,
                    isolation: isolation(iso),
                    quotas: Some(quotas(q)),
                    labels: to_map(labels),
                })
                .await?
                .into_inner();
            print_tenants(vec![t], json);
        }
        TenantCmd::Get { id } => {
            let t = c
                .get_tenant(pb::GetTenantRequest { id })
                .await?
                .into_inner();
            print_tenants(vec![t], json);
        }
        TenantCmd::Ls {
            labels,
            state,
            isolation: iso,
        } => {
            let r = c
                .list_tenants(pb::ListTenantsRequest {
                    label_selector: to_map(labels),
                    state: state.map_or(0, |s| match s {
                        TenantStateArg::Pending => pb::TenantState::Pending as i32,
                        TenantStateArg::Ready => pb::TenantState::Ready as i32,
                        TenantStateArg::Failed => pb::TenantState::Failed as i32,
                        TenantStateArg::Deleting => pb::TenantState::Deleting as i32,
                    }),
                    isolation: iso.map_or(0, isolation),
                })
                .await?
                .into_inner();
            print_tenants(r.tenants, json);
        }
        TenantCmd::Update { id, quotas: q } => {
            let t = c
                .update_tenant_quotas(pb::UpdateTenantQuotasRequest {
                    id,
                    quotas: Some(quotas(q)),
                })
                .await?
                .into_inner();
            print_tenants(vec![t], json);
        }
        TenantCmd::Rm { id, force } => {
            c.delete_tenant(pb::DeleteTenantRequest {
                id: id.clone(),
                force,
            })
            .await?;
            if json {
                out::json(&serde_json::json!({ "deleted": id }));
            } else {
                println!("deleted tenant {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cref(tenant: String, container: String) -> Option<pb::ContainerRef> {
    Some(pb::ContainerRef { tenant, container })
}

fn print_containers(cs: Vec<pb::Container>, json: bool) {
    if json {
        out::json(&cs);
        return;
    }
    out::table(
        &[
            "TENANT", "NAME", "ID", "STATE", "EXIT", "IMAGE", "PORTS", "CREATED",
        ],
        cs.into_iter()
            .map(|c| {
                let ports: Vec<String> = c
                    .ports
                    .iter()
                    .map(|p| format!("{}->{}/{}", p.host_port, p.container_port, p.protocol))
                    .collect();
                vec![
                    c.tenant,
                    c.name,
                    c.id,
                    pb::ContainerState::try_from(c.state)
                        .map(|s| {
                            s.as_str_name()
                                .trim_start_matches("CONTAINER_STATE_")
                                .to_lowercase()
                        })
                        .unwrap_or_default(),
                    c.exit_code.to_string(),
                    c.image,
                    ports.join(","),
                    out::time_ms(c.created_at_unix_ms),
                ]
            })
            .collect(),
    );
}

fn create_request(a: CreateArgs) -> pb::CreateContainerRequest {
    pb::CreateContainerRequest {
        tenant: a.tenant,
        name: a.name,
        image: a.image.unwrap_or_default(),
        rootfs_path: a.rootfs.unwrap_or_default(),
        command: a.command,
        env: a.env,
        workdir: a.workdir.unwrap_or_default(),
        resources: Some(pb::Resources {
            cpus: a.cpus,
            memory_bytes: a.memory,
            pids: a.pids,
            cpu_shares: a.cpu_shares,
        }),
        labels: to_map(a.labels),
        ports: a
            .ports
            .into_iter()
            .map(|(h, c, p)| pb::PortMapping {
                host_port: h,
                container_port: c,
                protocol: p,
                host_ip: String::new(),
            })
            .collect(),
    }
}

async fn container(ch: Channel, cmd: ContainerCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = ContainerServiceClient::new(ch);
    match cmd {
        ContainerCmd::Create(a) => {
            let r = c.create_container(create_request(a)).await?.into_inner();
            print_containers(vec![r], json);
        }
        ContainerCmd::Run(a) => {
            let created = c.create_container(create_request(a)).await?.into_inner();
            let r = c
                .start_container(pb::StartContainerRequest {
                    r#ref: cref(created.tenant, created.id),
                })
                .await?
                .into_inner();
            print_containers(vec![r], json);
        }
        ContainerCmd::Start { tenant, container } => {
            let r = c
                .start_container(pb::StartContainerRequest {
                    r#ref: cref(tenant, container),
                })
                .await?
                .into_inner();
            print_containers(vec![r], json);
        }
        ContainerCmd::Stop {
            tenant,
            container,
            grace,
            signal,
        } => {
            let r = c
                .stop_container(pb::StopContainerRequest {
                    r#ref: cref(tenant, container),
                    grace_seconds: grace,
                    signal: signal.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_containers(vec![r], json);
        }
        ContainerCmd::Kill {
            tenant,
            container,
            signal,
        } => {
            let r = c
                .kill_container(pb::KillContainerRequest {
                    r#ref: cref(tenant, container),
                    signal: signal.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_containers(vec![r], json);
        }
        ContainerCmd::Rm {
            tenant,
            container,
            force,
        } => {
            c.delete_container(pb::DeleteContainerRequest {
                r#ref: cref(tenant.clone(), container.clone()),
                force,
            })
            .await?;
            if json {
                out::json(&serde_json::json!({ "deleted": container, "tenant": tenant }));
            } else {
                println!("deleted container {container} of tenant {tenant}");
            }
        }
        ContainerCmd::Wait { tenant, container } => {
            let r = c
                .wait_container(pb::WaitContainerRequest {
                    r#ref: cref(tenant, container),
                })
                .await?
                .into_inner();
            if json {
                out::json(&r);
            } else {
                println!(
                    "{}{}",
                    r.exit_code,
                    if r.oom_killed { " (oom-killed)" } else { "" }
                );
            }
        }
        ContainerCmd::Ps {
            tenant,
            state,
            labels,
        } => {
            let r = c
                .list_containers(pb::ListContainersRequest {
                    tenant: tenant.unwrap_or_default(),
                    state: state.map_or(0, |s| match s {
                        ContainerStateArg::Created => pb::ContainerState::Created as i32,
                        ContainerStateArg::Running => pb::ContainerState::Running as i32,
                        ContainerStateArg::Exited => pb::ContainerState::Exited as i32,
                        ContainerStateArg::Unknown => pb::ContainerState::Unknown as i32,
                    }),
                    label_selector: to_map(labels),
                })
                .await?
                .into_inner();
            print_containers(r.containers, json);
        }
        ContainerCmd::Inspect { tenant, container } => {
            let r = c
                .inspect_container(pb::InspectContainerRequest {
                    r#ref: cref(tenant, container),
                })
                .await?
                .into_inner();
            out::json(&r);
        }
        ContainerCmd::Logs {
            tenant,
            container,
            tail,
            follow,
        } => {
            let mut s = c
                .logs(pb::LogsRequest {
                    r#ref: cref(tenant, container),
                    tail,
                    follow,
                    stream: 0,
                })
                .await?
                .into_inner();
            while let Some(chunk) = s.next().await {
                let chunk = chunk?;
                if json {
                    out::json_line(&serde_json::json!({
                        "stream": chunk.stream,
                        "time_unix_ns": chunk.time_unix_ns,
                        "data": String::from_utf8_lossy(&chunk.data),
                    }));
                } else if chunk.stream == pb::LogStream::Stderr as i32 {
                    std::io::stderr().write_all(&chunk.data)?;
                } else {
                    std::io::stdout().write_all(&chunk.data)?;
                }
            }
        }
        ContainerCmd::Exec {
            tenant,
            container,
            env,
            workdir,
            command,
        } => {
            let mut s = c
                .exec(pb::ExecRequest {
                    r#ref: cref(tenant, container),
                    command,
                    env,
                    workdir: workdir.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut code = None;
            while let Some(o) = s.next().await {
                match o?.output {
                    Some(pb::exec_output::Output::Stdout(b)) => std::io::stdout().write_all(&b)?,
                    Some(pb::exec_output::Output::Stderr(b)) => std::io::stderr().write_all(&b)?,
                    Some(pb::exec_output::Output::ExitCode(c)) => code = Some(c),
                    None => {}
                }
            }
            let code = code.context("the exec stream ended without an exit code")?;
            if json {
                out::json(&serde_json::json!({ "exit_code": code }));
            }
            return Ok(ExitCode::from(u8::try_from(code & 0xff).unwrap_or(1)));
        }
        ContainerCmd::Events { tenant, after } => {
            let mut s = c
                .events(pb::EventsRequest {
                    tenant: tenant.unwrap_or_default(),
                    after_seq: after,
                })
                .await?
                .into_inner();
            while let Some(e) = s.next().await {
                let e = e?;
                if json {
                    out::json_line(&e);
                } else {
                    println!(
                        "{} #{} {} {}/{} exit={}",
                        out::time_ms(e.time_unix_ms),
                        e.seq,
                        pb::ContainerEventType::try_from(e.r#type)
                            .map(|t| t
                                .as_str_name()
                                .trim_start_matches("CONTAINER_EVENT_TYPE_")
                                .to_lowercase())
                            .unwrap_or_default(),
                        e.tenant,
                        e.container_name,
                        e.exit_code
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_images(is: Vec<pb::Image>, json: bool) {
    if json {
        out::json(&is);
        return;
    }
    out::table(
        &["TENANT", "REFERENCE", "DIGEST", "SIZE", "CREATED"],
        is.into_iter()
            .map(|i| {
                vec![
                    i.tenant,
                    i.reference,
                    i.digest.chars().take(19).collect(),
                    out::bytes(i.size_bytes),
                    out::time_ms(i.created_at_unix_ms),
                ]
            })
            .collect(),
    );
}

async fn image(ch: Channel, cmd: ImageCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = ImageServiceClient::new(ch);
    match cmd {
        ImageCmd::Pull {
            tenant,
            reference,
            username,
            password_stdin,
        } => {
            let auth = match (username, password_stdin) {
                (Some(u), true) => {
                    let mut p = String::new();
                    std::io::stdin().read_line(&mut p)?;
                    Some(pb::RegistryAuth {
                        username: u,
                        password: p.trim_end_matches(['\r', '\n']).to_string(),
                        identity_token: String::new(),
                    })
                }
                (Some(u), false) => Some(pb::RegistryAuth {
                    username: u,
                    ..Default::default()
                }),
                (None, true) => anyhow::bail!("--password-stdin needs --username"),
                (None, false) => None,
            };
            let mut s = c
                .pull_image(pb::PullImageRequest {
                    tenant,
                    reference,
                    auth,
                })
                .await?
                .into_inner();
            // One line for the whole image (layers download in parallel), redrawn in place on
            // a terminal; a line per finished layer either way.
            let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let mut layers: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
            let mut pulled = false;
            while let Some(p) = s.next().await {
                match p?.event {
                    Some(pb::pull_progress::Event::Layer(l)) => {
                        if json {
                            out::json_line(&l);
                            continue;
                        }
                        let short: String = l.digest.chars().take(19).collect();
                        let before = layers.insert(l.digest.clone(), (l.done_bytes, l.total_bytes));
                        let finished = l.total_bytes > 0
                            && l.done_bytes >= l.total_bytes
                            && before.is_none_or(|(d, t)| d < t);
                        if finished {
                            if tty {
                                eprint!("\r\x1b[2K");
                            }
                            eprintln!("{short} done ({})", out::bytes(l.total_bytes));
                        }
                        if tty {
                            let (done, total) = layers
                                .values()
                                .fold((0u64, 0u64), |(d, t), (ld, lt)| (d + ld, t + lt));
                            let pct = done.saturating_mul(100).checked_div(total).unwrap_or(0);
                            let bar = "#".repeat(usize::try_from(pct / 5).unwrap_or(0));
                            eprint!(
                                "\r\x1b[2K{} layers [{bar:<20}] {pct:>3}% {}/{}",
                                layers.len(),
                                out::bytes(done),
                                out::bytes(total)
                            );
                        }
                    }
                    Some(pb::pull_progress::Event::Image(i)) => {
                        if tty && !json {
                            eprintln!();
                        }
                        pulled = true;
                        print_images(vec![i], json)
                    }
                    None => {}
                }
            }
            if !pulled {
                anyhow::bail!("the pull ended without a result; the agent log says why");
            }
        }
        ImageCmd::Ls { tenant, filter } => {
            let r = c
                .list_images(pb::ListImagesRequest {
                    tenant: tenant.unwrap_or_default(),
                    reference_contains: filter.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_images(r.images, json);
        }
        ImageCmd::Inspect { tenant, reference } => {
            let i = c
                .inspect_image(pb::InspectImageRequest { tenant, reference })
                .await?
                .into_inner();
            out::json(&i);
        }
        ImageCmd::Rm { tenant, reference } => {
            c.remove_image(pb::RemoveImageRequest {
                tenant: tenant.clone(),
                reference: reference.clone(),
            })
            .await?;
            if json {
                out::json(&serde_json::json!({ "removed": reference, "tenant": tenant }));
            } else {
                println!("removed {reference} from tenant {tenant}");
            }
        }
        ImageCmd::Import {
            tenant,
            path,
            reference,
        } => {
            let i = c
                .import_image(pb::ImportImageRequest {
                    tenant,
                    path,
                    reference,
                })
                .await?
                .into_inner();
            print_images(vec![i], json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_records(rs: &[pb::BillingRecord]) {
    out::table(
        &[
            "CURSOR",
            "TENANT",
            "CONTAINER",
            "WINDOW",
            "CPU-S",
            "GIB-S",
            "PEAK",
            "OOM",
            "RX",
            "TX",
        ],
        rs.iter()
            .map(|r| {
                vec![
                    r.cursor.to_string(),
                    r.tenant.clone(),
                    if r.container.is_empty() {
                        "-".into()
                    } else {
                        r.container.clone()
                    },
                    format!(
                        "{}+{}s",
                        out::time_ms(r.window_start_unix_s * 1000),
                        r.window_seconds
                    ),
                    format!("{:.3}", r.cpu_seconds),
                    format!("{:.3}", r.memory_gib_seconds),
                    out::bytes(r.memory_peak_bytes),
                    r.oom_kills.to_string(),
                    out::bytes(r.rx_bytes),
                    out::bytes(r.tx_bytes),
                ]
            })
            .collect(),
    );
}

async fn usage(ch: Channel, cmd: UsageCmd, json: bool) -> anyhow::Result<ExitCode> {
    let mut c = UsageServiceClient::new(ch);
    match cmd {
        UsageCmd::Get {
            tenant,
            container,
            since,
            until,
            per_second,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let r = c
                .get_usage(pb::GetUsageRequest {
                    tenant,
                    container: container.unwrap_or_default(),
                    start_unix_s: since.unwrap_or(now.saturating_sub(3600)),
                    end_unix_s: until.unwrap_or(0),
                    granularity: if per_second {
                        pb::Granularity::Second as i32
                    } else {
                        pb::Granularity::Window as i32
                    },
                })
                .await?
                .into_inner();
            if json {
                out::json(&r);
            } else {
                out::table(
                    &[
                        "TIME",
                        "SECONDS",
                        "CPU-S",
                        "GIB-S",
                        "WORKING-SET",
                        "PEAK",
                        "OOM",
                        "RX",
                        "TX",
                    ],
                    r.points
                        .iter()
                        .map(|p| (out::time_ms(p.time_unix_s * 1000), p))
                        .chain(r.total.as_ref().map(|t| ("total".to_string(), t)))
                        .map(|(time, p)| {
                            vec![
                                time,
                                p.seconds.to_string(),
                                format!("{:.3}", p.cpu_seconds),
                                format!("{:.3}", p.memory_gib_seconds),
                                out::bytes(p.memory_working_set_bytes),
                                out::bytes(p.memory_peak_bytes),
                                p.oom_kills.to_string(),
                                out::bytes(p.rx_bytes),
                                out::bytes(p.tx_bytes),
                            ]
                        })
                        .collect(),
                );
            }
        }
        UsageCmd::Records {
            after,
            limit,
            tenant,
        } => {
            let r = c
                .read_records(pb::ReadRecordsRequest {
                    after_cursor: after,
                    limit,
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                out::json(&r);
            } else {
                print_records(&r.records);
                println!("next cursor: {}", r.next_cursor);
            }
        }
        UsageCmd::Stream { after, tenant } => {
            let mut s = c
                .stream_records(pb::StreamRecordsRequest {
                    after_cursor: after,
                    tenant: tenant.unwrap_or_default(),
                })
                .await?
                .into_inner();
            while let Some(r) = s.next().await {
                let r = r?;
                if json {
                    out::json_line(&r);
                } else {
                    print_records(std::slice::from_ref(&r));
                }
            }
        }
        UsageCmd::Ack { cursor } => {
            let r = c
                .ack_records(pb::AckRecordsRequest { cursor })
                .await?
                .into_inner();
            if json {
                out::json(&r);
            } else {
                println!("acknowledged up to cursor {}", r.acked_cursor);
            }
        }
        UsageCmd::Export {
            format,
            after,
            tenant,
        } => {
            let tenant = tenant.unwrap_or_default();
            let mut cursor = after;
            if matches!(format, ExportFormat::Csv) {
                println!(
                    "id,cursor,node,tenant,container,window_start_unix_s,window_seconds,cpu_seconds,memory_gib_seconds,memory_peak_bytes,oom_kills,rx_bytes,tx_bytes"
                );
            }
            loop {
                let r = c
                    .read_records(pb::ReadRecordsRequest {
                        after_cursor: cursor,
                        limit: 1000,
                        tenant: tenant.clone(),
                    })
                    .await?
                    .into_inner();
                if r.records.is_empty() {
                    break;
                }
                for rec in &r.records {
                    match format {
                        ExportFormat::Jsonl => out::json_line(rec),
                        ExportFormat::Csv => println!(
                            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
                            rec.id,
                            rec.cursor,
                            rec.node,
                            rec.tenant,
                            rec.container,
                            rec.window_start_unix_s,
                            rec.window_seconds,
                            rec.cpu_seconds,
                            rec.memory_gib_seconds,
                            rec.memory_peak_bytes,
                            rec.oom_kills,
                            rec.rx_bytes,
                            rec.tx_bytes
                        ),
                    }
                }
                cursor = r.next_cursor;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
