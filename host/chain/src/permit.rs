//! EIP-712 spending permits, signed exactly as `PaymentStream` verifies them.
//!
//! A user signs one `SpendingPermit{user, modelId, host, token, maxAmount, expiry, nonce}` for a
//! (model, host) pair; the host may then settle cumulative charges up to `maxAmount`. The domain
//! is `("DIV PaymentStream", "1", chainId, PaymentStream proxy)`, so a signature is worthless on
//! another chain or contract.

use alloy::primitives::{Address, B256, Bytes};
use alloy::signers::Signer;
use alloy::sol_types::{Eip712Domain, SolStruct, eip712_domain};

pub use crate::bindings::IPaymentStream::SpendingPermit;
use crate::error::ChainError;

/// The EIP-712 domain of the `PaymentStream` at `payment_stream` on `chain_id`.
pub fn permit_domain(chain_id: u64, payment_stream: Address) -> Eip712Domain {
    eip712_domain! {
        name: "DIV PaymentStream",
        version: "1",
        chain_id: chain_id,
        verifying_contract: payment_stream,
    }
}

impl SpendingPermit {
    /// The digest the user signs and the contract's `hashPermit` returns.
    pub fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        self.eip712_signing_hash(domain)
    }
}

/// Signs `permit` with `signer` (which must be `permit.user`) and returns the 65-byte signature.
pub async fn sign_permit<S: Signer + Sync>(
    signer: &S,
    permit: &SpendingPermit,
    domain: &Eip712Domain,
) -> Result<Bytes, ChainError> {
    let sig = signer.sign_hash(&permit.signing_hash(domain)).await?;
    Ok(Bytes::from(sig.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{U256, address, b256};
    use alloy::signers::local::PrivateKeySigner;

    fn permit(user: Address) -> SpendingPermit {
        SpendingPermit {
            user,
            modelId: b256!("0101010101010101010101010101010101010101010101010101010101010101"),
            host: address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
            token: address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
            maxAmount: U256::from(1_000_000u64),
            expiry: 1_900_000_000,
            nonce: U256::from(7u64),
        }
    }

    #[tokio::test]
    async fn signature_recovers_to_the_user_and_binds_the_domain() -> Result<(), Box<dyn std::error::Error>> {
        let signer = PrivateKeySigner::random();
        let p = permit(signer.address());
        let domain = permit_domain(31337, Address::repeat_byte(9));
        let sig = sign_permit(&signer, &p, &domain).await?;
        assert_eq!(sig.len(), 65);
        let parsed = alloy::primitives::Signature::try_from(sig.as_ref())?;
        assert_eq!(parsed.recover_address_from_prehash(&p.signing_hash(&domain))?, signer.address());
        // another chain, another contract or another field gives another digest
        assert_ne!(p.signing_hash(&domain), p.signing_hash(&permit_domain(1, Address::repeat_byte(9))));
        assert_ne!(p.signing_hash(&domain), p.signing_hash(&permit_domain(31337, Address::repeat_byte(8))));
        let mut q = p.clone();
        q.maxAmount += U256::from(1u64);
        assert_ne!(p.signing_hash(&domain), q.signing_hash(&domain));
        Ok(())
    }
}
