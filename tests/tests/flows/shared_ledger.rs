//! The PostgreSQL ledger against a real PostgreSQL server the test starts itself: two `Ledger`s
//! on one schema stand for two replicas of a host. What must hold whichever replica serves: no
//! cumulative number issued twice, a permit's cap and a user's deposit never passed together,
//! one settler at a time, and a database restart that loses nothing it confirmed.

use std::collections::HashSet;
use std::sync::Arc;

use alloy::primitives::{Address, B256, Bytes, U256};
use div_meter::{Ledger, MeterError, PermitAccount, PermitFields};
use div_tests::Postgres;

fn account(user: u8, token: u8, max: u64) -> PermitAccount {
    PermitAccount::new(
        PermitFields {
            user: Address::repeat_byte(user),
            model_id: B256::repeat_byte(1),
            host: Address::repeat_byte(2),
            token: Address::repeat_byte(token),
            max_amount: U256::from(max),
            expiry: 2_000_000_000,
            nonce: U256::from(u64::from(user) * 1000 + u64::from(token)),
        },
        Bytes::from(vec![1u8; 65]),
        "m".into(),
    )
}

async fn two_replicas(pg: &Postgres) -> anyhow::Result<(Arc<Ledger>, Arc<Ledger>)> {
    let a = Arc::new(Ledger::open_postgres(&pg.url(), "div_c31337").await?);
    let b = Arc::new(Ledger::open_postgres(&pg.url(), "div_c31337").await?);
    Ok((a, b))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_share_one_ledger_and_never_issue_a_number_twice() -> anyhow::Result<()> {
    let pg = Postgres::start("shared")?;
    let (a, b) = two_replicas(&pg).await?;
    let stream = Address::repeat_byte(9);
    a.bind(31337, stream).await?;
    b.bind(31337, stream).await?;
    assert!(b.bind(314159, stream).await.is_err(), "the schema is chain 31337's");

    // a key issued by A spends on B; the same permit cannot be registered twice, on either
    let (hash, big) = (B256::repeat_byte(0xaa), account(7, 3, 1_000_000));
    assert!(a.register(hash, big.clone(), "key-a").await?);
    assert!(!b.register(hash, big.clone(), "key-b").await?, "a replayed permit gets no second key");
    assert!(!a.register(hash, big, "key-a2").await?);
    assert_eq!(b.permit_of_key("key-a").await?, Some(hash), "B finds A's key in the database");
    assert_eq!(b.permit_of_key("key-b").await?, None);
    assert!(b.account(&hash).is_some(), "and the permit joined B's view");

    // 2 replicas × 8 tasks × 40 charges at once: every cumulative number exactly once
    let mut tasks = Vec::new();
    for (r, l) in [a.clone(), b.clone()].into_iter().enumerate() {
        for t in 0..8 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in 0..40 {
                    let id = format!("r{r}-t{t}-{i}");
                    got.push(l.charge(hash, U256::from(3u64), &id, Some(&id), U256::MAX).await?);
                }
                anyhow::Ok(got)
            }));
        }
    }
    let mut numbers = Vec::new();
    for t in tasks {
        for c in t.await?? {
            assert_eq!(c.cumulative_amount, U256::from(3 * c.cumulative_requests));
            numbers.push(c.cumulative_requests);
        }
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=640).collect::<Vec<u64>>(), "1..640, none twice, none skipped");
    let journal = a.journal().await?;
    assert_eq!(journal.len(), 640);
    assert_eq!(journal.iter().map(|c| c.request_id.as_str()).collect::<HashSet<_>>().len(), 640);
    // receipts are found by either replica, by the host's id and by the client's
    let c = b.charge_by_request("r0-t3-7").await?.ok_or_else(|| anyhow::anyhow!("no r0-t3-7"))?;
    assert_eq!(a.charge_by_client_id(&hash, "r0-t3-7").await?, Some(c));
    // each view catches up with the other's charges
    b.refresh().await?;
    a.refresh().await?;
    assert_eq!(a.charged(&hash), Some((U256::from(1920u64), 640)));
    assert_eq!(b.charged(&hash), Some((U256::from(1920u64), 640)));
    assert_eq!(a.unsettled_total(), U256::from(1920u64));

    // settled totals only grow, and the unsettled sum follows
    a.mark_settled(hash, U256::from(900u64), 300).await?;
    b.mark_settled(hash, U256::from(600u64), 200).await?; // an older read, late
    b.refresh().await?;
    let acc = b.account(&hash).ok_or_else(|| anyhow::anyhow!("no account"))?;
    assert_eq!((acc.settled_amount, acc.settled_requests), (U256::from(900u64), 300));
    assert_eq!(b.unsettled_of(Address::repeat_byte(7), Address::repeat_byte(3)), U256::from(1020u64));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cap_and_a_deposit_hold_across_replicas_whose_views_are_stale() -> anyhow::Result<()> {
    let pg = Postgres::start("limits")?;
    let (a, b) = two_replicas(&pg).await?;
    // one permit capped at 10 units, charged 1 at a time from both replicas at once
    let capped = B256::repeat_byte(0xc0);
    assert!(a.register(capped, account(4, 3, 10), "capped").await?);
    let mut tasks = Vec::new();
    for (r, l) in [a.clone(), b.clone()].into_iter().enumerate() {
        for i in 0..15 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.charge(capped, U256::from(1u64), &format!("cap-{r}-{i}"), None, U256::MAX).await
            }));
        }
    }
    let (mut ok, mut over) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(_) => ok += 1,
            Err(MeterError::OverCap { .. }) => over += 1,
            Err(e) => anyhow::bail!("unexpected: {e}"),
        }
    }
    assert_eq!((ok, over), (10, 20), "exactly the cap was charged, the rest refused");

    // one user, two permits, one on each replica; the deposit covers 12 units in all
    let (p1, p2) = (B256::repeat_byte(0xd1), B256::repeat_byte(0xd2));
    let (mut acc2, limit) = (account(5, 3, 1000), U256::from(12u64));
    acc2.permit.nonce = U256::from(77u64);
    assert!(a.register(p1, account(5, 3, 1000), "p1").await?);
    assert!(b.register(p2, acc2, "p2").await?);
    let mut tasks = Vec::new();
    for (l, p) in [(a.clone(), p1), (b.clone(), p2)] {
        for i in 0..10 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.charge(p, U256::from(1u64), &format!("dep-{p}-{i}"), None, limit).await
            }));
        }
    }
    let (mut ok, mut short) = (0, 0);
    for t in tasks {
        match t.await? {
            Ok(_) => ok += 1,
            Err(MeterError::InsufficientFunds { .. }) => short += 1,
            Err(e) => anyhow::bail!("unexpected: {e}"),
        }
    }
    assert_eq!((ok, short), (12, 8), "the deposit was spent once across both permits and replicas");

    // settling frees the deposit again; a permit the contract refused stops counting
    a.mark_settled(p1, U256::from(a.charged(&p1).map_or(0, |c| c.1)), a.charged(&p1).map_or(0, |c| c.1))
        .await?;
    let freed = b.charge(p2, U256::from(1u64), "after-settle", None, limit).await;
    assert!(freed.is_ok(), "settled charges no longer hold the deposit: {freed:?}");
    b.mark_rejected(p2, 4).await?;
    let refused = a.charge(p2, U256::from(1u64), "rejected", None, limit).await;
    assert!(matches!(refused, Err(MeterError::Revoked)), "{refused:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn one_settler_at_a_time_and_a_restart_loses_nothing_confirmed() -> anyhow::Result<()> {
    let mut pg = Postgres::start("lease")?;
    let (a, b) = two_replicas(&pg).await?;
    assert!(a.may_settle().await, "the first to ask takes the lease");
    assert!(!b.may_settle().await, "the other does not");
    assert_eq!((a.holds_settlement(), b.holds_settlement()), (Some(true), Some(false)));
    assert!(a.may_settle().await, "the holder keeps it");
    a.release_settlement().await;
    assert!(b.may_settle().await, "released (a draining replica): the other takes it");
    assert!(!a.may_settle().await);

    let hash = B256::repeat_byte(0xee);
    assert!(a.register(hash, account(6, 3, 1_000_000), "k").await?);
    for i in 0..20 {
        a.charge(hash, U256::from(2u64), &format!("before-{i}"), None, U256::MAX).await?;
    }

    // PostgreSQL restarts: charges fail while it is down (nothing confirmed is lost), the lease
    // goes with the holder's connection, and everything works again after
    pg.stop();
    let down = a.charge(hash, U256::from(2u64), "while-down", None, U256::MAX).await;
    assert!(matches!(down, Err(MeterError::Ledger(_))), "{down:?}");
    assert!(!b.may_settle().await, "no database, no lease");
    pg.restart()?;
    let mut after = None;
    for i in 0..100 {
        match a.charge(hash, U256::from(2u64), &format!("after-{i}"), None, U256::MAX).await {
            Ok(c) => {
                after = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let after = after.ok_or_else(|| anyhow::anyhow!("charges never worked again: {}", pg.log()))?;
    assert_eq!(after.cumulative_requests, 21, "the 20 confirmed before the restart are all there");
    assert!(a.charge_by_request("while-down").await?.is_none(), "what failed was not charged");
    let mut holders = 0;
    for l in [&a, &b] {
        if l.may_settle().await {
            holders += 1;
        }
    }
    assert_eq!(holders, 1, "after the restart exactly one replica settles");
    Ok(())
}
