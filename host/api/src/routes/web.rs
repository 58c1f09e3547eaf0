//! The dApp's files at every path outside the API (unknown paths get its `index.html`, so the
//! app's own routes survive a reload), and JSON 404s for unknown API routes.
//!
//! The page at `/` carries the host's own description (what `GET /v1/host` answers) in an empty
//! `<script type="application/json" id="div-host">` the build leaves for it: the page's first
//! script can then ask the chain for the catalogue while it is still parsing, instead of after a
//! round trip to the host. That round trip was a quarter of the 200 ms first-load budget.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::server::{is_api_path, is_read};
use crate::state::AppState;

/// The element the build leaves empty for the host's description.
const HOST_SLOT: &str = r#"<script type="application/json" id="div-host"></script>"#;

/// `index` with the host's description in its slot. JSON has no `<` outside strings, and inside
/// them `\u003c` reads the same, so nothing in it can close the script element.
fn with_host_info(index: &str, info: &serde_json::Value) -> String {
    let json = info.to_string().replace('<', "\\u003c");
    index.replacen(HOST_SLOT, &format!(r#"<script type="application/json" id="div-host">{json}</script>"#), 1)
}

/// The page at `/`, with the host's description in it.
async fn index_page(dir: &std::path::Path, state: &AppState) -> Response {
    match tokio::fs::read_to_string(dir.join("index.html")).await {
        Ok(index) => (
            [
                (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (axum::http::header::CACHE_CONTROL, "no-cache"),
            ],
            with_host_info(&index, &crate::routes::host::info_of(state)),
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("serving the web app: {e}")).into_response(),
    }
}

/// Unknown API routes get a JSON 404; anything else is the dApp's, when one is served.
pub async fn fallback(web: Option<Arc<std::path::Path>>, state: &AppState, req: Request<Body>) -> Response {
    let path = req.uri().path();
    match web {
        Some(dir) if matches!(path, "/" | "/index.html") && is_read(req.method()) => {
            index_page(&dir, state).await
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_description_fills_its_slot_and_cannot_close_the_script() {
        let page = format!("<head>{HOST_SLOT}<script>boot()</script></head>");
        let info = serde_json::json!({"public_url": "http://x/</script><script>alert(1)</script>"});
        let out = with_host_info(&page, &info);
        assert_eq!(out.matches("</script>").count(), 2, "{out}");
        let inner = out
            .split(r#"id="div-host">"#)
            .nth(1)
            .and_then(|r| r.split("</script>").next())
            .unwrap_or_default();
        let back: serde_json::Value = serde_json::from_str(inner).unwrap_or_default();
        assert_eq!(back, info);
        // a page without the slot is served as it is
        assert_eq!(with_host_info("<head></head>", &info), "<head></head>");
    }
}
