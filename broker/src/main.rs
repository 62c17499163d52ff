//! `posfleet-broker`: see `posfleet_broker::cli`.

fn main() -> std::process::ExitCode {
    posfleet_broker::cli::main()
}
