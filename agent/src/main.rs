//! The `posfleet-agent` binary: everything lives in the library (`posfleet_agent::cli`).

fn main() -> std::process::ExitCode {
    posfleet_agent::cli::main()
}
