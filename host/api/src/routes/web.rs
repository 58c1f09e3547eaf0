//! The dApp's files at every path outside the API (unknown paths get its `index.html`, so the
//! app's own routes survive a reload), and JSON 404s for unknown API routes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::server::{is_api_path, is_read};

/// Unknown API routes get a JSON 404; anything else is the dApp's, when one is served.
pub async fn fallback(web: Option<Arc<std::path::Path>>, req: Request<Body>) -> Response {
    let path = req.uri().path();
    match web {
        Some(dir) if !is_api_path(path) && is_read(req.method()) => {
            let index = tower_http::services::ServeFile::new(dir.join("index.html"));
            let serve = tower_http::services::ServeDir::new(&*dir).fallback(index);
            match tower::ServiceExt::oneshot(serve, req).await {
                Ok(r) => r.map(Body::new),
                Err(e) => ApiError::internal(format!("serving the web app: {e}")).into_response(),
            }
        }
        _ => ApiError::route_not_found(req.uri().path()).into_response(),
    }
}
