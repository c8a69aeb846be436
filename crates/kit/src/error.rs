//! One error type for every service, mapped to canonical gRPC status codes with
//! `google.rpc` details in one place (ARCHITECTURE §7). Internal details are logged, never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::validate::{Violations, clip};

/// The most characters of a status message, and of field violations listed in its details.
const MAX_MESSAGE_CHARS: usize = 1000;
const MAX_VIOLATIONS: usize = 20;

/// The `ErrorInfo.domain` of every error the suite returns.
pub const ERROR_DOMAIN: &str = "crm";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid argument")]
    InvalidArgument(Violations),
    #[error("{0}")]
    NotFound(String),
    /// A record with the same key exists; `metadata` names it (ErrorInfo).
    #[error("{message}")]
    AlreadyExists { message: String, reason: &'static str, metadata: Vec<(String, String)> },
    /// Optimistic concurrency: the record changed since the caller read it.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// FAILED_PRECONDITION naming each field that must be set first (a deal entering a stage
    /// that requires them), as a `google.rpc.BadRequest`.
    #[error("{message}")]
    Unmet { message: String, violations: Violations },
    /// No valid credentials: missing, malformed, expired or badly signed token, failed sign-in.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials without the permission the call needs.
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unavailable(String),
    /// Too much at once (a queue's deadline passed): the caller should retry shortly.
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A single-field INVALID_ARGUMENT.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Violations::new();
        v.add(field, description);
        ApiError::InvalidArgument(v)
    }

    /// UNAUTHENTICATED with `message`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        ApiError::Unauthenticated(message.into())
    }
}

/// A handler's answer: the value as the response, or the error as its status.
pub fn respond<T>(result: Result<T, ApiError>) -> Result<tonic::Response<T>, Status> {
    result.map(tonic::Response::new).map_err(Status::from)
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match err {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                ApiError::Unavailable(format!("database unavailable: {err}"))
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// A status with `violations` as a `google.rpc.BadRequest`; bounded whatever a description
/// quotes, since clients refuse metadata over 8 KiB.
fn with_bad_request(code: Code, message: String, violations: &Violations) -> Status {
    let mut details = ErrorDetails::new();
    for (field, description) in violations.iter().take(MAX_VIOLATIONS) {
        details.add_bad_request_violation(clip(field.clone(), 200), clip(description.clone(), 300));
    }
    Status::with_error_details(code, clip(message, MAX_MESSAGE_CHARS), details)
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::InvalidArgument(violations) => {
                let message = violations.iter().map(|(f, d)| format!("{f}: {d}")).collect::<Vec<_>>().join("; ");
                with_bad_request(Code::InvalidArgument, message, &violations)
            }
            ApiError::Unmet { message, violations } => {
                let fields = violations.iter().map(|(f, d)| format!("{f}: {d}")).collect::<Vec<_>>().join("; ");
                with_bad_request(Code::FailedPrecondition, format!("{message}: {fields}"), &violations)
            }
            ApiError::NotFound(msg) => Status::not_found(clip(msg, MAX_MESSAGE_CHARS)),
            ApiError::AlreadyExists { message, reason, metadata } => {
                let details = ErrorDetails::with_error_info(
                    reason,
                    ERROR_DOMAIN,
                    metadata.into_iter().collect::<std::collections::HashMap<_, _>>(),
                );
                Status::with_error_details(Code::AlreadyExists, clip(message, MAX_MESSAGE_CHARS), details)
            }
            ApiError::Aborted(msg) => Status::aborted(clip(msg, MAX_MESSAGE_CHARS)),
            ApiError::FailedPrecondition(msg) => Status::failed_precondition(clip(msg, MAX_MESSAGE_CHARS)),
            ApiError::Unauthenticated(msg) => Status::unauthenticated(clip(msg, MAX_MESSAGE_CHARS)),
            ApiError::PermissionDenied(msg) => Status::permission_denied(clip(msg, MAX_MESSAGE_CHARS)),
            ApiError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "unavailable");
                let details = ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1)));
                Status::with_error_details(Code::Unavailable, "a backing store is unavailable; retry later", details)
            }
            ApiError::ResourceExhausted(msg) => {
                let details = ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(1)));
                Status::with_error_details(Code::ResourceExhausted, clip(msg, MAX_MESSAGE_CHARS), details)
            }
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_bad_request() {
        let mut v = Violations::new();
        v.add("person.full_name", "is required");
        v.add("person.emails[0]", "is not an e-mail address");
        let status = Status::from(ApiError::InvalidArgument(v));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("person.full_name: is required"));
        let bad = status.get_details_bad_request().expect("BadRequest details");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[1].field, "person.emails[0]");
    }

    #[test]
    fn unmet_preconditions_name_their_fields() {
        let mut v = Violations::new();
        v.add("deal.amount", "is required to enter the stage \"Payment\"");
        let status =
            Status::from(ApiError::Unmet { message: "the deal cannot enter \"Payment\" yet".into(), violations: v });
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert!(status.message().starts_with("the deal cannot enter"));
        let bad = status.get_details_bad_request().expect("BadRequest details");
        assert_eq!(bad.field_violations[0].field, "deal.amount");
    }

    #[test]
    fn messages_are_bounded() {
        let mut v = Violations::new();
        for i in 0..100 {
            v.add(format!("field{i}"), "x".repeat(5000));
        }
        let status = Status::from(ApiError::InvalidArgument(v));
        assert!(status.message().chars().count() <= MAX_MESSAGE_CHARS + 1);
        let bad = status.get_details_bad_request().expect("BadRequest details");
        assert_eq!(bad.field_violations.len(), MAX_VIOLATIONS);
        assert!(status.details().len() < 8 * 1024);
        let status = Status::from(ApiError::NotFound("y".repeat(10_000)));
        assert!(status.message().len() < 4 * MAX_MESSAGE_CHARS);
    }

    #[test]
    fn internal_details_are_masked() {
        let status = Status::from(ApiError::Internal("password=hunter2 in query".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }

    #[test]
    fn already_exists_names_the_record() {
        let status = Status::from(ApiError::AlreadyExists {
            message: "exists".into(),
            reason: "DUPLICATE",
            metadata: vec![("record_id".into(), "abc".into())],
        });
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "DUPLICATE");
        assert_eq!(info.metadata.get("record_id").map(String::as_str), Some("abc"));
    }
}
