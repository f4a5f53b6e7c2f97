//! `caas-agent`: the per-server agent. `serve` runs it; `certs dev` writes development
//! certificates.

use std::{path::PathBuf, process::ExitCode};

use caas_agent::{certs, config::Config, logging, serve};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "caas-agent", version = caas_agent::VERSION, about = "Per-server agent of a Containers-as-a-Service provider")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the API until SIGTERM.
    Serve {
        /// Config file (default: /etc/caas-agent/config.toml if it exists, else built-in defaults).
        #[arg(long, env = "CAAS_CONFIG")]
        config: Option<PathBuf>,
        /// Check the configuration and exit.
        #[arg(long)]
        check: bool,
    },
    /// Run one tenant's engine (started by the agent, not by hand).
    #[command(hide = true)]
    Engine(caas_agent::engine::EngineArgs),
    /// Be the init of a VM tenant's guest (PID 1 inside the VM, started by its kernel).
    #[command(hide = true)]
    Guest(caas_agent::guest::GuestArgs),
    /// Be PID 1 of a pod's shared process namespace (started by the tenant's engine).
    #[command(hide = true)]
    Pause {
        /// The empty directory it confines itself to.
        #[arg(long)]
        root: PathBuf,
    },
    /// Certificates for development and tests.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a CA, a server certificate and a client certificate per role into DIR.
    Dev {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Extra tenant ids to issue `tenant:<id>` client certificates for.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// Names the server certificate is valid for (default: localhost, 127.0.0.1, ::1, host name).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Print the files written as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve { config, check } => {
            let cfg = match Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("caas-agent: {e}");
                    return ExitCode::from(2);
                }
            };
            if check {
                println!("configuration ok");
                return ExitCode::SUCCESS;
            }
            logging::init(&cfg.log);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("caas-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "caas-agent failed");
                    eprintln!("caas-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Engine(args) => {
            logging::init(&caas_agent::config::LogConfig::default());
            match caas_agent::engine::main(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("caas-agent engine: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Pause { root } => caas_agent::engine::pause::main(&root),
        Cmd::Guest(args) => {
            if std::process::id() != 1 {
                eprintln!("caas-agent guest: only runs as the init (PID 1) of a VM tenant's guest");
                return ExitCode::from(2);
            }
            // A panic anywhere in the guest's init (its relay thread included) must not leave a
            // guest that runs but cannot be reached: power off, and the host boots it again.
            std::panic::set_hook(Box::new(|info| {
                eprintln!("caas-guest: {info}; powering off");
                caas_agent::guest::power_off()
            }));
            if let Err(e) = caas_agent::guest::main(&args) {
                eprintln!("caas-guest: {e}; powering off");
            }
            caas_agent::guest::power_off()
        }
        Cmd::Certs {
            cmd:
                CertsCmd::Dev {
                    out,
                    tenants,
                    sans,
                    json,
                },
        } => {
            for t in &tenants {
                if let Err(e) = caas_agent::validate::check_id("--tenant", t) {
                    eprintln!("caas-agent: {e}");
                    return ExitCode::from(2);
                }
            }
            let sans = if sans.is_empty() {
                let mut s = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
                if let Ok(h) = nix::unistd::gethostname() {
                    s.extend(h.into_string().ok());
                }
                s
            } else {
                sans
            };
            match certs::write_dev_bundle(&out, &sans, &tenants) {
                Ok(files) if json => {
                    println!("{}", serde_json::json!({ "dir": out, "files": files }));
                    ExitCode::SUCCESS
                }
                Ok(files) => {
                    for f in files {
                        println!("{f}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("caas-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
