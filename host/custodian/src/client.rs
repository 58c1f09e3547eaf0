//! The other side of the protocol: owners depositing shares, hosts (and owners) collecting them.
//!
//! [`collect_key`] is what a host runs when it loads an encrypted model: it asks every custodian
//! in parallel with one fresh X25519 key, checks each answer against the commitments in the
//! ciphertext header (which the chain pins through the content id), and combines the first
//! `threshold` valid shares as soon as they are in, without waiting for slow custodians. Each
//! custodian that failed is reported by address with the reason, so a lying or broken custodian
//! is visible in logs and metrics without stopping the load.

use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use div_vault::{Header, SealKey, Sealed, Share, seal};
use futures::StreamExt;
use zeroize::Zeroizing;

use crate::protocol::{
    CustodianInfo, DepositRequest, ReleaseRequest, ReleaseResponse, deposit_context, now, release_context,
};

/// Why talking to custodians failed.
#[derive(Debug, thiserror::Error)]
pub enum CustodianError {
    /// The HTTP exchange failed.
    #[error("{url}: {message}")]
    Http {
        /// The custodian's URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// The custodian refused (status and its JSON error message).
    #[error("{url}: refused ({status}): {message}")]
    Refused {
        /// The custodian's URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// The custodian's error code (`host_not_authorized`, …).
        code: String,
        /// The custodian's message.
        message: String,
    },
    /// The answer was invalid (bad signature, bad seal, wrong share).
    #[error("{url}: {message}")]
    Invalid {
        /// The custodian's URL.
        url: String,
        /// What was wrong.
        message: String,
    },
    /// Fewer than `threshold` valid shares came back.
    #[error("{got} valid key shares of {needed} needed; failures: {}", failures_text(.failures))]
    NotEnoughShares {
        /// Shares needed.
        needed: usize,
        /// Valid shares received.
        got: usize,
        /// Each custodian that failed and why.
        failures: Vec<(Address, String)>,
    },
    /// Combining valid shares failed (should not happen).
    #[error("combining shares: {0}")]
    Combine(String),
    /// Enough custodians answered, but none of their shares fits the ciphertext header's
    /// commitments: the header (the ciphertext) is what is wrong, not the custodians.
    #[error(
        "the ciphertext's header does not match the key shares its custodians hold ({answered} answered, \
         none of their shares fits its commitments): the ciphertext is damaged or was published with \
         another header; no custodian is at fault"
    )]
    HeaderMismatch {
        /// Custodians that answered with a share.
        answered: usize,
    },
}

/// A `reqwest` error with its causes ("error sending request …: connection refused"), not
/// just its outermost line (which can be as bare as "builder error").
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn failures_text(f: &[(Address, String)]) -> String {
    f.iter().map(|(a, r)| format!("{a}: {r}")).collect::<Vec<_>>().join("; ")
}

/// A custodian endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its address (as `ModelVault` lists it).
    pub address: Address,
    /// Its base URL.
    pub url: String,
}

async fn send_json<T: serde::de::DeserializeOwned>(
    url: &str,
    req: reqwest::RequestBuilder,
) -> Result<T, CustodianError> {
    let http = |message: String| CustodianError::Http { url: url.to_string(), message };
    let resp = req.send().await.map_err(|e| http(describe(&e)))?;
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| http(describe(&e)))?;
    if !status.is_success() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        let field = |k: &str| v["error"][k].as_str().unwrap_or_default().to_string();
        return Err(CustodianError::Refused {
            url: url.to_string(),
            status: status.as_u16(),
            code: field("code"),
            message: field("message"),
        });
    }
    serde_json::from_slice(&bytes).map_err(|e| http(format!("answer: {e}")))
}

/// Reads a custodian's address and sealing key, checking that the key is signed by the address.
pub async fn fetch_info(http: &reqwest::Client, url: &str) -> Result<(Address, [u8; 32]), CustodianError> {
    let url = url.trim_end_matches('/');
    let info: CustodianInfo = send_json(url, http.get(format!("{url}/v1/info"))).await?;
    let key =
        info.verified_key().map_err(|message| CustodianError::Invalid { url: url.to_string(), message })?;
    Ok((info.address, key))
}

/// Seals `share` to a custodian's key `key` for deposit (see [`deposit_sealed`]).
pub fn seal_share(
    endpoint: &Endpoint,
    key: &[u8; 32],
    model: B256,
    share: &Share,
) -> Result<Sealed, CustodianError> {
    let (info, aad) = deposit_context(model, endpoint.address);
    seal::seal(key, &info, &aad, &share.0)
        .map_err(|e| CustodianError::Invalid { url: endpoint.url.clone(), message: e.to_string() })
}

/// The owner hands the share sealed for this custodian (index `index` of model `name`) to it.
/// Idempotent: depositing the same share again succeeds.
pub async fn deposit_sealed(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    owner: &PrivateKeySigner,
    name: &str,
    index: u8,
    header: &Header,
    sealed: Sealed,
) -> Result<(), CustodianError> {
    let url = endpoint.url.trim_end_matches('/');
    let invalid = |message: String| CustodianError::Invalid { url: url.to_string(), message };
    let model = B256::from(header.model_id);
    let mut req = DepositRequest {
        owner: owner.address(),
        name: name.to_string(),
        index,
        threshold: header.threshold,
        commitments: header.commitments.iter().map(hex::encode).collect(),
        sealed,
        issued_at: now(),
        signature: String::new(),
    };
    let sig = owner
        .sign_message_sync(req.message(model, endpoint.address).as_bytes())
        .map_err(|e| invalid(e.to_string()))?;
    req.signature = hex::encode(sig.as_bytes());
    let _: serde_json::Value =
        send_json(url, http.put(format!("{url}/v1/models/{model:#x}/share")).json(&req)).await?;
    Ok(())
}

/// Seals and deposits `share` in one step (see [`deposit_sealed`]).
pub async fn deposit(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    key: &[u8; 32],
    owner: &PrivateKeySigner,
    name: &str,
    share: &Share,
    header: &Header,
) -> Result<(), CustodianError> {
    let sealed = seal_share(endpoint, key, B256::from(header.model_id), share)?;
    deposit_sealed(http, endpoint, owner, name, share.index().unwrap_or(0), header, sealed).await
}

/// Asks one custodian for its share of `model`, sealed to `ephemeral`.
pub async fn request_share(
    http: &reqwest::Client,
    endpoint: &Endpoint,
    model: B256,
    requester: &PrivateKeySigner,
    ephemeral: &SealKey,
) -> Result<Share, CustodianError> {
    let url = endpoint.url.trim_end_matches('/');
    if url.is_empty() {
        return Err(CustodianError::Http {
            url: format!("custodian {}", endpoint.address),
            message: "no URL known for it: none of the host's --custodian URLs answered as this address \
                      (each is down or not configured)"
                .into(),
        });
    }
    let invalid = |message: String| CustodianError::Invalid { url: url.to_string(), message };
    let mut req = ReleaseRequest {
        requester: requester.address(),
        ephemeral_key: hex::encode(ephemeral.public()),
        issued_at: now(),
        nonce: hex::encode(rand::random::<[u8; 16]>()),
        signature: String::new(),
    };
    let sig = requester
        .sign_message_sync(req.message(model, endpoint.address).as_bytes())
        .map_err(|e| invalid(e.to_string()))?;
    req.signature = hex::encode(sig.as_bytes());
    let resp: ReleaseResponse =
        send_json(url, http.post(format!("{url}/v1/models/{model:#x}/release")).json(&req)).await?;
    let (info, aad) = release_context(model, endpoint.address, requester.address());
    let plain = ephemeral.open(&resp.sealed, &info, &aad).map_err(|e| invalid(e.to_string()))?;
    let share = Share::from_slice(&plain).map_err(|e| invalid(e.to_string()))?;
    if share.index() != Some(resp.index) {
        return Err(invalid(format!("sealed share #{:?} answered as #{}", share.index(), resp.index)));
    }
    Ok(share)
}

/// How long, once enough valid shares are in, the other custodians' answers are still awaited
/// to name any that lie (they are not needed for the key).
pub const LATE_ANSWER_GRACE: Duration = Duration::from_millis(250);

/// The result of collecting a key.
pub struct Collected {
    /// The content key.
    pub key: Zeroizing<[u8; 32]>,
    /// Custodians whose answers were not used because they failed, with the reason.
    pub failures: Vec<(Address, String)>,
}

/// Collects `header.threshold` verified shares of `header.model_id` from `custodians` (listed in
/// share order: the i-th holds share i+1) and recombines the content key.
pub async fn collect_key(
    http: &reqwest::Client,
    custodians: &[Endpoint],
    header: &Header,
    requester: &PrivateKeySigner,
    timeout: Duration,
) -> Result<Collected, CustodianError> {
    let model = B256::from(header.model_id);
    let ephemeral = SealKey::generate();
    let needed = header.threshold as usize;
    let mut pending = futures::stream::FuturesUnordered::new();
    for (i, ep) in custodians.iter().enumerate() {
        let ephemeral = &ephemeral;
        pending.push(async move {
            let got = tokio::time::timeout(timeout, request_share(http, ep, model, requester, ephemeral))
                .await
                .unwrap_or_else(|_| {
                    Err(CustodianError::Http {
                        url: ep.url.clone(),
                        message: format!("no answer in {timeout:?}"),
                    })
                });
            (i, ep.address, got)
        });
    }
    let mut valid: Vec<Share> = Vec::new();
    let mut failures = Vec::new();
    let mut misfits = 0usize;
    let mut judge = |i: usize,
                     address: Address,
                     got: Result<Share, CustodianError>,
                     valid: &mut Vec<Share>,
                     failures: &mut Vec<(Address, String)>| match got {
        Ok(share) if share.index() != Some(i as u8 + 1) => {
            failures.push((address, format!("returned share #{:?}, holds #{}", share.index(), i + 1)))
        }
        Ok(share) if !share.verify(&header.commitments) => {
            misfits += 1;
            failures
                .push((address, "returned a wrong share (it does not fit the header's commitments)".into()));
        }
        Ok(share) => valid.push(share),
        Err(e) => failures.push((address, e.to_string())),
    };
    while valid.len() < needed {
        let Some((i, address, got)) = pending.next().await else { break };
        judge(i, address, got, &mut valid, &mut failures);
    }
    // enough to combine; give the others a moment so a lying custodian is still named
    let grace = tokio::time::sleep(LATE_ANSWER_GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace => break,
            next = pending.next() => match next {
                Some((i, address, got)) => {
                    let mut extra = Vec::new();
                    judge(i, address, got, &mut extra, &mut failures);
                }
                None => break,
            },
        }
    }

    if valid.is_empty() && misfits >= needed {
        // every share that came back is a different, well-formed share, and none fits: the one
        // thing they all disagree with is the header
        return Err(CustodianError::HeaderMismatch { answered: misfits });
    }
    for (address, why) in &failures {
        if why.contains("wrong share") {
            tracing::warn!(custodian = %address, model = %model, "custodian returned a share that fails the commitments");
        }
    }
    if valid.len() < needed {
        return Err(CustodianError::NotEnoughShares { needed, got: valid.len(), failures });
    }
    let key = div_vault::shares::combine(&header.model_id, &header.commitments, &valid)
        .map_err(|e| CustodianError::Combine(e.to_string()))?;
    Ok(Collected { key, failures })
}
