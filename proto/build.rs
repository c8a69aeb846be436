//! Compiles every `.proto` under `crm/` with protox (no system protoc) and writes the
//! descriptor set that reflection and the gateway serve.

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

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(compiler.file_descriptor_set())?;

    println!("cargo:rerun-if-changed=crm");
    println!("cargo:rerun-if-changed=google");
    Ok(())
}
