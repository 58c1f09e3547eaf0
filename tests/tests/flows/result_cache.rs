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
