//! Compiles every `.proto` under `crm/` with protox (no system protoc), writes the descriptor
//! set that reflection and the gateway serve, and the module tree of every `crm.<service>.v1`
//! package (so that a new service's protos need no edit here).

use std::path::{Path, PathBuf};

fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> =
        std::fs::read_dir(dir).expect("read proto dir").map(|e| e.expect("dir entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            protos(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

/// `pub mod contacts { pub mod v1 { tonic::include_proto!("crm.contacts.v1"); } }` for every
/// package `crm.<service>.<version>`, inside `pub mod crm` (so that the generated code's
/// relative paths to `google.api` resolve) and re-exported at the crate root.
fn modules(packages: &[String]) -> String {
    let mut out = String::from("pub mod crm {\n");
    for package in packages {
        let parts: Vec<&str> = package.split('.').skip(1).collect();
        for part in &parts {
            out.push_str(&format!("pub mod {part} {{ "));
        }
        out.push_str(&format!("tonic::include_proto!(\"{package}\"); "));
        out.push_str(&"} ".repeat(parts.len()));
        out.push('\n');
    }
    out.push_str("}\npub use self::crm::*;\n");
    out
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let mut files = Vec::new();
    protos(&root.join("crm"), &mut files);
    let relative: Vec<PathBuf> =
        files.iter().map(|p| p.strip_prefix(&root).expect("under root").to_path_buf()).collect();

    let mut compiler = protox::Compiler::new([&root])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(&relative)?;

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("crm_descriptor.bin"), compiler.encode_file_descriptor_set())?;

    let descriptors = compiler.file_descriptor_set();
    let mut packages: Vec<String> =
        descriptors.file.iter().map(|f| f.package().to_string()).filter(|p| p.starts_with("crm.")).collect();
    packages.sort();
    packages.dedup();
    std::fs::write(out.join("crm_packages.rs"), modules(&packages))?;
    // Every message knows its full name (`prost::Name`): event envelopes carry it as the type.
    let mut config = prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(descriptors, config)?;

    println!("cargo:rerun-if-changed=crm");
    println!("cargo:rerun-if-changed=google");
    Ok(())
}
