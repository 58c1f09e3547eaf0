//! Errors as OpenAI shapes them: `{"error":{"message","type","param","code"}}` with one status
//! and one stable `code` per case, so clients (and the stock OpenAI libraries) can branch on them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use div_runtime::{InvokeError, PluginError};
use serde::Serialize;

/// An error the API answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// The request parameter at fault, if one.
    pub param: Option<&'static str>,
    /// What a person reads.
    pub message: String,
    /// Seconds after which a retry may succeed (503/429).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, param: None, message: message.into(), retry_after: None }
    }

    /// 400 with the offending parameter.
    pub fn invalid(param: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", code, message)
        }
    }

    /// 400: the body is not the JSON we take.
    pub fn bad_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_json", message)
    }

    /// 413: the body is over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// 404: no such model on this host.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            param: Some("model"),
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!("the model '{model}' does not exist on this host"),
            )
        }
    }

    /// 503: the model is one this host serves, but it is being (re)loaded or its last load
    /// failed and is being retried.
    pub fn model_loading(model: &str, retry_after: u32) -> Self {
        Self {
            param: Some("model"),
            retry_after: Some(retry_after.max(1)),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "model_loading",
                format!("the model '{model}' is being loaded on this host; retry shortly"),
            )
        }
    }

    /// 404: no such route.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", format!("no route {path}"))
    }

    /// 405.
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "this route does not take that method",
        )
    }

    /// 503: every sandbox slot is busy; retry shortly.
    pub fn overloaded() -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "overloaded",
                "the host is at its concurrency limit; retry shortly",
            )
        }
    }

    /// 500: our fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    /// 408: the body did not arrive in time.
    pub fn body_timeout(secs: u64) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!("the request body stalled: nothing arrived for {secs} s"),
        )
    }

    /// 431: the headers are larger than this host takes.
    pub fn headers_too_large(size: usize, limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "invalid_request_error",
            "headers_too_large",
            format!("the request headers are {size} bytes; this host takes at most {limit}"),
        )
    }

    /// 502: the plugin's answer is not one the host passes on (too large, malformed).
    pub fn plugin_answer(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "server_error", "plugin_error", message)
    }

    /// 400 for an input the backend refused as the caller's own fault.
    pub fn refused(r: &div_nn::Refusal) -> Self {
        let param = match r.param {
            "messages" => "messages",
            "prompt" => "prompt",
            _ => "input",
        };
        Self::invalid(param, "invalid_input", clip(&r.message, 1024))
    }
}

/// What a plugin says, as it may appear in an answer: at most 1 KiB.
fn clip(s: &str, max: usize) -> String {
    div_runtime::clip(s, max)
}

impl From<InvokeError> for ApiError {
    fn from(e: InvokeError) -> Self {
        let msg = clip(&e.to_string(), 1024);
        match e {
            InvokeError::Plugin(PluginError::InvalidInput(m)) => {
                ApiError::invalid("input", "invalid_input", clip(&m, 1024))
            }
            InvokeError::Plugin(PluginError::Unsupported(m)) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "unsupported", clip(&m, 1024))
            }
            InvokeError::Plugin(PluginError::Backend(m)) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "backend_error",
                format!("the model backend refused the plugin's request: {}", clip(&m, 1024)),
            ),
            InvokeError::Plugin(PluginError::Internal(m)) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "plugin_error",
                format!("the model's plugin failed: {}", clip(&m, 1024)),
            ),
            InvokeError::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "server_error", "plugin_timeout", msg)
            }
            InvokeError::MemoryLimit { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "plugin_memory_limit", msg)
            }
            InvokeError::Trap(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "plugin_trapped", msg)
            }
            InvokeError::Instantiate(_) => ApiError {
                retry_after: Some(1),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "sandbox_unavailable", msg)
            },
        }
    }
}

impl ApiError {
    /// The JSON body this error answers with (also an SSE error event's data).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner { message: &self.message, kind: self.kind, param: self.param, code: self.code },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

impl From<div_meter::MeterError> for ApiError {
    fn from(e: div_meter::MeterError) -> Self {
        use div_meter::MeterError as M;
        let (status, kind, code) = match &e {
            M::MissingCredential => (StatusCode::UNAUTHORIZED, "invalid_request_error", "missing_api_key"),
            M::InvalidKey => (StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_api_key"),
            M::PermitRequired(_) => (StatusCode::UNAUTHORIZED, "invalid_request_error", "permit_required"),
            M::BadSignature(_) => (StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_signature"),
            M::ProofRequired(_) => (StatusCode::UNAUTHORIZED, "invalid_request_error", "key_proof_required"),
            M::BadProof(_) => (StatusCode::UNAUTHORIZED, "invalid_request_error", "invalid_key_proof"),
            M::Rejected(_) => (StatusCode::FORBIDDEN, "invalid_request_error", "permit_rejected"),
            M::TooManyKeys { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "too_many_keys"),
            M::WrongChain { .. } => (StatusCode::FORBIDDEN, "invalid_request_error", "permit_wrong_chain"),
            M::WrongHost { .. } => (StatusCode::FORBIDDEN, "invalid_request_error", "permit_wrong_host"),
            M::WrongModel { .. } => (StatusCode::FORBIDDEN, "invalid_request_error", "permit_wrong_model"),
            M::Expired(_) => (StatusCode::FORBIDDEN, "invalid_request_error", "permit_expired"),
            M::Revoked => (StatusCode::FORBIDDEN, "invalid_request_error", "permit_revoked"),
            M::Replayed => (StatusCode::CONFLICT, "invalid_request_error", "permit_replayed"),
            M::InsufficientTokens { .. } => {
                (StatusCode::FORBIDDEN, "invalid_request_error", "insufficient_token_balance")
            }
            M::PremiumRequired { .. } => (StatusCode::FORBIDDEN, "invalid_request_error", "premium_required"),
            M::OverCap { .. } | M::InsufficientFunds { .. } => {
                (StatusCode::PAYMENT_REQUIRED, "insufficient_quota", "insufficient_quota")
            }
            M::RateLimited { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded")
            }
            M::ChainUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "chain_unavailable"),
            M::Ledger(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "ledger_unavailable"),
            M::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_permit"),
        };
        let retry_after = match &e {
            M::RateLimited { .. } => Some(1),
            M::ChainUnavailable(_) | M::Ledger(_) => Some(5),
            _ => None,
        };
        Self { retry_after, ..Self::new(status, kind, code, e.to_string()) }
    }
}
