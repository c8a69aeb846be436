//! `crm`: the whole CRM suite in one binary (see the library for its commands).

use std::process::ExitCode;

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
