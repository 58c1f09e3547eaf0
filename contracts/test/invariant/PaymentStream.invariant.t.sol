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

        bytes4[] memory selectors = new bytes4[](8);
        selectors[0] = PaymentStreamHandler.deposit.selector;
        selectors[1] = PaymentStreamHandler.requestWithdraw.selector;
        selectors[2] = PaymentStreamHandler.cancelWithdraw.selector;
        selectors[3] = PaymentStreamHandler.withdraw.selector;
        selectors[4] = PaymentStreamHandler.warp.selector;
        selectors[5] = PaymentStreamHandler.settle.selector;
        selectors[6] = PaymentStreamHandler.settleBatch.selector;
        selectors[7] = PaymentStreamHandler.revoke.selector;
        targetContract(address(handler));
        targetSelector(FuzzSelector({addr: address(handler), selectors: selectors}));
    }

    /// @dev Σ deposits == Σ balances + Σ paid to payouts + Σ withdrawn, the stream holds exactly
    /// Σ balances, and each balance is what the ghost ledger says.
    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_fundsConserved() public view {
        for (uint256 t; t < handler.TOKENS(); ++t) {
            address token = address(handler.tokenAt(t));
            uint256 balances = handler.sumBalances(token);
            assertEq(
                handler.ghostDeposited(token),
                balances + handler.ghostPaid(token) + handler.ghostWithdrawn(token),
                "deposits != balances + paid + withdrawn"
            );
            assertEq(
                DevStablecoin(token).balanceOf(address(stream)), balances, "stream holds != sum of balances"
            );
            for (uint256 a; a < handler.ACTORS(); ++a) {
                address actor = handler.actorAt(a);
                assertEq(
                    stream.getBalance(actor, token), handler.ghostBalance(actor, token), "balance != ghost"
                );
            }
        }
        assertEq(handler.ghostOverWithdrawals(), 0, "a withdrawal paid more than asked or held");
    }

    /// @dev Each permit's settled amount stays within its signed cap, and a payout never holds
    /// more than the caps of the permits that pay it.
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
                DevStablecoin token = handler.tokenAt(t);
                assertLe(
                    token.balanceOf(payouts[p]),
                    handler.sumCaps(payouts[p], address(token)),
                    "payout > sum of caps"
                );
            }
        }
    }

    /// @dev What a payout received == Σ of the settled deltas the handler saw == Σ of the
    /// permits' `settledAmount`: no charge moved twice.
    /// forge-config: default.invariant.fail-on-revert = true
    function invariant_nothingSettlesTwice() public view {
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
                uint256 received = DevStablecoin(token).balanceOf(payouts[p]);
                assertEq(received, handler.ghostPaidTo(payouts[p], token), "received != ghost deltas");
                assertEq(received, handler.sumSettled(payouts[p], token), "received != sum of settledAmount");
            }
        }
    }
}
