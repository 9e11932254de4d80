//! Generates the gRPC code from `proto/` with a vendored `protoc`, so a fresh
//! machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the env concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // `bytes` fields as `bytes::Bytes`: output chunks are cut from read
        // buffers and handed to the encoder without a copy.
        .bytes(".clawker.clawkerd.v1")
        // …and on through the admin API's exec/cp/logs streams unchanged.
        .bytes(".clawker.admin.v1")
        .file_descriptor_set_path(out_dir.join("clawker_descriptor.bin"))
        .compile_protos(
            &[
                "proto/clawker/clawkerd/v1/clawkerd.proto",
                "proto/clawker/agent/v1/agent.proto",
                "proto/clawker/admin/v1/admin.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
