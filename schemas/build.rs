//! Compiles every `.proto` under `proto/` with protox (a pure-Rust protobuf compiler), so
//! building needs no `protoc` on the machine, then generates prost messages and tonic services.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/creto/enablement/events/v1/envelope.proto",
        "proto/creto/enablement/metering/v1/metering.proto",
        "proto/creto/enablement/messaging/v1/messaging.proto",
        "proto/creto/enablement/oversight/v1/oversight.proto",
        "proto/creto/enablement/runtime/v1/runtime.proto",
        "proto/creto/authz/v1/authz.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set also feeds gRPC reflection.
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
