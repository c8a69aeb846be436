//! Settings shared by every role. Every flag also reads an environment variable (shown in
//! `--help`), so the same binary is configured by flags locally and by env in Kubernetes.

use crate::telemetry::LogFormat;

/// Logging settings.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log line format; default: pretty for `crm dev`, json otherwise. RUST_LOG sets the levels.
    #[arg(long, env = "CRM_LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,
}

impl LogArgs {
    pub fn format_or(&self, default: LogFormat) -> LogFormat {
        self.log_format.unwrap_or(default)
    }
}
