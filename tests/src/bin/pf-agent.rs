//! `posfleet-agent` under a name the e2e binary can find (`CARGO_BIN_EXE_pf-agent`).
fn main() -> std::process::ExitCode {
    posfleet_agent::cli::main()
}
