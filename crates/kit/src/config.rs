//! Settings shared by every role. Every flag also reads an environment variable (shown in
//! `--help`), so the same binary is configured by flags locally and by env in Kubernetes.

use std::time::Duration;

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

/// Parses "30s", "500ms", "2m", "1h", "2d", "250us" or a bare number of seconds (clap value parser
/// for every duration setting).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let duration = match unit.trim() {
        "" | "s" => Duration::from_secs(value),
        "ms" => Duration::from_millis(value),
        "us" => Duration::from_micros(value),
        "m" => Duration::from_secs(value.saturating_mul(60)),
        "h" => Duration::from_secs(value.saturating_mul(3600)),
        "d" => Duration::from_secs(value.saturating_mul(86_400)),
        other => return Err(format!("unknown unit {other:?} in {text:?}; use ms, s, m, h or d")),
    };
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
    }
}
