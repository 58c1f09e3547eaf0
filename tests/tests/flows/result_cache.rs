//! The shared result cache and rate limits in a real Redis (started by the test): MiniLM, whose
//! owner allows caching in its manifest, answers a repeated input from the cache with the same
//! vectors; a model that does not allow it never touches the cache; Redis going away costs
//! nothing but the speed-up; two replicas count a permit's rate together.

use alloy::primitives::B256;
use div_api::shared::Shared;
use div_tests::{Redis, TestHost, metric, minilm_dir, plugin_wasm};
use serde_json::{Value, json};

async fn embed(
    http: &reqwest::Client,
    url: &str,
    model: &str,
    input: Value,
) -> anyhow::Result<(u16, Option<String>, Value)> {
    let r = http
        .post(format!("{url}/v1/embeddings"))
        .json(&json!({"model": model, "input": input}))
        .send()
        .await?;
    let cache = r.headers().get("x-div-cache").and_then(|v| v.to_str().ok()).map(str::to_string);
    Ok((r.status().as_u16(), cache, r.json().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_input_is_answered_from_the_cache_only_where_the_owner_allows_it() -> anyhow::Result<()> {
    let redis = Redis::start()?;
    let host =
        TestHost::start_with(div_api::ApiConfig::default(), Some(Shared::connect(&redis.url()).await?))
            .await?;
    let mut cached = div_models::ModelFiles::read_dir(&minilm_dir())?;
    cached.manifest.result_cache = Some(div_models::ManifestCache { ttl_secs: 600 });
    host.store.load(cached, &plugin_wasm("div_embeddings")?).await?;
    let mut plain = div_models::ModelFiles::read_dir(&minilm_dir())?;
    plain.manifest.name = "minilm-uncached".into();
    host.store.load(plain, &plugin_wasm("div_embeddings")?).await?;
    let http = reqwest::Client::new();
    let m = "all-minilm-l6-v2";

    let (s, c, first) = embed(&http, &host.url, m, json!(["a vault for models", "second"])).await?;
    assert_eq!((s, c.as_deref()), (200, Some("miss")), "{first}");
    let (s, c, again) = embed(&http, &host.url, m, json!(["a vault for models", "second"])).await?;
    assert_eq!((s, c.as_deref()), (200, Some("hit")));
    assert_eq!(first["data"], again["data"], "the cache gives back exactly the vectors");
    assert_eq!(first["usage"], again["usage"]);
    // another input, another order, token ids instead of text: each its own entry
    for input in [json!(["second", "a vault for models"]), json!("a vault for models"), json!([[101, 102]])] {
        let (s, c, _) = embed(&http, &host.url, m, input.clone()).await?;
        assert_eq!((s, c.as_deref()), (200, Some("miss")), "{input}");
    }
    // the model whose owner did not opt in: no cache, no header
    for _ in 0..2 {
        let (s, c, _) = embed(&http, &host.url, "minilm-uncached", json!("a vault for models")).await?;
        assert_eq!((s, c), (200, None));
    }
    let text = http.get(format!("{}/metrics", host.url)).send().await?.text().await?;
    assert_eq!(metric(&text, "div_result_cache_total", r#"outcome="hit""#), 1.0);
    assert_eq!(metric(&text, "div_result_cache_total", r#"outcome="miss""#), 4.0);

    // Redis goes away: the model still answers, counted as an error, never a failure
    drop(redis);
    let (s, c, b) = embed(&http, &host.url, m, json!(["a vault for models", "second"])).await?;
    assert_eq!((s, c.as_deref()), (200, Some("miss")), "{b}");
    assert_eq!(b["data"], first["data"]);
    let text = http.get(format!("{}/metrics", host.url)).send().await?.text().await?;
    assert!(metric(&text, "div_result_cache_total", r#"outcome="error""#) >= 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_count_a_permits_rate_together() -> anyhow::Result<()> {
    let redis = Redis::start()?;
    let (a, b) = (Shared::connect(&redis.url()).await?, Shared::connect(&redis.url()).await?);
    let (permit, other) = (B256::repeat_byte(1), B256::repeat_byte(2));
    let second = 1_000_000u64;
    let mut allowed = 0;
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        if replica.take_rate_at(permit, 10, second).await == Some(true) {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 10, "10 per second across both replicas, not 10 each");
    assert_eq!(a.take_rate_at(other, 10, second).await, Some(true), "another permit has its own count");
    assert_eq!(b.take_rate_at(permit, 10, second + 1).await, Some(true), "the next second starts afresh");
    drop(redis);
    assert_eq!(
        a.take_rate_at(permit, 10, second + 2).await,
        None,
        "no Redis: the replica's own bucket decides"
    );
    Ok(())
}

/// Greedy generation (temperature 0) of SmolLM2, its owner allowing caching: the same request
/// again is answered from the cache with the same text and token counts; sampling and streams
/// never touch it.
#[tokio::test(flavor = "multi_thread")]
async fn greedy_generation_is_cached_and_sampling_and_streams_are_not() -> anyhow::Result<()> {
    let redis = Redis::start()?;
    let host =
        TestHost::start_with(div_api::ApiConfig::default(), Some(Shared::connect(&redis.url()).await?))
            .await?;
    let mut files = div_models::ModelFiles::read_dir(&div_tests::chat_dir())?;
    files.manifest.result_cache = Some(div_models::ManifestCache { ttl_secs: 600 });
    let name = files.manifest.name.clone();
    host.store.load(files, &plugin_wasm("div_chat")?).await?;
    let http = reqwest::Client::new();
    let ask = |extra: Value| {
        let (http, url, name) = (http.clone(), host.url.clone(), name.clone());
        async move {
            let mut body = json!({"model": name, "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8});
            if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
                b.extend(e.clone());
            }
            let r = http.post(format!("{url}/v1/chat/completions")).json(&body).send().await?;
            let cache = r.headers().get("x-div-cache").and_then(|v| v.to_str().ok()).map(str::to_string);
            let status = r.status().as_u16();
            let text = r.text().await?;
            anyhow::Ok((status, cache, text))
        }
    };
    let (s, c, first) = ask(json!({})).await?;
    assert_eq!((s, c.as_deref()), (200, Some("miss")), "{first}");
    let (s, c, again) = ask(json!({"temperature": 0})).await?;
    assert_eq!((s, c.as_deref()), (200, Some("hit")), "temperature 0 is the same greedy request");
    let (a, b): (Value, Value) = (serde_json::from_str(&first)?, serde_json::from_str(&again)?);
    assert_eq!(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]);
    assert_eq!(a["usage"], b["usage"]);
    assert_ne!(a["id"], b["id"], "each answer has its own id");
    let (s, c, _) = ask(json!({"temperature": 0.8, "seed": 3})).await?;
    assert_eq!((s, c), (200, None), "sampling is never cached");
    let (s, c, streamed) = ask(json!({"stream": true})).await?;
    assert_eq!((s, c), (200, None), "a stream is never served from the cache");
    assert!(streamed.contains("data: [DONE]"));
    Ok(())
}
