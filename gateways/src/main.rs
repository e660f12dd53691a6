//! The `enablement` binary: gateways, projectors and operator commands of the platform.

fn main() -> std::process::ExitCode {
    creto_gateways::cli::main()
}
