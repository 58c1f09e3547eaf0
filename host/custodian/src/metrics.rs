//! What a custodian tells Prometheus (`GET /metrics`): every answer by route and status, so an
//! operator sees releases refused (a host not authorised, a replay) apart from releases the
//! custodian could not decide (503: the chain did not answer). The route is the template
//! (`/v1/models/{model_id}/release`), never the model id: one series per route and status.

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    route: String,
    status: u16,
}

/// The custodian's counters.
pub struct CustodianMetrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
}

impl Default for CustodianMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("div_custodian");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Requests answered, by route and status", requests.clone());
        Self { registry, requests }
    }
}

impl CustodianMetrics {
    /// Counts an answer.
    pub fn answered(&self, route: &str, status: u16) {
        self.requests.get_or_create(&Labels { route: route.to_string(), status }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Middleware: counts every answer under its route template.
pub(crate) async fn count(
    State(m): State<Arc<CustodianMetrics>>,
    matched: Option<MatchedPath>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    m.answered(&route, resp.status().as_u16());
    resp
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(m): State<Arc<CustodianMetrics>>) -> Response {
    match m.encode() {
        Ok(text) => {
            let mut r = text.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            r
        }
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The alert rules and the dashboard read `div_custodian_requests_total{route,status}`: the
    /// custodian exports exactly that.
    #[test]
    fn the_operator_files_read_the_custodians_request_counter() -> Result<(), Box<dyn std::error::Error>> {
        let m = CustodianMetrics::default();
        m.answered("/v1/models/{model_id}/release", 503);
        let text = m.encode()?;
        assert!(text.contains("# TYPE div_custodian_requests counter"), "{text}");
        assert!(
            text.contains(
                r#"div_custodian_requests_total{route="/v1/models/{model_id}/release",status="503"} 1"#
            ),
            "{text}"
        );
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for file in ["deploy/prometheus/rules.yml", "deploy/grafana/div-host.json"] {
            let used = std::fs::read_to_string(root.join(file))?;
            assert!(
                used.contains("div_custodian_requests_total{status=\\\"503\\\"}")
                    || used.contains(r#"div_custodian_requests_total{status="503"}"#),
                "{file}"
            );
        }
        Ok(())
    }
}
