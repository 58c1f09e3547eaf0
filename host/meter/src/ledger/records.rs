//! What the ledger records: a permit with its charged and settled totals, each charge, and the
//! sums the host reports.

use alloy::primitives::{Address, B256, Bytes, U256};
use div_chain::SpendingPermit;
use serde::{Deserialize, Serialize};

/// A permit as the ledger keeps it, with what has been charged and settled on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermitAccount {
    /// The signed permit.
    pub permit: PermitFields,
    /// The user's signature (hex).
    pub signature: Bytes,
    /// The model's name on this host.
    pub model: String,
    /// Total charged so far (base units).
    pub charged_amount: U256,
    /// Requests charged so far.
    pub charged_requests: u64,
    /// What `PaymentStream` has settled (as last read back).
    pub settled_amount: U256,
    /// Requests settled.
    pub settled_requests: u64,
    /// The contract refused this permit for good (its `SkipReason`): its key is disabled and it
    /// is not sent again.
    #[serde(default)]
    pub rejected: Option<u8>,
}

impl PermitAccount {
    /// A permit with nothing charged yet.
    pub fn new(permit: PermitFields, signature: Bytes, model: String) -> Self {
        Self {
            permit,
            signature,
            model,
            charged_amount: U256::ZERO,
            charged_requests: 0,
            settled_amount: U256::ZERO,
            settled_requests: 0,
            rejected: None,
        }
    }

    /// Charged but not yet settled.
    pub fn unsettled(&self) -> U256 {
        self.charged_amount.saturating_sub(self.settled_amount)
    }

    /// Requests charged but not yet settled.
    pub fn unsettled_requests(&self) -> u64 {
        self.charged_requests.saturating_sub(self.settled_requests)
    }

    /// The signature a settlement sends: none once the chain has settled the permit before (the
    /// contract checks it only at the first settlement, and leaving its ~100 bytes of calldata
    /// out saves ~1.5k gas per permit and round).
    pub fn settlement_signature(&self) -> Bytes {
        if self.settled_before() { Bytes::new() } else { self.signature.clone() }
    }

    /// Whether the chain had settled this permit (as last read back): its stored state then
    /// proves the signature.
    pub fn settled_before(&self) -> bool {
        !self.settled_amount.is_zero() || self.settled_requests != 0
    }

    /// Whether settlement has something to send for it.
    pub fn settleable(&self) -> bool {
        self.rejected.is_none() && self.charged_amount > self.settled_amount
    }
}

/// What one host's ledger holds for one model, summed over its permits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelUsage {
    /// Permits seen for the model.
    pub permits: u64,
    /// Charged in total.
    pub charged_amount: U256,
    /// Requests charged.
    pub charged_requests: u64,
    /// Settled on chain (as last read back).
    pub settled_amount: U256,
    /// Requests settled.
    pub settled_requests: u64,
}

/// `SpendingPermit`'s fields in a serialisable form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermitFields {
    /// Who pays.
    pub user: Address,
    /// For which model.
    pub model_id: B256,
    /// Which host may charge.
    pub host: Address,
    /// In which stablecoin.
    pub token: Address,
    /// The most the host may ever charge.
    pub max_amount: U256,
    /// Unix time after which it cannot be used.
    pub expiry: u64,
    /// Distinguishes permits with equal fields.
    pub nonce: U256,
}

impl From<&PermitFields> for SpendingPermit {
    fn from(p: &PermitFields) -> Self {
        SpendingPermit {
            user: p.user,
            modelId: p.model_id,
            host: p.host,
            token: p.token,
            maxAmount: p.max_amount,
            expiry: p.expiry,
            nonce: p.nonce,
        }
    }
}

/// One charged request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Journal position.
    pub seq: u64,
    /// The host's id for the request (unique; what the receipt signs).
    pub request_id: String,
    /// The id the client sent in `x-request-id`, if any (not unique: the client chooses it).
    #[serde(default)]
    pub client_request_id: Option<String>,
    /// The permit charged.
    pub permit_hash: B256,
    /// This request's price.
    pub amount: U256,
    /// The permit's total after this charge.
    pub cumulative_amount: U256,
    /// The permit's request count after this charge.
    pub cumulative_requests: u64,
    /// Unix seconds.
    pub at: u64,
}

/// The host's totals, kept as charges and settlements land.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Charged and not settled, across every permit.
    pub unsettled_amount: U256,
    /// Requests charged and not settled.
    pub unsettled_requests: u64,
    /// Permits recorded.
    pub permits: u64,
}
