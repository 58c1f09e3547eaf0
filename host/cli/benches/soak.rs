//! The soak: 16 clients paying for embeddings for ten minutes (`DIV_SOAK_SECS`) against real
//! processes, while a custodian restarts, the chain RPC refuses and then hangs (20 s each), and
//! the host is killed with SIGKILL and restarted. Clients send their own request ids; after the
//! run they reconcile every answer they lost (`GET /v1/receipts/{id}`), the host settles, and:
//! - `soak_error_rate`: failed requests ÷ requests, outside the injected windows (the host's
//!   restart, from the kill until it serves again);
//! - `soak_lost_charges`: receipts the owner was not paid for (Σ receipts − payout Δ, in
//!   requests), and cumulative numbers issued twice.
//!
//! Writes `bench/out/soak.json` and `bench/out/soak.md`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::U256;
use anyhow::Context;
use div_meter::Receipt;
use serde_json::{Value, json};

#[path = "../tests/rig/mod.rs"]
mod rig;

#[path = "../tests/hostile/proxy.rs"]
#[allow(dead_code)]
mod proxy;

use proxy::{Mode, Proxy};
use rig::paid::{PRICE, Paid};
use rig::{HOST, OWNER, Rig, misbehave_wasm};

fn div() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_div"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("div-soak-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    failed_in_window: u64,
    receipts: Vec<Receipt>,
    lost: Vec<String>,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("DIV_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let total = Duration::from_secs(secs);
    let rig = Rig::start("soak").await?;
    let pkg = rig.tiny_package("tiny-paid")?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
    let anvil: std::net::SocketAddr = rig.chain.rpc_url.trim_start_matches("http://").parse()?;
    let proxy = Proxy::start(anvil).await?;
    let mut book: Value = serde_json::from_slice(&std::fs::read(&rig.book)?)?;
    book["rpcUrl"] = proxy.url().into();
    let proxied = rig.dir.join("addresses-proxied.json");
    std::fs::write(&proxied, book.to_string())?;
    let flags = [
        "--rate-limit",
        "100000",
        "--settle-interval-secs",
        "10",
        "--settle-receipt-timeout-secs",
        "5",
        "--rpc-timeout-ms",
        "1500",
    ];
    let mut p = Paid::serve_with_book(rig, id, proxied, &flags).await?;
    let users = [2usize, 7, 8, 9];
    let mut keys = Vec::new();
    for u in users {
        p.fund(u, 1_000_000_000, true).await?;
        keys.push(p.key_for(u, 1_000_000_000).await?);
    }
    let owner = p.key(OWNER).address();
    let before = p.usdc_of(owner).await?;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // the window in which failures are the injected fault's (the host's restart)
    let window = Arc::new(std::sync::Mutex::new(None::<(Instant, Option<Instant>)>));
    let mut clients = Vec::new();
    for c in 0..16usize {
        let (url, key, stop, window) =
            (p.url.clone(), keys[c % keys.len()].clone(), stop.clone(), window.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build()?;
            let mut t = Tally::default();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let rid = format!("soak-{c}-{i}");
                let sent = Instant::now();
                let r = http
                    .post(format!("{url}/v1/embeddings"))
                    .bearer_auth(&key)
                    .header("x-request-id", &rid)
                    .json(&json!({"model": "tiny-paid", "input": format!("soak {c} {i}")}))
                    .send()
                    .await;
                let receipt = match r {
                    Ok(r) if r.status().is_success() => r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_value::<Receipt>(b["receipt"].clone()).ok()),
                    _ => None,
                };
                match receipt {
                    Some(rc) => {
                        t.ok += 1;
                        t.receipts.push(rc);
                    }
                    None => {
                        let in_window = window
                            .lock()
                            .map(|w| {
                                w.is_some_and(|(from, to)| {
                                    sent >= from.checked_sub(Duration::from_secs(1)).unwrap_or(from)
                                        && to.is_none_or(|to| sent <= to)
                                })
                            })
                            .unwrap_or(false);
                        if in_window {
                            t.failed_in_window += 1
                        } else {
                            t.failed += 1
                        }
                        t.lost.push(rid);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            Ok::<_, anyhow::Error>((key, t))
        }));
    }
    let at = |f: f64| started + total.mul_f64(f);
    let mut events = Vec::new();
    // a custodian restarts (the model stays loaded; custodians matter at the next load)
    tokio::time::sleep_until(at(0.2).into()).await;
    p.rig.stop_custodian(1);
    tokio::time::sleep(Duration::from_secs(15)).await;
    p.rig.start_custodian(1).await?;
    events.push(format!("custodian 2 of 3 restarted at {:?}", at(0.2) - started));
    // the chain RPC refuses, then hangs
    tokio::time::sleep_until(at(0.45).into()).await;
    proxy.set(Mode::Refuse);
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.set(Mode::Hang);
    tokio::time::sleep(Duration::from_secs(20)).await;
    proxy.set(Mode::Pass);
    events.push(format!("RPC refused 20 s then hung 20 s from {:?}", at(0.45) - started));
    // the host is killed and restarted
    tokio::time::sleep_until(at(0.7).into()).await;
    let killed = Instant::now();
    if let Ok(mut w) = window.lock() {
        *w = Some((killed, None));
    }
    if let Some(mut h) = p.host.take() {
        h.0.kill()?;
        h.0.wait()?;
    }
    p.start_host(&flags).await?;
    // serving again: the window ends when a request succeeds (its receipt counts like any other)
    let mut probes: Vec<Receipt> = Vec::new();
    loop {
        if let Ok((200, b)) = p.embed(Some(&keys[0]), 1).await {
            probes.push(serde_json::from_value(b["receipt"].clone())?);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = Instant::now();
    if let Ok(mut w) = window.lock() {
        *w = Some((killed, Some(back)));
    }
    events.push(format!(
        "host killed (SIGKILL) at {:?}, serving again after {:?}",
        killed - started,
        back - killed
    ));
    tokio::time::sleep_until(at(1.0).into()).await;
    stop.store(true, Ordering::Relaxed);
    let mut tallies = Vec::new();
    for c in clients {
        tallies.push(c.await??);
    }
    // reconcile every lost answer, then settle and compare
    let http = reqwest::Client::new();
    let (mut ok, mut failed, mut failed_in_window, mut recovered) = (0u64, 0u64, 0u64, 0u64);
    let mut receipts: Vec<Receipt> = probes;
    for (key, t) in tallies {
        ok += t.ok;
        failed += t.failed;
        failed_in_window += t.failed_in_window;
        receipts.extend(t.receipts);
        for rid in t.lost {
            let r = http.get(format!("{}/v1/receipts/{rid}", p.url)).bearer_auth(&key).send().await?;
            if r.status().is_success() {
                receipts.push(r.json().await?);
                recovered += 1;
            }
        }
    }
    p.settle().await?;
    p.claim().await?;
    let paid = p.usdc_of(owner).await? - before;
    let held = receipts.iter().fold(U256::ZERO, |t, r| t + r.amount);
    let mut seen = std::collections::HashSet::new();
    let duplicates =
        receipts.iter().filter(|r| !seen.insert((r.permit_hash, r.cumulative_requests))).count() as u64;
    let lost_charges = held.saturating_sub(paid) / U256::from(PRICE);
    let lost_charges = u64::try_from(lost_charges).unwrap_or(u64::MAX) + duplicates;
    let outside = ok + failed;
    let error_rate = failed as f64 / outside.max(1) as f64;
    let overpaid = paid.saturating_sub(held) / U256::from(PRICE);
    println!(
        "soak: {secs} s, 16 clients: {ok} ok, {failed} failed outside the injected windows (rate {error_rate:.5}), \
         {failed_in_window} during the host's restart; {recovered} lost answers reconciled; lost charges {lost_charges}, \
         payout {paid} for receipts {held}"
    );
    for e in &events {
        println!("  {e}");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&json!({
            "soak_seconds": secs,
            "soak_requests": ok + failed + failed_in_window,
            "soak_error_rate": error_rate,
            "soak_failed_in_fault_windows": failed_in_window,
            "soak_lost_charges": lost_charges,
            "soak_overpaid_requests": u64::try_from(overpaid).unwrap_or(u64::MAX),
            "soak_reconciled_receipts": recovered,
        }))?,
    )?;
    std::fs::write(
        out.join("soak.md"),
        format!(
            "## Soak: {secs} s, 16 paying clients, faults injected\n\n{}\n\n\
             | | |\n|---|---:|\n| requests answered with a receipt | {ok} |\n| failed outside the fault windows | {failed} (rate {error_rate:.5}; goal < 0.001) |\n\
             | failed while the host restarted | {failed_in_window} |\n| lost answers reconciled by `GET /v1/receipts` | {recovered} |\n\
             | lost charges (receipts not paid, or numbered twice) | {lost_charges} (goal 0) |\n",
            events.iter().map(|e| format!("- {e}")).collect::<Vec<_>>().join("\n")
        ),
    )?;
    anyhow::ensure!(lost_charges == 0, "charges were lost");
    let _ = p.pid().context("host")?;
    Ok(())
}
