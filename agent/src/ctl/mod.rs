//! `caasctl`: the operator CLI, one command per RPC. Tables by default, `--json` for programs.
//!
//! Talks to the unix socket (as root: role `admin`) or to TCP with a client certificate.

mod cmds;
pub mod output;

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::{self, Target};

/// Top-level arguments.
#[derive(Parser, Debug)]
#[command(name = "caasctl", version = crate::VERSION, about = "Operate a caas-agent")]
pub struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug)]
struct Conn {
    /// The agent's unix socket.
    #[arg(
        long,
        env = "CAAS_SOCKET",
        global = true,
        default_value = "/run/caas-agent/agent.sock"
    )]
    socket: PathBuf,
    /// Reach the agent over TCP with mTLS instead, e.g. https://node-1:7443.
    #[arg(long, env = "CAAS_ENDPOINT", global = true)]
    endpoint: Option<String>,
    /// CA certificate (PEM) that signed the agent's certificate.
    #[arg(long, env = "CAAS_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM); its CN is your role.
    #[arg(long, env = "CAAS_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, env = "CAAS_KEY", global = true)]
    key: Option<PathBuf>,
    /// Server name to verify, if not the endpoint's host.
    #[arg(long, env = "CAAS_SERVER_NAME", global = true)]
    server_name: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// This node: info, health, and who you are to it.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Tenants.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Containers.
    #[command(subcommand)]
    Container(ContainerCmd),
    /// Images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Usage and billing records.
    #[command(subcommand)]
    Usage(UsageCmd),
}

#[derive(Subcommand, Debug)]
enum NodeCmd {
    /// Version, capacity, cgroup layout, warnings.
    Info,
    /// Health checks.
    Health,
    /// The role the agent gives you.
    Whoami,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum IsolationArg {
    Userns,
    Vm,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum TenantStateArg {
    Pending,
    Ready,
    Failed,
    Deleting,
}

#[derive(Args, Debug, Default)]
struct QuotaArgs {
    /// CPU quota in CPUs (e.g. 1.5).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory quota (bytes, or with Ki/Mi/Gi/Ti).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Pids quota.
    #[arg(long)]
    pids: Option<u64>,
    /// Most containers at once.
    #[arg(long)]
    max_containers: Option<u32>,
}

#[derive(Subcommand, Debug)]
enum TenantCmd {
    /// Create a tenant.
    Create {
        id: String,
        #[arg(long, value_enum, default_value = "userns")]
        isolation: IsolationArg,
        #[command(flatten)]
        quotas: QuotaArgs,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    /// Show one tenant.
    Get { id: String },
    /// List tenants.
    #[command(alias = "list")]
    Ls {
        /// Only tenants with this label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
        #[arg(long, value_enum)]
        state: Option<TenantStateArg>,
        #[arg(long, value_enum)]
        isolation: Option<IsolationArg>,
    },
    /// Change quotas (unset ones keep their value).
    Update {
        id: String,
        #[command(flatten)]
        quotas: QuotaArgs,
    },
    /// Delete a tenant.
    #[command(alias = "delete")]
    Rm {
        id: String,
        /// Stop and delete its containers first.
        #[arg(long)]
        force: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ContainerStateArg {
    Created,
    Running,
    Exited,
    Unknown,
}

#[derive(Args, Debug)]
struct CreateArgs {
    tenant: String,
    name: String,
    /// Image reference known to the tenant.
    #[arg(long)]
    image: Option<String>,
    /// Host rootfs directory or OCI layout instead of an image.
    #[arg(long)]
    rootfs: Option<String>,
    /// Environment KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    #[arg(long, short = 'w')]
    workdir: Option<String>,
    /// CPU limit in CPUs.
    #[arg(long)]
    cpus: Option<f64>,
    /// Relative CPU weight under contention (2 to 262144; 1024 = one CPU's worth).
    #[arg(long)]
    cpu_shares: Option<u64>,
    /// Memory limit (bytes, or with Ki/Mi/Gi/Ti).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    #[arg(long)]
    pids: Option<u64>,
    /// A label KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = parse_kv)]
    labels: Vec<(String, String)>,
    /// Publish HOSTPORT:CONTAINERPORT[/tcp|udp] (repeatable).
    #[arg(long = "publish", short = 'p', value_parser = parse_port)]
    ports: Vec<(u32, u32, String)>,
    /// The command and its arguments.
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum ContainerCmd {
    /// Create a container.
    Create(CreateArgs),
    /// Create and start a container.
    Run(CreateArgs),
    /// Start a created container.
    Start { tenant: String, container: String },
    /// Stop: the signal, then SIGKILL after the grace period.
    Stop {
        tenant: String,
        container: String,
        #[arg(long, default_value_t = 10)]
        grace: u32,
        #[arg(long)]
        signal: Option<String>,
    },
    /// Send a signal.
    Kill {
        tenant: String,
        container: String,
        #[arg(long, short = 's')]
        signal: Option<String>,
    },
    /// Delete a container.
    #[command(alias = "delete")]
    Rm {
        tenant: String,
        container: String,
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Wait for exit and print the code.
    Wait { tenant: String, container: String },
    /// List containers.
    #[command(alias = "ls")]
    Ps {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, value_enum)]
        state: Option<ContainerStateArg>,
        #[arg(long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    /// Show one container.
    Inspect { tenant: String, container: String },
    /// Print a container's logs.
    Logs {
        tenant: String,
        container: String,
        #[arg(long, default_value_t = 0)]
        tail: u32,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Run a command in a running container.
    Exec {
        tenant: String,
        container: String,
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stream container events.
    Events {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Pull an image for a tenant.
    Pull {
        tenant: String,
        reference: String,
        #[arg(long)]
        username: Option<String>,
        /// Read the registry password from standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List images.
    #[command(alias = "list")]
    Ls {
        #[arg(long)]
        tenant: Option<String>,
        /// Only references containing this text.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Show one image.
    Inspect { tenant: String, reference: String },
    /// Remove an image.
    Rm { tenant: String, reference: String },
    /// Import an OCI image layout directory or tarball from the host.
    Import {
        tenant: String,
        path: String,
        #[arg(long)]
        reference: String,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ExportFormat {
    Csv,
    Jsonl,
}

#[derive(Subcommand, Debug)]
enum UsageCmd {
    /// Usage of a tenant or container over a time range.
    Get {
        tenant: String,
        #[arg(long)]
        container: Option<String>,
        /// Start, unix seconds (default: an hour ago).
        #[arg(long)]
        since: Option<u64>,
        /// End, unix seconds (default: now).
        #[arg(long)]
        until: Option<u64>,
        /// One point per second instead of per billing window.
        #[arg(long)]
        per_second: bool,
    },
    /// Read billing records after a cursor.
    Records {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Stream billing records live from a cursor.
    Stream {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Acknowledge records up to a cursor.
    Ack { cursor: u64 },
    /// Export billing records as CSV or JSON lines.
    Export {
        #[arg(long, value_enum)]
        format: ExportFormat,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long)]
        tenant: Option<String>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Parses `1073741824`, `512Mi`, `1Gi`, `2G` into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 512Mi or 1Gi"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" | "KB" => 1000,
        "Ki" | "KiB" => 1 << 10,
        "M" | "MB" => 1_000_000,
        "Mi" | "MiB" => 1 << 20,
        "G" | "GB" => 1_000_000_000,
        "Gi" | "GiB" => 1 << 30,
        "T" | "TB" => 1_000_000_000_000,
        "Ti" | "TiB" => 1 << 40,
        _ => {
            return Err(format!(
                "{unit:?} is not a size unit; use Ki, Mi, Gi, Ti (or K, M, G, T)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_port(s: &str) -> Result<(u32, u32, String), String> {
    let (ports, proto) = match s.split_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto.to_string()),
        Some((_, other)) => return Err(format!("protocol {other:?} must be tcp or udp")),
        None => (s, "tcp".to_string()),
    };
    let (h, c) = ports
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not HOSTPORT:CONTAINERPORT[/tcp|udp]"))?;
    let port = |p: &str| -> Result<u32, String> {
        match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => Ok(n),
            _ => Err(format!("{p:?} is not a port number 1..65535")),
        }
    };
    Ok((port(h)?, port(c)?, proto))
}

fn to_map(v: Vec<(String, String)>) -> BTreeMap<String, String> {
    v.into_iter().collect()
}

/// Runs caasctl with the process arguments.
pub fn main() -> ExitCode {
    crate::sys::default_sigpipe();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("caasctl: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            if json {
                let (code, message) = match e.downcast_ref::<tonic::Status>() {
                    Some(s) => (format!("{:?}", s.code()), s.message().to_string()),
                    None => ("Client".to_string(), format!("{e:#}")),
                };
                eprintln!(
                    "{}",
                    serde_json::json!({"error": {"code": code, "message": message}})
                );
            } else {
                match e.downcast_ref::<tonic::Status>() {
                    Some(s) => eprintln!("caasctl: {:?}: {}", s.code(), s.message()),
                    None => eprintln!("caasctl: {e:#}"),
                }
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let target = target(&cli.conn)?;
    let channel = client::connect(&target).await?;
    cmds::dispatch(channel, cli.cmd, cli.json).await
}

fn target(c: &Conn) -> anyhow::Result<Target> {
    let Some(endpoint) = &c.endpoint else {
        return Ok(Target::Unix(c.socket.clone()));
    };
    let read = |p: &Option<PathBuf>, flag: &str| -> anyhow::Result<Vec<u8>> {
        let p = p
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("--endpoint needs {flag} (or its CAAS_ variable)"))?;
        std::fs::read(p).map_err(|e| anyhow::anyhow!("{flag} {}: {e}", p.display()))
    };
    Ok(Target::Tls {
        endpoint: endpoint.clone(),
        ca_pem: read(&c.ca, "--ca")?,
        cert_pem: read(&c.cert, "--cert")?,
        key_pem: read(&c.key, "--key")?,
        domain: c.server_name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert_eq!(parse_size("42"), Ok(42));
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("Gi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080:80"), Ok((8080, 80, "tcp".into())));
        assert_eq!(parse_port("53:53/udp"), Ok((53, 53, "udp".into())));
        assert!(parse_port("0:80").is_err());
        assert!(parse_port("80").is_err());
        assert!(parse_port("80:80/sctp").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
