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
            // the build names every asset by its content hash: it never changes under its name, so
            // a returning visitor's browser need not ask again; index.html is asked every time
            let immutable = path.starts_with("/assets/");
            let index = tower_http::services::ServeFile::new(dir.join("index.html"));
            let serve = tower_http::services::ServeDir::new(&*dir).fallback(index);
            match tower::ServiceExt::oneshot(serve, req).await {
                Ok(mut r) => {
                    let cache = if immutable && r.status().is_success() {
                        "public, max-age=31536000, immutable"
                    } else {
                        "no-cache"
                    };
                    r.headers_mut().insert(
                        axum::http::header::CACHE_CONTROL,
                        axum::http::HeaderValue::from_static(cache),
                    );
                    r.map(Body::new)
                }
                Err(e) => ApiError::internal(format!("serving the web app: {e}")).into_response(),
            }
        }
        _ => ApiError::route_not_found(req.uri().path()).into_response(),
    }
}
