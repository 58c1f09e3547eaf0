//! Embeddings through the sandbox and through HTTP, against the same backend called directly in
//! Rust, measured in one run on this machine.
//!
//! - direct: native `tokenizers` (`encode_fast`, one text after another) on the model's tokenizer.json → [`OnnxGraph::run`] → mean-pool +
//!   L2 in Rust (exactly the plugin's algorithm, no sandbox);
//! - sandbox: the embeddings plugin in a fresh instance per call (wizer snapshot), same graph;
//! - HTTP: `POST /v1/embeddings` to an in-process host on loopback.
//!
//! Calls alternate between the variants so drift hits both; medians are compared. Writes
//! `bench/out/embeddings.json` (flat keys) and `.md` for `scripts/bench-report.py`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use div_models::LoadedModel;
use div_nn::{NamedTensor, Tensor, TensorType};
use div_runtime::Input;
use div_tests::{TestHost, minilm_dir, minilm_reference, workspace_root};
use serde_json::json;

const MODEL: &str = "all-minilm-l6-v2";

const HEADER: &str = "| batch | direct ms | sandbox ms | sandbox, host tokenizer ms | direct, blocking thread ms | sandbox, blocking thread ms | HTTP ms | sandbox ÷ direct | host-tokenizer sandbox ÷ direct | ÷, both on a blocking thread | HTTP ÷ direct | sentences/s (HTTP) |";

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

/// One embed call through `model`'s plugin, on this thread (as `direct` runs), timed.
fn sandboxed(model: &LoadedModel, inputs: &[Input]) -> anyhow::Result<(Duration, div_runtime::Embeddings)> {
    let t = Instant::now();
    let (r, _) = model.plugin.embed(inputs, Arc::from("bench"));
    Ok((t.elapsed(), r?))
}

/// One embed call through `model`'s plugin on a blocking thread, as the API makes it, timed.
async fn sandboxed_blocking(model: &Arc<LoadedModel>, inputs: &[Input]) -> anyhow::Result<Duration> {
    let (m, inp) = (model.clone(), inputs.to_vec());
    let t = Instant::now();
    let (r, _) = tokio::task::spawn_blocking(move || m.plugin.embed(&inp, Arc::from("bench"))).await?;
    r?;
    Ok(t.elapsed())
}

/// The median of `num[i] / den[i]`: each pair was measured back to back, so drift in the
/// machine's speed (this is a shared VM) cancels within a pair.
fn paired_ratio(num: &[Duration], den: &[Duration]) -> f64 {
    let mut r: Vec<f64> = num.iter().zip(den).map(|(n, d)| n.as_secs_f64() / d.as_secs_f64()).collect();
    r.sort_by(f64::total_cmp);
    r.get(r.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The plugin's algorithm, natively.
fn direct(
    model: &LoadedModel,
    tok: &tokenizers::Tokenizer,
    texts: &[String],
) -> anyhow::Result<Vec<Vec<f32>>> {
    // one by one with `encode_fast` (no offsets), as the host's tokenizer and the plugin do:
    // `encode_batch` hands even one text to rayon's pool, which costs a thread wake-up
    let enc = texts
        .iter()
        .map(|t| tok.encode_fast(t.as_str(), true))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let batch = enc.len();
    let seq = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
    let mut ids = vec![0i64; batch * seq];
    let mut mask = vec![0i64; batch * seq];
    for (r, e) in enc.iter().enumerate() {
        for (c, &t) in e.get_ids().iter().enumerate() {
            ids[r * seq + c] = i64::from(t);
            mask[r * seq + c] = 1;
        }
    }
    let dims = vec![batch as u32, seq as u32];
    let t = |v: &[i64]| {
        Tensor::new(dims.clone(), TensorType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    let out = model.graph.onnx().context("MiniLM is an ONNX graph")?.run(vec![
        NamedTensor { name: "input_ids".into(), tensor: t(&ids) },
        NamedTensor { name: "attention_mask".into(), tensor: t(&mask) },
        NamedTensor { name: "token_type_ids".into(), tensor: t(&vec![0; batch * seq]) },
    ])?;
    let hidden = out.first().ok_or_else(|| anyhow::anyhow!("no output"))?;
    let h: Vec<f32> =
        hidden.tensor.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let dim = 384;
    Ok((0..batch)
        .map(|r| {
            let mut sum = vec![0f32; dim];
            let mut n = 0f32;
            for p in 0..seq {
                if mask[r * seq + p] != 0 {
                    n += 1.0;
                    for (s, x) in sum.iter_mut().zip(&h[(r * seq + p) * dim..(r * seq + p + 1) * dim]) {
                        *s += x;
                    }
                }
            }
            sum.iter_mut().for_each(|s| *s /= n.max(1e-9));
            let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            sum.iter_mut().for_each(|s| *s /= norm);
            sum
        })
        .collect())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let host = TestHost::start(div_api::ApiConfig { max_concurrency: 256, ..Default::default() }).await?;
    host.load_minilm().await?;
    let model = host.store.get(MODEL).ok_or_else(|| anyhow::anyhow!("model not loaded"))?;
    // the same plugin and graph, tokenizing through the host's native tokenizer (host.tokenize)
    let mut files = div_models::ModelFiles::read_dir(&minilm_dir())?;
    files.manifest.name = "minilm-host-tokenizer".into();
    files.manifest.extra.insert("tokenizer".into(), json!("host"));
    let hosttok = host.store.load(files, &div_tests::plugin_wasm("div_embeddings")?).await?;
    let mut tok = tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    tok.with_padding(None);
    let sentences: Vec<String> =
        minilm_reference()?.items.into_iter().map(|i| i.input).filter(|s| s.len() < 200).collect();
    let batch_of =
        |n: usize| -> Vec<String> { (0..n).map(|i| sentences[i % sentences.len()].clone()).collect() };
    let client = reqwest::Client::new();
    let url = format!("{}/v1/embeddings", host.url);
    let tok_arc = Arc::new(tok.clone());

    let mut out = serde_json::Map::new();
    let mut rows = Vec::new();
    let mut per_sentence = Vec::new();
    for (b, iters) in [(1usize, 400usize), (8, 100), (32, 60)] {
        let texts = batch_of(b);
        let inputs: Vec<Input> = texts.iter().cloned().map(Input::Text).collect();
        let body = json!({"model": MODEL, "input": texts}).to_string();
        // d: direct; s: sandbox; t: sandbox with the host's tokenizer; sb and db: sandbox and
        // direct on a blocking thread (the API's hop); h: HTTP
        let mut m: [Vec<Duration>; 6] = Default::default();
        for i in 0..iters + 5 {
            let mut took = [Duration::ZERO; 6];
            // rotate the order, so no variant always runs right after the same other one
            for k in 0..6 {
                let v = (k + i) % 6;
                took[v] = match v {
                    0 => {
                        let t = Instant::now();
                        direct(&model, &tok, &texts)?;
                        t.elapsed()
                    }
                    1 => {
                        let (ts, r) = sandboxed(&model, &inputs)?;
                        anyhow::ensure!(r.vectors.len() == b, "the sandbox lost inputs");
                        ts
                    }
                    2 => sandboxed(&hosttok, &inputs)?.0,
                    3 => sandboxed_blocking(&model, &inputs).await?,
                    4 => {
                        let (m2, tk, tx) = (model.clone(), tok_arc.clone(), texts.clone());
                        let t = Instant::now();
                        tokio::task::spawn_blocking(move || direct(&m2, &tk, &tx)).await??;
                        t.elapsed()
                    }
                    _ => {
                        let t = Instant::now();
                        let resp = client.post(&url).body(body.clone()).send().await?;
                        anyhow::ensure!(resp.status().is_success(), "HTTP {}", resp.status());
                        let _ = resp.bytes().await?;
                        t.elapsed()
                    }
                };
            }
            if i >= 5 {
                for (v, t) in m.iter_mut().zip(took) {
                    v.push(t);
                }
            }
        }
        let [d, s, t, sb, db, h] = &m;
        let sandbox_ratio = paired_ratio(s, d);
        let host_tok_ratio = paired_ratio(t, d);
        let blocking_ratio = paired_ratio(sb, db);
        let http_ratio = paired_ratio(h, d);
        if b == 1 || b == 32 {
            out.insert(format!("sandbox_ratio_b{b}"), json!(sandbox_ratio));
            out.insert(format!("http_ratio_b{b}"), json!(http_ratio));
            out.insert(format!("sandbox_ratio_b{b}_host_tokenizer"), json!(host_tok_ratio));
            // as the API runs it: both on a blocking thread
            out.insert(format!("sandbox_blocking_ratio_b{b}"), json!(blocking_ratio));
            out.insert(format!("thread_hop_ratio_b{b}"), json!(paired_ratio(db, d)));
        }
        let ms = |v: &Vec<Duration>| median(v.clone()).as_secs_f64() * 1e3;
        let sps = b as f64 / median(h.clone()).as_secs_f64();
        out.insert(format!("sentences_per_s_b{b}"), json!(sps));
        per_sentence.push((b, sps));
        rows.push(format!(
            "| {b} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {sandbox_ratio:.3} | {host_tok_ratio:.3} | {blocking_ratio:.3} | {http_ratio:.3} | {sps:.1} |",
            ms(d),
            ms(s),
            ms(t),
            ms(db),
            ms(sb),
            ms(h),
        ));
    }

    // concurrent callers, one sentence each, through HTTP, against one batch request of as many
    let concurrent = |clients: usize, model: &'static str, per_client: usize| {
        let (client, url, sentences) = (client.clone(), url.clone(), sentences.clone());
        async move {
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..clients {
                let (client, url, s) = (client.clone(), url.clone(), sentences[c % sentences.len()].clone());
                tasks.push(tokio::spawn(async move {
                    for _ in 0..per_client {
                        let r = client
                            .post(&url)
                            .body(json!({"model": model, "input": s}).to_string())
                            .send()
                            .await?;
                        anyhow::ensure!(r.status().is_success(), "HTTP {}", r.status());
                        let _ = r.bytes().await?;
                    }
                    Ok(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok::<_, anyhow::Error>((clients * per_client) as f64 / started.elapsed().as_secs_f64())
        }
    };
    let batch_rate = |n: usize, model: &'static str, rounds: usize| {
        let (client, url, body) =
            (client.clone(), url.clone(), json!({"model": model, "input": batch_of(n)}).to_string());
        async move {
            let mut took = Vec::new();
            for _ in 0..rounds {
                let t = Instant::now();
                let r = client.post(&url).body(body.clone()).send().await?;
                anyhow::ensure!(r.status().is_success(), "HTTP {}", r.status());
                let _ = r.bytes().await?;
                took.push(t.elapsed());
            }
            Ok::<_, anyhow::Error>(n as f64 / median(took).as_secs_f64())
        }
    };
    let c32 = concurrent(32, MODEL, 20).await?;
    let b32 = per_sentence.iter().find(|(b, _)| *b == 32).map(|x| x.1).unwrap_or(f64::NAN);
    out.insert("sentences_per_s_concurrent32".into(), json!(c32));
    out.insert("concurrent32_vs_batch32".into(), json!(c32 / b32));
    // 64: batched below the sandbox (the sample manifest's setting) and, for contrast, the same
    // graph with every request run alone
    let mut files = div_models::ModelFiles::read_dir(&minilm_dir())?;
    files.manifest.name = "minilm-unbatched".into();
    files.manifest.batching = None;
    host.store.load(files, &div_tests::plugin_wasm("div_embeddings")?).await?;
    concurrent(64, MODEL, 4).await?;
    let (mut c64s, mut u64s, mut b64s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        b64s.push(batch_rate(64, MODEL, 5).await?);
        c64s.push(concurrent(64, MODEL, 10).await?);
        u64s.push(concurrent(64, "minilm-unbatched", 10).await?);
    }
    let medf = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (c64, u64, b64) = (medf(c64s), medf(u64s), medf(b64s));
    out.insert("sentences_per_s_batch64".into(), json!(b64));
    out.insert("sentences_per_s_concurrent64".into(), json!(c64));
    out.insert("sentences_per_s_concurrent64_unbatched".into(), json!(u64));
    out.insert("concurrent64_vs_batch64".into(), json!(c64 / b64));
    out.insert("concurrent64_batched_vs_unbatched".into(), json!(c64 / u64));
    host.store.unload("minilm-unbatched");

    // the int8 variant, if the bootstrap made it: accuracy against sentence-transformers (every
    // fixture sentence), and speed against F32 at batch 32 on the graphs directly
    let int8 = int8_section(&host, &tok, &batch_of(32)).await?;
    for (k, v) in &int8 {
        out.insert(k.clone(), v.clone());
    }

    // the fixed cost of a sandbox: instantiate from the snapshot and drop
    let mut inst = Vec::new();
    for _ in 0..3000 {
        inst.push(model.plugin.instantiate_only(Arc::from("bench"))?);
    }
    let (p50, p99) = (pct(inst.clone(), 0.5), pct(inst, 0.99));
    out.insert("instantiate_p50_us".into(), json!(p50.as_secs_f64() * 1e6));
    out.insert("instantiate_p99_us".into(), json!(p99.as_secs_f64() * 1e6));

    // the same plugin without the wizer snapshot: initialize (parse tokenizer.json) per request
    let mut files = div_models::ModelFiles::read_dir(&minilm_dir())?;
    files.manifest.name = "minilm-no-snapshot".into();
    let runtime = div_runtime::Runtime::new(div_runtime::RuntimeConfig::default())?;
    let plain = div_models::ModelStore::new(
        runtime,
        div_models::LoadOptions { snapshot: false, ..Default::default() },
    );
    let plain = plain.load(files, &div_tests::plugin_wasm("div_embeddings")?).await?;
    let one = vec![Input::Text(sentences[0].clone())];
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..30 {
        let t = Instant::now();
        model.plugin.embed(&one, Arc::from("b")).0?;
        with.push(t.elapsed());
        let t = Instant::now();
        plain.plugin.embed(&one, Arc::from("b")).0?;
        without.push(t.elapsed());
    }
    let (w, wo) = (median(with), median(without));
    out.insert("request_ms_b1_snapshot".into(), json!(w.as_secs_f64() * 1e3));
    out.insert("request_ms_b1_no_snapshot".into(), json!(wo.as_secs_f64() * 1e3));

    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    println!("embeddings bench (all-MiniLM-L6-v2 F32 ONNX, {nproc} cores; medians)");
    println!("{HEADER}");
    for r in &rows {
        println!("{r}");
    }
    println!("32 concurrent single-sentence callers: {c32:.1} sentences/s = {:.2} × batch 32", c32 / b32);
    println!(
        "64 concurrent single-sentence callers: {c64:.1} sentences/s batched below the sandbox, {u64:.1} unbatched; \
         one batch-64 request: {b64:.1} sentences/s; concurrent ÷ batch = {:.3}",
        c64 / b64
    );
    println!("int8: {}", serde_json::to_string(&int8)?);
    println!(
        "sandbox instantiate p50 {:.1} µs, p99 {:.1} µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    println!(
        "request at batch 1: {:.2} ms from the wizer snapshot, {:.2} ms parsing tokenizer.json per request",
        w.as_secs_f64() * 1e3,
        wo.as_secs_f64() * 1e3
    );

    let mut md = String::from("## Embeddings: sandbox and HTTP vs the backend called directly\n\n");
    md.push_str(&format!(
        "all-MiniLM-L6-v2 (F32 ONNX, ONNX Runtime 1.32 via `ort`), {nproc} cores; medians, and ratios as medians of per-round ratios.\n\n"
    ));
    md.push_str(HEADER);
    md.push_str("\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(r);
        md.push('\n');
    }
    md.push_str(&format!(
        "\n- 32 concurrent single-sentence callers: {c32:.1} sentences/s ({:.2} × batch 32).\n\
         - 64 concurrent single-sentence callers: {c64:.1} sentences/s with batching below the sandbox (manifest `batching`: up to 64 rows, 2 ms window), {u64:.1} with every request run alone; one batch-64 request: {b64:.1} sentences/s; concurrent ÷ batch **{:.3}** (goal ≥ 0.9).\n\
         - Sandbox instantiate (store + WASI ctx + instance from the snapshot): p50 {:.1} µs, p99 {:.1} µs (goal ≤ 10 µs p50).\n\
         - A batch-1 request from the wizer snapshot: {:.2} ms; without it (tokenizer.json parsed per request): {:.2} ms.\n\
         - Ratios are medians of per-round ratios (each round runs every path once, in rotating order, so the machine's drift cancels within a round). \"Sandbox\" runs the plugin on the calling thread, as \"direct\" runs; the API also hops to a blocking thread, measured on both sides in the \"both on a blocking thread\" column, and HTTP adds that hop, hyper and JSON.\n\
         - Goal sandbox ÷ direct ≤ 1.02. PyTorch peer ratio: not measured (PyTorch is not installed here: its PyPI wheel pulls ~6 GB of CUDA).\n",
        c32 / b32,
        c64 / b64,
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        w.as_secs_f64() * 1e3,
        wo.as_secs_f64() * 1e3
    ));
    let dir = workspace_root().join("bench/out");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("embeddings.json"), serde_json::to_string_pretty(&out)?)?;
    std::fs::write(dir.join("embeddings.md"), md)?;
    Ok(())
}

/// The int8 package (`scripts/make-minilm-int8.py`), if built: its worst cosine against the
/// sentence-transformers reference over every fixture sentence, through the plugin; and F32 ÷ int8
/// time at batch 32 on the graphs directly, paired rounds.
async fn int8_section(
    host: &TestHost,
    tok: &tokenizers::Tokenizer,
    batch32: &[String],
) -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
    let mut out = serde_json::Map::new();
    let dir = div_tests::minilm_int8_dir();
    if !dir.join("manifest.json").is_file() {
        println!("int8: {} not built; skipped", dir.display());
        return Ok(out);
    }
    let files = div_models::ModelFiles::read_dir(&dir)?;
    let int8 = host.store.load(files, &div_tests::plugin_wasm("div_embeddings")?).await?;
    let f32m = host.store.get(MODEL).ok_or_else(|| anyhow::anyhow!("F32 not loaded"))?;
    let mut worst = 1.0f64;
    for item in minilm_reference()?.items {
        let (r, _) = int8.plugin.embed(&[Input::Text(item.input.clone())], Arc::from("bench"));
        worst = worst.min(div_tests::cosine(&r?.vectors[0], &item.embedding));
    }
    out.insert("int8_min_cosine".into(), json!(worst));
    let (mut f, mut q) = (Vec::new(), Vec::new());
    for i in 0..25 {
        let a = Instant::now();
        direct(&f32m, tok, batch32)?;
        let fa = a.elapsed();
        let b = Instant::now();
        direct(&int8, tok, batch32)?;
        let qb = b.elapsed();
        if i >= 3 {
            f.push(fa);
            q.push(qb);
        }
    }
    out.insert("int8_vs_f32_b32".into(), json!(paired_ratio(&f, &q)));
    out.insert("int8_b32_ms".into(), json!(median(q).as_secs_f64() * 1e3));
    out.insert("f32_b32_ms".into(), json!(median(f).as_secs_f64() * 1e3));
    host.store.unload(&int8.manifest.name);
    Ok(out)
}
