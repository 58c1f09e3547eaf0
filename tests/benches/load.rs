//! The load generator against any running host:
//!
//! ```text
//! cargo bench -p div-tests --bench load -- http://127.0.0.1:8080 --model all-minilm-l6-v2 \
//!     --key div_… --clients 64 --secs 10
//! ```
//!
//! Embedding models get one sentence per request on `/v1/embeddings`; `--chat` sends a short
//! chat to `/v1/chat/completions` instead. Prints requests per second, p50 and p99, and the first
//! error if any. Without a URL (as in `make bench`) it only says how to use it.

use std::time::Duration;

use bytes::Bytes;
use div_tests::load::{LoadSpec, run};
use serde_json::json;

const USAGE: &str = "usage: cargo bench -p div-tests --bench load -- URL --model NAME [--key KEY] \
                     [--clients N] [--secs S] [--chat] [--input TEXT]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let (mut url, mut model, mut key, mut clients, mut secs, mut chat, mut input) =
        (None, None, None, 64usize, 10u64, false, "A vault keeps its keys apart.".to_string());
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow::anyhow!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--model" => model = Some(value()?),
            "--key" => key = Some(value()?),
            "--clients" => clients = value()?.parse()?,
            "--secs" => secs = value()?.parse()?,
            "--input" => input = value()?,
            "--chat" => chat = true,
            u if u.starts_with("http://") => url = Some(u.trim_end_matches('/').to_string()),
            other => anyhow::bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    let (Some(base), Some(model)) = (url, model) else {
        println!("load: no host given, nothing to do\n{USAGE}");
        return Ok(());
    };
    let (path, body) = if chat {
        ("/v1/chat/completions", json!({"model": model, "messages": [{"role": "user", "content": input}]}))
    } else {
        ("/v1/embeddings", json!({"model": model, "input": input}))
    };
    let spec = LoadSpec {
        base,
        path: path.into(),
        body: Bytes::from(body.to_string()),
        bearer: key,
        clients,
        duration: Duration::from_secs(secs),
    };
    let r = run(&spec).await?;
    println!(
        "{} ok, {} errors in {secs} s at {clients} clients: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
        r.ok,
        r.errors,
        r.rps,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3
    );
    if let Some(e) = r.first_error {
        println!("first error: {e}");
    }
    Ok(())
}
