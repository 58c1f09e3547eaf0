//! The address book: where one deployment of DIV lives. `div dev` and `div deploy` write it as
//! JSON; the host, the custodians, the web app and scripts read it.

use std::path::Path;

use alloy::primitives::{Address, U256};
use serde::{Deserialize, Serialize};

use crate::error::ChainError;

/// One deployment of the DIV contracts on one chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    /// The chain's id (31337 for anvil).
    pub chain_id: u64,
    /// The JSON-RPC endpoint it was deployed through.
    pub rpc_url: String,
    /// Who deployed it and governs the upgradeable contracts.
    pub governance: Address,
    /// `ModelVault` (proxy).
    pub model_vault: Address,
    /// `PaymentStream` (proxy).
    pub payment_stream: Address,
    /// The `ModelAccessToken` implementation every model's token proxy points at.
    pub access_token_implementation: Address,
    /// Stablecoins `PaymentStream` accepts, by symbol.
    pub stablecoins: Vec<Stablecoin>,
    /// The block the deployment finished in (hosts follow events from here).
    pub deployed_at_block: u64,
}

/// A stablecoin accepted for deposits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stablecoin {
    /// e.g. "USDC".
    pub symbol: String,
    /// The token contract.
    pub address: Address,
    /// Its decimals (6 for USDC, 18 for USDFC).
    pub decimals: u8,
    /// Whether this deployment created it as a local stand-in (`DevStablecoin`).
    pub dev: bool,
}

impl Stablecoin {
    /// `whole` tokens in base units.
    pub fn units(&self, whole: u64) -> U256 {
        U256::from(whole) * U256::from(10u64).pow(U256::from(self.decimals))
    }
}

impl Deployment {
    /// The stablecoin with this symbol.
    pub fn stablecoin(&self, symbol: &str) -> Option<&Stablecoin> {
        self.stablecoins.iter().find(|s| s.symbol.eq_ignore_ascii_case(symbol))
    }

    /// Reads an address book.
    pub fn load(path: &Path) -> Result<Self, ChainError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ChainError::AddressBook { path: path.display().to_string(), source })?;
        serde_json::from_str(&text)
            .map_err(|source| ChainError::AddressBookFormat { path: path.display().to_string(), source })
    }

    /// Writes the address book atomically (temp file + rename), creating the folder.
    pub fn save(&self, path: &Path) -> Result<(), ChainError> {
        let io = |source| ChainError::AddressBook { path: path.display().to_string(), source };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let text = serde_json::to_string_pretty(self)
            .map_err(|source| ChainError::AddressBookFormat { path: path.display().to_string(), source })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() -> Result<(), ChainError> {
        let d = Deployment {
            chain_id: 31337,
            rpc_url: "http://127.0.0.1:8545".into(),
            governance: Address::repeat_byte(1),
            model_vault: Address::repeat_byte(2),
            payment_stream: Address::repeat_byte(3),
            access_token_implementation: Address::repeat_byte(4),
            stablecoins: vec![Stablecoin {
                symbol: "USDC".into(),
                address: Address::repeat_byte(5),
                decimals: 6,
                dev: true,
            }],
            deployed_at_block: 7,
        };
        let dir = std::env::temp_dir().join(format!("div-addr-{}", std::process::id()));
        let path = dir.join("addresses.json");
        d.save(&path)?;
        let back = Deployment::load(&path)?;
        assert_eq!(back, d);
        assert_eq!(back.stablecoin("usdc").map(|s| s.units(2)), Some(U256::from(2_000_000u64)));
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ChainError::AddressBook { path: path.display().to_string(), source })?;
        assert!(text.contains("\"paymentStream\""), "camelCase keys for the web app: {text}");
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    #[test]
    fn a_broken_file_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("div-addr-bad-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("addresses.json");
        let _ = std::fs::write(&path, "{not json");
        let err = Deployment::load(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("addresses.json"), "{err}");
        let missing =
            Deployment::load(&dir.join("nope.json")).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(missing.contains("nope.json"), "{missing}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
