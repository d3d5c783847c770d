//! Generates the gRPC code of Omega's own services (proto/), shared by the agent (server) and omctl (client).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/omega/logs/v1/logs.proto");
    tonic_prost_build::configure().compile_protos(&["../proto/omega/logs/v1/logs.proto"], &["../proto"])?;
    Ok(())
}
