//! `posfleet-broker` under a name the e2e binary can find (`CARGO_BIN_EXE_pf-broker`).
#[global_allocator]
static ALLOCATOR: posfleet_broker::Allocator = posfleet_broker::Allocator;

fn main() -> std::process::ExitCode {
    posfleet_broker::cli::main()
}
