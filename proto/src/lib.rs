//! Generated protobuf types, clients and servers of the CRM suite.

/// Encoded `google.protobuf.FileDescriptorSet` of every CRM proto and its imports, for server
/// reflection and for tools that need the schema at run time.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/crm_descriptor.bin"));

pub mod google {
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

pub mod contacts {
    pub mod v1 {
        tonic::include_proto!("crm.contacts.v1");
    }
}

pub mod auth {
    pub mod v1 {
        tonic::include_proto!("crm.auth.v1");
    }
}
