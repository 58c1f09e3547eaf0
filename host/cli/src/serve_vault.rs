//! `div serve --vault`: following `ModelVault`, and publishing this host on it.
//!
//! The host registers its public URL first (an owner's authorisation takes effect only for a
//! registered host, so custodians release nothing before it), then loads the models its operator
//! allows and their owners authorised, and publishes the set it serves whenever that changes.

use std::sync::Arc;
use std::time::Duration;

use alloy::signers::local::PrivateKeySigner;
use anyhow::{Context, bail};
use div_api::Metrics;
use div_chain::{Client, Deployment};
use div_models::ModelStore;
use div_sync::{Allow, CustodianObserver, SyncConfig, VaultSync};
use div_vault::Store;

use crate::cmd_serve::ServeArgs;

/// The vault sync as the API sees it: models this host serves but does not hold right now.
pub(crate) struct SyncCatalog(pub(crate) Arc<VaultSync>);

impl div_api::Catalog for SyncCatalog {
    fn wanted(&self, name: &str) -> Option<u32> {
        self.0.wanted(name)
    }

    fn readiness(&self) -> Vec<serde_json::Value> {
        self.0
            .readiness()
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name,
                    "model_id": format!("{:#x}", r.model_id),
                    "state": r.state,
                    "error": r.error,
                    "retry_in_secs": r.retry_in_secs,
                })
            })
            .collect()
    }

    fn initial_sync_done(&self) -> bool {
        self.0.initial_sync_done()
    }
}

/// Starts following `ModelVault` in the background: the host first publishes itself on chain
/// (its public URL; an owner's authorisation takes effect only for a registered host), then the
/// models this host's operator allows and their owners authorised are loaded one by one, retried
/// when they fail, and kept in step; the models it serves are published as they change.
pub(crate) fn start_vault(
    args: &ServeArgs,
    signer: PrivateKeySigner,
    public_url: &str,
    store: Arc<ModelStore>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(Arc<VaultSync>, tokio::task::JoinHandle<()>)> {
    let allow = Allow {
        owners: args.allow_owners.clone(),
        models: args.allow_models.clone(),
        any: args.allow_any_owner,
    };
    if allow.is_empty() {
        bail!(
            "--vault serves only models its operator chose: pass --allow-owner ADDRESS and/or --allow-model ID \
             (or --allow-any-owner to serve every model any owner authorises for this host)"
        );
    }
    let d = Deployment::load(&args.addresses)
        .with_context(|| format!("reading the address book {}", args.addresses.display()))?;
    let provider =
        div_chain::rpc::read_provider(&d.rpc_url, Duration::from_millis(args.rpc_timeout_ms.max(100)))?;
    let observer: CustodianObserver = Arc::new(move |c, _why| metrics.custodian_failure(&c.to_string()));
    let sync = Arc::new(VaultSync::new(
        SyncConfig {
            provider,
            model_vault: d.model_vault,
            store: Store::from_spec(&args.store),
            custodians: args.custodians.clone(),
            signer: signer.clone(),
            share_timeout: Duration::from_secs(5),
            poll: Duration::from_millis(args.vault_poll_ms),
            on_custodian_failure: Some(observer),
            allow,
            retry_base: Duration::from_millis(args.load_retry_ms.max(100)),
        },
        store,
    ));
    println!("host {} following ModelVault {}, published at {public_url}", sync.host(), d.model_vault);
    let mut elsewhere = Vec::new();
    for path in &args.payment_chains {
        elsewhere.push(
            Deployment::load(path).with_context(|| format!("reading the address book {}", path.display()))?,
        );
    }
    let runner = sync.clone();
    let url = public_url.to_string();
    let task = tokio::spawn(async move {
        // on the other chains the host takes payment on, it registers too (PaymentStream there
        // settles only for a host that vault authorises, and an authorisation takes effect only
        // for a registered host), and publishes the served models that vault knows
        for other in elsewhere {
            let (sync, signer, url) = (runner.clone(), signer.clone(), url.clone());
            tokio::spawn(async move {
                let client = publish_host(&other, signer, &url).await;
                publish_served(sync, client, other, url, true).await
            });
        }
        let client = publish_host(&d, signer, &url).await;
        tokio::spawn(publish_served(runner.clone(), client, d, url, false));
        runner.run(std::future::pending()).await
    });
    Ok((sync, task))
}

/// Registers this host at `url` on `d`'s `ModelVault` (keeping the models it published before
/// under the same URL), retrying until the chain takes it: until then no custodian releases a
/// share to this host, and no payment there settles.
async fn publish_host(d: &Deployment, signer: PrivateKeySigner, url: &str) -> Client {
    let mut wait = Duration::from_secs(1);
    loop {
        let attempt = async {
            let client = Client::connect(&d.rpc_url, signer.clone()).await?;
            let sent = client.ensure_host_registered(d, url, None).await?;
            Ok::<_, div_chain::ChainError>((client, sent))
        };
        match attempt.await {
            Ok((client, sent)) => {
                if sent {
                    tracing::info!(%url, "registered this host on ModelVault");
                }
                return client;
            }
            Err(e) => {
                tracing::warn!(
                    retry_in_secs = wait.as_secs(),
                    chain_id = d.chain_id,
                    "registering this host on ModelVault failed (nothing is served or settled there until it is): {e}"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Publishes the models this host serves (ready, or held and paged out) whenever that set
/// changes, so the dApp lists this host for them. On another chain than the one the models come
/// from (`only_known`), only those its `ModelVault` has registered (the owner registers a model
/// on each chain it takes payment on).
async fn publish_served(sync: Arc<VaultSync>, client: Client, d: Deployment, url: String, only_known: bool) {
    let mut published: Option<Vec<alloy::primitives::B256>> = None;
    let mut wait = Duration::from_secs(2);
    loop {
        tokio::time::sleep(wait).await;
        if !sync.initial_sync_done() {
            continue;
        }
        let mut served: Vec<_> = sync
            .readiness()
            .into_iter()
            .filter(|r| matches!(r.state, "ready" | "evicted"))
            .map(|r| r.model_id)
            .collect();
        if only_known {
            let vault = div_chain::bindings::ModelVault::new(d.model_vault, client.provider());
            let mut known = Vec::new();
            let mut answered = true;
            for id in served {
                match vault.getModel(id).call().await {
                    Ok(_) => known.push(id),
                    // ModelNotFound: not registered on this chain
                    Err(e) if e.as_revert_data().is_some() => {}
                    Err(_) => answered = false,
                }
            }
            if !answered {
                continue; // the chain is not answering: keep what was published
            }
            served = known;
        }
        served.sort();
        if published.as_ref() == Some(&served) {
            continue;
        }
        match client.ensure_host_registered(&d, &url, Some(&served)).await {
            Ok(_) => {
                tracing::info!(
                    models = served.len(),
                    chain_id = d.chain_id,
                    "published the models this host serves"
                );
                published = Some(served);
                wait = Duration::from_secs(2);
            }
            Err(e) => {
                tracing::warn!("publishing the models this host serves failed: {e}");
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}
