//! Gas limits with a margin over the node's estimate.
//!
//! `eth_estimateGas` runs a transaction against the state and clock of the block being built
//! when it is asked; the transaction is mined a moment later. When its cost depends on the
//! clock the estimate can be short: `ModelAccessToken` keeps vote checkpoints by timestamp, and
//! a `buy` estimated in the second of the last checkpoint updates that checkpoint in place,
//! while the same `buy` mined in the next second writes a new one (~20 000 gas more) and runs
//! out of gas, a revert the user pays for. Wallets add a margin for this reason; so do we: gas
//! not used is not paid for, only the limit rises.

use alloy::network::{Network, TransactionBuilder};
use alloy::providers::fillers::{FillerControlFlow, GasFillable, GasFiller, TxFiller};
use alloy::providers::{Provider, SendableTx};
use alloy::transports::TransportResult;

/// The limit sent for an estimate of `estimate` gas: a quarter more, plus the cost of one new
/// storage slot (so a small transaction that writes one more slot than estimated still fits).
pub fn with_margin(estimate: u64) -> u64 {
    estimate.saturating_add(estimate / 4).saturating_add(25_000)
}

/// alloy's [`GasFiller`] (fees and the estimate), with [`with_margin`] on a limit it estimated.
/// A limit the caller set is sent as it is.
#[derive(Clone, Debug, Default)]
pub struct GasMarginFiller(GasFiller);

impl<N: Network> TxFiller<N> for GasMarginFiller {
    /// The inner filler's answer and whether the limit is an estimate.
    type Fillable = (GasFillable, bool);

    fn status(&self, tx: &N::TransactionRequest) -> FillerControlFlow {
        TxFiller::<N>::status(&self.0, tx)
    }

    fn fill_sync(&self, _tx: &mut SendableTx<N>) {}

    async fn prepare<P>(&self, provider: &P, tx: &N::TransactionRequest) -> TransportResult<Self::Fillable>
    where
        P: Provider<N>,
    {
        let estimated = tx.gas_limit().is_none();
        Ok((TxFiller::<N>::prepare(&self.0, provider, tx).await?, estimated))
    }

    async fn fill(
        &self,
        (fillable, estimated): Self::Fillable,
        tx: SendableTx<N>,
    ) -> TransportResult<SendableTx<N>> {
        let fillable = match fillable {
            GasFillable::Legacy { gas_limit, gas_price } if estimated => {
                GasFillable::Legacy { gas_limit: with_margin(gas_limit), gas_price }
            }
            GasFillable::Eip1559 { gas_limit, estimate } if estimated => {
                GasFillable::Eip1559 { gas_limit: with_margin(gas_limit), estimate }
            }
            other => other,
        };
        TxFiller::<N>::fill(&self.0, fillable, tx).await
    }
}

#[cfg(test)]
mod tests {
    use super::with_margin;

    #[test]
    fn the_margin_covers_a_new_storage_slot_and_a_quarter() {
        assert_eq!(with_margin(21_000), 21_000 + 5_250 + 25_000);
        assert_eq!(with_margin(200_000), 275_000);
        assert_eq!(with_margin(u64::MAX), u64::MAX);
    }
}
