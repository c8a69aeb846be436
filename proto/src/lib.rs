//! Generated protobuf types, clients and servers of the CRM suite: `crm_proto::<service>::v1`
//! for every package `crm.<service>.v1` under `proto/crm/`, and the `google.api` annotations.

/// Encoded `google.protobuf.FileDescriptorSet` of every CRM proto and its imports, for server
/// reflection and for tools that need the schema at run time.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/crm_descriptor.bin"));

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

include!(concat!(env!("OUT_DIR"), "/crm_packages.rs"));
