//! Compiles `proto/*.proto` with protox (pure Rust, no system protoc) and generates tonic code.
use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["fedretail.proto", "admin.proto"], ["proto"])?;
    // `compile_fds` ignores `file_descriptor_set_path`, so the descriptor set is written here.
    std::fs::write(out.join("fedretail_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
