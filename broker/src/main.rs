//! `posfleet-broker`: see `posfleet_broker::cli`.

#[global_allocator]
static ALLOCATOR: posfleet_broker::Allocator = posfleet_broker::Allocator;

fn main() -> std::process::ExitCode {
    posfleet_broker::cli::main()
}
