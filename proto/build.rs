//! Compiles `proto/posfleet/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a fresh
//! machine builds with `cargo` alone and no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/posfleet/v1/posfleet.proto";
    println!("cargo:rerun-if-changed={file}");
    let descriptors = protox::compile([file], ["proto"])?;
    prost_build::Config::new().compile_fds(descriptors)?;
    Ok(())
}
