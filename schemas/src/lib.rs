//! Generated protobuf and gRPC code for the platform's events and APIs.
//! The `.proto` sources under `proto/` are the contract; this crate only compiles them.

pub mod codec;

/// Encoded `FileDescriptorSet` of every proto here, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

pub mod events {
    pub mod v1 {
        tonic::include_proto!("creto.enablement.events.v1");
    }
}

pub mod metering {
    pub mod v1 {
        tonic::include_proto!("creto.enablement.metering.v1");
    }
}

pub mod messaging {
    pub mod v1 {
        tonic::include_proto!("creto.enablement.messaging.v1");
    }
}

pub mod oversight {
    // Generated: the request event's `Requested` variant carries the policy snapshot.
    #[allow(clippy::large_enum_variant)]
    pub mod v1 {
        tonic::include_proto!("creto.enablement.oversight.v1");
    }
}

pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("creto.enablement.runtime.v1");
    }
}

/// The external creto-authz service (client side; the gateways call `Check` per request).
pub mod authz {
    pub mod v1 {
        tonic::include_proto!("creto.authz.v1");
    }
}
