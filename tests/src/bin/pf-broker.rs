//! `posfleet-broker` under a name the e2e binary can find (`CARGO_BIN_EXE_pf-broker`).
fn main() -> std::process::ExitCode {
    posfleet_broker::cli::main()
}
