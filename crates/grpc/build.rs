//! Generates the message types, servers and clients from `proto/` at build time, with the
//! `protoc` shipped inside the `protoc-bin-vendored` crate (no system protoc needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Tensor bytes (PNG files, raw contents) move without copies.
    config.bytes(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .build_transport(false)
        .compile_with_config(
            config,
            &["proto/dataplane.proto", "proto/model_repository.proto"],
            &["proto"],
        )?;
    Ok(())
}
