//! `caasctl`: the operator CLI for caas-agent (see `caas_agent::ctl`).

fn main() -> std::process::ExitCode {
    caas_agent::ctl::main()
}
