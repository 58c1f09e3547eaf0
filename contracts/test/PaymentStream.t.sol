// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {IERC1967} from "@openzeppelin/contracts/interfaces/IERC1967.sol";
import {OwnableUpgradeable} from "@openzeppelin/contracts-upgradeable/access/OwnableUpgradeable.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {DevStablecoin} from "../src/DevStablecoin.sol";
import {DivProxy} from "../src/DivProxy.sol";
import {PaymentStream} from "../src/PaymentStream.sol";
import {IModelVault} from "../src/interfaces/IModelVault.sol";
import {IPaymentStream} from "../src/interfaces/IPaymentStream.sol";
import {Fixture} from "./utils/Fixture.sol";
import {TestWallet} from "./utils/TestWallet.sol";
import {Vm} from "./utils/Vm.sol";
import {PaymentStreamV2} from "./utils/UpgradeMocks.sol";

contract PaymentStreamTest is Fixture {
    uint256 internal constant DEPOSIT = 100e6; // 100 USDC
    uint256 internal constant CAP = 50e6;
    bytes32 internal constant UNKNOWN_MODEL = keccak256("no such model");

    IPaymentStream.SpendingPermit internal permit;
    bytes internal sig;
    bytes32 internal permitHash;

    function setUp() public override {
        super.setUp();
        fund(user, usdc, DEPOSIT);
        permit = permitFor(user, address(usdc), CAP);
        sig = signPermit(USER_KEY, permit);
        permitHash = stream.hashPermit(permit);
    }

    // ------------------------------------------------------------ helpers

    function _settle(uint128 cumulativeAmount, uint64 cumulativeRequests) internal returns (uint256) {
        return _settleAs(host, permit, sig, cumulativeAmount, cumulativeRequests);
    }

    function _settleAs(
        address caller,
        IPaymentStream.SpendingPermit memory p,
        bytes memory signature,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) internal returns (uint256) {
        vm.prank(caller);
        return stream.settle(p, signature, cumulativeAmount, cumulativeRequests);
    }

    function _permitWithNonce(uint256 nonce) internal view returns (IPaymentStream.SpendingPermit memory p) {
        p = permitFor(user, address(usdc), CAP);
        p.nonce = nonce;
    }

    /// @dev What settlement credited to the fixture's model in `token`, not yet claimed.
    function _credit(DevStablecoin token) internal view returns (uint256) {
        return stream.claimable(modelId, address(token));
    }

    function _totalInferences() internal view returns (uint64) {
        return vault.getModel(modelId).totalInferences;
    }

    function _assertState(bytes32 h, uint256 amount, uint256 requests, uint256 revokedAt) internal view {
        IPaymentStream.PermitState memory st = stream.permitState(h);
        assertEq(st.settledAmount, amount, "settledAmount");
        assertEq(st.settledRequests, requests, "settledRequests");
        assertEq(st.revokedAt, revokedAt, "revokedAt");
    }

    function _ownableUnauthorized(address account) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(OwnableUpgradeable.OwnableUnauthorizedAccount.selector, account);
    }

    function _entry(
        IPaymentStream.SpendingPermit memory p,
        bytes memory signature,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) internal pure returns (IPaymentStream.Settlement memory) {
        return IPaymentStream.Settlement({
            permit: p,
            signature: signature,
            cumulativeAmount: cumulativeAmount,
            cumulativeRequests: cumulativeRequests
        });
    }

    // ------------------------------------------------------------ initialize

    function test_initialize_setsState() public view {
        assertEq(stream.owner(), governance);
        assertEq(stream.vault(), address(vault));
        assertEq(stream.withdrawDelay(), 1 hours);
        assertEq(stream.settleGrace(), 1 hours);
        assertTrue(stream.isTokenAllowed(address(usdc)));
        assertTrue(stream.isTokenAllowed(address(usdfc)));
        assertFalse(stream.isTokenAllowed(address(accessToken)));
        assertEq(stream.MAX_DELAY(), 30 days);
        assertEq(stream.MAX_BATCH(), 256);
        assertEq(
            stream.PERMIT_TYPEHASH(),
            keccak256(
                "SpendingPermit(address user,bytes32 modelId,address host,address token,uint256 maxAmount,uint64 expiry,uint256 nonce)"
            )
        );
    }

    function test_initialize_emitsEvents() public {
        address impl = address(new PaymentStream());
        vm.expectEmit();
        emit IPaymentStream.WithdrawDelaySet(1 hours);
        vm.expectEmit();
        emit IPaymentStream.SettleGraceSet(1 hours);
        vm.expectEmit();
        emit IPaymentStream.TokenAllowed(address(usdc), true);
        vm.expectEmit();
        emit IPaymentStream.TokenAllowed(address(usdfc), true);
        new DivProxy(
            impl,
            abi.encodeCall(
                PaymentStream.initialize, (governance, vault, twoTokens(address(usdc), address(usdfc)))
            )
        );
    }

    function test_initialize_revertsOnZeroVault() public {
        address impl = address(new PaymentStream());
        vm.expectRevert(IPaymentStream.ZeroAddress.selector);
        new DivProxy(
            impl,
            abi.encodeCall(PaymentStream.initialize, (governance, IModelVault(address(0)), new address[](0)))
        );
    }

    function test_initialize_revertsOnZeroToken() public {
        address impl = address(new PaymentStream());
        vm.expectRevert(IPaymentStream.ZeroAddress.selector);
        new DivProxy(
            impl,
            abi.encodeCall(
                PaymentStream.initialize, (governance, vault, twoTokens(address(usdc), address(0)))
            )
        );
    }

    function test_initialize_revertsWhenCalledTwice() public {
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        stream.initialize(stranger, vault, new address[](0));
    }

    function test_initialize_implementationCannotBeInitialized() public {
        PaymentStream impl = new PaymentStream();
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        impl.initialize(stranger, vault, new address[](0));
    }

    // ------------------------------------------------------------ setTokenAllowed

    function test_setTokenAllowed_stopsDepositsButNotWithdrawalsOrSettlement() public {
        vm.expectEmit(address(stream));
        emit IPaymentStream.TokenAllowed(address(usdc), false);
        vm.prank(governance);
        stream.setTokenAllowed(address(usdc), false);
        assertFalse(stream.isTokenAllowed(address(usdc)));

        usdc.mint(user, 1e6);
        vm.startPrank(user);
        usdc.approve(address(stream), 1e6);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.TokenNotAllowed.selector, address(usdc)));
        stream.deposit(address(usdc), 1e6);
        stream.requestWithdraw(address(usdc), 10e6);
        vm.stopPrank();

        _settle(5e6, 1);
        vm.warp(block.timestamp + 1 hours);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 10e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 15e6);
    }

    function test_setTokenAllowed_allowsNewToken() public {
        DevStablecoin eurc = new DevStablecoin("EURC (dev)", "EURC", 6);
        vm.prank(governance);
        stream.setTokenAllowed(address(eurc), true);
        fund(user, eurc, 3e6);
        assertEq(stream.getBalance(user, address(eurc)), 3e6);
    }

    function test_setTokenAllowed_revertsOnZeroAddress() public {
        vm.expectRevert(IPaymentStream.ZeroAddress.selector);
        vm.prank(governance);
        stream.setTokenAllowed(address(0), true);
    }

    function test_setTokenAllowed_revertsForNonGovernance() public {
        vm.expectRevert(_ownableUnauthorized(stranger));
        vm.prank(stranger);
        stream.setTokenAllowed(address(usdc), false);
    }

    // ------------------------------------------------------------ deposit

    function test_deposit_sixDecimalToken() public {
        usdc.mint(otherUser, 25e6);
        vm.startPrank(otherUser);
        usdc.approve(address(stream), 25e6);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Deposited(otherUser, address(usdc), 25e6, 25e6);
        stream.deposit(address(usdc), 25e6);
        vm.stopPrank();
        assertEq(stream.getBalance(otherUser, address(usdc)), 25e6);
        assertEq(usdc.balanceOf(otherUser), 0);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT + 25e6);
    }

    function test_deposit_eighteenDecimalTokenAccumulates() public {
        fund(user, usdfc, 3.5e18);
        usdfc.mint(user, 1.5e18);
        vm.startPrank(user);
        usdfc.approve(address(stream), 1.5e18);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Deposited(user, address(usdfc), 1.5e18, 5e18);
        stream.deposit(address(usdfc), 1.5e18);
        vm.stopPrank();
        assertEq(stream.getBalance(user, address(usdfc)), 5e18);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT);
        assertEq(usdfc.balanceOf(address(stream)), 5e18);
    }

    function testFuzz_deposit_creditsExactAmount(uint256 amount, bool eighteenDecimals) public {
        DevStablecoin token = eighteenDecimals ? usdfc : usdc;
        amount = bound(amount, 1, eighteenDecimals ? 1e30 : 1e18);
        uint256 before = stream.getBalance(otherUser, address(token));
        fund(otherUser, token, amount);
        assertEq(stream.getBalance(otherUser, address(token)), before + amount);
        assertEq(token.balanceOf(otherUser), 0);
    }

    function test_deposit_revertsForTokenNotAllowed() public {
        DevStablecoin other = new DevStablecoin("Other", "OTH", 6);
        other.mint(user, 1e6);
        vm.startPrank(user);
        other.approve(address(stream), 1e6);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.TokenNotAllowed.selector, address(other)));
        stream.deposit(address(other), 1e6);
        vm.stopPrank();
    }

    function test_deposit_revertsOnZeroAmount() public {
        vm.expectRevert(IPaymentStream.ZeroAmount.selector);
        vm.prank(user);
        stream.deposit(address(usdc), 0);
    }

    function test_deposit_revertsWithoutAllowance() public {
        usdc.mint(otherUser, 5e6);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, address(stream), 0, 5e6)
        );
        vm.prank(otherUser);
        stream.deposit(address(usdc), 5e6);
    }

    // ------------------------------------------------------------ depositWithPermit

    function test_depositWithPermit_withOneSignature() public {
        uint256 deadline = block.timestamp + 1 hours;
        usdc.mint(user, 30e6);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(USER_KEY, erc2612Digest(usdc, user, address(stream), 30e6, deadline));
        vm.expectEmit(address(stream));
        emit IPaymentStream.Deposited(user, address(usdc), 30e6, DEPOSIT + 30e6);
        vm.prank(user);
        stream.depositWithPermit(address(usdc), 30e6, deadline, v, r, s);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT + 30e6);
        assertEq(usdc.nonces(user), 1);
        assertEq(usdc.allowance(user, address(stream)), 0);
        assertEq(usdc.balanceOf(user), 0);
    }

    function test_depositWithPermit_eighteenDecimalToken() public {
        uint256 deadline = block.timestamp + 1 hours;
        usdfc.mint(otherUser, 7e18);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(OTHER_USER_KEY, erc2612Digest(usdfc, otherUser, address(stream), 7e18, deadline));
        vm.prank(otherUser);
        stream.depositWithPermit(address(usdfc), 7e18, deadline, v, r, s);
        assertEq(stream.getBalance(otherUser, address(usdfc)), 7e18);
    }

    function test_depositWithPermit_succeedsAfterFrontRunPermit() public {
        uint256 deadline = block.timestamp + 1 hours;
        usdc.mint(user, 30e6);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(USER_KEY, erc2612Digest(usdc, user, address(stream), 30e6, deadline));
        // a front-runner submits the permit first: the signature is spent, the allowance is set
        vm.prank(stranger);
        usdc.permit(user, address(stream), 30e6, deadline, v, r, s);
        assertEq(usdc.nonces(user), 1);

        vm.prank(user);
        stream.depositWithPermit(address(usdc), 30e6, deadline, v, r, s);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT + 30e6);
        assertEq(usdc.allowance(user, address(stream)), 0);
    }

    function test_depositWithPermit_revertsWithBadSignatureAndNoAllowance() public {
        uint256 deadline = block.timestamp + 1 hours;
        usdc.mint(user, 30e6);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(OTHER_USER_KEY, erc2612Digest(usdc, user, address(stream), 30e6, deadline));
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, address(stream), 0, 30e6)
        );
        vm.prank(user);
        stream.depositWithPermit(address(usdc), 30e6, deadline, v, r, s);
    }

    function test_depositWithPermit_revertsForTokenNotAllowed() public {
        DevStablecoin other = new DevStablecoin("Other", "OTH", 6);
        uint256 deadline = block.timestamp + 1 hours;
        other.mint(user, 1e6);
        (uint8 v, bytes32 r, bytes32 s) =
            vm.sign(USER_KEY, erc2612Digest(other, user, address(stream), 1e6, deadline));
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.TokenNotAllowed.selector, address(other)));
        vm.prank(user);
        stream.depositWithPermit(address(other), 1e6, deadline, v, r, s);
    }

    // ------------------------------------------------------------ requestWithdraw / cancelWithdraw

    function test_requestWithdraw_recordsPendingAndEmits() public {
        uint64 readyAt = uint64(block.timestamp + 1 hours);
        vm.expectEmit(address(stream));
        emit IPaymentStream.WithdrawRequested(user, address(usdc), 40e6, readyAt);
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 40e6);
        (uint256 amount, uint64 at) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(amount, 40e6);
        assertEq(at, readyAt);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT);
    }

    function test_requestWithdraw_replacesEarlierRequest() public {
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 40e6);
        vm.warp(block.timestamp + 30 minutes);
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 10e6);
        (uint256 amount, uint64 readyAt) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(amount, 10e6);
        assertEq(readyAt, block.timestamp + 1 hours);
    }

    function test_requestWithdraw_revertsOnZeroAmount() public {
        vm.expectRevert(IPaymentStream.ZeroAmount.selector);
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 0);
    }

    function test_requestWithdraw_revertsAboveBalance() public {
        vm.expectRevert(
            abi.encodeWithSelector(
                IPaymentStream.InsufficientBalance.selector, user, address(usdc), DEPOSIT, DEPOSIT + 1
            )
        );
        vm.prank(user);
        stream.requestWithdraw(address(usdc), DEPOSIT + 1);
    }

    function test_cancelWithdraw_clearsRequest() public {
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 40e6);
        vm.expectEmit(address(stream));
        emit IPaymentStream.WithdrawCancelled(user, address(usdc));
        vm.prank(user);
        stream.cancelWithdraw(address(usdc));
        (uint256 amount, uint64 readyAt) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(amount, 0);
        assertEq(readyAt, 0);

        vm.warp(block.timestamp + 2 hours);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NoPendingWithdrawal.selector, user, address(usdc))
        );
        vm.prank(user);
        stream.withdraw(address(usdc));
    }

    function test_cancelWithdraw_revertsWithoutRequest() public {
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NoPendingWithdrawal.selector, user, address(usdc))
        );
        vm.prank(user);
        stream.cancelWithdraw(address(usdc));
    }

    // ------------------------------------------------------------ withdraw

    function test_withdraw_honoursDelay() public {
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 40e6);
        uint64 readyAt = uint64(block.timestamp + 1 hours);

        vm.warp(readyAt - 1);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.WithdrawalNotReady.selector, user, address(usdc), readyAt)
        );
        vm.prank(user);
        stream.withdraw(address(usdc));

        vm.warp(readyAt);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Withdrawn(user, address(usdc), 40e6, DEPOSIT - 40e6);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 40e6);
        assertEq(usdc.balanceOf(user), 40e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 40e6);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT - 40e6);
        (uint256 amount, uint64 at) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(amount, 0);
        assertEq(at, 0);

        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NoPendingWithdrawal.selector, user, address(usdc))
        );
        vm.prank(user);
        stream.withdraw(address(usdc));
    }

    function test_withdraw_revertsWithoutRequest() public {
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NoPendingWithdrawal.selector, user, address(usdc))
        );
        vm.prank(user);
        stream.withdraw(address(usdc));
    }

    function test_withdraw_paysWhatIsLeftAfterSettlementDuringDelay() public {
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 80e6);
        vm.warp(block.timestamp + 30 minutes);
        _settle(50e6, 10);
        vm.warp(block.timestamp + 30 minutes);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Withdrawn(user, address(usdc), 50e6, 0);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 50e6);
        assertEq(usdc.balanceOf(user), 50e6);
        assertEq(_credit(usdc), 50e6);
        assertEq(stream.getBalance(user, address(usdc)), 0);
        assertEq(usdc.balanceOf(address(stream)), 50e6);
    }

    function test_withdraw_paysNothingWhenBalanceWasSettledAway() public {
        IPaymentStream.SpendingPermit memory big = permitFor(user, address(usdc), DEPOSIT);
        bytes memory bigSig = signPermit(USER_KEY, big);
        vm.prank(user);
        stream.requestWithdraw(address(usdc), DEPOSIT);
        _settleAs(host, big, bigSig, u128(DEPOSIT), 1);
        vm.warp(block.timestamp + 1 hours);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Withdrawn(user, address(usdc), 0, 0);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 0);
        assertEq(usdc.balanceOf(user), 0);
        (, uint64 readyAt) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(readyAt, 0);
    }

    function test_withdraw_keepsReadyTimeWhenDelayChanges() public {
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 1e6);
        vm.prank(governance);
        stream.setWithdrawDelay(2 days);
        vm.warp(block.timestamp + 1 hours);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 1e6);
    }

    function test_withdraw_zeroDelayIsImmediate() public {
        vm.prank(governance);
        stream.setWithdrawDelay(0);
        vm.startPrank(user);
        stream.requestWithdraw(address(usdc), 1e6);
        assertEq(stream.withdraw(address(usdc)), 1e6);
        vm.stopPrank();
    }

    // ------------------------------------------------------------ setWithdrawDelay / setSettleGrace

    function test_setWithdrawDelay_acceptsUpToMax() public {
        vm.expectEmit(address(stream));
        emit IPaymentStream.WithdrawDelaySet(30 days);
        vm.prank(governance);
        stream.setWithdrawDelay(30 days);
        assertEq(stream.withdrawDelay(), 30 days);
        vm.prank(user);
        stream.requestWithdraw(address(usdc), 1);
        (, uint64 readyAt) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(readyAt, block.timestamp + 30 days);
    }

    function test_setWithdrawDelay_revertsAboveMax() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.DelayTooLong.selector, 30 days + 1, 30 days));
        vm.prank(governance);
        stream.setWithdrawDelay(30 days + 1);
    }

    function test_setWithdrawDelay_revertsForNonGovernance() public {
        vm.expectRevert(_ownableUnauthorized(user));
        vm.prank(user);
        stream.setWithdrawDelay(0);
    }

    function testFuzz_setWithdrawDelay_bounds(uint64 delay) public {
        vm.prank(governance);
        if (delay > 30 days) {
            vm.expectRevert(abi.encodeWithSelector(IPaymentStream.DelayTooLong.selector, delay, 30 days));
            stream.setWithdrawDelay(delay);
        } else {
            stream.setWithdrawDelay(delay);
            assertEq(stream.withdrawDelay(), delay);
        }
    }

    function test_setSettleGrace_acceptsUpToMax() public {
        vm.expectEmit(address(stream));
        emit IPaymentStream.SettleGraceSet(30 days);
        vm.prank(governance);
        stream.setSettleGrace(30 days);
        assertEq(stream.settleGrace(), 30 days);
        vm.prank(governance);
        stream.setSettleGrace(0);
        assertEq(stream.settleGrace(), 0);
    }

    function test_setSettleGrace_revertsAboveMax() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.DelayTooLong.selector, 30 days + 1, 30 days));
        vm.prank(governance);
        stream.setSettleGrace(30 days + 1);
    }

    function test_setSettleGrace_revertsForNonGovernance() public {
        vm.expectRevert(_ownableUnauthorized(host));
        vm.prank(host);
        stream.setSettleGrace(2 hours);
    }

    // ------------------------------------------------------------ settle: happy paths

    function test_hashPermit_isEip712Digest() public view {
        bytes32 domainSeparator = keccak256(
            abi.encode(
                keccak256(
                    "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
                ),
                keccak256("DIV PaymentStream"),
                keccak256("1"),
                block.chainid,
                address(stream)
            )
        );
        bytes32 structHash = keccak256(
            abi.encode(
                stream.PERMIT_TYPEHASH(),
                permit.user,
                permit.modelId,
                permit.host,
                permit.token,
                permit.maxAmount,
                permit.expiry,
                permit.nonce
            )
        );
        assertEq(permitHash, keccak256(abi.encodePacked(hex"1901", domainSeparator, structHash)));
    }

    function test_settle_paysPayoutExactDelta() public {
        vm.expectEmit(address(stream));
        emit IPaymentStream.Settled(permitHash, modelId, user, address(usdc), 10e6, 4, 10e6, 4);
        assertEq(_settle(10e6, 4), 10e6);

        assertEq(_credit(usdc), 10e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 10e6);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT);
        assertEq(usdc.balanceOf(host), 0);
        assertEq(_totalInferences(), 4);
        _assertState(permitHash, 10e6, 4, 0);
    }

    function test_settle_repeatedCumulativeMovesOnlyTheDifference() public {
        _settle(10e6, 4);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Settled(permitHash, modelId, user, address(usdc), 15e6, 5, 25e6, 9);
        assertEq(_settle(25e6, 9), 15e6);
        assertEq(_credit(usdc), 25e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 25e6);
        assertEq(_totalInferences(), 9);

        // more requests at the same amount: nothing moves, the requests are counted
        vm.expectEmit(address(stream));
        emit IPaymentStream.Settled(permitHash, modelId, user, address(usdc), 0, 3, 25e6, 12);
        assertEq(_settle(25e6, 12), 0);
        assertEq(_credit(usdc), 25e6);
        assertEq(_totalInferences(), 12);
        _assertState(permitHash, 25e6, 12, 0);

        // more amount at the same request count
        assertEq(_settle(26e6, 12), 1e6);
        assertEq(_credit(usdc), 26e6);
        assertEq(_totalInferences(), 12);
    }

    function test_settle_eighteenDecimalToken() public {
        fund(user, usdfc, 10e18);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdfc), 5e18);
        bytes memory s = signPermit(USER_KEY, p);
        assertEq(_settleAs(host, p, s, 1.25e18, 3), 1.25e18);
        assertEq(_credit(usdfc), 1.25e18);
        assertEq(stream.getBalance(user, address(usdfc)), 8.75e18);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT);
    }

    function test_settle_exactlyAtCap() public {
        assertEq(_settle(u128(CAP), 1), CAP);
        assertEq(_credit(usdc), CAP);
    }

    function test_settle_countsRequestsWithoutCharge() public {
        assertEq(_settle(0, 3), 0);
        assertEq(_totalInferences(), 3);
        _assertState(permitHash, 0, 3, 0);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT);
    }

    function test_settle_creditsTheModelAndPaysNobodyYet() public {
        _settle(10e6, 1);
        assertEq(usdc.balanceOf(payout), 0);
        assertEq(usdc.balanceOf(modelOwner), 0);
        assertEq(usdc.balanceOf(host), 0);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT);
        assertEq(_credit(usdc) + stream.getBalance(user, address(usdc)), DEPOSIT);
    }

    function test_settle_signatureIsCheckedOnlyOnFirstSettlement() public {
        _settle(10e6, 1);
        // the stored state proves the permit was signed; later settlements need no signature
        _settleAs(host, permit, "", 20e6, 2);
        assertEq(_credit(usdc), 20e6);
    }

    /// @dev Settlement follows the signed permit, not the vault's host list or the model's
    /// active flag (requests already served get paid).
    /// @dev A host the owner revoked, or a model the owner paused, still gets paid for what the
    /// host served while it was authorised (bounded by the user's signed cap).
    function test_settle_revokedHostOfPausedModelStillSettles() public {
        vm.startPrank(modelOwner);
        vault.revokeHost(modelId, host);
        vault.setActive(modelId, false);
        vm.stopPrank();
        assertEq(_settle(1e6, 1), 1e6);
    }

    /// @dev Anyone can sign a zero-cap permit for any model naming themselves as host. A permit
    /// whose host the owner never authorised does not settle, so no stranger can inflate
    /// `totalInferences` (or, before the counter saturated, overflow it and block the model).
    function test_settle_strangerHostCannotInflateTheCount() public {
        uint256 attackerKey = 0xBAD;
        address attacker = vm.addr(attackerKey);
        IPaymentStream.SpendingPermit memory p = IPaymentStream.SpendingPermit({
            user: attacker,
            modelId: modelId,
            host: attacker,
            token: address(usdc),
            maxAmount: 0,
            expiry: uint64(block.timestamp + 1 days),
            nonce: 0
        });
        bytes memory attackerSig = signPermit(attackerKey, p);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.HostNotAuthorized.selector, modelId, attacker));
        _settleAs(attacker, p, attackerSig, 0, type(uint64).max);
        assertEq(_totalInferences(), 0);

        assertEq(_settle(10e6, 4), 10e6);
        assertEq(_credit(usdc), 10e6);
        assertEq(_totalInferences(), 4);
    }

    // ------------------------------------------------------------ settle: rejections

    function test_settle_revertsOnSameCumulative() public {
        _settle(10e6, 4);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToSettle.selector, permitHash, 10e6, 10e6)
        );
        _settle(10e6, 4);
    }

    function test_settle_revertsOnLowerAmountEvenWithMoreRequests() public {
        _settle(10e6, 4);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToSettle.selector, permitHash, 9e6, 10e6)
        );
        _settle(9e6, 5);
    }

    function test_settle_revertsOnEmptyFirstSettlement() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.NothingToSettle.selector, permitHash, 0, 0));
        _settle(0, 0);
    }

    function test_settle_revertsWhenRequestCountDecreases() public {
        _settle(10e6, 4);
        vm.expectRevert(
            abi.encodeWithSelector(
                IPaymentStream.RequestCountDecreased.selector, permitHash, uint64(3), uint64(4)
            )
        );
        _settle(20e6, 3);
    }

    function test_settle_revertsForAnotherHost() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.HostMismatch.selector, otherHost, host));
        _settleAs(otherHost, permit, sig, 1e6, 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.HostMismatch.selector, user, host));
        _settleAs(user, permit, sig, 1e6, 1);
    }

    function test_settle_expiresAfterGrace() public {
        uint256 deadline = uint256(permit.expiry) + 1 hours;
        vm.warp(deadline);
        _settle(1e6, 1);
        vm.warp(deadline + 1);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.PermitExpired.selector, permitHash, permit.expiry)
        );
        _settle(2e6, 2);
    }

    function test_settle_graceIsReadAtSettlementTime() public {
        vm.prank(governance);
        stream.setSettleGrace(0);
        vm.warp(uint256(permit.expiry) + 1);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.PermitExpired.selector, permitHash, permit.expiry)
        );
        _settle(1e6, 1);
        // raising the grace later makes an expired permit settle again
        vm.prank(governance);
        stream.setSettleGrace(1 hours);
        _settle(1e6, 1);
    }

    function test_settle_revertsOnWrongSigner() public {
        bytes memory otherSig = signPermit(OTHER_USER_KEY, permit);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, permitHash));
        _settleAs(host, permit, otherSig, 1e6, 1);
    }

    function test_settle_revertsOnSignatureOverAnotherPermit() public {
        bytes memory sigForNonce1 = signPermit(USER_KEY, _permitWithNonce(1));
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, permitHash));
        _settleAs(host, permit, sigForNonce1, 1e6, 1);
    }

    function test_settle_revertsOnMalformedSignature() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, permitHash));
        _settleAs(host, permit, new bytes(65), 1e6, 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, permitHash));
        _settleAs(host, permit, "", 1e6, 1);
        bytes memory truncated = new bytes(64);
        for (uint256 i; i < 64; ++i) {
            truncated[i] = sig[i];
        }
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, permitHash));
        _settleAs(host, permit, truncated, 1e6, 1);
    }

    function test_settle_revertsAboveCap() public {
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.ExceedsPermitCap.selector, permitHash, CAP + 1, CAP)
        );
        _settle(u128(CAP + 1), 1);
        _settle(40e6, 1);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.ExceedsPermitCap.selector, permitHash, CAP + 1, CAP)
        );
        _settle(u128(CAP + 1), 2);
    }

    function test_settle_insufficientBalanceMovesNothing() public {
        IPaymentStream.SpendingPermit memory big = permitFor(user, address(usdc), 500e6);
        bytes memory bigSig = signPermit(USER_KEY, big);
        bytes32 bigHash = stream.hashPermit(big);
        _settleAs(host, big, bigSig, 60e6, 6);

        vm.expectRevert(
            abi.encodeWithSelector(
                IPaymentStream.InsufficientBalance.selector, user, address(usdc), 40e6, 100e6 + 1
            )
        );
        _settleAs(host, big, bigSig, 160e6 + 1, 7);

        // all or nothing: not even the part the balance covers moved
        assertEq(stream.getBalance(user, address(usdc)), 40e6);
        assertEq(_credit(usdc), 60e6);
        assertEq(usdc.balanceOf(address(stream)), 100e6);
        assertEq(_totalInferences(), 6);
        _assertState(bigHash, 60e6, 6, 0);

        // the exact remaining balance still settles
        _settleAs(host, big, bigSig, 100e6, 7);
        assertEq(stream.getBalance(user, address(usdc)), 0);
    }

    function test_settle_revertsWithoutBalanceInThePermitToken() public {
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdfc), 1e18);
        bytes memory s = signPermit(USER_KEY, p);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.InsufficientBalance.selector, user, address(usdfc), 0, 1)
        );
        _settleAs(host, p, s, 1, 1);
    }

    function test_settle_revertsForUnknownModel() public {
        IPaymentStream.SpendingPermit memory p = permit;
        p.modelId = UNKNOWN_MODEL;
        bytes memory s = signPermit(USER_KEY, p);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.ModelNotFound.selector, UNKNOWN_MODEL));
        _settleAs(host, p, s, 1e6, 1);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT);
    }

    // ------------------------------------------------------------ revokePermit

    function test_revokePermit_recordsAndEmits() public {
        vm.expectEmit(address(stream));
        emit IPaymentStream.PermitRevokedByUser(permitHash, user, uint64(block.timestamp));
        vm.prank(user);
        stream.revokePermit(permit);
        _assertState(permitHash, 0, 0, block.timestamp);
    }

    function test_revokePermit_settlesOnlyInsideGrace() public {
        _settle(5e6, 1);
        vm.prank(user);
        stream.revokePermit(permit);
        uint64 revokedAt = uint64(block.timestamp);

        vm.warp(uint256(revokedAt) + 1 hours);
        _settle(10e6, 2);
        vm.warp(uint256(revokedAt) + 1 hours + 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.PermitRevoked.selector, permitHash, revokedAt));
        _settle(15e6, 3);
        assertEq(_credit(usdc), 10e6);
        _assertState(permitHash, 10e6, 2, revokedAt);
    }

    function test_revokePermit_beforeFirstSettlement() public {
        vm.prank(user);
        stream.revokePermit(permit);
        uint64 revokedAt = uint64(block.timestamp);
        vm.warp(block.timestamp + 2 hours);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.PermitRevoked.selector, permitHash, revokedAt));
        _settle(1e6, 1);
    }

    function test_revokePermit_revertsForNonUser() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.NotPermitUser.selector, host, user));
        vm.prank(host);
        stream.revokePermit(permit);
    }

    function test_revokePermit_revertsWhenAlreadyRevoked() public {
        vm.prank(user);
        stream.revokePermit(permit);
        vm.warp(block.timestamp + 1);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.AlreadyRevoked.selector, permitHash));
        vm.prank(user);
        stream.revokePermit(permit);
    }

    function test_revokePermit_leavesOtherPermitsAlone() public {
        IPaymentStream.SpendingPermit memory next = _permitWithNonce(1);
        vm.prank(user);
        stream.revokePermit(permit);
        vm.warp(block.timestamp + 2 hours);
        _settleAs(host, next, signPermit(USER_KEY, next), 1e6, 1);
        assertEq(_credit(usdc), 1e6);
    }

    // ------------------------------------------------------------ ERC-1271 smart accounts

    function _fundWallet(TestWallet wallet, uint256 amount) internal {
        address walletOwner = wallet.owner();
        usdc.mint(address(wallet), amount);
        vm.startPrank(walletOwner);
        wallet.execute(address(usdc), abi.encodeCall(usdc.approve, (address(stream), amount)));
        wallet.execute(address(stream), abi.encodeCall(stream.deposit, (address(usdc), amount)));
        vm.stopPrank();
    }

    function test_settle_smartAccountSigner() public {
        TestWallet wallet = new TestWallet(vm.addr(WALLET_OWNER_KEY));
        _fundWallet(wallet, 20e6);
        IPaymentStream.SpendingPermit memory p = permitFor(address(wallet), address(usdc), 10e6);
        bytes memory s = signPermit(WALLET_OWNER_KEY, p);
        bytes32 h = stream.hashPermit(p);
        vm.expectEmit(address(stream));
        emit IPaymentStream.Settled(h, modelId, address(wallet), address(usdc), 7e6, 2, 7e6, 2);
        assertEq(_settleAs(host, p, s, 7e6, 2), 7e6);
        assertEq(stream.getBalance(address(wallet), address(usdc)), 13e6);
        assertEq(_credit(usdc), 7e6);
    }

    function test_settle_smartAccountRejectsOtherSigner() public {
        TestWallet wallet = new TestWallet(vm.addr(WALLET_OWNER_KEY));
        _fundWallet(wallet, 20e6);
        IPaymentStream.SpendingPermit memory p = permitFor(address(wallet), address(usdc), 10e6);
        bytes memory userSig = signPermit(USER_KEY, p);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.InvalidSignature.selector, stream.hashPermit(p))
        );
        _settleAs(host, p, userSig, 7e6, 2);
    }

    function test_revokePermit_bySmartAccount() public {
        TestWallet wallet = new TestWallet(vm.addr(WALLET_OWNER_KEY));
        IPaymentStream.SpendingPermit memory p = permitFor(address(wallet), address(usdc), 10e6);
        vm.prank(wallet.owner());
        wallet.execute(address(stream), abi.encodeCall(stream.revokePermit, (p)));
        assertEq(stream.permitState(stream.hashPermit(p)).revokedAt, block.timestamp);
    }

    // ------------------------------------------------------------ settleBatch

    function test_settleBatch_settlesGoodEntriesAndSkipsBadOnes() public {
        fund(user, usdfc, 10e18);
        // a permit already settled at the cumulative the batch repeats
        IPaymentStream.SpendingPermit memory done = _permitWithNonce(10);
        bytes memory doneSig = signPermit(USER_KEY, done);
        _settleAs(host, done, doneSig, 5e6, 5);
        // a permit revoked more than the grace ago
        IPaymentStream.SpendingPermit memory revoked = _permitWithNonce(11);
        vm.prank(user);
        stream.revokePermit(revoked);
        vm.warp(block.timestamp + 1 hours + 1);

        IPaymentStream.SpendingPermit[11] memory p;
        p[0] = _permitWithNonce(20); // good
        p[1] = _permitWithNonce(21);
        p[1].host = otherHost; // HostMismatch
        p[2] = _permitWithNonce(22);
        p[2].expiry = uint64(block.timestamp - 1 hours - 1); // Expired
        p[3] = revoked; // Revoked
        p[4] = _permitWithNonce(24); // BadSignature
        p[5] = _permitWithNonce(25); // OverCap
        p[6] = done; // NothingToSettle
        p[7] = permitFor(otherUser, address(usdc), CAP); // InsufficientBalance
        p[8] = done; // RequestCountDecreased
        p[9] = _permitWithNonce(29);
        p[9].modelId = UNKNOWN_MODEL; // ModelNotFound
        p[10] = permitFor(user, address(usdfc), 1e18); // good

        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](11);
        for (uint256 i; i < 11; ++i) {
            batch[i] = _entry(p[i], signPermit(i == 7 ? OTHER_USER_KEY : USER_KEY, p[i]), 1e6, 1);
        }
        batch[0].cumulativeAmount = 3e6;
        batch[4].signature = signPermit(OTHER_USER_KEY, p[4]);
        batch[5].cumulativeAmount = u128(CAP + 1);
        batch[6] = _entry(done, doneSig, 5e6, 5);
        batch[8] = _entry(done, doneSig, 6e6, 4);
        batch[10].cumulativeAmount = 0.5e18;

        IPaymentStream.SkipReason[11] memory reasons = [
            IPaymentStream.SkipReason.None,
            IPaymentStream.SkipReason.HostMismatch,
            IPaymentStream.SkipReason.Expired,
            IPaymentStream.SkipReason.Revoked,
            IPaymentStream.SkipReason.BadSignature,
            IPaymentStream.SkipReason.OverCap,
            IPaymentStream.SkipReason.NothingToSettle,
            IPaymentStream.SkipReason.InsufficientBalance,
            IPaymentStream.SkipReason.RequestCountDecreased,
            IPaymentStream.SkipReason.ModelNotFound,
            IPaymentStream.SkipReason.None
        ];
        bytes32[11] memory hashes;
        for (uint256 i; i < 11; ++i) {
            hashes[i] = stream.hashPermit(p[i]);
        }
        for (uint256 i; i < 11; ++i) {
            vm.expectEmit(address(stream));
            if (i == 0) {
                emit IPaymentStream.Settled(hashes[0], modelId, user, address(usdc), 3e6, 1, 3e6, 1);
            } else if (i == 10) {
                emit IPaymentStream.Settled(hashes[10], modelId, user, address(usdfc), 0.5e18, 1, 0.5e18, 1);
            } else {
                emit IPaymentStream.SettlementSkipped(hashes[i], reasons[i]);
            }
        }
        vm.prank(host);
        assertEq(stream.settleBatch(batch), 2);

        assertEq(_credit(usdc), 5e6 + 3e6);
        assertEq(_credit(usdfc), 0.5e18);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 8e6);
        assertEq(stream.getBalance(user, address(usdfc)), 9.5e18);
        assertEq(_totalInferences(), 5 + 2);
        _assertState(hashes[0], 3e6, 1, 0);
        _assertState(hashes[6], 5e6, 5, 0);
        for (uint256 i = 1; i < 10; ++i) {
            if (i == 3 || i == 6 || i == 8) continue;
            _assertState(hashes[i], 0, 0, 0);
        }
    }

    function test_settleBatch_samePermitTwice() public {
        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](3);
        batch[0] = _entry(permit, sig, 10e6, 1);
        batch[1] = _entry(permit, sig, 10e6, 1);
        batch[2] = _entry(permit, sig, 12e6, 2);
        vm.expectEmit(address(stream));
        emit IPaymentStream.SettlementSkipped(permitHash, IPaymentStream.SkipReason.NothingToSettle);
        vm.prank(host);
        assertEq(stream.settleBatch(batch), 2);
        assertEq(_credit(usdc), 12e6);
        _assertState(permitHash, 12e6, 2, 0);
    }

    function test_settleBatch_entriesShareTheUserBalance() public {
        IPaymentStream.SpendingPermit memory a = permitFor(user, address(usdc), DEPOSIT);
        IPaymentStream.SpendingPermit memory b = _permitWithNonce(1);
        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](2);
        batch[0] = _entry(a, signPermit(USER_KEY, a), u128(DEPOSIT - 1e6), 1);
        batch[1] = _entry(b, signPermit(USER_KEY, b), 2e6, 1);
        bytes32 hashB = stream.hashPermit(b);
        vm.expectEmit(address(stream));
        emit IPaymentStream.SettlementSkipped(hashB, IPaymentStream.SkipReason.InsufficientBalance);
        vm.prank(host);
        assertEq(stream.settleBatch(batch), 1);
        assertEq(stream.getBalance(user, address(usdc)), 1e6);
        assertEq(_credit(usdc), DEPOSIT - 1e6);
    }

    function test_settleBatch_skipsAHostNeverAuthorized() public {
        IPaymentStream.SpendingPermit memory p = _permitWithNonce(30);
        p.host = otherHost; // signed by the user, but the owner never authorised otherHost
        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](1);
        batch[0] = _entry(p, signPermit(USER_KEY, p), 1e6, 1);
        vm.expectEmit(address(stream));
        emit IPaymentStream.SettlementSkipped(
            stream.hashPermit(p), IPaymentStream.SkipReason.HostNotAuthorized
        );
        vm.prank(otherHost);
        assertEq(stream.settleBatch(batch), 0);
        assertEq(_credit(usdc), 0);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT);
    }

    function test_settleBatch_emptyBatch() public {
        vm.prank(host);
        assertEq(stream.settleBatch(new IPaymentStream.Settlement[](0)), 0);
    }

    function test_settleBatch_acceptsMaxBatch() public {
        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](256);
        for (uint256 i; i < 256; ++i) {
            batch[i] = _entry(permit, sig, u128(1e4 * (i + 1)), u64(i + 1));
        }
        vm.prank(host);
        assertEq(stream.settleBatch(batch), 256);
        assertEq(_credit(usdc), 256e4);
        assertEq(_totalInferences(), 256);
    }

    function test_settleBatch_revertsWhenTooLarge() public {
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.BatchTooLarge.selector, 257, 256));
        vm.prank(host);
        stream.settleBatch(new IPaymentStream.Settlement[](257));
    }

    function test_settleBatch_skipsAnUnknownModel() public {
        IPaymentStream.SpendingPermit memory p = _permitWithNonce(31);
        p.modelId = UNKNOWN_MODEL;
        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](2);
        batch[0] = _entry(p, signPermit(USER_KEY, p), 1e6, 1);
        batch[1] = _entry(permit, sig, 2e6, 1);
        vm.expectEmit(address(stream));
        emit IPaymentStream.SettlementSkipped(stream.hashPermit(p), IPaymentStream.SkipReason.ModelNotFound);
        vm.prank(host);
        assertEq(stream.settleBatch(batch), 1);
        assertEq(stream.claimable(UNKNOWN_MODEL, address(usdc)), 0);
        assertEq(_credit(usdc), 2e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 2e6);
    }

    // ------------------------------------------------------------ claim

    function test_claim_paysTheWholeCreditToThePayoutInOneTransfer() public {
        _settle(10e6, 4);
        IPaymentStream.SpendingPermit memory second = _permitWithNonce(7);
        _settleAs(host, second, signPermit(USER_KEY, second), 5e6, 2);
        _settle(12e6, 5);
        assertEq(_credit(usdc), 17e6);

        vm.recordLogs();
        vm.expectEmit(address(stream));
        emit IPaymentStream.Claimed(modelId, address(usdc), payout, 17e6);
        vm.prank(stranger); // anyone may claim: the money can only go to the payout
        assertEq(stream.claim(modelId, address(usdc)), 17e6);
        uint256 transfers;
        Vm.Log[] memory logs = vm.getRecordedLogs();
        for (uint256 i; i < logs.length; ++i) {
            if (logs[i].emitter == address(usdc)) ++transfers;
        }
        assertEq(transfers, 1, "one transfer for three settlements");

        assertEq(usdc.balanceOf(payout), 17e6);
        assertEq(usdc.balanceOf(stranger), 0);
        assertEq(_credit(usdc), 0);
        assertEq(usdc.balanceOf(address(stream)), DEPOSIT - 17e6);
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 17e6);
        // what was claimed cannot be claimed again
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToClaim.selector, modelId, address(usdc))
        );
        stream.claim(modelId, address(usdc));
        // and settling the same cumulative totals again credits nothing
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToSettle.selector, permitHash, 12e6, 12e6)
        );
        _settle(12e6, 5);
    }

    function test_claim_paysThePayoutNamedAtClaimTime() public {
        _settle(10e6, 1);
        vm.prank(modelOwner);
        vault.updatePayout(modelId, stranger);
        _settle(15e6, 2);
        assertEq(stream.claim(modelId, address(usdc)), 15e6);
        assertEq(usdc.balanceOf(payout), 0);
        assertEq(usdc.balanceOf(stranger), 15e6);
    }

    function test_claim_keepsEachTokenApart() public {
        fund(user, usdfc, 10e18);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdfc), 5e18);
        _settleAs(host, p, signPermit(USER_KEY, p), 1.25e18, 3);
        _settle(2e6, 1);
        assertEq(_credit(usdfc), 1.25e18);
        assertEq(stream.claim(modelId, address(usdfc)), 1.25e18);
        assertEq(usdfc.balanceOf(payout), 1.25e18);
        assertEq(usdc.balanceOf(payout), 0);
        assertEq(_credit(usdc), 2e6);
    }

    function test_claim_keepsEachModelApart() public {
        address secondPayout = makeAddr("secondPayout");
        bytes32 second = registerModel(stranger, "second", address(accessToken), secondPayout);
        vm.prank(stranger);
        vault.authorizeHost(second, host);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), CAP);
        p.modelId = second;
        _settleAs(host, p, signPermit(USER_KEY, p), 3e6, 3);
        _settle(1e6, 1);
        assertEq(stream.claimable(second, address(usdc)), 3e6);
        assertEq(stream.inferencesOf(second), 3);
        assertEq(stream.inferencesOf(modelId), 1);
        stream.claim(second, address(usdc));
        assertEq(usdc.balanceOf(secondPayout), 3e6);
        assertEq(usdc.balanceOf(payout), 0);
        assertEq(_credit(usdc), 1e6);
    }

    function test_claim_revertsWithNothingToClaim() public {
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToClaim.selector, modelId, address(usdc))
        );
        stream.claim(modelId, address(usdc));
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToClaim.selector, UNKNOWN_MODEL, address(usdc))
        );
        stream.claim(UNKNOWN_MODEL, address(usdc));
        // a settlement that only counts requests credits nothing
        _settle(0, 3);
        vm.expectRevert(
            abi.encodeWithSelector(IPaymentStream.NothingToClaim.selector, modelId, address(usdc))
        );
        stream.claim(modelId, address(usdc));
    }

    function test_claim_stillPaysForATokenNoLongerAllowed() public {
        _settle(4e6, 1);
        vm.prank(governance);
        stream.setTokenAllowed(address(usdc), false);
        assertEq(stream.claim(modelId, address(usdc)), 4e6);
        assertEq(usdc.balanceOf(payout), 4e6);
    }

    function testFuzz_claim_paysExactlyWhatWasSettled(uint96[4] memory steps) public {
        uint256 cumulative;
        uint256 claimed;
        for (uint256 i; i < steps.length; ++i) {
            cumulative += uint256(steps[i]) % 20e6;
            if (cumulative > CAP) break;
            if (cumulative > stream.permitState(permitHash).settledAmount) {
                _settle(u128(cumulative), u64(i + 1));
            }
            if (steps[i] % 2 == 0 && _credit(usdc) != 0) claimed += stream.claim(modelId, address(usdc));
        }
        uint256 settled = stream.permitState(permitHash).settledAmount;
        assertEq(claimed + _credit(usdc), settled);
        assertEq(usdc.balanceOf(payout), claimed);
        assertEq(usdc.balanceOf(address(stream)), stream.getBalance(user, address(usdc)) + _credit(usdc));
    }

    function test_getModel_countsWhatThisContractSettled() public {
        _settle(1e6, 7);
        assertEq(stream.inferencesOf(modelId), 7);
        assertEq(_totalInferences(), 7);
    }

    // ------------------------------------------------------------ upgrades

    function test_upgrade_keepsBalancesAndPermitState() public {
        fund(otherUser, usdfc, 4e18);
        _settle(10e6, 3);
        IPaymentStream.SpendingPermit memory revoked = _permitWithNonce(1);
        bytes32 revokedHash = stream.hashPermit(revoked);
        uint64 revokedAt = storeStateToKeep(revoked);

        PaymentStreamV2 next = new PaymentStreamV2();
        vm.expectEmit(address(stream));
        emit IERC1967.Upgraded(address(next));
        vm.prank(governance);
        stream.upgradeToAndCall(address(next), "");

        assertEq(implementationOf(address(stream)), address(next));
        assertEq(PaymentStreamV2(address(stream)).version(), 2);
        assertEq(stream.owner(), governance);
        assertEq(stream.vault(), address(vault));
        assertEq(stream.settleGrace(), 2 hours);
        assertEq(stream.withdrawDelay(), 3 hours);
        assertTrue(stream.isTokenAllowed(address(usdc)));
        assertFalse(stream.isTokenAllowed(address(usdfc)));
        assertEq(stream.getBalance(user, address(usdc)), DEPOSIT - 10e6);
        assertEq(stream.getBalance(otherUser, address(usdfc)), 4e18);
        assertEq(stream.hashPermit(permit), permitHash);
        _assertState(permitHash, 10e6, 3, 0);
        _assertState(revokedHash, 0, 0, revokedAt);
        (uint256 amount, uint64 readyAt) = stream.pendingWithdrawal(user, address(usdc));
        assertEq(amount, 20e6);
        assertEq(readyAt, revokedAt + 1 hours);

        // the permit keeps settling from where it was, the revoked one stays revoked
        assertEq(_settle(15e6, 4), 5e6);
        vm.expectRevert(abi.encodeWithSelector(IPaymentStream.AlreadyRevoked.selector, revokedHash));
        vm.prank(user);
        stream.revokePermit(revoked);
        vm.warp(block.timestamp + 1 hours);
        vm.prank(user);
        assertEq(stream.withdraw(address(usdc)), 20e6);
    }

    function test_upgrade_revertsForNonGovernance() public {
        address next = address(new PaymentStreamV2());
        vm.expectRevert(_ownableUnauthorized(host));
        vm.prank(host);
        stream.upgradeToAndCall(next, "");
    }
}
