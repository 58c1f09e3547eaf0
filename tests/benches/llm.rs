//! Text generation through HTTP + the chat plugin against llama.cpp called directly, in one run.
//!
//! - direct: `llama-cpp-2` on the same GGUF, greedy, the prompt the plugin builds, in this
//!   process (no sandbox, no HTTP);
//! - served: `POST /v1/chat/completions` with `stream: true` to an in-process host on loopback,
//!   reading the SSE chunks as they arrive.
//!
//! Both count from the request (or the first decode) to each token: time to first token, and
//! tokens/s over the whole generation. Runs alternate between the two so drift hits both; medians
//! are compared. Then four streams at once, decoded together by continuous batching: their
//! aggregate tokens/s against one stream's, and their time to first token. Writes
//! `bench/out/llm.json` (`llm_tokens_ratio`, `llm_batch4_vs_single`, `llm_ttft_ms`,
//! `llm_ttft_ms_4streams`, `llm_direct_ttft_ms`, `llm_tokens_per_s`, `llm_direct_tokens_per_s`,
//! `llm_tokens_per_s_4streams`) and `llm.md`.

use std::time::{Duration, Instant};

use div_api::ApiConfig;
use div_tests::{CHAT_MODEL, TestHost, chat_dir, chat_prompt, llama_generate, workspace_root};
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use serde_json::json;

const QUESTION: &str = "Explain in a few sentences why model owners want their weights encrypted.";
const MAX_TOKENS: usize = 96;
const ROUNDS: usize = 5;

/// One generation's timing: time to first token, tokens, total time.
#[derive(Debug, Clone, Copy)]
struct Run {
    ttft: Duration,
    tokens: usize,
    total: Duration,
}

impl Run {
    fn tokens_per_s(&self) -> f64 {
        self.tokens as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

fn direct(model: &LlamaModel, prompt: &str) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut ttft = None;
    let tokens = llama_generate(model, prompt, MAX_TOKENS, |_| {
        ttft.get_or_insert(started.elapsed());
    })?;
    Ok(Run { ttft: ttft.unwrap_or_default(), tokens, total: started.elapsed() })
}

async fn served(url: &str) -> anyhow::Result<Run> {
    let started = Instant::now();
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "model": CHAT_MODEL, "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "status {}", r.status());
    let (mut ttft, mut last, mut tokens) = (None, started.elapsed(), 0usize);
    let mut buf = String::new();
    while let Some(chunk) = r.chunk().await? {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            let Some(data) = ev.trim().strip_prefix("data: ") else { continue };
            if data == "[DONE]" {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(data)?;
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|t| !t.is_empty()) {
                last = started.elapsed();
                ttft.get_or_insert(last);
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
        }
    }
    Ok(Run { ttft: ttft.unwrap_or(last), tokens, total: last })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let host = TestHost::start(ApiConfig::default()).await?;
    host.load_chat().await?;
    let backend = div_nn::llama_backend()?;
    let model =
        LlamaModel::load_from_file(backend, chat_dir().join("model.gguf"), &LlamaModelParams::default())?;
    let threads = div_nn::GgmlConfig::default().threads;
    let prompt = chat_prompt(QUESTION);
    // warm both paths once
    direct(&model, &prompt)?;
    served(&host.url).await?;
    let (mut d, mut s) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(tokio::task::block_in_place(|| direct(&model, &prompt))?);
        s.push(served(&host.url).await?);
    }
    anyhow::ensure!(
        d[0].tokens == s[0].tokens,
        "direct generated {} tokens, served {}",
        d[0].tokens,
        s[0].tokens
    );
    let d_tps = median(d.iter().map(Run::tokens_per_s).collect());
    let s_tps = median(s.iter().map(Run::tokens_per_s).collect());
    let d_ttft = median(d.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect());
    let s_ttft = median(s.iter().map(|r| r.ttft.as_secs_f64() * 1e3).collect());
    // four streams at once, batched: aggregate tokens per second over the wall time, against
    // one stream alone measured in the same rounds
    let (mut fours, mut ttft4) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let runs = futures_join4(&host.url).await?;
        let wall = started.elapsed().as_secs_f64();
        fours.push(runs.iter().map(|r| r.tokens).sum::<usize>() as f64 / wall);
        ttft4.extend(runs.iter().map(|r| r.ttft.as_secs_f64() * 1e3));
    }
    let four = median(fours);
    let ttft4 = median(ttft4);
    let out = json!({
        "llm_tokens_ratio": s_tps / d_tps,
        "llm_batch4_vs_single": four / s_tps,
        "llm_ttft_ms": s_ttft,
        "llm_ttft_ms_4streams": ttft4,
        "llm_direct_ttft_ms": d_ttft,
        "llm_tokens_per_s": s_tps,
        "llm_direct_tokens_per_s": d_tps,
        "llm_tokens_per_s_4streams": four,
    });
    let md = format!(
        "## Text generation (SmolLM2-135M-Instruct Q4_1, llama.cpp, {} tokens greedy, {threads} threads, median of {ROUNDS})\n\n\
         | path | tokens/s | time to first token |\n|---|---:|---:|\n\
         | llama-cpp-2 directly, one stream | {d_tps:.1} | {d_ttft:.1} ms |\n\
         | HTTP + chat plugin (SSE), one stream | {s_tps:.1} | {s_ttft:.1} ms |\n\
         | HTTP + chat plugin (SSE), four streams at once (in all) | {four:.1} | {ttft4:.1} ms |\n\n\
         Ratio served ÷ direct: **{:.3}** (goal ≥ 0.95). Four streams batched ÷ one stream: **{:.2}** (goal ≥ 2.0).\n",
        d[0].tokens,
        s_tps / d_tps,
        four / s_tps
    );
    println!("{md}");
    let dir = workspace_root().join("bench/out");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("llm.json"), serde_json::to_string_pretty(&out)?)?;
    std::fs::write(dir.join("llm.md"), md)?;
    Ok(())
}

async fn futures_join4(url: &str) -> anyhow::Result<Vec<Run>> {
    let (a, b, c, d) = tokio::join!(served(url), served(url), served(url), served(url));
    Ok(vec![a?, b?, c?, d?])
}
