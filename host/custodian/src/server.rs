//! The custodian service (`div custodian`): one share per model, released only to whoever the
//! chain says may have it.
//!
//! A deposit is accepted from the model's owner alone: the signer's address and the model name
//! must hash to the model id, exactly as `ModelVault` derives ids, so no registration needs to
//! exist yet (publishing delivers shares *before* registering, so a crash never leaves a
//! registered model without them). The share must verify against the commitments deposited with
//! it. It is stored encrypted under a key derived from the custodian's own secret key, in a file
//! only the custodian's user can read.
//!
//! A release is granted to the model's owner (so the owner can always recover the key), or to a
//! host for which `ModelVault.isHostAuthorized(model, host)` holds while the model is active,
//! read by `eth_call` at the time of the request, so a revoked host is refused from the next
//! request on. Stale, replayed or mis-signed requests are refused before the chain is asked.
//! When the chain cannot be read the answer is 503: a custodian never releases on a guess.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use alloy::primitives::{Address, B256};
use alloy::providers::DynProvider;
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use div_chain::bindings::ModelVault;
use div_vault::{SealKey, Share};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::protocol::{
    CustodianInfo, DepositRequest, MAX_CLOCK_SKEW_SECS, MAX_DEPOSIT_AGE_SECS, ReleaseRequest,
    ReleaseResponse, deposit_context, model_id, now, recover, release_context,
};

/// A refusal: HTTP status, machine code and message, sent as `{"error":{…}}`.
#[derive(Debug)]
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let body = serde_json::json!({"error": {"message": self.message, "type": kind, "code": self.code}});
        (self.status, Json(body)).into_response()
    }
}

/// What a custodian keeps on disk for one model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShareRecord {
    owner: Address,
    name: String,
    index: u8,
    threshold: u8,
    commitments: Vec<String>,
    issued_at: u64,
    /// AES-256-GCM nonce for the share at rest (hex).
    nonce: String,
    /// The share encrypted at rest (hex).
    ciphertext: String,
}

/// A running custodian's state.
pub struct Custodian {
    signer: PrivateKeySigner,
    seal_key: SealKey,
    at_rest: Zeroizing<[u8; 32]>,
    dir: PathBuf,
    vault: ModelVault::ModelVaultInstance<DynProvider>,
    nonces: Mutex<HashMap<String, u64>>,
    write_lock: tokio::sync::Mutex<()>,
}

fn derive(secret: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's limit: expand cannot fail
    let _ = Hkdf::<Sha256>::new(Some(b"div custodian"), secret).expand(info, &mut *out);
    out
}

impl Custodian {
    /// A custodian with Ethereum key `signer`, keeping shares in `data_dir` and reading
    /// `ModelVault` at `model_vault` through `provider`.
    pub fn new(
        signer: PrivateKeySigner,
        data_dir: &Path,
        provider: DynProvider,
        model_vault: Address,
    ) -> std::io::Result<Self> {
        let secret = Zeroizing::new(signer.to_bytes().0);
        let seal_key = SealKey::from_seed(&derive(secret.as_slice(), b"sealing key v1"));
        let at_rest = derive(secret.as_slice(), b"at-rest key v1");
        let dir = data_dir.join("shares");
        std::fs::create_dir_all(&dir)?;
        restrict(data_dir, 0o700)?;
        restrict(&dir, 0o700)?;
        Ok(Self {
            signer,
            seal_key,
            at_rest,
            dir,
            vault: ModelVault::new(model_vault, provider),
            nonces: Mutex::new(HashMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The custodian's address.
    pub fn address(&self) -> Address {
        self.signer.address()
    }

    fn record_path(&self, model: B256) -> PathBuf {
        self.dir.join(format!("{}.json", hex::encode(model)))
    }

    fn read_record(&self, model: B256) -> Result<Option<ShareRecord>, Refusal> {
        match std::fs::read(self.record_path(model)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| internal(format!("share record for {model:#x} is damaged: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(internal(format!("reading the share record: {e}"))),
        }
    }

    fn seal_at_rest(&self, model: B256, share: &Share) -> Result<(String, String), Refusal> {
        let cipher = Aes256Gcm::new_from_slice(&*self.at_rest).map_err(|_| internal("at-rest key"))?;
        let nonce: [u8; 12] = rand::random();
        let nonce_ga = Nonce::from(nonce);
        let ct = cipher
            .encrypt(&nonce_ga, Payload { msg: &share.0, aad: model.as_slice() })
            .map_err(|_| internal("encrypting the share at rest"))?;
        Ok((hex::encode(nonce), hex::encode(ct)))
    }

    fn open_at_rest(&self, model: B256, rec: &ShareRecord) -> Result<Share, Refusal> {
        let cipher = Aes256Gcm::new_from_slice(&*self.at_rest).map_err(|_| internal("at-rest key"))?;
        let nonce = hex::decode(&rec.nonce).map_err(|_| internal("share record nonce"))?;
        let ct = hex::decode(&rec.ciphertext).map_err(|_| internal("share record ciphertext"))?;
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| internal("share record nonce length"))?;
        let plain = Zeroizing::new(
            cipher
                .decrypt(&Nonce::from(nonce), Payload { msg: &ct, aad: model.as_slice() })
                .map_err(|_| internal("the stored share does not decrypt with this custodian's key"))?,
        );
        Share::from_slice(&plain).map_err(|e| internal(e.to_string()))
    }
}

fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// A failure of this custodian's own (a damaged share file, a key that does not decrypt it):
/// logged here, where the operator can act on it, as well as answered.
fn internal(message: impl Into<String>) -> Refusal {
    let message = message.into();
    tracing::error!("{message}");
    Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
}

/// How far `issued_at` is from now, in words: "120 s ago" or "120 s in the future".
fn skew_words(issued_at: u64) -> String {
    let now = now();
    if issued_at > now {
        format!("{} s in the future", issued_at - now)
    } else {
        format!("{} s ago", now - issued_at)
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal::new(StatusCode::BAD_REQUEST, code, message)
}

fn parse_model(s: &str) -> Result<B256, Refusal> {
    s.parse::<B256>().map_err(|_| bad("invalid_model_id", format!("{s:?} is not a 32-byte hex model id")))
}

/// The custodian's HTTP routes.
pub fn router(custodian: Arc<Custodian>) -> Router {
    let metrics = Arc::new(crate::metrics::CustodianMetrics::default());
    let observed = Router::new()
        .route("/v1/info", get(info))
        .route("/v1/models/{model_id}/share", put(deposit))
        .route("/v1/models/{model_id}/release", post(release))
        .layer(DefaultBodyLimit::max(64 * 1024))
        .with_state(custodian)
        .layer(axum::middleware::from_fn_with_state(metrics.clone(), crate::metrics::count));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(crate::metrics::metrics))
        .with_state(metrics)
        .merge(observed)
}

async fn info(State(c): State<Arc<Custodian>>) -> Result<Json<CustodianInfo>, Refusal> {
    let key = hex::encode(c.seal_key.public());
    let sig = c
        .signer
        .sign_message_sync(CustodianInfo::message(c.address(), &key).as_bytes())
        .map_err(|e| internal(format!("signing: {e}")))?;
    Ok(Json(CustodianInfo {
        address: c.address(),
        encryption_key: key,
        signature: hex::encode(sig.as_bytes()),
    }))
}

async fn deposit(
    State(c): State<Arc<Custodian>>,
    UrlPath(model): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), Refusal> {
    let model = parse_model(&model)?;
    let req: DepositRequest =
        serde_json::from_slice(&body).map_err(|e| bad("invalid_json", format!("deposit body: {e}")))?;
    let age = now().abs_diff(req.issued_at);
    if age > MAX_DEPOSIT_AGE_SECS {
        return Err(bad(
            "stale_request",
            format!(
                "deposit signed {}; at most {MAX_DEPOSIT_AGE_SECS} s either way",
                skew_words(req.issued_at)
            ),
        ));
    }
    let signer =
        recover(&req.message(model, c.address()), &req.signature).map_err(|e| bad("bad_signature", e))?;
    if signer != req.owner || model_id(req.owner, &req.name) != model {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "not_model_owner",
            format!("{signer} is not the owner of {model:#x} (owner and name must hash to the id)"),
        ));
    }
    let commitments = req
        .commitments
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|v| <[u8; 33]>::try_from(v).ok())
                .ok_or_else(|| bad("invalid_commitment", "commitments are 33-byte hex points"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if commitments.len() != req.threshold as usize || req.threshold == 0 {
        return Err(bad("invalid_commitment", "one commitment per unit of threshold"));
    }
    let (info, aad) = deposit_context(model, c.address());
    let plain = c
        .seal_key
        .open(&req.sealed, &info, &aad)
        .map_err(|_| bad("bad_seal", "the share is not sealed to this custodian for this model"))?;
    let share = Share::from_slice(&plain).map_err(|e| bad("invalid_share", e.to_string()))?;
    if share.index() != Some(req.index) {
        return Err(bad(
            "invalid_share",
            format!("share index {:?}, request says {}", share.index(), req.index),
        ));
    }
    if !share.verify(&commitments) {
        return Err(bad("invalid_share", "the share does not verify against its commitments"));
    }
    let _guard = c.write_lock.lock().await;
    if let Some(old) = c.read_record(model)? {
        let same = old.commitments == req.commitments
            && old.index == req.index
            && c.open_at_rest(model, &old)? == share;
        if same {
            return Ok((StatusCode::OK, Json(serde_json::json!({"stored": true, "unchanged": true}))));
        }
        if req.issued_at <= old.issued_at {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "older_deposit",
                "a share deposited later than this one is already stored",
            ));
        }
    }
    let (nonce, ciphertext) = c.seal_at_rest(model, &share)?;
    let record = ShareRecord {
        owner: req.owner,
        name: req.name,
        index: req.index,
        threshold: req.threshold,
        commitments: req.commitments,
        issued_at: req.issued_at,
        nonce,
        ciphertext,
    };
    let path = c.record_path(model);
    let json = serde_json::to_vec_pretty(&record).map_err(|e| internal(e.to_string()))?;
    let dir = c.dir.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        // NamedTempFile is created 0600; written, synced and renamed into place
        let tmp = tempfile_in(&dir)?;
        std::fs::write(&tmp, &json)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(|e| internal(e.to_string()))?
    .map_err(|e| internal(format!("storing the share: {e}")))?;
    tracing::info!(model = %model, index = record.index, owner = %record.owner, "share stored");
    Ok((StatusCode::CREATED, Json(serde_json::json!({"stored": true}))))
}

fn tempfile_in(dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!(".tmp-{}", hex::encode(rand::random::<[u8; 8]>())));
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
    Ok(path)
}

async fn release(
    State(c): State<Arc<Custodian>>,
    UrlPath(model): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<ReleaseResponse>, Refusal> {
    let model = parse_model(&model)?;
    let req: ReleaseRequest =
        serde_json::from_slice(&body).map_err(|e| bad("invalid_json", format!("release body: {e}")))?;
    let skew = now().abs_diff(req.issued_at);
    if skew > MAX_CLOCK_SKEW_SECS {
        return Err(bad(
            "stale_request",
            format!(
                "request signed {}; at most {MAX_CLOCK_SKEW_SECS} s either way",
                skew_words(req.issued_at)
            ),
        ));
    }
    if req.nonce.len() < 16 || hex::decode(&req.nonce).is_err() {
        return Err(bad("invalid_nonce", "nonce must be at least 8 random bytes in hex"));
    }
    let signer =
        recover(&req.message(model, c.address()), &req.signature).map_err(|e| bad("bad_signature", e))?;
    if signer != req.requester {
        return Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "bad_signature",
            "the signature is not the requester's",
        ));
    }
    let ephemeral = crate::protocol::hex32(&req.ephemeral_key).map_err(|e| bad("invalid_key", e))?;
    {
        let mut seen = c.nonces.lock().unwrap_or_else(|p| p.into_inner());
        let t = now();
        seen.retain(|_, at| t.saturating_sub(*at) <= 2 * MAX_CLOCK_SKEW_SECS);
        if seen.insert(format!("{signer}:{}", req.nonce), t).is_some() {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "replayed_request",
                "this request was already answered",
            ));
        }
    }
    let record = c.read_record(model)?.ok_or_else(|| {
        Refusal::new(StatusCode::NOT_FOUND, "unknown_model", format!("no share held for {model:#x}"))
    })?;
    if signer != record.owner {
        authorise_host(&c, model, signer).await?;
    }
    let share = c.open_at_rest(model, &record)?;
    let (info, aad) = release_context(model, c.address(), signer);
    let sealed = div_vault::seal::seal(&ephemeral, &info, &aad, &share.0)
        .map_err(|e| bad("invalid_key", e.to_string()))?;
    tracing::info!(model = %model, to = %signer, index = record.index, "share released");
    Ok(Json(ReleaseResponse { index: record.index, sealed }))
}

async fn authorise_host(c: &Custodian, model: B256, host: Address) -> Result<(), Refusal> {
    let unavailable = |e: alloy::contract::Error| {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "chain_unavailable",
            format!("reading ModelVault: {}", div_chain::revert_reason(&e)),
        )
    };
    let forbidden = |why: String| {
        tracing::warn!(model = %model, host = %host, why, "share refused");
        Refusal::new(StatusCode::FORBIDDEN, "host_not_authorized", why)
    };
    let m = match c.vault.getModel(model).call().await {
        Ok(m) => m,
        Err(e)
            if matches!(
                e.as_decoded_interface_error::<ModelVault::ModelVaultErrors>(),
                Some(ModelVault::ModelVaultErrors::ModelNotFound(_))
            ) =>
        {
            return Err(forbidden(format!("model {model:#x} is not registered")));
        }
        Err(e) => return Err(unavailable(e)),
    };
    if host == m.owner {
        return Ok(());
    }
    if !m.active {
        return Err(forbidden(format!("model {model:#x} is not active")));
    }
    if !c.vault.isHostAuthorized(model, host).call().await.map_err(unavailable)? {
        return Err(forbidden(format!("{host} is not authorised for {model:#x} in ModelVault")));
    }
    Ok(())
}
