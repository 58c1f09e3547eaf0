//! The custodian protocol: what owners, hosts and custodians send each other, and the exact text
//! each party signs.
//!
//! Every request is signed with the sender's Ethereum key as an EIP-191 personal message, so any
//! wallet can produce it and the custodian learns *who* asks by recovering the signer. The texts
//! name the custodian, the model, the purpose and a timestamp; a release also carries a nonce and
//! the requester's fresh X25519 key, so a captured request is useless elsewhere, later, or again
//! (the share it releases is sealed to a key only the original requester holds).
//!
//! ```text
//! GET  /v1/info                          -> CustodianInfo (address, sealing key, signed)
//! PUT  /v1/models/{model_id}/share       <- DepositRequest  (owner)
//! POST /v1/models/{model_id}/release     <- ReleaseRequest  (host or owner) -> ReleaseResponse
//! ```

use alloy::primitives::{Address, B256, Signature};
use div_vault::Sealed;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How far a request's timestamp may be from the custodian's clock, in seconds.
pub const MAX_CLOCK_SKEW_SECS: u64 = 60;
/// How old a deposit may be, in seconds (publishing can be slow).
pub const MAX_DEPOSIT_AGE_SECS: u64 = 600;

/// What a custodian says about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CustodianInfo {
    /// Its Ethereum address (what `ModelVault` lists).
    pub address: Address,
    /// Its X25519 public key for sealing shares to it (hex).
    pub encryption_key: String,
    /// The custodian's signature over [`CustodianInfo::message`], binding key to address.
    pub signature: String,
}

impl CustodianInfo {
    /// The text the custodian signs.
    pub fn message(address: Address, encryption_key: &str) -> String {
        format!("DIV custodian key\ncustodian: {address:#x}\nkey: {encryption_key}")
    }

    /// Checks the signature and returns the sealing key.
    pub fn verified_key(&self) -> Result<[u8; 32], String> {
        let signer = recover(&Self::message(self.address, &self.encryption_key), &self.signature)?;
        if signer != self.address {
            return Err(format!("custodian info for {} is signed by {signer}", self.address));
        }
        hex32(&self.encryption_key)
    }
}

/// The owner hands a custodian its share of a model's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DepositRequest {
    /// The model's owner (whose address, with `name`, makes the model id).
    pub owner: Address,
    /// The model's name.
    pub name: String,
    /// The share's index (the custodian's 1-based position in the model's custodian list).
    pub index: u8,
    /// Shares needed to recover the key.
    pub threshold: u8,
    /// Feldman commitments (hex, 33 bytes each), as in the ciphertext header.
    pub commitments: Vec<String>,
    /// The share sealed to the custodian's key.
    pub sealed: Sealed,
    /// Unix seconds when signed.
    pub issued_at: u64,
    /// The owner's signature over [`DepositRequest::message`].
    pub signature: String,
}

impl DepositRequest {
    /// The text the owner signs.
    pub fn message(&self, model_id: B256, custodian: Address) -> String {
        let mut h = Sha256::new();
        for c in &self.commitments {
            h.update(c.as_bytes());
        }
        h.update(&self.sealed.enc);
        h.update(&self.sealed.ciphertext);
        format!(
            "DIV share deposit\nmodel: {model_id:#x}\ncustodian: {custodian:#x}\nindex: {}\nthreshold: {}\n\
             digest: {}\nissued: {}",
            self.index,
            self.threshold,
            hex::encode(h.finalize()),
            self.issued_at
        )
    }
}

/// A host (or the owner) asks for the share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// Who asks (must be the signer).
    pub requester: Address,
    /// A fresh X25519 public key to seal the share to (hex).
    pub ephemeral_key: String,
    /// Unix seconds when signed.
    pub issued_at: u64,
    /// Random, never reused (hex).
    pub nonce: String,
    /// The requester's signature over [`ReleaseRequest::message`].
    pub signature: String,
}

impl ReleaseRequest {
    /// The text the requester signs.
    pub fn message(&self, model_id: B256, custodian: Address) -> String {
        format!(
            "DIV share release\nmodel: {model_id:#x}\ncustodian: {custodian:#x}\nkey: {}\nissued: {}\nnonce: {}",
            self.ephemeral_key, self.issued_at, self.nonce
        )
    }
}

/// The released share, sealed to the requester's ephemeral key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// The share's index.
    pub index: u8,
    /// The 64-byte share, sealed.
    pub sealed: Sealed,
}

/// `info` and `aad` for sealing a deposit to a custodian.
pub fn deposit_context(model_id: B256, custodian: Address) -> (Vec<u8>, Vec<u8>) {
    ([b"div share deposit v1".as_slice(), model_id.as_slice()].concat(), custodian.to_vec())
}

/// `info` and `aad` for sealing a released share to a requester.
pub fn release_context(model_id: B256, custodian: Address, requester: Address) -> (Vec<u8>, Vec<u8>) {
    (
        [b"div share release v1".as_slice(), model_id.as_slice()].concat(),
        [custodian.as_slice(), requester.as_slice()].concat(),
    )
}

/// `ModelVault`'s id for `(owner, name)`: `keccak256(abi.encode(owner, name))`.
pub fn model_id(owner: Address, name: &str) -> B256 {
    use alloy::sol_types::SolValue;
    alloy::primitives::keccak256((owner, name.to_string()).abi_encode_params())
}

/// Recovers the EIP-191 signer of `message` from a hex signature.
pub fn recover(message: &str, signature: &str) -> Result<Address, String> {
    let bytes = hex::decode(signature.trim_start_matches("0x")).map_err(|e| format!("signature: {e}"))?;
    let sig = Signature::from_raw(&bytes).map_err(|e| format!("signature: {e}"))?;
    sig.recover_address_from_msg(message.as_bytes()).map_err(|e| format!("signature: {e}"))
}

/// Parses 32 bytes of hex.
pub fn hex32(s: &str) -> Result<[u8; 32], String> {
    let v = hex::decode(s.trim_start_matches("0x")).map_err(|e| format!("hex: {e}"))?;
    v.try_into().map_err(|_| "expected 32 bytes".to_string())
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    #[test]
    fn model_ids_match_the_contract() {
        // ModelVault.modelIdOf(0x…01, "m") = keccak256(abi.encode(address(1), "m"))
        let owner = Address::with_last_byte(1);
        let mut enc = vec![0u8; 32];
        enc[31] = 1;
        enc.extend_from_slice(&{
            let mut w = [0u8; 32];
            w[31] = 0x40;
            w
        });
        enc.extend_from_slice(&{
            let mut w = [0u8; 32];
            w[31] = 1;
            w
        });
        let mut s = [0u8; 32];
        s[0] = b'm';
        enc.extend_from_slice(&s);
        assert_eq!(model_id(owner, "m"), alloy::primitives::keccak256(&enc));
    }

    #[test]
    fn signatures_recover_their_signer_and_nothing_else() {
        let key = PrivateKeySigner::random();
        let sig = key.sign_message_sync(b"hello").map(|s| hex::encode(s.as_bytes())).unwrap_or_default();
        assert_eq!(recover("hello", &sig), Ok(key.address()));
        assert_ne!(recover("hellO", &sig), Ok(key.address()));
        assert!(recover("hello", "zz").is_err());
    }
}
