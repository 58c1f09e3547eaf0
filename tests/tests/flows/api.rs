//! The HTTP API of a real host (router, store, runtime, ONNX Runtime behind hyper on loopback):
//! correct embeddings, precise errors for bad input, misbehaving plugins contained, limits.

use std::time::{Duration, Instant};

use base64::Engine as _;
use div_api::ApiConfig;
use div_tests::{TestHost, cosine, minilm_reference};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MINILM: &str = "all-minilm-l6-v2";

async fn post(
    url: &str,
    body: impl Into<reqwest::Body>,
) -> anyhow::Result<(StatusCode, Value, reqwest::header::HeaderMap)> {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?;
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await?;
    let value = serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("not JSON ({e}): {text}"))?;
    Ok((status, value, headers))
}

fn vector(v: &Value) -> Vec<f32> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).map(|x| x as f32).collect()).unwrap_or_default()
}

fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_over_http_match_sentence_transformers() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig::default()).await?;
    host.load_minilm().await?;
    let reference = minilm_reference()?;
    for item in &reference.items {
        let (status, body, headers) =
            post(&host.url, json!({"model": MINILM, "input": item.input}).to_string()).await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(headers.contains_key("x-request-id"));
        let c = cosine(&vector(&body["data"][0]["embedding"]), &item.embedding);
        assert!(c >= 0.9999, "cosine {c} for {:?}", item.input);
    }
    // the whole batch, base64-encoded, as the OpenAI client libraries ask by default
    let inputs: Vec<&str> = reference.items.iter().map(|i| i.input.as_str()).collect();
    let (status, body, _) =
        post(&host.url, json!({"model": MINILM, "input": inputs, "encoding_format": "base64"}).to_string())
            .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], MINILM);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > inputs.len() as u64);
    for (i, item) in reference.items.iter().enumerate() {
        assert_eq!(body["data"][i]["index"], i);
        let b64 = body["data"][i]["embedding"].as_str().unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
        let v: Vec<f32> =
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(v.len(), 384);
        assert!(cosine(&v, &item.embedding) >= 0.9999);
    }
    // token ids in, as OpenAI allows: [CLS] hello world [SEP] is what "hello world" tokenizes to
    let (_, by_text, _) =
        post(&host.url, json!({"model": MINILM, "input": "hello world"}).to_string()).await?;
    let (status, by_ids, _) =
        post(&host.url, json!({"model": MINILM, "input": [101, 7592, 2088, 102]}).to_string()).await?;
    assert_eq!(status, StatusCode::OK, "{by_ids}");
    assert_eq!(by_text["usage"]["prompt_tokens"], 4);
    assert!(
        cosine(&vector(&by_text["data"][0]["embedding"]), &vector(&by_ids["data"][0]["embedding"])) > 0.99999
    );

    let models: Value = reqwest::get(format!("{}/v1/models", host.url)).await?.json().await?;
    assert_eq!(models["data"][0]["id"], MINILM);
    assert_eq!(models["data"][0]["object"], "model");
    let metrics = reqwest::get(format!("{}/metrics", host.url)).await?.text().await?;
    assert!(
        metrics.contains("div_sandbox_instantiate_seconds_count{model=\"all-minilm-l6-v2\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("div_backend_inference_seconds_count{model=\"all-minilm-l6-v2\"}"));
    assert!(
        metrics.contains(
            "div_requests_total{route=\"/v1/embeddings\",model=\"all-minilm-l6-v2\",status=\"200\"}"
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_precise_json_errors() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig { max_body_bytes: 64 << 10, ..ApiConfig::default() }).await?;
    host.load_minilm().await?;
    let url = &host.url;
    let cases: Vec<(String, u16, &str)> = vec![
        ("{\"model\": ".into(), 400, "invalid_json"),
        ("".into(), 400, "invalid_json"),
        (json!({"input": "hi"}).to_string(), 400, "invalid_value"),
        (json!({"model": "nope", "input": "hi"}).to_string(), 404, "model_not_found"),
        (json!({"model": MINILM, "input": ""}).to_string(), 400, "invalid_input"),
        (json!({"model": MINILM, "input": []}).to_string(), 400, "invalid_input"),
        (json!({"model": MINILM, "input": ["ok", 5]}).to_string(), 400, "invalid_input"),
        (json!({"model": MINILM, "input": "hi", "dimensions": 64}).to_string(), 400, "unsupported_parameter"),
        (json!({"model": MINILM, "input": "hi", "encoding_format": "hex"}).to_string(), 400, "invalid_value"),
        (json!({"model": MINILM, "input": vec![7592u32; 300]}).to_string(), 400, "input_too_long"),
        (json!({"model": MINILM, "input": "x".repeat(20 << 10)}).to_string(), 400, "input_too_long"),
        (json!({"model": MINILM, "input": [101, 4294967295u32, 102]}).to_string(), 400, "invalid_token"),
        (json!({"model": MINILM, "input": "x".repeat(70 << 10)}).to_string(), 413, "request_too_large"),
    ];
    for (body, status, code) in cases {
        let (s, b, headers) = post(url, body.clone()).await?;
        assert_error(s, &b, status, code);
        assert!(headers.contains_key("x-request-id"), "{body:.80}");
    }
    let r = reqwest::Client::new().get(format!("{url}/v1/embeddings")).send().await?;
    assert_eq!(r.status().as_u16(), 405);
    let r = reqwest::get(format!("{url}/v2/nothing")).await?;
    assert_eq!(r.status().as_u16(), 404);
    let b: Value = r.json().await?;
    assert_eq!(b["error"]["code"], "not_found");
    // a caller's own request id is kept beside the host's, which is the request's id
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/embeddings"))
        .header("x-request-id", "my-id-42")
        .body(json!({"model": MINILM, "input": "hi"}).to_string())
        .send()
        .await?;
    assert_eq!(r.headers().get("x-client-request-id").and_then(|v| v.to_str().ok()), Some("my-id-42"));
    let host_id = r.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(host_id.starts_with("req_") && host_id != "my-id-42", "{host_id}");
    // and after all that the host still serves
    let (s, b, _) = post(url, json!({"model": MINILM, "input": "still here"}).to_string()).await?;
    assert_eq!(s, StatusCode::OK, "{b}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_plugins_fail_alone_and_within_the_deadline() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig::default()).await?;
    for mode in ["trap", "loop", "oom", "wrong-type", "huge", "echo", "count"] {
        host.load_misbehave(&format!("bad-{mode}"), mode).await?;
    }
    let call = |model: &str| json!({"model": model, "input": "hi"}).to_string();
    for (model, status, code) in [
        ("bad-trap", 500, "plugin_trapped"),
        ("bad-loop", 504, "plugin_timeout"),
        ("bad-oom", 500, "plugin_memory_limit"),
        ("bad-wrong-type", 502, "backend_error"),
        ("bad-huge", 502, "backend_error"),
    ] {
        let started = Instant::now();
        let (s, b, _) = post(&host.url, call(model)).await?;
        assert_error(s, &b, status, code);
        // the manifest's deadline is 1 s and the sandbox's wall bound 4 s: a runaway plugin is
        // stopped by them, not by the test's patience (the bound leaves room for a busy machine)
        assert!(started.elapsed() < Duration::from_secs(30), "{model} took {:?}", started.elapsed());
        let m = b["error"]["message"].as_str().unwrap_or_default();
        if model == "bad-wrong-type" {
            assert!(m.contains("input_ids") && m.contains("FP32"), "{m}");
        }
        if model == "bad-huge" {
            assert!(m.contains("40000 elements") && m.contains("split the batch"), "{m}");
        }
        // the host goes on serving
        let (s, b, _) = post(&host.url, call("bad-echo")).await?;
        assert_eq!(s, StatusCode::OK, "after {model}: {b}");
        assert_eq!(vector(&b["data"][0]["embedding"]), vec![104.0, 105.0], "h=104 i=105 through the graph");
    }
    // every request gets a fresh instance: a counter in the plugin never passes 1
    for _ in 0..3 {
        let (s, b, _) = post(&host.url, call("bad-count")).await?;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(vector(&b["data"][0]["embedding"]), vec![1.0]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_concurrency_limit_callers_get_503_at_once() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig { max_concurrency: 1, ..ApiConfig::default() }).await?;
    // a plugin that spins for its whole (generous) deadline holds the one slot
    host.load_misbehave_limits("slow", "loop", None, Some(8_000)).await?;
    let url = host.url.clone();
    let busy =
        tokio::spawn(async move { post(&url, json!({"model": "slow", "input": "x"}).to_string()).await });
    // wait until it is in flight, however long the machine takes to get there
    loop {
        let m = reqwest::get(format!("{}/metrics", host.url)).await?.text().await?;
        if m.lines().any(|l| l.starts_with("div_requests_in_flight") && l.ends_with(" 1")) {
            break;
        }
        anyhow::ensure!(!busy.is_finished(), "the slow request ended before it was seen in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, b, headers) = post(&host.url, json!({"model": "slow", "input": "y"}).to_string()).await?;
    assert_error(s, &b, 503, "overloaded");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    // refused at once, not queued: the answer came while the slot's holder still runs
    assert!(!busy.is_finished(), "the 503 waited for the busy request");
    let (s, b, _) = busy.await??;
    assert_error(s, &b, 504, "plugin_timeout");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_past_its_own_instance_limit_gets_503_while_others_serve() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig::default()).await?;
    host.load_misbehave_with("one-at-a-time", "loop", Some(1)).await?;
    host.load_misbehave("other", "echo").await?;
    let url = host.url.clone();
    let busy =
        tokio::spawn(
            async move { post(&url, json!({"model": "one-at-a-time", "input": "x"}).to_string()).await },
        );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, b, headers) =
        post(&host.url, json!({"model": "one-at-a-time", "input": "y"}).to_string()).await?;
    assert_error(s, &b, 503, "sandbox_unavailable");
    assert!(headers.contains_key("retry-after"));
    let (s, b, _) = post(&host.url, json!({"model": "other", "input": "hi"}).to_string()).await?;
    assert_eq!(s, StatusCode::OK, "another model is not held up: {b}");
    let (s, b, _) = busy.await??;
    assert_error(s, &b, 504, "plugin_timeout");
    // the slot is free again
    let (s, b, _) = post(&host.url, json!({"model": "one-at-a-time", "input": "z"}).to_string()).await?;
    assert_error(s, &b, 504, "plugin_timeout");
    Ok(())
}

/// The load generator that ships with the project (`cargo bench -p div-tests --bench load`)
/// counts what the host really answered: every answer of a served model, and the precise error
/// of an unknown one.
#[tokio::test(flavor = "multi_thread")]
async fn the_load_generator_counts_answers_and_names_errors() -> anyhow::Result<()> {
    use div_tests::load::{LoadSpec, run};
    let host = TestHost::start(ApiConfig::default()).await?;
    host.load_misbehave("echo", "echo").await?;
    let spec = |model: &str| LoadSpec {
        base: host.url.clone(),
        path: "/v1/embeddings".into(),
        body: json!({"model": model, "input": "hi"}).to_string().into(),
        bearer: None,
        clients: 4,
        duration: Duration::from_millis(500),
    };
    let served = run(&spec("echo")).await?;
    assert!(served.ok > 0, "{served:?}");
    assert_eq!(served.errors, 0, "{served:?}");
    assert!(served.p99 >= served.p50, "{served:?}");
    let unknown = run(&spec("no-such-model")).await?;
    assert_eq!(unknown.ok, 0, "{unknown:?}");
    assert!(unknown.errors > 0, "{unknown:?}");
    let first = unknown.first_error.unwrap_or_default();
    assert!(first.starts_with("404") && first.contains("model_not_found"), "{first}");
    Ok(())
}

/// Other origins (the dApp served by another host) may read whether this host is up and who it
/// is, and nothing else: no key, session or inference answer carries a CORS grant.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_hosts_public_facts_are_readable_from_other_origins() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig::default()).await?;
    let http = reqwest::Client::new();
    let cors = |r: &reqwest::Response| r.headers().get("access-control-allow-origin").cloned();
    for path in ["/healthz", "/v1/host"] {
        let r = http
            .get(format!("{}{path}", host.url))
            .header("origin", "https://elsewhere.example")
            .send()
            .await?;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(cors(&r).as_ref().and_then(|v| v.to_str().ok()), Some("*"), "{path}");
    }
    for path in ["/v1/models", "/v1/me", "/metrics", "/readyz", "/v1/keys/challenge"] {
        let r = http
            .get(format!("{}{path}", host.url))
            .header("origin", "https://elsewhere.example")
            .send()
            .await?;
        assert!(cors(&r).is_none(), "{path} is readable from other origins");
    }
    let (_, _, headers) = post(&host.url, r#"{"model":"all-minilm-l6-v2","input":"hi"}"#).await?;
    assert!(headers.get("access-control-allow-origin").is_none(), "an answer is readable from other origins");
    Ok(())
}
