// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {PaymentStream} from "../src/PaymentStream.sol";
import {IPaymentStream} from "../src/interfaces/IPaymentStream.sol";
import {Fixture} from "./utils/Fixture.sol";

/// @notice Property tests of settlement: what a signature binds, the time windows, the cap and
/// the race between a withdrawal and a settlement.
contract PaymentStreamFuzzTest is Fixture {
    uint256 internal constant DEPOSIT = 1_000e6;

    PaymentStream internal secondStream;

    function setUp() public override {
        super.setUp();
        fund(user, usdc, DEPOSIT);
        // the same code and configuration at another address
        secondStream = deployStream(governance, vault, twoTokens(address(usdc), address(usdfc)));
        fund(secondStream, user, usdc, DEPOSIT);
    }

    /// @dev What the fixture's model earned in USDC: paid out by claims plus still to claim.
    function _earned() internal view returns (uint256) {
        return usdc.balanceOf(payout) + stream.claimable(modelId, address(usdc));
    }

    function _settle(
        IPaymentStream.SpendingPermit memory p,
        bytes memory sig,
        uint128 amount,
        uint64 requests
    ) internal returns (uint256) {
        vm.prank(p.host);
        return stream.settle(p, sig, amount, requests);
    }

    function _invalidSignature(bytes32 h) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, h);
    }

    // ------------------------------------------------------------ signatures

    function testFuzz_settle_rejectsHighSSignature(uint256 keySeed, uint256 amount) public {
        uint256 key = bound(keySeed, 1, SECP256K1_N - 1);
        address signer = vm.addr(key);
        amount = bound(amount, 1, 1e12);
        fund(signer, usdc, amount);
        IPaymentStream.SpendingPermit memory p = permitFor(signer, address(usdc), amount);
        bytes32 h = stream.hashPermit(p);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, h);

        // the mirrored signature (s' = n - s, v flipped) is a valid secp256k1 signature of the signer
        bytes32 sHigh = bytes32(SECP256K1_N - uint256(s));
        uint8 vHigh = v == 27 ? 28 : 27;
        assertEq(ecrecover(h, vHigh, r, sHigh), signer);

        vm.expectRevert(_invalidSignature(h));
        _settle(p, abi.encodePacked(r, sHigh, vHigh), u128(amount), 1);

        assertEq(_settle(p, abi.encodePacked(r, s, v), u128(amount), 1), amount);
        assertEq(_earned(), amount);
    }

    function testFuzz_settle_rejectsReplayOnAnotherChain(uint256 newChainId, uint256 amount) public {
        newChainId = bound(newChainId, 1, type(uint64).max);
        vm.assume(newChainId != block.chainid);
        amount = bound(amount, 1, DEPOSIT);
        uint256 originalChainId = block.chainid;
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), amount);
        bytes memory sig = signPermit(USER_KEY, p);
        bytes32 original = stream.hashPermit(p);

        vm.chainId(newChainId);
        bytes32 replayed = stream.hashPermit(p);
        assertTrue(replayed != original);
        vm.expectRevert(_invalidSignature(replayed));
        _settle(p, sig, u128(amount), 1);

        vm.chainId(originalChainId);
        assertEq(_settle(p, sig, u128(amount), 1), amount);
    }

    function testFuzz_settle_rejectsReplayOnAnotherContract(uint256 amount, uint256 nonce) public {
        amount = bound(amount, 1, DEPOSIT);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), amount);
        p.nonce = nonce;
        bytes memory sig = signPermit(USER_KEY, p);
        bytes32 replayed = secondStream.hashPermit(p);
        assertTrue(replayed != stream.hashPermit(p));

        vm.expectRevert(_invalidSignature(replayed));
        vm.prank(host);
        secondStream.settle(p, sig, u128(amount), 1);
        assertEq(secondStream.getBalance(user, address(usdc)), DEPOSIT);

        assertEq(_settle(p, sig, u128(amount), 1), amount);
    }

    /// @dev Every field of the permit is signed: changing any one of them (keeping the other
    /// checks satisfied) turns the signature invalid.
    function testFuzz_settle_rejectsAnyChangedField(uint256 field, uint256 seed) public {
        field = bound(field, 0, 6);
        IPaymentStream.SpendingPermit memory signed = permitFor(user, address(usdc), 100e6);
        bytes memory sig = signPermit(USER_KEY, signed);
        // a fresh copy (assigning `signed` would alias the same memory)
        IPaymentStream.SpendingPermit memory p = IPaymentStream.SpendingPermit(
            signed.user,
            signed.modelId,
            signed.host,
            signed.token,
            signed.maxAmount,
            signed.expiry,
            signed.nonce
        );
        uint128 amount = 10e6;
        if (field == 0) {
            p.user = address(uint160(bound(seed, 1, type(uint160).max)));
            if (p.user == signed.user) p.user = address(uint160(signed.user) ^ 1);
        } else if (field == 1) {
            p.modelId = bytes32(seed);
            if (p.modelId == signed.modelId) p.modelId = bytes32(seed ^ 1);
        } else if (field == 2) {
            p.host = address(uint160(bound(seed, 1, type(uint160).max)));
            if (p.host == signed.host) p.host = address(uint160(signed.host) ^ 1);
        } else if (field == 3) {
            p.token = address(uint160(bound(seed, 1, type(uint160).max)));
            if (p.token == signed.token) p.token = address(uint160(signed.token) ^ 1);
        } else if (field == 4) {
            p.maxAmount = bound(seed, amount, type(uint256).max);
            if (p.maxAmount == signed.maxAmount) p.maxAmount = signed.maxAmount + 1;
        } else if (field == 5) {
            p.expiry = uint64(bound(seed, block.timestamp, type(uint64).max));
            if (p.expiry == signed.expiry) p.expiry = signed.expiry + 1;
        } else {
            p.nonce = seed;
            if (p.nonce == signed.nonce) p.nonce = signed.nonce + 1;
        }
        bytes32 h = stream.hashPermit(p);
        vm.expectRevert(_invalidSignature(h));
        _settle(p, sig, amount, 1);
        assertEq(stream.permitState(h).settledAmount, 0);
        assertEq(_earned(), 0);
    }

    // ------------------------------------------------------------ time windows

    function testFuzz_settle_expiryBoundary(uint256 lifetime, uint256 grace, uint256 lateness) public {
        grace = bound(grace, 0, 30 days);
        lifetime = bound(lifetime, 0, 365 days);
        lateness = bound(lateness, 1, 365 days);
        vm.prank(governance);
        stream.setSettleGrace(u64(grace));
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), 10e6);
        p.expiry = u64(block.timestamp + lifetime);
        bytes memory sig = signPermit(USER_KEY, p);
        bytes32 h = stream.hashPermit(p);

        uint256 lastSecond = uint256(p.expiry) + grace;
        vm.warp(lastSecond);
        assertEq(_settle(p, sig, 1e6, 1), 1e6);

        vm.warp(lastSecond + lateness);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.PermitExpired.selector, h, p.expiry));
        _settle(p, sig, 2e6, 2);
    }

    function testFuzz_settle_revocationBoundary(uint256 grace, uint256 revokeAfter, uint256 lateness) public {
        grace = bound(grace, 0, 30 days);
        revokeAfter = bound(revokeAfter, 0, 3 days);
        lateness = bound(lateness, 1, 30 days);
        vm.prank(governance);
        stream.setSettleGrace(u64(grace));
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), 10e6);
        p.expiry = uint64(block.timestamp + 365 days);
        bytes memory sig = signPermit(USER_KEY, p);
        bytes32 h = stream.hashPermit(p);

        vm.warp(block.timestamp + revokeAfter);
        vm.prank(user);
        stream.revokePermit(p);
        uint64 revokedAt = uint64(block.timestamp);

        vm.warp(uint256(revokedAt) + grace);
        assertEq(_settle(p, sig, 1e6, 1), 1e6);
        vm.warp(uint256(revokedAt) + grace + lateness);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.PermitRevoked.selector, h, revokedAt));
        _settle(p, sig, 2e6, 2);
    }

    // ------------------------------------------------------------ cap and balance

    function testFuzz_settle_rejectsOverCap(uint256 maxAmount, uint256 first, uint256 cumulative) public {
        maxAmount = bound(maxAmount, 0, DEPOSIT);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), maxAmount);
        bytes memory sig = signPermit(USER_KEY, p);
        bytes32 h = stream.hashPermit(p);
        first = bound(first, 0, maxAmount);
        if (first != 0) _settle(p, sig, u128(first), 1);

        cumulative = bound(cumulative, maxAmount + 1, type(uint128).max);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.ExceedsPermitCap.selector, h, cumulative, maxAmount)
        );
        _settle(p, sig, u128(cumulative), 2);
        assertEq(_earned(), first);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - first);
    }

    function testFuzz_settle_cumulativeSequencePaysEachChargeOnce(uint256[6] memory steps, uint256 cap)
        public
    {
        cap = bound(cap, 1, DEPOSIT);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), cap);
        bytes memory sig = signPermit(USER_KEY, p);
        uint256 settled;
        for (uint64 i; i < steps.length; ++i) {
            uint256 next = bound(steps[i], settled, cap);
            uint256 before = _earned();
            // the request count always grows, so even an unchanged amount settles
            assertEq(_settle(p, sig, u128(next), i + 1), next - settled);
            assertEq(_earned() - before, next - settled);
            settled = next;
        }
        assertEq(_earned(), settled);
        assertEq(stream.permitState(stream.hashPermit(p)).settledAmount, settled);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - settled);
        assertLe(settled, cap);
        assertEq(vault.getModel(modelId).totalInferences, steps.length);
    }

    function testFuzz_settle_insufficientBalanceIsAllOrNothing(uint256 balance, uint256 cumulative) public {
        balance = bound(balance, 1, 1e12);
        cumulative = bound(cumulative, 1, 2e12);
        fund(otherUser, usdc, balance);
        IPaymentStream.SpendingPermit memory p = permitFor(otherUser, address(usdc), 2e12);
        bytes memory sig = signPermit(OTHER_USER_KEY, p);
        if (cumulative > balance) {
            vm.expectRevert(
                abi.encodeWithSelector(
                    IPaymentStream.InsufficientBalance.selector, otherUser, address(usdc), balance, cumulative
                )
            );
            _settle(p, sig, u128(cumulative), 1);
            assertEq(stream.getBalance(otherUser, address(usdc)), balance);
            assertEq(_earned(), 0);
        } else {
            assertEq(_settle(p, sig, u128(cumulative), 1), cumulative);
            assertEq(stream.getBalance(otherUser, address(usdc)), balance - cumulative);
            assertEq(_earned(), cumulative);
        }
    }

    // ------------------------------------------------------------ withdraw-delay races

    struct Race {
        uint256 deposit;
        uint256 requested;
        uint256 cap;
        uint256 charge;
        uint256 settleAt;
        uint256 withdrawAt;
        uint256 paid;
        uint256 withdrawn;
    }

    /// @dev The user asks to withdraw, the host settles at some point before or after the
    /// withdrawal: the user never gets more than what was asked for or what is left, the payout
    /// never more than the cap or the charge, and every unit is accounted for.
    function testFuzz_withdrawRace_neverPaysMoreThanBalanceOrCap(
        uint256 depositAmount,
        uint256 requested,
        uint256 cap,
        uint256 charge,
        uint256 settleAt,
        uint256 withdrawAt,
        bool settleFirstOnTie
    ) public {
        Race memory r;
        r.deposit = bound(depositAmount, 1, 1e12);
        r.requested = bound(requested, 1, r.deposit);
        r.cap = bound(cap, 1, 2 * r.deposit);
        r.charge = bound(charge, 1, r.cap);
        fund(otherUser, usdc, r.deposit);
        IPaymentStream.SpendingPermit memory p = permitFor(otherUser, address(usdc), r.cap);
        bytes memory sig = signPermit(OTHER_USER_KEY, p);

        uint256 t0 = block.timestamp;
        vm.prank(otherUser);
        stream.requestWithdraw(address(usdc), r.requested);
        uint256 readyAt = t0 + stream.withdrawDelay();
        r.settleAt = bound(settleAt, t0, readyAt + 2 hours);
        r.withdrawAt = bound(withdrawAt, readyAt, readyAt + 2 hours);

        if (r.settleAt < r.withdrawAt || (r.settleAt == r.withdrawAt && settleFirstOnTie)) {
            vm.warp(r.settleAt);
            r.paid = _trySettle(p, sig, r.charge);
            vm.warp(r.withdrawAt);
            r.withdrawn = _withdraw();
            assertEq(r.withdrawn, _min(r.requested, r.deposit - r.paid));
        } else {
            vm.warp(r.withdrawAt);
            r.withdrawn = _withdraw();
            assertEq(r.withdrawn, r.requested);
            vm.warp(r.settleAt);
            r.paid = _trySettle(p, sig, r.charge);
        }

        uint256 left = stream.getBalance(otherUser, address(usdc));
        assertLe(r.withdrawn, r.requested);
        assertLe(r.withdrawn + r.paid, r.deposit);
        assertLe(r.paid, r.cap);
        assertEq(r.withdrawn + r.paid + left, r.deposit);
        assertEq(usdc.balanceOf(otherUser), r.withdrawn);
        assertEq(_earned(), r.paid);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT + left + stream.claimable(modelId, address(usdc)));
        // a charge the balance covered was paid in full, one it did not was not paid at all
        assertTrue(r.paid == 0 || r.paid == r.charge);
        // and the claim pays exactly that to the payout
        if (r.paid != 0) stream.claim(modelId, address(usdc));
        assertEq(usdc.balanceOf(payout), r.paid);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT + left);
    }

    function _trySettle(IPaymentStream.SpendingPermit memory p, bytes memory sig, uint256 charge)
        internal
        returns (uint256 paid)
    {
        uint256 balance = stream.getBalance(p.user, p.token);
        if (charge > balance) {
            vm.expectRevert(
                abi.encodeWithSelector(
                    IPaymentStream.InsufficientBalance.selector, p.user, p.token, balance, charge
                )
            );
            _settle(p, sig, u128(charge), 1);
            return 0;
        }
        return _settle(p, sig, u128(charge), 1);
    }

    function _withdraw() internal returns (uint256) {
        vm.prank(otherUser);
        return stream.withdraw(address(usdc));
    }

    function _min(uint256 a, uint256 b) internal pure returns (uint256) {
        return a < b ? a : b;
    }
}
