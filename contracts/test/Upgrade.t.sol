// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {DivProxy} from "../src/DivProxy.sol";
import {ModelVault} from "../src/ModelVault.sol";
import {PaymentStream} from "../src/PaymentStream.sol";
import {IModelVault} from "../src/interfaces/IModelVault.sol";
import {IPaymentStream} from "../src/interfaces/IPaymentStream.sol";
import {Fixture} from "./utils/Fixture.sol";

/// @notice The released contracts (v1: each settlement called the vault and paid the payout) are
/// used, then upgraded in place to the contracts in `src/` (v2: settlement credits the model,
/// `claim` pays). Every stored balance, permit state, pending withdrawal, setting and model
/// survives, settlement continues from the stored cumulative totals without paying anything twice,
/// and the inference count continues from the vault's.
///
/// Order of the upgrade (documented in contracts/README.md): the payment stream first, then the
/// vault. A v1 stream calls `recordInferences`, which the v2 vault no longer has, and a v2 vault's
/// `getModel` reads `inferencesOf`, which a v1 stream does not have.
contract UpgradeFromV1Test is Fixture {
    uint256 internal constant DEPOSIT = 100e6;

    IPaymentStream.SpendingPermit internal permit;
    bytes internal sig;
    bytes32 internal permitHash;
    IPaymentStream.SpendingPermit internal revoked;
    bytes32 internal secondModel;
    address internal secondPayout = makeAddr("secondPayout");

    /// @dev The released (v1) vault and stream behind proxies, instead of the fixture's v2 ones.
    function setUp() public override {
        super.setUp();
        vault = ModelVault(
            address(
                new DivProxy(
                    _deployLegacy("test/legacy/ModelVault.v1.json"),
                    abi.encodeCall(ModelVault.initialize, (governance))
                )
            )
        );
        stream = PaymentStream(
            address(
                new DivProxy(
                    _deployLegacy("test/legacy/PaymentStream.v1.json"),
                    abi.encodeCall(
                        PaymentStream.initialize,
                        (governance, vault, twoTokens(address(usdc), address(usdfc)))
                    )
                )
            )
        );
        vm.prank(governance);
        vault.setPaymentStream(address(stream));
        modelId = registerModel(modelOwner, MODEL_NAME, address(accessToken), payout);
        secondModel = registerModel(stranger, "second", address(accessToken), secondPayout);
        vm.prank(modelOwner);
        vault.authorizeHost(modelId, host);
        vm.prank(stranger);
        vault.authorizeHost(secondModel, host);

        fund(user, usdc, DEPOSIT);
        fund(otherUser, usdfc, 4e18);
        permit = permitFor(user, address(usdc), 50e6);
        sig = signPermit(USER_KEY, permit);
        permitHash = stream.hashPermit(permit);
        revoked = permitFor(user, address(usdc), 50e6);
        revoked.nonce = 1;
    }

    function _deployLegacy(string memory artifact) internal returns (address impl) {
        bytes memory code = vm.getCode(artifact);
        assembly ("memory-safe") {
            impl := create(0, add(code, 0x20), mload(code))
        }
        assertTrue(impl != address(0)); // the legacy bytecode deployed
    }

    function _settle(IPaymentStream.SpendingPermit memory p, bytes memory s, uint128 amount, uint64 requests)
        internal
        returns (uint256)
    {
        vm.prank(host);
        return stream.settle(p, s, amount, requests);
    }

    function test_upgradeFromV1_keepsEverythingAndSettlesOnWithoutPayingTwice() public {
        // ---- v1 in use
        assertEq(_settle(permit, sig, 10e6, 3), 10e6);
        assertEq(usdc.balanceOf(payout), 10e6, "v1 paid the payout at settlement");
        IPaymentStream.SpendingPermit memory second = permitFor(user, address(usdc), 50e6);
        second.modelId = secondModel;
        second.nonce = 2;
        _settle(second, signPermit(USER_KEY, second), 4e6, 4);
        assertEq(vault.getModel(modelId).totalInferences, 3);
        assertEq(vault.getModel(secondModel).totalInferences, 4);
        bytes32 revokedHash = stream.hashPermit(revoked);
        uint64 revokedAt = storeStateToKeep(revoked);

        // ---- the upgrade: the stream first, then the vault
        address streamV1 = implementationOf(address(stream));
        vm.startPrank(governance);
        stream.upgradeToAndCall(address(new PaymentStream()), "");
        vault.upgradeToAndCall(address(new ModelVault()), "");
        vm.stopPrank();
        assertTrue(implementationOf(address(stream)) != streamV1);

        // ---- everything stored survived
        assertEq(stream.owner(), governance);
        assertEq(vault.owner(), governance);
        assertEq(stream.vault(), address(vault));
        assertEq(vault.paymentStream(), address(stream));
        assertEq(stream.settleGrace(), 2 hours);
        assertEq(stream.withdrawDelay(), 3 hours);
        assertTrue(stream.isTokenAllowed(address(usdc)));
        assertFalse(stream.isTokenAllowed(address(usdfc)));
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 14e6);
        assertEq(stream.getBalance(otherUser, address(usdfc)), 4e18);
        // same EIP-712 domain: permits signed before the upgrade stay valid
        assertEq(stream.hashPermit(permit), permitHash);
        IPaymentStream.PermitState memory st = stream.permitState(permitHash);
        assertEq(st.settledAmount, 10e6);
        assertEq(st.settledRequests, 3);
        assertEq(stream.permitState(revokedHash).revokedAt, revokedAt);
        (uint256 pending, uint64 readyAt) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(pending, 20e6);
        assertEq(readyAt, revokedAt + 1 hours);
        assertEq(vault.modelCount(), 2);
        IModelVault.Model memory m = vault.getModel(modelId);
        assertEq(m.owner, modelOwner);
        assertEq(m.payout, payout);
        assertEq(m.totalInferences, 3, "the vault's v1 count carries over");
        // a v1 authorisation takes effect again once the host has registered (v2), and settling
        // what it served never needed it
        assertFalse(vault.isHostAuthorized(modelId, host));
        assertTrue(vault.wasHostAuthorized(modelId, host));
        registerHost(host, HOST_URL);
        assertTrue(vault.isHostAuthorized(modelId, host));
        assertEq(stream.claimable(modelId, address(usdc)), 0, "v1 paid as it settled: no credit");

        // ---- settlement continues from the stored totals: only the difference is credited
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToSettle.selector, permitHash, 10e6, 10e6)
        );
        _settle(permit, sig, 10e6, 3);
        assertEq(_settle(permit, "", 15e6, 5), 5e6);
        assertEq(stream.claimable(modelId, address(usdc)), 5e6);
        assertEq(vault.getModel(modelId).totalInferences, 5, "v1 count + v2 count");
        assertEq(stream.claim(modelId, address(usdc)), 5e6);
        assertEq(usdc.balanceOf(payout), 15e6, "payout received exactly the permit's settledAmount");

        // a new permit's first settlement still checks the host against the upgraded vault
        IPaymentStream.SpendingPermit memory fresh = permitFor(user, address(usdc), 50e6);
        fresh.nonce = 3;
        fresh.host = otherHost;
        bytes memory freshSig = signPermit(USER_KEY, fresh);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.HostNotAuthorized.selector, modelId, otherHost));
        vm.prank(otherHost);
        stream.settle(fresh, freshSig, 1e6, 1);

        // the revoked permit stays revoked, the pending withdrawal pays what is left
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.AlreadyRevoked.selector, revokedHash));
        vm.prank(user);
        stream.revokePermit(revoked);
        vm.warp(readyAt);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 20e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 15e6 - 4e6 - 20e6);
        assertEq(usdc.balanceOf(address(stream)), stream.getBalance(user, address(usdc)));
    }
}
