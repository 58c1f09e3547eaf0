//! What one paid request costs the ledger, with 10 permits recorded and with 100 000: the funds
//! check (`unsettled_of`), the cap check (`charged`) and the durable charge, from 32 concurrent
//! requests on the same 10 permits in both cases (as the host runs them, group commit
//! included), so the only difference is how many permits the ledger holds. Before the ledger kept its indexes
//! every one of those scanned all permits under the ledger's lock. Writes
//! `bench/out/charge.json` (`charge_us_at_10_permits`, `charge_us_at_100k_permits`, their ratio).

use std::sync::Arc;
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256, Bytes, U256};
use div_meter::{Ledger, PermitAccount, PermitFields};

fn account(i: u64) -> PermitAccount {
    PermitAccount::new(
        PermitFields {
            user: Address::left_padding_from(&i.to_be_bytes()),
            model_id: B256::repeat_byte(1),
            host: Address::repeat_byte(2),
            token: Address::repeat_byte(3),
            max_amount: U256::from(u64::MAX),
            expiry: 4_000_000_000,
            nonce: U256::from(i),
        },
        Bytes::from(vec![1u8; 65]),
        "m".into(),
    )
}

fn hash(i: u64) -> B256 {
    B256::left_padding_from(&i.to_be_bytes())
}

async fn ledger_with(permits: u64, dir: &std::path::Path) -> anyhow::Result<Arc<Ledger>> {
    let l = Arc::new(Ledger::open(dir)?);
    let mut next = 0u64;
    while next < permits {
        let mut tasks = Vec::new();
        for i in next..(next + 256).min(permits) {
            let l = l.clone();
            tasks.push(tokio::spawn(
                async move { l.register(hash(i), account(i), &format!("key-{i}")).await },
            ));
        }
        for t in tasks {
            t.await??;
        }
        next += 256;
    }
    Ok(l)
}

/// Mean µs per paid request's ledger work, 32 at once.
async fn per_charge(l: &Arc<Ledger>, permits: u64, rounds: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..32u64 {
        let l = l.clone();
        tasks.push(tokio::spawn(async move {
            let p = c % permits;
            let a = account(p);
            for r in 0..rounds {
                let _ = l.unsettled_of(a.permit.user, a.permit.token);
                let _ = l.charged(&hash(p));
                l.charge(hash(p), U256::from(1000u64), &format!("c{c}-{r}"), None, U256::MAX).await?;
            }
            Ok::<_, div_meter::MeterError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / (32 * rounds) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let scratch = std::env::temp_dir().join(format!("div-charge-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let t = Instant::now();
    let small = ledger_with(10, &scratch.join("small")).await?;
    let big = ledger_with(100_000, &scratch.join("big")).await?;
    eprintln!("charge bench: 100 000 permits recorded in {:?}", t.elapsed());
    // let the store settle after recording 100 000 permits (sled compacts its log in the
    // background), then warm both up
    tokio::time::sleep(Duration::from_secs(3)).await;
    per_charge(&small, 10, 300).await?;
    per_charge(&big, 10, 300).await?;
    let (mut s, mut b) = (Vec::new(), Vec::new());
    // alternate, so drift in a shared machine falls on both
    for _ in 0..11 {
        s.push(per_charge(&small, 10, 200).await?);
        b.push(per_charge(&big, 10, 200).await?);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, b) = (median(s), median(b));
    let ratio = b / s;
    println!(
        "charge: {s:.1} µs per paid request's ledger work with 10 permits, {b:.1} µs with 100 000: ratio {ratio:.3}"
    );
    let out = root.join("bench/out");
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("charge.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "charge_us_at_10_permits": s,
            "charge_us_at_100k_permits": b,
            "charge_ratio_100k_vs_10": ratio,
        }))?,
    )?;
    std::fs::write(
        out.join("charge.md"),
        format!(
            "## Ledger work per paid request (funds check, cap check, durable charge), 32 at once\n\n\
             | permits recorded | µs per request |\n|---:|---:|\n| 10 | {s:.1} |\n| 100 000 | {b:.1} |\n\n\
             Ratio 100 000 ÷ 10: **{ratio:.3}** (goal ≤ 1.1): every lookup is an index, never a scan.\n"
        ),
    )?;
    drop((small, big));
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
