//! `posctl`, the posfleet admin CLI; everything lives in `posfleet_broker::posctl`.

fn main() -> std::process::ExitCode {
    posfleet_broker::posctl::main()
}
