//! What the host's HTTP path and a fresh sandbox per request cost, with no model work at all.
//!
//! A plugin that answers a constant (the misbehaving test plugin in its `echo` mode, on the chat
//! route: one emitted piece, no graph call) served by the host's real server loop and router,
//! with a fresh wasmtime instance per request, against a plain hyper handler answering the very
//! bytes the host answered. 16 clients on keep-alive connections (`div_tests::load`); rounds
//! alternate between the two, and the ratio is the median of per-round ratios, so drift in this
//! shared VM cancels within a round. Anchor: `wasmtime serve` with a fresh instance per request
//! reaches 0.08–0.09 of native hyper here.
//!
//! Writes `bench/out/noop.json` (`noop_plugin_vs_native_c16`, the two rates and p99s) and
//! `bench/out/noop.md`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use div_tests::load::{self, LoadReport, LoadSpec};
use div_tests::{TestHost, workspace_root};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

const CLIENTS: usize = 16;
const ROUNDS: usize = 5;
const ROUND: Duration = Duration::from_secs(3);

/// A hyper HTTP/1.1 server answering `body` to every request, on a loopback port.
async fn native(body: Bytes) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header(hyper::header::CONTENT_TYPE, "application/json")
                                .body(Full::new(body))
                                .unwrap_or_default(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(base)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let served = TestHost::start(div_api::ApiConfig::default()).await?;
    served.load_misbehaving_chat("noop", "echo", 10_000).await?;
    let host = served.url.clone();

    let body = Bytes::from(
        json!({"model": "noop", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            .to_string(),
    );
    let answer = reqwest::Client::new()
        .post(format!("{host}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    anyhow::ensure!(answer.status().is_success(), "the no-op plugin failed: {}", answer.text().await?);
    let constant = answer.bytes().await?;
    anyhow::ensure!(
        String::from_utf8_lossy(&constant).contains("echo"),
        "unexpected answer: {}",
        String::from_utf8_lossy(&constant)
    );
    let native = native(constant.clone()).await?;

    let spec = |base: &str, duration| LoadSpec {
        base: base.to_string(),
        path: "/v1/chat/completions".into(),
        body: body.clone(),
        bearer: None,
        clients: CLIENTS,
        duration,
    };
    let check = |r: &LoadReport, what: &str| {
        anyhow::ensure!(r.errors == 0 && r.ok > 0, "{what}: {} errors, first: {:?}", r.errors, r.first_error);
        Ok(())
    };
    // warm both (pooled slots, connections, caches)
    check(&load::run(&spec(&host, Duration::from_secs(1))).await?, "host warm-up")?;
    check(&load::run(&spec(&native, Duration::from_secs(1))).await?, "native warm-up")?;
    let (mut ratios, mut hosts, mut natives) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // alternate which goes first, so neither always runs on a warmer machine
        let (h, n) = if round % 2 == 0 {
            let h = load::run(&spec(&host, ROUND)).await?;
            (h, load::run(&spec(&native, ROUND)).await?)
        } else {
            let n = load::run(&spec(&native, ROUND)).await?;
            (load::run(&spec(&host, ROUND)).await?, n)
        };
        check(&h, "host")?;
        check(&n, "native")?;
        println!(
            "round {round}: plugin {:.0} req/s (p99 {:.2} ms), native {:.0} req/s (p99 {:.2} ms): {:.3}",
            h.rps,
            h.p99.as_secs_f64() * 1e3,
            n.rps,
            n.p99.as_secs_f64() * 1e3,
            h.rps / n.rps
        );
        ratios.push(h.rps / n.rps);
        hosts.push(h);
        natives.push(n);
    }
    let ratio = median(ratios);
    let host_rps = median(hosts.iter().map(|r| r.rps).collect());
    let native_rps = median(natives.iter().map(|r| r.rps).collect());
    let host_p99 = median(hosts.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect());
    let native_p99 = median(natives.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect());
    println!(
        "no-op plugin through the host: {host_rps:.0} req/s vs native hyper {native_rps:.0} req/s at \
         {CLIENTS} clients: ratio {ratio:.3}"
    );
    let out = json!({
        "noop_plugin_vs_native_c16": ratio,
        "noop_plugin_rps_c16": host_rps,
        "noop_native_rps_c16": native_rps,
        "noop_plugin_p99_ms_c16": host_p99,
        "noop_native_p99_ms_c16": native_p99,
    });
    let md = format!(
        "## A no-op plugin against native hyper\n\n| what | req/s | p99 |\n|---|---:|---:|\n\
         | constant answer from a plugin, fresh sandbox per request, the host's server + router | \
         {host_rps:.0} | {host_p99:.2} ms |\n\
         | plain hyper handler answering the same bytes | {native_rps:.0} | {native_p99:.2} ms |\n\
         | ratio (goal ≥ 0.25; `wasmtime serve` with a fresh instance per request: 0.08–0.09) | \
         **{ratio:.3}** | |\n\n\
         {CLIENTS} clients on keep-alive connections ({}), {ROUNDS} rounds of {} s alternating, \
         median of per-round ratios; the clients share the machine's cores with both servers.\n",
        "`div_tests::load`, also `cargo bench -p div-tests --bench load`",
        ROUND.as_secs()
    );
    let dir = workspace_root().join("bench/out");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("noop.json"), serde_json::to_string_pretty(&out)?)?;
    std::fs::write(dir.join("noop.md"), md)?;
    Ok(())
}
