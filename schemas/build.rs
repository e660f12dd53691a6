//! Compiles every `.proto` under `proto/` with protox (a pure-Rust protobuf compiler), so
//! building needs no `protoc` on the machine, then generates prost messages and tonic services.
use std::path::PathBuf;

/// Servers and clients come from two tonic generators: servers decode requests with
/// `crate::codec::RequestCodec` (a request that does not decode is the caller's error), clients
/// keep tonic's codec (a response that does not decode is the server's).
struct ServersAndClients([Box<dyn prost_build::ServiceGenerator>; 2]);

impl prost_build::ServiceGenerator for ServersAndClients {
    fn generate(&mut self, service: prost_build::Service, buf: &mut String) {
        for generator in &mut self.0 {
            generator.generate(service.clone(), buf);
        }
    }

    fn finalize(&mut self, buf: &mut String) {
        for generator in &mut self.0 {
            generator.finalize(buf);
        }
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        for generator in &mut self.0 {
            generator.finalize_package(package, buf);
        }
    }
}

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
    let servers = tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::codec::RequestCodec")
        .service_generator();
    let clients = tonic_prost_build::configure()
        .build_server(false)
        .service_generator();
    let mut config = prost_build::Config::new();
    config
        .out_dir(&out)
        .service_generator(Box::new(ServersAndClients([servers, clients])));
    config.compile_fds(fds)?;
    Ok(())
}
