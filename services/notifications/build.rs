//! Rebuilds this crate when a migration is added: `sqlx::migrate!` embeds the migrations
//! directory when it compiles, and Cargo reruns it only when a file it already knows changes, so
//! a new migration alone would leave the binary migrating to the last build's schema.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
