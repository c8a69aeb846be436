//! `crm`: the whole CRM suite in one binary (see the library for its commands).

use std::process::ExitCode;

/// Every process of the suite allocates through mimalloc rather than the C library's allocator,
/// which took about a quarter of a serving process's CPU under listing load (the rows of a page
/// of 50 are many short-lived strings and buffers).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match crm::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The message and its causes on one line; a refused call's field violations follow
            // on their own lines.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
