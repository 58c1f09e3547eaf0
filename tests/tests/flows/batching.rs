//! Dynamic batching below the sandbox, on the real MiniLM graph and ONNX Runtime: a request that
//! shares a backend run gets what it would get alone, whatever it shares the run with.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use div_nn::{BatchConfig, NamedTensor, OnnxConfig, OnnxGraph, RunReport, Tensor, TensorType};
use div_runtime::Input;
use div_tests::{TestHost, cosine, minilm_dir, minilm_reference, ort_dylib};

/// One sentence's three input tensors, `[1, seq]`.
fn inputs(tok: &tokenizers::Tokenizer, text: &str) -> anyhow::Result<Vec<NamedTensor>> {
    let enc = tok.encode_fast(text, true).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ids: Vec<i64> = enc.get_ids().iter().map(|&t| i64::from(t)).collect();
    let dims = vec![1, ids.len() as u32];
    let t = |v: Vec<i64>| {
        Tensor::new(dims.clone(), TensorType::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect())
    };
    Ok(vec![
        NamedTensor { name: "input_ids".into(), tensor: t(ids.clone()) },
        NamedTensor { name: "attention_mask".into(), tensor: t(vec![1; ids.len()]) },
        NamedTensor { name: "token_type_ids".into(), tensor: t(vec![0; ids.len()]) },
    ])
}

/// The sentence embedding (mean over its positions, L2-normalised) from a `[1, seq, 384]` output.
fn pooled(out: &[NamedTensor], seq: usize) -> anyhow::Result<Vec<f32>> {
    let h = &out
        .iter()
        .find(|o| o.name == "last_hidden_state")
        .ok_or_else(|| anyhow::anyhow!("no output"))?
        .tensor;
    anyhow::ensure!(
        h.dimensions == vec![1, seq as u32, 384],
        "output shape {:?}, expected [1, {seq}, 384]",
        h.dimensions
    );
    let v: Vec<f32> = h.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let mut sum = vec![0f32; 384];
    for row in v.chunks_exact(384) {
        sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
    }
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    Ok(sum.iter().map(|s| s / norm).collect())
}

/// Runs `graph` on one sentence's inputs and answers its embedding.
fn embed(graph: &OnnxGraph, inputs: Vec<NamedTensor>) -> anyhow::Result<Vec<f32>> {
    let seq = inputs.first().map_or(0, |t| t.tensor.dimensions[1] as usize);
    pooled(&graph.run(inputs)?, seq)
}

/// ONNX Runtime loaded, and the sample package's graph bytes and tokenizer.
fn minilm() -> anyhow::Result<(Vec<u8>, tokenizers::Tokenizer)> {
    div_nn::init_onnx_runtime(&ort_dylib()?)?;
    let bytes = std::fs::read(minilm_dir().join("model.onnx"))?;
    let tok = tokenizers::Tokenizer::from_file(minilm_dir().join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((bytes, tok))
}

#[test]
fn a_stacked_run_gives_each_request_what_it_gets_alone_whatever_it_is_stacked_with() -> anyhow::Result<()> {
    let (bytes, tok) = minilm()?;
    let config = OnnxConfig { sessions: 1, intra_threads: 1, ..Default::default() };
    let alone = OnnxGraph::load(&bytes, config)?;
    // a window no machine reaches: a run starts when every announced request has arrived, so
    // which requests share it is decided by the test, not by timing
    let batching = BatchConfig { max_batch: 64, window: Duration::from_secs(600) };
    let runs = Arc::new(Mutex::new(Vec::<usize>::new()));
    let log = runs.clone();
    let stacked =
        OnnxGraph::load_batched(&bytes, config, batching)?.with_observer(Arc::new(move |r: &RunReport| {
            log.lock().unwrap_or_else(|p| p.into_inner()).push(r.requests)
        }));
    let reference = minilm_reference()?;
    let mut texts: Vec<(String, Vec<f32>)> =
        reference.items.iter().map(|i| (i.input.clone(), i.embedding.clone())).collect();
    texts.sort_by_key(|(t, _)| t.len());
    let (short, long) = (texts[0].clone(), texts[texts.len() - 1].clone());
    let probe = texts[texts.len() / 2].clone();
    // the same sentence beside a shorter one, a much longer one, and a crowd
    let crowds: Vec<Vec<(String, Vec<f32>)>> = vec![
        vec![probe.clone(), short.clone()],
        vec![long.clone(), probe.clone()],
        texts.iter().take(7).cloned().chain([probe.clone(), long.clone()]).collect(),
    ];
    let solo = |text: &str| embed(&alone, inputs(&tok, text)?);
    let mut worst = 1.0f64;
    for crowd in &crowds {
        runs.lock().unwrap_or_else(|p| p.into_inner()).clear();
        // every request's sandbox exists before any of them computes
        let requests: Vec<OnnxGraph> = crowd.iter().map(|_| stacked.for_request()).collect();
        let threads: Vec<_> = crowd
            .iter()
            .zip(requests)
            .map(|((text, _), graph)| {
                let inp = inputs(&tok, text);
                std::thread::spawn(move || embed(&graph, inp?))
            })
            .collect();
        let outs = threads
            .into_iter()
            .map(|t| t.join().map_err(|_| anyhow::anyhow!("panicked"))?)
            .collect::<anyhow::Result<Vec<_>>>()?;
        assert_eq!(
            *runs.lock().unwrap_or_else(|p| p.into_inner()),
            vec![crowd.len()],
            "one run for the whole crowd"
        );
        for ((text, reference), batched) in crowd.iter().zip(outs) {
            let c = cosine(&batched, &solo(text)?);
            worst = worst.min(c);
            assert!(c >= 0.99999, "cosine {c} between {text:?} stacked and alone");
            assert!(
                cosine(&batched, reference) >= 0.9999,
                "{text:?} stacked drifts from sentence-transformers"
            );
        }
    }
    eprintln!("worst cosine, stacked vs alone: {worst:.9}");
    // a lone request on the batched graph runs by itself, at once
    runs.lock().unwrap_or_else(|p| p.into_inner()).clear();
    assert!(cosine(&embed(&stacked.for_request(), inputs(&tok, &probe.0)?)?, &solo(&probe.0)?) >= 0.99999);
    assert_eq!(*runs.lock().unwrap_or_else(|p| p.into_inner()), vec![1]);
    Ok(())
}

#[test]
fn a_malformed_request_is_refused_before_it_can_spoil_a_shared_run() -> anyhow::Result<()> {
    let (bytes, tok) = minilm()?;
    let graph = OnnxGraph::load_batched(
        &bytes,
        OnnxConfig { sessions: 1, intra_threads: 1, ..Default::default() },
        BatchConfig { max_batch: 64, window: Duration::from_secs(600) },
    )?;
    let (good, bad) = (graph.for_request(), graph.for_request());
    let text = "A sentence that shares nothing with a malformed neighbour.";
    let inp = inputs(&tok, text)?;
    let seq = inp[0].tensor.dimensions[1] as usize;
    let ok = std::thread::spawn(move || embed(&good, inp));
    // a mask one position short: refused with its reason, and it releases the waiting run
    let mut wrong = inputs(&tok, text)?;
    wrong[1].tensor = Tensor::new(vec![1, seq as u32 - 1], TensorType::I64, vec![0; (seq - 1) * 8]);
    let e = bad.run(wrong).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("invalid input"), "{e}");
    let v = ok.join().map_err(|_| anyhow::anyhow!("panicked"))??;
    assert_eq!(v.len(), 384);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_api_callers_share_runs_and_get_the_answers_they_get_alone() -> anyhow::Result<()> {
    let host = TestHost::start(div_api::ApiConfig { max_concurrency: 256, ..Default::default() }).await?;
    host.load_minilm().await?;
    let model = host.store.get("all-minilm-l6-v2").ok_or_else(|| anyhow::anyhow!("not loaded"))?;
    assert!(
        model.graph.onnx().is_some_and(|g| g.batching().is_on()),
        "the sample manifest turns batching on"
    );
    let texts: Vec<String> = minilm_reference()?.items.into_iter().map(|i| i.input).take(16).collect();
    // each alone, one after another
    let mut alone = Vec::new();
    for t in &texts {
        let (r, _) = model.plugin.embed(&[Input::Text(t.clone())], Arc::from("alone"));
        alone.push(r?.vectors.remove(0));
    }
    // then 16 callers at once, four rounds, through HTTP
    let client = reqwest::Client::new();
    for _ in 0..4 {
        let calls: Vec<_> = texts
            .iter()
            .map(|t| {
                let (client, url) = (client.clone(), format!("{}/v1/embeddings", host.url));
                let body = serde_json::json!({"model": "all-minilm-l6-v2", "input": t}).to_string();
                tokio::spawn(async move {
                    let r = client.post(url).body(body).send().await?;
                    anyhow::ensure!(r.status().is_success(), "HTTP {}", r.status());
                    let v: serde_json::Value = r.json().await?;
                    let e: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone())?;
                    Ok(e)
                })
            })
            .collect();
        for ((t, call), alone) in texts.iter().zip(calls).zip(&alone) {
            let answer: Vec<f32> = call.await??;
            let c = cosine(&answer, alone);
            assert!(c >= 0.99999, "cosine {c} for {t:?} between a concurrent call and the same call alone");
        }
    }
    let metrics = client.get(format!("{}/metrics", host.url)).send().await?.text().await?;
    assert!(
        metrics.contains("div_backend_batch_requests_count{model=\"all-minilm-l6-v2\"}"),
        "the batch sizes are exported"
    );
    assert!(metrics.contains("div_backend_queue_wait_seconds_count{model=\"all-minilm-l6-v2\"}"));
    Ok(())
}
