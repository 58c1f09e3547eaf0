//! Past one machine: three `div serve` replicas of one host share a PostgreSQL ledger behind
//! HAProxy (Debian's, with the repository's `deploy/haproxy/haproxy.cfg`), against a real chain,
//! custodians and the real contracts. PostgreSQL is the test's own server, a plain process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use alloy::primitives::U256;
use div_chain::bindings::PaymentStream;
use div_meter::Receipt;
use serde_json::{Value, json};

use crate::rig::paid::{PRICE, Paid, numbered};
use crate::rig::{HOST, OWNER, Proc, Rig, free_port, misbehave_wasm};

const HAPROXY: &str = "/usr/sbin/haproxy";

/// How many replicas hold the settlement lease, by their `/metrics`.
async fn lease_holders(http: &reqwest::Client, ports: &[u16]) -> usize {
    let mut n = 0;
    for port in ports {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/metrics")).send().await
            && let Ok(text) = r.text().await
            && text.lines().any(|l| l.starts_with("div_settlement_lease{") && l.ends_with(" 1"))
        {
            n += 1;
        }
    }
    n
}

/// 32 clients send paid requests through HAProxy to three replicas on one PostgreSQL ledger;
/// one replica is killed with SIGKILL (and started again), PostgreSQL is restarted once. After
/// the run every lost answer is reconciled by its request id; then per permit every cumulative
/// number was issued once (1..n, across all replicas), the settlement the replicas made by
/// themselves pays the owner exactly Σ receipts, and no two replicas ever held the settlement
/// lease at once.
#[tokio::test(flavor = "multi_thread")]
async fn replicas_behind_haproxy_share_a_postgres_ledger_through_a_kill_and_a_database_restart()
-> anyhow::Result<()> {
    let pg = Arc::new(std::sync::Mutex::new(div_tests::Postgres::start("replicas")?));
    let url_db = pg.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.url();
    let redis = div_tests::Redis::start()?;
    let url_redis = redis.url();
    let rig = Rig::start("replicas").await?;
    // the owner lets hosts cache this model's answers
    let pkg = rig.tiny_package_with(
        "tiny-paid",
        json!({"extra": {"mode": "echo"}, "result_cache": {"ttl_secs": 600}}),
        false,
    )?;
    let id = rig.publish_ok(&pkg, &misbehave_wasm(), &[rig.chain.keys[HOST].address()])?;
    let lb_port = free_port()?;
    let book = rig.book.clone();
    let state = rig.dir.join("replica-1");
    let p =
        Paid { url: format!("http://127.0.0.1:{lb_port}"), rig, id, port: lb_port, state, host: None, book };
    let public = p.url.clone();
    let extra = [
        // every replica is the one host users know, at the load balancer's address
        "--public-url",
        public.as_str(),
        "--ledger",
        url_db.as_str(),
        "--redis",
        url_redis.as_str(),
        "--settle-interval-secs",
        "1",
        "--drain-notice-secs",
        "1",
        "--rate-limit",
        "100000",
    ];
    // one after another: each registers the host on chain with the host key
    let ports = [free_port()?, free_port()?, free_port()?];
    let mut replicas: Vec<Option<Proc>> = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let state = p.rig.dir.join(format!("replica-{}", i + 1));
        replicas.push(Some(p.spawn_host(*port, &state, &format!("replica-{}.log", i + 1), &extra).await?));
    }
    let mut lb = std::process::Command::new(HAPROXY);
    lb.args(["-db", "-f"])
        .arg(div_tests::workspace_root().join("deploy/haproxy/haproxy.cfg"))
        .env("DIV_LB_LISTEN", format!("127.0.0.1:{lb_port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(p.rig.dir.join("haproxy.log"))?);
    for (i, port) in ports.iter().enumerate() {
        lb.env(format!("DIV_REPLICA_{}", i + 1), format!("127.0.0.1:{port}"));
    }
    let _lb = Proc(lb.spawn()?);
    let http = reqwest::Client::new();
    let mut up = false;
    for _ in 0..100 {
        if let Ok(r) = http.get(format!("{}/readyz", p.url)).send().await
            && r.status().is_success()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(up, "HAProxy never answered");

    // users get their keys through the load balancer: the challenge and the key request meet
    // different replicas
    let users = [2usize, 8, 9, 4];
    let mut keys = Vec::new();
    for u in users {
        p.fund(u, 100_000_000, true).await?;
        keys.push(p.key_for(u, 100_000_000).await?);
    }
    let owner = p.key(OWNER).address();
    let before = p.usdc_of(owner).await?;

    // Sign-In with Ethereum through the load balancer: the session works on every replica
    let session = p.sign_in(users[0]).await?;
    for port in ports {
        let r = http.get(format!("http://127.0.0.1:{port}/v1/me")).bearer_auth(&session).send().await?;
        let (s, v) = (r.status().as_u16(), r.json::<Value>().await?);
        assert_eq!(s, 200, "replica {port}: {v}");
        assert_eq!(
            v["address"].as_str().map(str::to_lowercase),
            Some(p.key(users[0]).address().to_string().to_lowercase())
        );
    }

    // the result cache, shared in Redis: a miss on replica 1, a hit on replica 3, charged alike;
    // never an answer for a caller the gate refuses
    let mut receipts: Vec<Receipt> = Vec::new();
    let mut cache_answers = Vec::new();
    for port in [ports[0], ports[2]] {
        let r = http
            .post(format!("http://127.0.0.1:{port}/v1/embeddings"))
            .bearer_auth(&keys[0])
            .json(&json!({"model": "tiny-paid", "input": "cache me"}))
            .send()
            .await?;
        let cache = r.headers().get("x-div-cache").and_then(|v| v.to_str().ok()).map(str::to_string);
        let b: Value = r.json().await?;
        receipts.push(serde_json::from_value(b["receipt"].clone())?);
        cache_answers.push((cache, b["data"].clone()));
    }
    assert_eq!(cache_answers[0].0.as_deref(), Some("miss"));
    assert_eq!(cache_answers[1].0.as_deref(), Some("hit"), "another replica finds it in Redis");
    assert_eq!(cache_answers[0].1, cache_answers[1].1);
    assert_eq!(
        (receipts[0].amount, receipts[1].amount),
        (U256::from(PRICE), U256::from(PRICE)),
        "a hit is charged like a miss"
    );
    assert_eq!(receipts[1].cumulative_requests, receipts[0].cumulative_requests + 1);
    for key in [None, Some("div_not-a-key")] {
        let mut req = http
            .post(format!("{}/v1/embeddings", p.url))
            .json(&json!({"model": "tiny-paid", "input": "cache me"}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await?;
        assert_eq!(r.status().as_u16(), 401, "the gate runs before the cache");
        assert!(r.headers().get("x-div-cache").is_none());
    }

    // the lease sampler: never two holders at once
    let stop = Arc::new(AtomicBool::new(false));
    let (most, seen_one) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let alive = Arc::new(std::sync::Mutex::new(ports.to_vec()));
    let sampler = {
        let (stop, most, seen_one, alive, http) =
            (stop.clone(), most.clone(), seen_one.clone(), alive.clone(), http.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ports = alive.lock().map(|a| a.clone()).unwrap_or_default();
                let n = lease_holders(&http, &ports).await;
                most.fetch_max(n, Ordering::Relaxed);
                if n == 1 {
                    seen_one.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let clients_stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..32 {
        let (url, key, stop) = (p.url.clone(), keys[c % keys.len()].clone(), clients_stop.clone());
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let (mut got, mut lost, mut refused): (Vec<Receipt>, Vec<(String, String)>, Vec<String>) =
                (Vec::new(), Vec::new(), Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let id = format!("c{c}-{i}");
                let sent = http
                    .post(format!("{url}/v1/embeddings"))
                    .bearer_auth(&key)
                    .header("x-request-id", &id)
                    .json(&json!({"model": "tiny-paid", "input": format!("replicate me {c} {i}")}))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                let (status, body) = match sent {
                    Ok(r) => (r.status().as_u16(), r.json::<Value>().await.ok()),
                    Err(_) => (0, None),
                };
                match body.as_ref().and_then(|b| serde_json::from_value::<Receipt>(b["receipt"].clone()).ok())
                {
                    Some(rc) => got.push(rc),
                    None => {
                        // no receipt: charged or not, the client finds out by the request id
                        lost.push((key.clone(), id));
                        if status != 0 && status != 502 && status != 503 {
                            refused.push(format!("{status} {}", body.unwrap_or_default()));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            (got, lost, refused)
        }));
    }
    let kill_at = ports[1];
    tokio::time::sleep(Duration::from_secs(3)).await;
    if let Some(mut h) = replicas[1].take() {
        h.0.kill()?; // SIGKILL
        h.0.wait()?;
    }
    alive.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.retain(|p| *p != kill_at);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pg2 = pg.clone();
    tokio::task::spawn_blocking(move || pg2.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.restart())
        .await??;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // the killed replica comes back on the same ledger
    let state = p.rig.dir.join("replica-2");
    replicas[1] = Some(p.spawn_host(kill_at, &state, "replica-2.log", &extra).await?);
    alive.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(kill_at);
    tokio::time::sleep(Duration::from_secs(4)).await;
    clients_stop.store(true, Ordering::Relaxed);
    let (mut lost, mut refused) = (Vec::new(), Vec::new());
    for c in clients {
        let (g, l, r) = c.await?;
        receipts.extend(g);
        lost.extend(l);
        refused.extend(r);
    }
    assert!(refused.is_empty(), "requests refused for something other than the faults: {refused:?}");
    assert!(receipts.len() > 200, "only {} requests were served", receipts.len());
    assert!(receipts.iter().all(Receipt::verify));

    // reconcile every lost answer through the load balancer (any replica finds any charge)
    let mut recovered = 0;
    for (key, id) in &lost {
        let mut answer = None;
        for _ in 0..50 {
            let r = http.get(format!("{}/v1/receipts/{id}", p.url)).bearer_auth(key).send().await?;
            match r.status().as_u16() {
                200 | 404 => {
                    answer = Some((r.status().as_u16(), r.json::<Value>().await?));
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        match answer {
            Some((200, v)) => {
                let rc: Receipt = serde_json::from_value(v)?;
                assert!(rc.verify());
                receipts.push(rc);
                recovered += 1;
            }
            Some((404, _)) => {}
            other => anyhow::bail!("receipt lookup of {id} never answered: {other:?}"),
        }
    }
    eprintln!(
        "replicas: {} receipts, {recovered} recovered of {} lost answers (kill -9 + PostgreSQL restart)",
        receipts.len(),
        lost.len()
    );

    // per permit: 1..n exactly once across the replicas, amounts adding up
    let (by_permit, total) = numbered(&receipts);
    assert_eq!(by_permit.len(), users.len());

    // the lease holder settles by itself (every second): wait until the chain has it all
    let ps = PaymentStream::new(p.rig.chain.deployment.payment_stream, p.rig.provider()?);
    let mut settled = false;
    for _ in 0..120 {
        let mut all = true;
        for (hash, rs) in &by_permit {
            if ps.permitState(*hash).call().await?.settledRequests != rs.len() as u64 {
                all = false;
            }
        }
        if all {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    sampler.await?;
    anyhow::ensure!(settled, "the replicas never settled every receipt");
    assert_eq!(most.load(Ordering::Relaxed), 1, "two replicas held the settlement lease at once");
    assert!(seen_one.load(Ordering::Relaxed) > 0, "no replica ever held the lease");
    p.claim().await?;
    assert_eq!(p.usdc_of(owner).await? - before, total, "payout Δ = Σ receipts");
    Ok(())
}
