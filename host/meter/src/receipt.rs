//! What the caller can prove later: every charged request's receipt, signed by the host.
//!
//! The receipt names the host's own id for the request (unique, never chosen by the client), the
//! id the client sent if any (so a client that lost the answer can find it again), the model, the
//! permit, this request's price and the permit's cumulative totals after it. The host signs the
//! text of [`Receipt::message`] with EIP-191, so anyone (the dApp in the browser, a wallet, a
//! contract) can check it against the host's address.

use alloy::primitives::{Address, B256, Signature, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use serde::{Deserialize, Serialize};

use crate::ledger::Charge;

/// What the host signs for each charged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The host's id for the request (`x-request-id` of the answer; unique).
    pub request_id: String,
    /// The `x-request-id` the client sent, if it sent one.
    #[serde(default)]
    pub client_request_id: Option<String>,
    /// The model's `ModelVault` id.
    pub model_id: B256,
    /// The permit charged.
    pub permit_hash: B256,
    /// This request's price (base units, decimal in JSON).
    #[serde(with = "decimal")]
    pub amount: U256,
    /// The permit's total after this request.
    #[serde(with = "decimal")]
    pub cumulative_amount: U256,
    /// The permit's request count after this request.
    pub cumulative_requests: u64,
    /// The host.
    pub host: Address,
    /// The host's EIP-191 signature over [`Receipt::message`] (hex).
    pub signature: String,
}

impl Receipt {
    /// The receipt of a journal entry, signed by `host`.
    pub fn sign(charge: &Charge, model_id: B256, host: &PrivateKeySigner) -> Result<Self, String> {
        let mut r = Self {
            request_id: charge.request_id.clone(),
            client_request_id: charge.client_request_id.clone(),
            model_id,
            permit_hash: charge.permit_hash,
            amount: charge.amount,
            cumulative_amount: charge.cumulative_amount,
            cumulative_requests: charge.cumulative_requests,
            host: host.address(),
            signature: String::new(),
        };
        let sig = host
            .sign_message_sync(r.message().as_bytes())
            .map_err(|e| format!("signing the receipt: {e}"))?;
        r.signature = format!("0x{}", alloy::hex::encode(sig.as_bytes()));
        Ok(r)
    }

    /// The text the host signs.
    pub fn message(&self) -> String {
        format!(
            "DIV receipt\nrequest: {}\nclient request: {}\nmodel: {:#x}\npermit: {:#x}\namount: {}\ncumulative: {}\nrequests: {}\nhost: {:#x}",
            self.request_id,
            self.client_request_id.as_deref().unwrap_or("-"),
            self.model_id,
            self.permit_hash,
            self.amount,
            self.cumulative_amount,
            self.cumulative_requests,
            self.host
        )
    }

    /// Whether the signature is the host's.
    pub fn verify(&self) -> bool {
        let Ok(bytes) = alloy::hex::decode(self.signature.trim_start_matches("0x")) else { return false };
        let Ok(sig) = Signature::from_raw(&bytes) else { return false };
        sig.recover_address_from_msg(self.message().as_bytes()).is_ok_and(|a| a == self.host)
    }
}

/// Amounts as decimal strings in JSON (what people and wallets read), not alloy's hex.
mod decimal {
    use alloy::primitives::U256;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        let s = String::deserialize(d)?;
        s.parse::<U256>().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_verifies_and_any_change_breaks_it() -> Result<(), String> {
        let host = PrivateKeySigner::random();
        let c = Charge {
            seq: 3,
            request_id: "host-id".into(),
            client_request_id: Some("mine".into()),
            permit_hash: B256::repeat_byte(1),
            amount: U256::from(5u64),
            cumulative_amount: U256::from(15u64),
            cumulative_requests: 3,
            at: 0,
        };
        let r = Receipt::sign(&c, B256::repeat_byte(2), &host)?;
        assert!(r.verify());
        assert!(r.message().contains("client request: mine"));
        let mut forged = r.clone();
        forged.client_request_id = Some("theirs".into());
        assert!(!forged.verify());
        let mut forged = r;
        forged.cumulative_requests = 2;
        assert!(!forged.verify());
        Ok(())
    }
}
