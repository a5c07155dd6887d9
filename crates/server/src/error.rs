//! Errors in OpenAI's JSON shape, with the HTTP status that goes with them:
//! `{"error": {"message", "type", "param", "code"}}`.

use std::borrow::Cow;

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use strata_engine::EngineError;

/// An error a client sees.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// OpenAI's `type`.
    pub(crate) kind: &'static str,
    /// What went wrong, for a person.
    pub(crate) message: String,
    /// The parameter at fault, if one is (a path like `messages[0].role`
    /// when the body did not parse).
    pub(crate) param: Option<Cow<'static, str>>,
    /// A machine-readable code, if there is one.
    pub(crate) code: Option<&'static str>,
    /// Seconds to wait before retrying (429/503).
    pub(crate) retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400: an invalid parameter.
    pub(crate) fn invalid(param: impl Into<Cow<'static, str>>, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.into()),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
        }
    }

    /// 400: a malformed request (no single parameter at fault).
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 401.
    pub(crate) fn unauthorized() -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "missing or invalid API key: send `Authorization: Bearer <key>`",
            )
        }
    }

    /// 404.
    pub(crate) fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: Some(code),
            ..Self::new(StatusCode::NOT_FOUND, "not_found_error", message)
        }
    }

    /// 409: the resource is busy.
    pub(crate) fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict_error", message)
    }

    /// 429: a per-tenant limit.
    pub(crate) fn too_many(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
    }

    /// 503 with Retry-After.
    pub(crate) fn unavailable(message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_overloaded",
                message,
            )
        }
    }

    /// 500: our fault, said plainly.
    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// 408: the request ran past `--request-timeout`.
    pub(crate) fn timeout(secs: f64) -> Self {
        Self {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout_error",
                format!("the request ran longer than the server's limit of {secs} s"),
            )
        }
    }

    /// 400 `context_length_exceeded`.
    pub(crate) fn context_exceeded(message: impl Into<String>) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            param: Some(Cow::Borrowed("messages")),
            ..Self::bad_request(message)
        }
    }

    /// 408: the body did not arrive within `--body-timeout`.
    pub(crate) fn timeout_body() -> Self {
        Self {
            code: Some("timeout"),
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout_error",
                "the request body did not arrive in time",
            )
        }
    }

    /// The error object, as sent (also inside a stream).
    pub(crate) fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        // The openai package retries 408, 409 and 429 twice unless told not to:
        // a timed-out or busy request would only run (and wait) again.
        if matches!(
            self.status,
            StatusCode::REQUEST_TIMEOUT | StatusCode::CONFLICT | StatusCode::TOO_MANY_REQUESTS
        ) {
            r.headers_mut().insert(
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            );
        }
        r
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ContextExceeded {
                context,
                prompt,
                max_tokens,
            } => Self::context_exceeded(format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens ({prompt} in the prompt, {max_tokens} in the completion). Please reduce the length of the prompt or completion.",
                prompt + max_tokens
            )),
            EngineError::EmptyPrompt => Self::invalid("prompt", "the prompt is empty"),
            EngineError::BadToken(t) => {
                Self::invalid("prompt", format!("token id {t} is outside the vocabulary"))
            }
            EngineError::QueueFull(n) => Self::unavailable(
                format!("the server is busy ({n} requests waiting); retry shortly"),
                1,
            ),
            // The engine's session numbers are sequential across tenants:
            // never shown (they would count everyone's sessions).
            EngineError::UnknownSession(_) | EngineError::SessionOfAnotherModel { .. } => {
                Self::not_found("session_not_found", "the session does not exist")
            }
            // The server released the session (its client left) but the
            // engine is still ending that turn: a moment, so 503 and retry.
            EngineError::SessionBusy(_) => Self::unavailable(
                "the session's previous turn is still ending; retry shortly",
                1,
            ),
            e @ EngineError::NoTokenizer => Self::invalid("stop", e.to_string()),
            e @ EngineError::ScoredTurn => Self::invalid("echo", e.to_string()),
            e @ EngineError::BadSamples(_) => Self::invalid("n", e.to_string()),
            EngineError::Stopped => Self::unavailable(
                "the engine has stopped (shutting down, or see the server log)",
                5,
            ),
            e @ EngineError::Config(_) => Self::internal(e.to_string()),
        }
    }
}
