// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {DevStablecoin} from "../../src/DevStablecoin.sol";
import {Fixture} from "../utils/Fixture.sol";
import {PaymentStreamHandler} from "./PaymentStreamHandler.sol";

/// @notice Whatever sequence of deposits, withdrawals, clock moves, settlements and revocations
/// happens: no unit is created or lost, no permit is charged past its cap, no charge is paid twice.
contract PaymentStreamInvariantTest is Fixture {
    PaymentStreamHandler internal handler;
    address internal secondPayout = makeAddr("secondPayout");

    function setUp() public override {
        super.setUp();
        bytes32[] memory modelIds = new bytes32[](2);
        modelIds[0] = modelId;
        modelIds[1] = registerModel(stranger, "second-model", address(accessToken), secondPayout);
        address[] memory payouts = new address[](2);
        payouts[0] = payout;
        payouts[1] = secondPayout;
        handler = new PaymentStreamHandler(stream, [usdc, usdfc], host, modelIds, payouts);

        // every actor starts with a balance in every token, so settlements succeed from the start
        for (uint256 a; a < handler.ACTORS(); ++a) {
            for (uint256 t; t < handler.TOKENS(); ++t) {
                handler.deposit(a, t, 200 * 10 ** handler.tokenAt(t).decimals());
            }
        }

        bytes4[] memory selectors = new bytes4[](10);
        selectors[0] = PaymentStreamHandler.deposit.selector;
        selectors[1] = PaymentStreamHandler.requestWithdraw.selector;
        selectors[2] = PaymentStreamHandler.cancelWithdraw.selector;
        selectors[3] = PaymentStreamHandler.withdraw.selector;
        selectors[4] = PaymentStreamHandler.warp.selector;
        selectors[5] = PaymentStreamHandler.settle.selector;
        selectors[6] = PaymentStreamHandler.settleBatch.selector;
        selectors[7] = PaymentStreamHandler.revoke.selector;
        selectors[8] = PaymentStreamHandler.claim.selector;
        selectors[9] = PaymentStreamHandler.settleOnAnotherChain.selector;
        targetContract(address(handler));
        targetSelector(FuzzSelector({addr: address(handler), selectors: selectors}));
    }

    /// @dev Σ deposits == Σ balances + Σ credits + Σ claimed + Σ withdrawn, the stream holds exactly
    /// Σ balances + Σ credits, Σ settled == Σ credits + Σ claimed, and each balance is what the ghost
    /// ledger says.
    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_fundsConserved() public view {
        for (uint256 t; t < handler.TOKENS(); ++t) {
            address token = address(handler.tokenAt(t));
            uint256 balances = handler.sumBalances(token);
            uint256 credits = handler.sumCredits(token);
            assertEq(
                handler.ghostDeposited(token),
                balances + credits + handler.ghostClaimed(token) + handler.ghostWithdrawn(token),
                "deposits != balances + credits + claimed + withdrawn"
            );
            assertEq(
                handler.ghostPaid(token),
                credits + handler.ghostClaimed(token),
                "settled != credits + claimed"
            );
            assertEq(
                DevStablecoin(token).balanceOf(address(stream)),
                balances + credits,
                "stream holds != balances + credits"
            );
            for (uint256 a; a < handler.ACTORS(); ++a) {
                address actor = handler.actorAt(a);
                assertEq(
                    stream.getBalance(actor, token), handler.ghostBalance(actor, token), "balance != ghost"
                );
            }
        }
        assertEq(handler.ghostOverWithdrawals(), 0, "a withdrawal or claim paid other than it should");
    }

    /// @dev Each permit's settled amount stays within its signed cap, and a model never earns
    /// (claimed + credited) more than the caps of the permits that pay it.
    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_payoutNeverExceedsCaps() public view {
        for (uint256 i; i < handler.entryCount(); ++i) {
            PaymentStreamHandler.Entry memory e = handler.entryAt(i);
            assertLe(
                stream.permitState(e.permitHash).settledAmount, e.permit.maxAmount, "settled > maxAmount"
            );
        }
        address[] memory payouts = handler.payoutAddresses();
        for (uint256 p; p < payouts.length; ++p) {
            for (uint256 t; t < handler.TOKENS(); ++t) {
                address token = address(handler.tokenAt(t));
                assertLe(handler.earned(p, token), handler.sumCaps(payouts[p], token), "earned > sum of caps");
            }
        }
    }

    /// @dev What a model earned (claimed to its payout + still credited) == Σ of the settled deltas
    /// the handler saw == Σ of the permits' `settledAmount`, and the payout received exactly what
    /// was claimed: no charge moved twice.
    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_nothingSettlesTwice() public view {
        // a permit replayed under another chain id never paid (the settled sums below also show
        // it moved nothing: they match what settled on this chain alone)
        assertEq(handler.ghostCrossChainSettlements(), 0, "a permit settled on another chain");
        for (uint256 i; i < handler.entryCount(); ++i) {
            PaymentStreamHandler.Entry memory e = handler.entryAt(i);
            assertEq(
                handler.ghostSettled(e.permitHash),
                stream.permitState(e.permitHash).settledAmount,
                "ghost settled != settledAmount"
            );
        }
        address[] memory payouts = handler.payoutAddresses();
        for (uint256 p; p < payouts.length; ++p) {
            for (uint256 t; t < handler.TOKENS(); ++t) {
                address token = address(handler.tokenAt(t));
                uint256 earned = handler.earned(p, token);
                assertEq(earned, handler.ghostPaidTo(payouts[p], token), "earned != ghost deltas");
                assertEq(earned, handler.sumSettled(payouts[p], token), "earned != sum of settledAmount");
                assertEq(
                    DevStablecoin(token).balanceOf(payouts[p]),
                    handler.ghostClaimedTo(payouts[p], token),
                    "received != claimed"
                );
            }
        }
    }
}
