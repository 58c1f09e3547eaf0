//! Who is calling, and is their permit theirs.
//!
//! A permit and its signature are not secrets: they travel to the host, sit in its ledger and,
//! once settled, in `settleBatch` calldata on chain for anyone to read. So holding one proves
//! nothing. An API key is issued for a permit only to a caller who proves control of the
//! permit's user right now: a fresh EIP-191 signature by that user over a single-use challenge
//! of this host (`GET /v1/keys/challenge`), or a Sign-In with Ethereum session as that user. One
//! key per permit; keys are stored only as their SHA-256; requests carry the key, never a permit.
//!
//! **Signatures** are accepted exactly when `PaymentStream` would accept them (OpenZeppelin's
//! `SignatureChecker.isValidSignatureNow`): from an address without code, a 65-byte ECDSA
//! signature with `v` 27 or 28 and a low `s` that recovers to it; from an address with code
//! (a smart account), whatever its ERC-1271 `isValidSignature` approves. A malleated form (high
//! `s`, `v` 0/1, a 64-byte compact signature) would be served here and skipped at settlement,
//! so it is refused here too.

use alloy::primitives::{Address, B256, Bytes, U256, eip191_hash_message};
use alloy::sol_types::SolCall;

use crate::ledger::{PermitAccount, PermitFields};
use crate::{Meter, MeterError, ModelRef};

/// How a caller proves what it may spend.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    /// Nothing was sent.
    None,
    /// `Authorization: Bearer <key>` from `POST /v1/keys`.
    ApiKey(&'a str),
    /// `Authorization: Bearer <session>` from `POST /v1/siwe`.
    Session(&'a str),
}

/// How a caller asking for a key proves it controls the permit's user.
pub enum Proof<'a> {
    /// No proof (refused).
    None,
    /// A Sign-In with Ethereum session token.
    Session(&'a str),
    /// The user's EIP-191 signature over [`key_proof_message`] with a challenge of this host.
    Challenge {
        /// The challenge from `GET /v1/keys/challenge`.
        nonce: &'a str,
        /// The signature.
        signature: &'a Bytes,
    },
}

/// The text a user signs to get an API key for a permit: names this host, the permit and the
/// host's single-use challenge, and says it moves no funds.
pub fn key_proof_message(host: Address, permit_hash: B256, nonce: &str) -> String {
    format!(
        "DIV API key request\nhost: {host:#x}\npermit: {permit_hash:#x}\nchallenge: {nonce}\n\n\
         Signing this proves you hold the key that signed the permit. It moves no funds."
    )
}

/// secp256k1's group order over two: `s` above it is the malleated twin of a valid signature.
const HALF_N: [u8; 32] = [
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x5d,
    0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
];

/// OpenZeppelin's `ECDSA.tryRecover(hash, bytes)` followed by `== signer`: what `PaymentStream`
/// accepts from an address without code.
pub fn ecdsa_exact(hash: B256, sig: &[u8], signer: Address) -> Result<(), &'static str> {
    if sig.len() != 65 {
        return Err("a signature is 65 bytes (r, s, v)");
    }
    if !matches!(sig[64], 27 | 28) {
        return Err("v must be 27 or 28");
    }
    let s = U256::from_be_slice(&sig[32..64]);
    if s > U256::from_be_bytes(HALF_N) {
        return Err("s is in the upper half of the curve order (a malleated signature)");
    }
    let parsed = alloy::primitives::Signature::from_raw(sig).map_err(|_| "not a signature")?;
    match parsed.recover_address_from_prehash(&hash) {
        Ok(a) if a == signer => Ok(()),
        Ok(_) => Err("it recovers to another address"),
        Err(_) => Err("it does not recover to any address"),
    }
}

alloy::sol! {
    /// ERC-1271.
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4);
    }
}

impl Meter {
    /// The EIP-712 hash `PaymentStream` gives this permit.
    pub fn permit_hash(&self, permit: &PermitFields) -> B256 {
        div_chain::SpendingPermit::from(permit).signing_hash(&self.domain)
    }

    /// Whether `signature` is `signer`'s signature of `hash`, exactly as `PaymentStream` decides.
    pub async fn verify_signature(
        &self,
        signer: Address,
        hash: B256,
        signature: &[u8],
    ) -> Result<(), MeterError> {
        if !self.has_code(signer).await? {
            return ecdsa_exact(hash, signature, signer).map_err(MeterError::BadSignature);
        }
        let data = IERC1271::isValidSignatureCall { hash, signature: Bytes::copy_from_slice(signature) }
            .abi_encode();
        let out = self.call_raw(signer, data).await?;
        // SignatureChecker: at least 32 bytes, the first word exactly the selector, zero-padded
        let mut want = [0u8; 32];
        want[..4].copy_from_slice(&IERC1271::isValidSignatureCall::SELECTOR);
        if out.len() >= 32 && out[..32] == want {
            Ok(())
        } else {
            Err(MeterError::BadSignature("the smart account's isValidSignature (ERC-1271) refused it"))
        }
    }

    /// A single-use challenge for [`key_proof_message`].
    pub fn key_challenge(&self) -> String {
        self.challenges.issue()
    }

    /// Checks a permit, its signature and the caller's proof, then issues the one API key it
    /// gets. `claimed` is the (chain id, contract) the caller says it signed for. Nothing is
    /// recorded unless every check passes.
    pub async fn issue_key(
        &self,
        permit: PermitFields,
        signature: Bytes,
        claimed: Option<(u64, Address)>,
        proof: Proof<'_>,
        model: &ModelRef,
    ) -> Result<(String, B256), MeterError> {
        if let Some((chain_id, contract)) = claimed
            && (chain_id != self.config.chain_id || contract != self.config.payment_stream)
        {
            return Err(MeterError::WrongChain {
                chain_id,
                contract,
                expected_chain: self.config.chain_id,
                expected_contract: self.config.payment_stream,
            });
        }
        let hash = self.permit_hash(&permit);
        self.check_terms(&permit, model)?;
        self.verify_signature(permit.user, hash, &signature).await?;
        match proof {
            Proof::None => return Err(MeterError::ProofRequired(permit.user)),
            Proof::Session(token) => {
                if self.sessions.address(token) != Some(permit.user) {
                    return Err(MeterError::ProofRequired(permit.user));
                }
            }
            Proof::Challenge { nonce, signature } => {
                if !self.challenges.is_live(nonce) {
                    return Err(MeterError::BadProof("the challenge is unknown, used or expired".into()));
                }
                let message = key_proof_message(self.config.host.address(), hash, nonce);
                self.verify_signature(permit.user, eip191_hash_message(message.as_bytes()), signature)
                    .await
                    .map_err(|e| match e {
                        MeterError::BadSignature(why) => MeterError::BadProof(format!(
                            "the challenge was not signed by {}: {why}",
                            permit.user
                        )),
                        other => other,
                    })?;
                if !self.challenges.take(nonce) {
                    return Err(MeterError::BadProof("the challenge is unknown, used or expired".into()));
                }
            }
        }
        if self.revoked(hash).await? {
            return Err(MeterError::Revoked);
        }
        if let Some(code) = self.ledger.account(&hash).and_then(|a| a.rejected) {
            return Err(MeterError::Rejected(code));
        }
        let live = self.ledger.live_keys_of(permit.user, crate::now());
        if live >= self.config.max_keys_per_user {
            return Err(MeterError::TooManyKeys { user: permit.user, limit: self.config.max_keys_per_user });
        }
        // a stranger gets no state here: the key is for someone who may use the model and can
        // pay for at least one request with it
        let info = self.model_info(model.model_id).await?;
        if permit.user != info.owner {
            let tokens = self.token_info(info.access_token, permit.user).await?;
            if tokens.balance < tokens.access {
                return Err(MeterError::InsufficientTokens { have: tokens.balance, need: tokens.access });
            }
            let funds = self.funds_info(permit.user, permit.token).await?;
            let (price, _) = self.prices_in(&info, permit.token).await?;
            let committed = self.ledger.unsettled_of(permit.user, permit.token) + funds.pending_withdrawal;
            let available = funds.balance.saturating_sub(committed);
            if available < price || permit.max_amount < price {
                return Err(MeterError::InsufficientFunds {
                    available: available.min(permit.max_amount),
                    price,
                });
            }
        }
        let key = format!("div-{}", alloy::hex::encode(rand::random::<[u8; 24]>()));
        let account = PermitAccount::new(permit, signature, model.name.clone());
        if !self.ledger.register(hash, account, &key).await? {
            return Err(MeterError::Replayed);
        }
        Ok((key, hash))
    }

    /// The permit's terms that need no chain read: this host, this model, not expired.
    pub(crate) fn check_terms(&self, permit: &PermitFields, model: &ModelRef) -> Result<(), MeterError> {
        let host = self.config.host.address();
        if permit.host != host {
            return Err(MeterError::WrongHost { permit_host: permit.host, host });
        }
        if permit.model_id != model.model_id {
            return Err(MeterError::WrongModel { permit_model: permit.model_id, model: model.model_id });
        }
        if permit.expiry <= crate::now() {
            return Err(MeterError::Expired(permit.expiry));
        }
        Ok(())
    }

    /// The permit a key spends, with its account; refused when the contract rejected it.
    pub(crate) async fn resolve(
        &self,
        credential: Credential<'_>,
    ) -> Result<(B256, PermitAccount), MeterError> {
        match credential {
            Credential::None => Err(MeterError::MissingCredential),
            Credential::ApiKey(key) => {
                let hash = self.ledger.permit_of_key(key).await?.ok_or(MeterError::InvalidKey)?;
                let account = self.ledger.account(&hash).ok_or(MeterError::InvalidKey)?;
                if let Some(code) = account.rejected {
                    return Err(MeterError::Rejected(code));
                }
                Ok((hash, account))
            }
            Credential::Session(token) => {
                Err(self.sessions.address(token).map_or(MeterError::InvalidKey, MeterError::PermitRequired))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::SignerSync;
    use alloy::signers::local::PrivateKeySigner;

    /// The n of secp256k1.
    fn n() -> U256 {
        U256::from_be_bytes(HALF_N) * U256::from(2u64) + U256::from(1u64)
    }

    #[test]
    fn exactly_the_contracts_signatures_pass() -> Result<(), String> {
        let key = PrivateKeySigner::random();
        let hash = B256::repeat_byte(0x42);
        let sig = key.sign_hash_sync(&hash).map_err(|e| e.to_string())?;
        let good = sig.as_bytes().to_vec();
        assert_eq!(ecdsa_exact(hash, &good, key.address()), Ok(()));
        // v as 0/1
        let mut v01 = good.clone();
        v01[64] -= 27;
        assert!(ecdsa_exact(hash, &v01, key.address()).is_err(), "v ∈ {{0,1}}");
        // the high-s twin: s' = n − s, v flipped; recovers to the same address, but malleable
        let s = U256::from_be_slice(&good[32..64]);
        let mut high = good.clone();
        high[32..64].copy_from_slice(&(n() - s).to_be_bytes::<32>());
        high[64] = if good[64] == 27 { 28 } else { 27 };
        let twin = alloy::primitives::Signature::from_raw(&high).map_err(|e| e.to_string())?;
        assert_eq!(
            twin.recover_address_from_prehash(&hash).ok(),
            Some(key.address()),
            "the twin is valid math"
        );
        assert!(ecdsa_exact(hash, &high, key.address()).is_err(), "high s");
        // 64-byte compact (EIP-2098) and other lengths
        assert!(ecdsa_exact(hash, &good[..64], key.address()).is_err());
        assert!(ecdsa_exact(hash, &[good.clone(), vec![0]].concat(), key.address()).is_err());
        // another signer, another hash
        assert!(ecdsa_exact(hash, &good, Address::repeat_byte(1)).is_err());
        assert!(ecdsa_exact(B256::repeat_byte(1), &good, key.address()).is_err());
        Ok(())
    }
}
