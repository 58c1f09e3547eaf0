//! What can go wrong talking to the chain, and how a revert is told to a person: by the custom
//! error's name and arguments decoded from the contract's ABI, never as a raw hex blob.

use alloy::contract;
use alloy::primitives::Address;
use alloy::sol_types::SolInterface;

use crate::bindings::{
    DaoTimelock, DevStablecoin, ModelAccessToken, ModelGovernor, ModelVault, PaymentStream,
};

/// An error from a chain operation.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A call or transaction failed; the message carries the decoded revert reason if any.
    #[error("{what}: {reason}")]
    Contract {
        /// What we were doing.
        what: &'static str,
        /// The decoded custom error, or the RPC's message.
        reason: String,
    },
    /// The RPC endpoint could not be reached or answered nonsense.
    #[error("{what}: RPC error: {source}")]
    Rpc {
        /// What we were doing.
        what: &'static str,
        /// The transport's error.
        #[source]
        source: alloy::transports::TransportError,
    },
    /// A transaction was sent but its receipt never came.
    #[error("{what}: waiting for the receipt failed: {source}")]
    Pending {
        /// What we were doing.
        what: &'static str,
        /// The provider's error.
        #[source]
        source: alloy::providers::PendingTransactionError,
    },
    /// A transaction was mined but reverted.
    #[error("{what}: transaction {tx} reverted")]
    Reverted {
        /// What we were doing.
        what: &'static str,
        /// The transaction hash.
        tx: alloy::primitives::TxHash,
    },
    /// A contract creation receipt without an address.
    #[error("{what}: no contract address in the receipt")]
    NoContractAddress {
        /// What we were deploying.
        what: &'static str,
    },
    /// The signer failed.
    #[error("signing failed: {0}")]
    Signer(#[from] alloy::signers::Error),
    /// Reading or writing the address book failed.
    #[error("address book {path}: {source}")]
    AddressBook {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The address book is not valid JSON of the expected shape.
    #[error("address book {path}: {source}")]
    AddressBookFormat {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: serde_json::Error,
    },
    /// Something expected on chain is not there.
    #[error("no contract code at {address} ({what})")]
    NoCode {
        /// Which contract.
        what: &'static str,
        /// Where we looked.
        address: Address,
    },
}

impl ChainError {
    pub(crate) fn contract(what: &'static str) -> impl FnOnce(contract::Error) -> Self {
        move |e| ChainError::Contract { what, reason: revert_reason(&e) }
    }

    pub(crate) fn pending(
        what: &'static str,
    ) -> impl FnOnce(alloy::providers::PendingTransactionError) -> Self {
        move |source| ChainError::Pending { what, source }
    }

    pub(crate) fn rpc(what: &'static str) -> impl FnOnce(alloy::transports::TransportError) -> Self {
        move |source| ChainError::Rpc { what, source }
    }
}

/// A readable reason for a failed contract call: the custom error of any DIV contract (or of
/// OpenZeppelin's bases, which the ABIs include) by name with its arguments, else the RPC's text.
pub fn revert_reason(err: &contract::Error) -> String {
    if let Some(e) = err.as_decoded_interface_error::<PaymentStream::PaymentStreamErrors>() {
        return format!("{}", DebugName(&e));
    }
    if let Some(e) = err.as_decoded_interface_error::<ModelVault::ModelVaultErrors>() {
        return format!("{}", DebugName(&e));
    }
    if let Some(e) = err.as_decoded_interface_error::<ModelAccessToken::ModelAccessTokenErrors>() {
        return format!("{}", DebugName(&e));
    }
    if let Some(e) = err.as_decoded_interface_error::<DevStablecoin::DevStablecoinErrors>() {
        return format!("{}", DebugName(&e));
    }
    if let Some(e) = err.as_decoded_interface_error::<ModelGovernor::ModelGovernorErrors>() {
        return format!("{}", DebugName(&e));
    }
    if let Some(e) = err.as_decoded_interface_error::<DaoTimelock::DaoTimelockErrors>() {
        return format!("{}", DebugName(&e));
    }
    err.to_string()
}

/// Formats a decoded error enum as `Name { field: value, .. }` (the variant's Debug form,
/// which carries the Solidity error name and its arguments).
struct DebugName<'a, T>(&'a T);

impl<T: SolInterface + std::fmt::Debug> std::fmt::Display for DebugName<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `PaymentStreamErrors::HostMismatch(HostMismatch { caller: .., host: .. })` →
        // `HostMismatch { caller: .., host: .. }`
        let dbg = format!("{:?}", self.0);
        let inner =
            dbg.split_once('(').map(|(_, rest)| rest.strip_suffix(')').unwrap_or(rest)).unwrap_or(&dbg);
        f.write_str(inner)
    }
}
