//! Why a request was refused or could not be metered: one variant per cause a caller can act on
//! (the API maps each to one HTTP status and one stable code).

use alloy::primitives::{Address, B256, U256};

/// Why a request was refused or could not be metered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeterError {
    /// No credential.
    #[error("this model is paid: send `Authorization: Bearer <key>` (get a key with POST /v1/keys)")]
    MissingCredential,
    /// An API key this host did not issue.
    #[error("unknown API key")]
    InvalidKey,
    /// A signed-in session, but paid inference needs a permit.
    #[error("signed in as {0}, but this model is paid: sign a spending permit (POST /v1/keys)")]
    PermitRequired(Address),
    /// The permit's signature is not one `PaymentStream` accepts from the permit's user.
    #[error("the permit signature is not a valid signature of the permit's user ({0})")]
    BadSignature(&'static str),
    /// `POST /v1/keys` without proof that the caller controls the permit's user.
    #[error(
        "a permit alone does not get a key: prove you are {0} by signing the challenge from \
         GET /v1/keys/challenge (field `proof`), or sign in with Ethereum as that address"
    )]
    ProofRequired(Address),
    /// The proof was not signed by the permit's user, or its challenge is unknown or used.
    #[error("the key proof is not valid: {0}")]
    BadProof(String),
    /// The permit was signed for another chain or contract.
    #[error(
        "the permit is for chain {chain_id} / {contract}; this host settles on chain {expected_chain} / {expected_contract}"
    )]
    WrongChain {
        /// The chain the caller says they signed for.
        chain_id: u64,
        /// The contract they say they signed for.
        contract: Address,
        /// Ours.
        expected_chain: u64,
        /// Ours.
        expected_contract: Address,
    },
    /// The permit names another host.
    #[error("the permit is for host {permit_host}; this host is {host}")]
    WrongHost {
        /// In the permit.
        permit_host: Address,
        /// This host.
        host: Address,
    },
    /// The permit is for another model.
    #[error("the permit is for model {permit_model}, not {model}")]
    WrongModel {
        /// In the permit.
        permit_model: B256,
        /// Asked for.
        model: B256,
    },
    /// Past its expiry.
    #[error("the permit expired at {0}")]
    Expired(u64),
    /// Revoked by its user.
    #[error("the permit was revoked by its user")]
    Revoked,
    /// `PaymentStream` refused the permit at settlement (its `SkipReason`): its key is disabled.
    #[error("PaymentStream refused this permit at settlement ({}); sign a new permit", skip_reason(*.0))]
    Rejected(u8),
    /// A permit that already has its key.
    #[error("this permit already has an API key; sign a new permit (another nonce) for another key")]
    Replayed,
    /// Too many live keys for one user on this host.
    #[error("{user} already has {limit} unexpired API keys on this host; let one expire or revoke it")]
    TooManyKeys {
        /// The user.
        user: Address,
        /// The limit.
        limit: usize,
    },
    /// Not enough of the access token.
    #[error("holding {} of the model's access token; {} needed", tokens(*have), tokens(*need))]
    InsufficientTokens {
        /// Balance.
        have: U256,
        /// Threshold.
        need: U256,
    },
    /// Batches need the premium tier.
    #[error("batches of more than {max} inputs need {} access tokens (premium); holding {}", tokens(*need), tokens(*have))]
    PremiumRequired {
        /// Largest batch without premium.
        max: usize,
        /// Balance.
        have: U256,
        /// Premium threshold.
        need: U256,
    },
    /// The permit's cap would be passed.
    #[error("the permit's cap of {cap} is reached ({charged} charged, {price} more needed)")]
    OverCap {
        /// The cap.
        cap: U256,
        /// Charged and reserved so far.
        charged: U256,
        /// This request's price.
        price: U256,
    },
    /// The deposit does not cover the price.
    #[error("deposit {available} available after unsettled charges; {price} needed")]
    InsufficientFunds {
        /// What is left.
        available: U256,
        /// Price.
        price: U256,
    },
    /// Too many requests.
    #[error("rate limit of {per_sec} requests/s reached")]
    RateLimited {
        /// The limit.
        per_sec: u32,
    },
    /// The chain cannot be read and nothing is known about this caller.
    #[error("the chain cannot be read: {0}")]
    ChainUnavailable(String),
    /// The ledger cannot record charges.
    #[error("the charge ledger: {0}")]
    Ledger(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// `PaymentStream.SkipReason` in words.
pub fn skip_reason(code: u8) -> &'static str {
    match code {
        1 => "HostMismatch",
        2 => "Expired",
        3 => "Revoked",
        4 => "BadSignature",
        5 => "OverCap",
        6 => "NothingToSettle",
        7 => "InsufficientBalance",
        8 => "RequestCountDecreased",
        9 => "ModelNotFound",
        10 => "HostNotAuthorized",
        _ => "unknown reason",
    }
}

/// An access-token amount (18 decimals) as people write it: `1`, `0.5`, `1000`.
pub(crate) fn tokens(v: U256) -> String {
    let unit = U256::from(10u64).pow(U256::from(18u64));
    let (whole, frac) = (v / unit, v % unit);
    if frac.is_zero() {
        return whole.to_string();
    }
    let f = format!("{frac:0>18}");
    format!("{whole}.{}", f.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_token_amounts_read_as_whole_tokens() {
        let e18 = U256::from(10u64).pow(U256::from(18u64));
        assert_eq!(tokens(U256::ZERO), "0");
        assert_eq!(tokens(e18), "1");
        assert_eq!(tokens(e18 * U256::from(1000u64)), "1000");
        assert_eq!(tokens(e18 / U256::from(2u64)), "0.5");
        assert_eq!(tokens(U256::from(1u64)), "0.000000000000000001");
        let e = MeterError::InsufficientTokens { have: U256::ZERO, need: e18 };
        assert_eq!(e.to_string(), "holding 0 of the model's access token; 1 needed");
        assert!(MeterError::Rejected(4).to_string().contains("BadSignature"));
    }
}
