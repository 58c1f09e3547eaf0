//! The plugin runtime with the real embeddings plugin, the real MiniLM graph and ONNX Runtime:
//! correctness against sentence-transformers, and isolation between requests.

use std::sync::Arc;
use std::time::Duration;

use div_models::{LoadOptions, ModelFiles, ModelStore};
use div_runtime::{Input, Runtime, RuntimeConfig};
use div_tests::{cosine, minilm_dir, minilm_reference, ort_dylib, plugin_wasm};

async fn store(snapshot: bool) -> anyhow::Result<(ModelStore, Arc<div_models::LoadedModel>)> {
    div_nn::init_onnx_runtime(&ort_dylib()?)?;
    let runtime = Runtime::new(RuntimeConfig::default())?;
    let store = ModelStore::new(runtime, LoadOptions { snapshot, ..LoadOptions::default() });
    // these tests are about answers, not speed: a deadline no busy machine reaches (the deadline
    // itself is tested in api.rs and the hostile runs)
    let mut files = ModelFiles::read_dir(&minilm_dir())?;
    files.manifest.limits.deadline_ms = Some(120_000);
    let model = store.load(files, &plugin_wasm("div_embeddings")?).await?;
    Ok((store, model))
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_embeddings_match_sentence_transformers() -> anyhow::Result<()> {
    let (_store, model) = store(true).await?;
    let reference = minilm_reference()?;
    let mut worst = 1.0f64;
    for item in &reference.items {
        let (out, t) = model.plugin.embed(&[Input::Text(item.input.clone())], Arc::from("test"));
        let out = out?;
        assert_eq!(out.vectors.len(), 1);
        let c = cosine(&out.vectors[0], &item.embedding);
        worst = worst.min(c);
        assert!(c >= 0.9999, "cosine {c} for {:?}", item.input);
        assert!(t.instantiate > Duration::ZERO, "the instantiation is timed");
    }
    // a batch gives the same vectors as one by one
    let inputs: Vec<Input> = reference.items.iter().map(|i| Input::Text(i.input.clone())).collect();
    let (batch, _) = model.plugin.embed(&inputs, Arc::from("batch"));
    let batch = batch?;
    for (v, item) in batch.vectors.iter().zip(&reference.items) {
        assert!(cosine(v, &item.embedding) >= 0.9999);
    }
    println!("worst cosine {worst}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_tokenizer_variant_gives_the_same_embeddings() -> anyhow::Result<()> {
    div_nn::init_onnx_runtime(&ort_dylib()?)?;
    let store = ModelStore::new(Runtime::new(RuntimeConfig::default())?, LoadOptions::default());
    let mut files = ModelFiles::read_dir(&minilm_dir())?;
    files.manifest.name = "minilm-host-tokenizer".into();
    files.manifest.extra.insert("tokenizer".into(), serde_json::Value::String("host".into()));
    let model = store.load(files, &plugin_wasm("div_embeddings")?).await?;
    let reference = minilm_reference()?;
    let inputs: Vec<Input> = reference.items.iter().map(|i| Input::Text(i.input.clone())).collect();
    let (out, _) = model.plugin.embed(&inputs, Arc::from("host-tok"));
    let out = out?;
    for (v, item) in out.vectors.iter().zip(&reference.items) {
        let c = cosine(v, &item.embedding);
        assert!(c >= 0.9999, "cosine {c} for {:?}", item.input);
    }
    // same token count as the in-plugin tokenizer
    assert_eq!(out.prompt_tokens, store_plain_tokens(&inputs).await?);
    Ok(())
}

async fn store_plain_tokens(inputs: &[Input]) -> anyhow::Result<u32> {
    let (_store, model) = store(true).await?;
    let (out, _) = model.plugin.embed(inputs, Arc::from("plain"));
    Ok(out?.prompt_tokens)
}

/// The embeddings plugin allocates from an 8 MiB request arena (`div_plugin::request_arena!`); a
/// request past it spills into the system allocator. Its answers stay right, and so do the
/// requests after it, in sandboxes reset from the snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn requests_past_the_plugins_request_arena_stay_correct() -> anyhow::Result<()> {
    let (_store, model) = store(true).await?;
    let reference = minilm_reference()?;
    // past 256 tokens: truncated to the model's length
    let long = reference.items.iter().map(|i| i.input.as_str()).collect::<Vec<_>>().join(" ").repeat(3);
    let (alone, _) = model.plugin.embed(&[Input::Text(long.clone())], Arc::from("one"));
    let alone = alone?;
    assert_eq!(alone.prompt_tokens, 256);
    // 40 inputs: a first inference of 32 × 256 tokens, whose output alone is 12.6 MB
    let inputs: Vec<Input> = (0..40).map(|_| Input::Text(long.clone())).collect();
    let (big, _) = model.plugin.embed(&inputs, Arc::from("big"));
    let big = big?;
    assert_eq!((big.vectors.len(), big.prompt_tokens), (40, 40 * 256));
    for v in &big.vectors {
        let c = cosine(v, &alone.vectors[0]);
        assert!(c >= 0.9999, "cosine {c} between a batched and a lone embedding");
    }
    for item in &reference.items {
        let (out, _) = model.plugin.embed(&[Input::Text(item.input.clone())], Arc::from("after"));
        let c = cosine(&out?.vectors[0], &item.embedding);
        assert!(c >= 0.9999, "cosine {c} for {:?} after a big request", item.input);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_snapshot_cache_is_retaken_not_fatal() -> anyhow::Result<()> {
    div_nn::init_onnx_runtime(&ort_dylib()?)?;
    let cache = std::env::temp_dir().join(format!("div-snapcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let load = || async {
        let runtime =
            Runtime::new(RuntimeConfig { cache_dir: Some(cache.clone()), ..RuntimeConfig::default() })?;
        let store = ModelStore::new(runtime, LoadOptions::default());
        let mut files = ModelFiles::read_dir(&div_tests::workspace_root().join("build/models/tiny-echo"))?;
        files.manifest.extra.insert("mode".into(), serde_json::Value::String("echo".into()));
        let model = store.load(files, &div_tests::test_plugin_wasm("div_misbehave")?).await?;
        let (out, _) = model.plugin.embed(&[Input::Text("hi".into())], Arc::from("cache"));
        anyhow::Ok(out?.vectors)
    };
    assert_eq!(load().await?, vec![vec![104.0, 105.0]]);
    let snaps: Vec<_> = std::fs::read_dir(cache.join("snapshots"))?.flatten().map(|e| e.path()).collect();
    assert_eq!(snaps.len(), 1, "one snapshot cached: {snaps:?}");
    std::fs::write(&snaps[0], b"not a component")?;
    assert_eq!(load().await?, vec![vec![104.0, 105.0]], "loads again from a fresh snapshot");
    assert_ne!(std::fs::read(&snaps[0])?, b"not a component", "the damaged file was replaced");
    let _ = std::fs::remove_dir_all(&cache);
    Ok(())
}

/// A byte-bounded store unloads the least recently *used* model, not the oldest.
#[tokio::test(flavor = "multi_thread")]
async fn the_model_cache_unloads_the_least_recently_used_past_its_byte_bound() -> anyhow::Result<()> {
    div_nn::init_onnx_runtime(&div_tests::ort_dylib()?)?;
    let dir = div_tests::workspace_root().join("build/models/tiny-echo");
    let size: u64 = ModelFiles::read_dir(&dir)?.manifest.files.iter().map(|f| f.size).sum();
    let options = LoadOptions { capacity_bytes: Some(2 * size), ..LoadOptions::default() };
    let store = ModelStore::new(Runtime::new(RuntimeConfig::default())?, options);
    let wasm = div_tests::test_plugin_wasm("div_misbehave")?;
    for name in ["a", "b"] {
        let mut files = ModelFiles::read_dir(&dir)?;
        files.manifest.name = name.into();
        store.load(files, &wasm).await?;
    }
    assert!(store.get("a").is_some(), "a is used now, b is the least recently used");
    let mut files = ModelFiles::read_dir(&dir)?;
    files.manifest.name = "c".into();
    store.load(files, &wasm).await?;
    let names: Vec<String> = store.list().iter().map(|m| m.manifest.name.clone()).collect();
    assert_eq!(names, ["a", "c"]);
    Ok(())
}
