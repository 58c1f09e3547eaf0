//! Reading a JSON body within a byte limit, with errors that say exactly what was wrong:
//! 413 past the limit, 408 when it stalls, 400 with line and column for broken JSON, 400 naming the field for JSON of
//! the wrong shape.

use axum::body::Body;
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Whether a body error is the router's body deadline (somewhere in its chain of causes).
fn stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if c.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Reads `body` (at most `limit` bytes) and parses it as `T`.
pub async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(ApiError::too_large(limit)),
        Err(e) if stalled(&*e) => return Err(ApiError::body_timeout(crate::server::BODY_STALL.as_secs())),
        Err(e) => return Err(ApiError::bad_json(format!("reading the body failed: {e}"))),
    };
    if bytes.is_empty() {
        return Err(ApiError::bad_json("the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError {
            code: "invalid_value",
            ..ApiError::bad_json(format!("the JSON does not fit this route: {e}"))
        },
        _ => ApiError::bad_json(format!("the body is not valid JSON: {e}")),
    })
}
