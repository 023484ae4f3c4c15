//! Generates the gRPC code from `tessera/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler): a fresh machine builds it without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["tessera/v1/coordinator.proto", "tessera/v1/atlas.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
