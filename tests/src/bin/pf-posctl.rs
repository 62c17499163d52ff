//! `posctl` under a name the e2e binary can find (`CARGO_BIN_EXE_pf-posctl`).
fn main() -> std::process::ExitCode {
    posfleet_broker::posctl::main()
}
