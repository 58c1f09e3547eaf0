//! The ledger's unit tests: durability and order across reopens, the indexes, the chain binding.

use super::*;
use alloy::primitives::Bytes;

fn account(user: u8) -> PermitAccount {
    PermitAccount::new(
        PermitFields {
            user: Address::repeat_byte(user),
            model_id: B256::repeat_byte(1),
            host: Address::repeat_byte(2),
            token: Address::repeat_byte(3),
            max_amount: U256::from(1000u64),
            expiry: 2_000_000_000,
            nonce: U256::from(1u64),
        },
        Bytes::from(vec![1u8; 65]),
        "m".into(),
    )
}

fn err(e: impl std::fmt::Display) -> MeterError {
    MeterError::Ledger(e.to_string())
}

#[test]
fn the_signature_is_sent_until_the_chain_has_settled_the_permit() {
    let mut a = account(4);
    a.charged_amount = U256::from(5u64);
    a.charged_requests = 5;
    assert_eq!(a.settlement_signature(), a.signature, "charged but never settled");
    a.settled_requests = 1; // a request-only settlement also proves the signature
    assert!(a.settlement_signature().is_empty());
    (a.settled_amount, a.settled_requests) = (U256::from(1u64), 0);
    assert!(a.settlement_signature().is_empty());
}

#[tokio::test]
async fn a_ledger_keeps_one_chains_charges_and_refuses_another_chain() -> Result<(), MeterError> {
    let dir = tempfile::tempdir().map_err(err)?;
    let stream = Address::repeat_byte(7);
    {
        let l = Ledger::open(dir.path())?;
        l.bind(31337, stream).await?;
        l.bind(31337, stream).await?;
    }
    let l = Ledger::open(dir.path())?;
    l.bind(31337, stream).await?; // after a reopen
    let other_chain = l.bind(314159, stream).await.map(|_| ()).map_err(|e| e.to_string());
    assert!(
        other_chain.as_ref().is_err_and(|e| e.contains("chain 31337") && e.contains("not chain 314159")),
        "{other_chain:?}"
    );
    assert!(l.bind(31337, Address::repeat_byte(8)).await.is_err(), "another contract on the same chain");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn charges_are_durable_in_order_and_survive_a_reopen() -> Result<(), MeterError> {
    let dir = tempfile::tempdir().map_err(err)?;
    let hash = B256::repeat_byte(9);
    {
        let l = Arc::new(Ledger::open(dir.path())?);
        assert!(l.register(hash, account(4), "key-1").await?);
        assert!(!l.register(hash, account(4), "key-2").await?, "a second key for one permit");
        let mut tasks = Vec::new();
        for i in 0..50 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.charge(hash, U256::from(3u64), &format!("r{i}"), Some(&format!("c{i}")), U256::MAX).await
            }));
        }
        let mut cum: Vec<U256> = Vec::new();
        for t in tasks {
            cum.push(t.await.map_err(err)??.cumulative_amount);
        }
        cum.sort();
        assert_eq!(cum, (1..=50u64).map(|i| U256::from(3 * i)).collect::<Vec<_>>());
        l.mark_settled(hash, U256::from(30u64), 10).await?;
        // a late, older read of the chain does not move settled totals back
        l.mark_settled(hash, U256::from(3u64), 1).await?;
    }
    let l = Ledger::open(dir.path())?;
    let acc = l.account(&hash).ok_or_else(|| err("lost"))?;
    assert_eq!((acc.charged_amount, acc.charged_requests), (U256::from(150u64), 50));
    assert_eq!(acc.unsettled(), U256::from(120u64));
    assert_eq!(l.unsettled_of(Address::repeat_byte(4), Address::repeat_byte(3)), U256::from(120u64));
    assert_eq!(
        l.totals(),
        Totals { unsettled_amount: U256::from(120u64), unsettled_requests: 40, permits: 1 }
    );
    assert_eq!(l.usage_of(B256::repeat_byte(1)).charged_requests, 50);
    assert_eq!(l.permit_of_key("key-1").await?, Some(hash));
    assert_eq!(l.permit_of_key("key-2").await?, None);
    let journal = l.journal().await?;
    assert_eq!(journal.len(), 50);
    assert!(
        journal
            .windows(2)
            .all(|w| w[0].seq + 1 == w[1].seq && w[0].cumulative_amount < w[1].cumulative_amount)
    );
    // receipts can be found again by either id
    let by_host = l.charge_by_request("r7").await?.ok_or_else(|| err("no r7"))?;
    let by_client = l.charge_by_client_id(&hash, "c7").await?.ok_or_else(|| err("no c7"))?;
    assert_eq!(by_host, by_client);
    assert_eq!(
        l.charge_by_client_id(&B256::ZERO, "c7").await?,
        None,
        "another permit's client ids are not ours"
    );
    // the next charge continues the journal
    let c = l.charge(hash, U256::from(1u64), "after", None, U256::MAX).await?;
    assert_eq!((c.seq, c.cumulative_amount), (50, U256::from(151u64)));
    Ok(())
}

/// The interleaving that once lost a receipted charge: charge 1's totals are assigned, then it
/// is held back while charge 2 is assigned and committed. Its older record must not overwrite
/// the newer one, on disk or after a reopen.
#[tokio::test(flavor = "multi_thread")]
async fn an_older_record_never_overwrites_a_newer_one() -> Result<(), MeterError> {
    let dir = tempfile::tempdir().map_err(err)?;
    let hash = B256::repeat_byte(5);
    {
        let l = Arc::new(Ledger::open(dir.path())?);
        assert!(l.register(hash, account(6), "k").await?);
        // hold back the second-to-last charge between assigning its totals and handing them
        // over, long enough for the last one to be assigned and committed first
        l.set_hook(Some(Arc::new(|seq: u64| {
            if seq == 18 {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        })));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                l.charge(hash, U256::from(1u64), &format!("r{i}"), None, U256::MAX).await
            }));
            tokio::task::yield_now().await;
        }
        let mut issued: Vec<u64> = Vec::new();
        for t in tasks {
            issued.push(t.await.map_err(err)??.cumulative_requests);
        }
        issued.sort_unstable();
        assert_eq!(issued, (1..=20).collect::<Vec<_>>(), "every cumulative number issued once");
        let disk = l.totals_on_disk(&hash).ok_or_else(|| err("no record"))?;
        assert_eq!(disk.1, 20, "the record on disk is the newest");
    }
    let l = Ledger::open(dir.path())?;
    assert_eq!(l.charged(&hash), Some((U256::from(20u64), 20)));
    let c = l.charge(hash, U256::from(1u64), "next", None, U256::MAX).await?;
    assert_eq!(c.cumulative_requests, 21, "no cumulative number is issued twice after a reopen");
    Ok(())
}

/// A record that fell behind its journal (written by an older host) is rebuilt on open.
#[tokio::test(flavor = "multi_thread")]
async fn open_rebuilds_totals_from_the_journal() -> Result<(), MeterError> {
    let dir = tempfile::tempdir().map_err(err)?;
    let hash = B256::repeat_byte(7);
    {
        let l = Ledger::open(dir.path())?;
        assert!(l.register(hash, account(8), "k").await?);
        for i in 0..5 {
            l.charge(hash, U256::from(2u64), &format!("r{i}"), None, U256::MAX).await?;
        }
        // write stale totals behind the ledger's back, as the old write order could
        let mut stale = l.account(&hash).ok_or_else(|| err("lost"))?;
        stale.charged_amount = U256::from(4u64);
        stale.charged_requests = 2;
        let Store::Sled(s) = &l.store else { return Err(err("not sled")) };
        s.hot.insert(tkey(&hash), totals_bytes(&stale)).map_err(db_err)?;
        s.db.insert(pkey(&hash), json(&stale)?).map_err(db_err)?;
        s.db.flush().map_err(db_err)?;
    }
    let l = Ledger::open(dir.path())?;
    assert_eq!(l.charged(&hash), Some((U256::from(10u64), 5)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rejected_permits_leave_settlement_and_indexes_stay_exact() -> Result<(), MeterError> {
    let dir = tempfile::tempdir().map_err(err)?;
    let l = Ledger::open(dir.path())?;
    let (a, b) = (B256::repeat_byte(1), B256::repeat_byte(2));
    l.register(a, account(1), "ka").await?;
    l.register(b, account(1), "kb").await?;
    l.charge(a, U256::from(5u64), "1", None, U256::MAX).await?;
    l.charge(b, U256::from(7u64), "2", None, U256::MAX).await?;
    assert_eq!(l.settleable(10).iter().map(|(h, _)| *h).collect::<Vec<_>>(), vec![b, a]);
    assert_eq!(l.unsettled_of(Address::repeat_byte(1), Address::repeat_byte(3)), U256::from(12u64));
    l.mark_rejected(b, 4).await?;
    assert_eq!(l.settleable(10).len(), 1);
    assert_eq!(l.live_keys_of(Address::repeat_byte(1), 0), 1, "a rejected permit's key is not live");
    l.mark_settled(a, U256::from(5u64), 1).await?;
    assert!(l.settleable(10).is_empty());
    assert_eq!(l.accounts_of(Address::repeat_byte(1)).len(), 2);
    Ok(())
}
