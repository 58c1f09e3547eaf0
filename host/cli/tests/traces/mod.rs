//! `div serve --otlp-endpoint`: a paid request is one trace, received over OTLP/HTTP by a
//! receiver of the test's own (decoding the protobuf an OpenTelemetry collector takes), with a
//! span per stage; a collector that goes away costs the requests nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use super::rig::paid::Paid;

#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: Vec<u8>,
    id: Vec<u8>,
    parent: Vec<u8>,
    service: String,
}

type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP trace receiver on a free port: what it got, its URL, and its task.
async fn receiver() -> anyhow::Result<(Received, String, tokio::task::JoinHandle<()>)> {
    let got: Received = Arc::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                    return axum::http::StatusCode::BAD_REQUEST;
                };
                let mut spans = store.lock().unwrap_or_else(|p| p.into_inner());
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                        spans.push(Span {
                            name: s.name,
                            trace: s.trace_id,
                            id: s.span_id,
                            parent: s.parent_span_id,
                            service: service.clone(),
                        });
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((got, url, task))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paid_request_is_one_trace_with_its_gate_sandbox_backend_and_ledger() -> anyhow::Result<()> {
    let (got, url, task) = receiver().await?;
    let p = Paid::start("traces", &["--otlp-endpoint", &url]).await?;
    p.fund(7, 1_000_000, true).await?;
    let key = p.key_for(7, 100_000).await?;
    let (status, body) = p.embed(Some(&key), 2).await?;
    assert_eq!(status, 200, "{body}");

    // the batch goes out within the exporter's schedule (5 s by default)
    let mut trace = Vec::new();
    for _ in 0..150 {
        let spans = got.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(ledger) = spans.iter().find(|s| s.name == "ledger") {
            trace = spans.iter().filter(|s| s.trace == ledger.trace).cloned().collect::<Vec<_>>();
            if ["request", "gate", "sandbox", "backend"].iter().all(|n| trace.iter().any(|s| s.name == *n)) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let find = |name: &str| trace.iter().find(|s| s.name == name).cloned();
    let (Some(request), Some(gate), Some(sandbox), Some(backend), Some(ledger)) =
        (find("request"), find("gate"), find("sandbox"), find("backend"), find("ledger"))
    else {
        anyhow::bail!("the trace lacks a stage: {:?}", trace.iter().map(|s| &s.name).collect::<Vec<_>>());
    };
    assert!(request.parent.is_empty(), "the request is the trace's root");
    for stage in [&gate, &sandbox, &ledger] {
        assert_eq!(stage.parent, request.id, "{} is a stage of the request", stage.name);
    }
    assert_eq!(backend.parent, sandbox.id, "the backend runs inside the sandbox");
    assert!(request.service.contains("div-host"), "{}", request.service);

    // the collector goes away: requests are served as before
    task.abort();
    for _ in 0..3 {
        let (status, body) = p.embed(Some(&key), 1).await?;
        assert_eq!(status, 200, "{body}");
    }
    Ok(())
}
