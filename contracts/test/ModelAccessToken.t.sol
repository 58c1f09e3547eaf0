// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {IERC20Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {IERC1967} from "@openzeppelin/contracts/interfaces/IERC1967.sol";
import {ERC1967Utils} from "@openzeppelin/contracts/proxy/ERC1967/ERC1967Utils.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {UUPSUpgradeable} from "@openzeppelin/contracts-upgradeable/proxy/utils/UUPSUpgradeable.sol";
import {DivProxy} from "../src/DivProxy.sol";
import {ModelAccessToken} from "../src/ModelAccessToken.sol";
import {IModelAccessToken} from "../src/interfaces/IModelAccessToken.sol";
import {Fixture} from "./utils/Fixture.sol";
import {ModelAccessTokenV2} from "./utils/UpgradeMocks.sol";
import {Vm} from "./utils/Vm.sol";

contract ModelAccessTokenTest is Fixture {
    bytes32 internal constant DEFAULT_ADMIN_ROLE = 0x00;
    bytes32 internal minterRole;
    address internal buyer = makeAddr("buyer");

    function setUp() public override {
        super.setUp();
        minterRole = accessToken.MINTER_ROLE();
    }

    function _initData(address admin, address paymentToken, uint256 price, address payout_)
        internal
        pure
        returns (bytes memory)
    {
        return abi.encodeCall(
            ModelAccessToken.initialize, ("MiniLM access", "MINILM", admin, paymentToken, price, payout_)
        );
    }

    /// @dev Mints `amount` payment tokens to `buyer` and approves the access token for `allowance`.
    function _prepareBuyer(uint256 amount, uint256 allowance) internal {
        usdc.mint(buyer, amount);
        vm.prank(buyer);
        usdc.approve(address(accessToken), allowance);
    }

    function _unauthorized(address account, bytes32 role) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(IAccessControl.AccessControlUnauthorizedAccount.selector, account, role);
    }

    // ------------------------------------------------------------ initialize

    function test_initialize_setsRolesThresholdsAndSale() public view {
        assertEq(accessToken.name(), "MiniLM access");
        assertEq(accessToken.symbol(), "MINILM");
        assertEq(accessToken.decimals(), 18);
        assertEq(accessToken.totalSupply(), 0);
        assertTrue(accessToken.hasRole(DEFAULT_ADMIN_ROLE, modelOwner));
        assertTrue(accessToken.hasRole(minterRole, modelOwner));
        assertFalse(accessToken.hasRole(DEFAULT_ADMIN_ROLE, address(this)));
        assertEq(minterRole, keccak256("MINTER_ROLE"));
        assertEq(accessToken.accessThreshold(), 1e18);
        assertEq(accessToken.premiumThreshold(), 100e18);
        assertEq(accessToken.paymentToken(), address(usdc));
        assertEq(accessToken.pricePerToken(), TOKEN_PRICE);
        assertEq(accessToken.payout(), payout);
    }

    function test_initialize_emitsThresholdAndSaleEvents() public {
        address impl = address(new ModelAccessToken());
        vm.expectEmit();
        emit IModelAccessToken.AccessThresholdSet(0, 1e18);
        vm.expectEmit();
        emit IModelAccessToken.PremiumThresholdSet(0, 100e18);
        vm.expectEmit();
        emit IModelAccessToken.SaleConfigured(address(usdc), TOKEN_PRICE, payout);
        new DivProxy(impl, _initData(modelOwner, address(usdc), TOKEN_PRICE, payout));
    }

    function test_initialize_allowsClosedSale() public {
        ModelAccessToken t = deployAccessToken(modelOwner, address(usdc), 0, payout);
        assertEq(t.pricePerToken(), 0);
    }

    function test_initialize_revertsOnZeroAdmin() public {
        address impl = address(new ModelAccessToken());
        vm.expectRevert(IModelAccessToken.ZeroAddress.selector);
        new DivProxy(impl, _initData(address(0), address(usdc), TOKEN_PRICE, payout));
    }

    function test_initialize_revertsOnZeroPaymentToken() public {
        address impl = address(new ModelAccessToken());
        vm.expectRevert(IModelAccessToken.ZeroAddress.selector);
        new DivProxy(impl, _initData(modelOwner, address(0), TOKEN_PRICE, payout));
    }

    function test_initialize_revertsOnZeroPayout() public {
        address impl = address(new ModelAccessToken());
        vm.expectRevert(IModelAccessToken.ZeroAddress.selector);
        new DivProxy(impl, _initData(modelOwner, address(usdc), TOKEN_PRICE, address(0)));
    }

    function test_initialize_revertsWhenCalledTwice() public {
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        accessToken.initialize("again", "AGAIN", stranger, address(usdc), 1, stranger);
    }

    function test_initialize_implementationCannotBeInitialized() public {
        ModelAccessToken impl = new ModelAccessToken();
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        impl.initialize("impl", "IMPL", stranger, address(usdc), 1, stranger);
    }

    // ------------------------------------------------------------ thresholds

    function test_setThresholds_updatesAndEmits() public {
        vm.expectEmit(address(accessToken));
        emit IModelAccessToken.AccessThresholdSet(1e18, 5e18);
        vm.expectEmit(address(accessToken));
        emit IModelAccessToken.PremiumThresholdSet(100e18, 50e18);
        vm.prank(modelOwner);
        accessToken.setThresholds(5e18, 50e18);
        assertEq(accessToken.accessThreshold(), 5e18);
        assertEq(accessToken.premiumThreshold(), 50e18);
    }

    function test_setThresholds_emitsOnlyForChangedValues() public {
        vm.recordLogs();
        vm.prank(modelOwner);
        accessToken.setThresholds(1e18, 7e18);
        Vm.Log[] memory logs = vm.getRecordedLogs();
        assertEq(logs.length, 1);
        assertEq(logs[0].topics[0], IModelAccessToken.PremiumThresholdSet.selector);
        assertEq(logs[0].data, abi.encode(uint256(100e18), uint256(7e18)));

        vm.recordLogs();
        vm.prank(modelOwner);
        accessToken.setThresholds(1e18, 7e18);
        assertEq(vm.getRecordedLogs().length, 0);
    }

    function test_setThresholds_acceptsEqualThresholds() public {
        vm.prank(modelOwner);
        accessToken.setThresholds(3e18, 3e18);
        assertEq(accessToken.accessThreshold(), 3e18);
        assertEq(accessToken.premiumThreshold(), 3e18);
    }

    function test_setThresholds_revertsOnZeroAccess() public {
        vm.expectRevert(abi.encodeWithSelector(IModelAccessToken.InvalidThresholds.selector, 0, 10e18));
        vm.prank(modelOwner);
        accessToken.setThresholds(0, 10e18);
    }

    function test_setThresholds_revertsWhenPremiumBelowAccess() public {
        vm.expectRevert(
            abi.encodeWithSelector(IModelAccessToken.InvalidThresholds.selector, 10e18, 10e18 - 1)
        );
        vm.prank(modelOwner);
        accessToken.setThresholds(10e18, 10e18 - 1);
    }

    function testFuzz_setThresholds_validatesOrder(uint256 access, uint256 premium) public {
        vm.prank(modelOwner);
        if (access == 0 || premium < access) {
            vm.expectRevert(
                abi.encodeWithSelector(IModelAccessToken.InvalidThresholds.selector, access, premium)
            );
            accessToken.setThresholds(access, premium);
        } else {
            accessToken.setThresholds(access, premium);
            assertEq(accessToken.accessThreshold(), access);
            assertEq(accessToken.premiumThreshold(), premium);
        }
    }

    function test_setThresholds_revertsForNonAdmin() public {
        vm.expectRevert(_unauthorized(stranger, DEFAULT_ADMIN_ROLE));
        vm.prank(stranger);
        accessToken.setThresholds(2e18, 20e18);
    }

    function test_setThresholds_revertsForMinterWithoutAdminRole() public {
        vm.prank(modelOwner);
        accessToken.grantRole(minterRole, stranger);
        vm.expectRevert(_unauthorized(stranger, DEFAULT_ADMIN_ROLE));
        vm.prank(stranger);
        accessToken.setThresholds(2e18, 20e18);
    }

    // ------------------------------------------------------------ hasAccess / isPremium

    function test_hasAccess_atThresholdBoundary() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 1e18 - 1);
        assertFalse(accessToken.hasAccess(buyer));
        vm.prank(modelOwner);
        accessToken.mint(buyer, 1);
        assertTrue(accessToken.hasAccess(buyer));
        assertFalse(accessToken.isPremium(buyer));
    }

    function test_isPremium_atThresholdBoundary() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 100e18 - 1);
        assertTrue(accessToken.hasAccess(buyer));
        assertFalse(accessToken.isPremium(buyer));
        vm.prank(modelOwner);
        accessToken.mint(buyer, 1);
        assertTrue(accessToken.isPremium(buyer));
    }

    function test_hasAccess_falseForEmptyAccount() public view {
        assertFalse(accessToken.hasAccess(stranger));
        assertFalse(accessToken.isPremium(stranger));
    }

    function test_hasAccess_followsThresholdChanges() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 5e18);
        assertTrue(accessToken.hasAccess(buyer));
        vm.prank(modelOwner);
        accessToken.setThresholds(5e18 + 1, 5e18 + 1);
        assertFalse(accessToken.hasAccess(buyer));
        vm.prank(modelOwner);
        accessToken.setThresholds(5e18, 5e18);
        assertTrue(accessToken.hasAccess(buyer));
        assertTrue(accessToken.isPremium(buyer));
    }

    function testFuzz_hasAccess_matchesThresholds(uint256 balance, uint256 access, uint256 premium) public {
        access = bound(access, 1, 1e30);
        premium = bound(premium, access, 1e30);
        balance = bound(balance, 0, 2e30);
        vm.startPrank(modelOwner);
        accessToken.setThresholds(access, premium);
        accessToken.mint(buyer, balance);
        vm.stopPrank();
        assertEq(accessToken.hasAccess(buyer), balance >= access);
        assertEq(accessToken.isPremium(buyer), balance >= premium);
    }

    // ------------------------------------------------------------ configureSale / quote

    function test_configureSale_updatesAndEmits() public {
        address newPayout = makeAddr("newPayout");
        vm.expectEmit(address(accessToken));
        emit IModelAccessToken.SaleConfigured(address(usdc), 7e6, newPayout);
        vm.prank(modelOwner);
        accessToken.configureSale(7e6, newPayout);
        assertEq(accessToken.pricePerToken(), 7e6);
        assertEq(accessToken.payout(), newPayout);
        assertEq(accessToken.paymentToken(), address(usdc));
    }

    function test_configureSale_revertsOnZeroPayout() public {
        vm.expectRevert(IModelAccessToken.ZeroAddress.selector);
        vm.prank(modelOwner);
        accessToken.configureSale(1e6, address(0));
    }

    function test_configureSale_revertsForNonAdmin() public {
        vm.expectRevert(_unauthorized(stranger, DEFAULT_ADMIN_ROLE));
        vm.prank(stranger);
        accessToken.configureSale(1, stranger);
    }

    function test_quote_roundsUp() public view {
        // 2.5 USDC per whole token
        assertEq(accessToken.quote(1e18), 2_500_000);
        assertEq(accessToken.quote(3e17), 750_000);
        assertEq(accessToken.quote(1), 1);
        assertEq(accessToken.quote(1e18 + 1), 2_500_001);
        assertEq(accessToken.quote(4e11), 1); // 0.000001 USDC exactly
        assertEq(accessToken.quote(4e11 + 1), 2);
        assertEq(accessToken.quote(0), 0);
    }

    // ------------------------------------------------------------ buy

    function test_buy_paysExactCostToPayout() public {
        uint256 amount = 10e18;
        uint256 cost = 25_000_000;
        _prepareBuyer(cost, cost);
        vm.expectEmit(address(accessToken));
        emit IModelAccessToken.TokensPurchased(buyer, amount, cost, payout);
        vm.prank(buyer);
        assertEq(accessToken.buy(amount), cost);
        assertEq(accessToken.balanceOf(buyer), amount);
        assertEq(accessToken.totalSupply(), amount);
        assertEq(usdc.balanceOf(payout), cost);
        assertEq(usdc.balanceOf(buyer), 0);
        assertEq(usdc.balanceOf(address(accessToken)), 0);
        assertEq(usdc.allowance(buyer, address(accessToken)), 0);
        assertTrue(accessToken.hasAccess(buyer));
    }

    function test_buy_roundsUpOddAmounts() public {
        // 1/3 token costs 833_333.33.. payment units: the buyer pays 833_334
        uint256 amount = uint256(1e18) / 3;
        _prepareBuyer(1e6, 1e6);
        vm.prank(buyer);
        uint256 cost = accessToken.buy(amount);
        assertEq(cost, 833_334);
        assertEq(usdc.balanceOf(payout), 833_334);
        assertEq(usdc.balanceOf(buyer), 1e6 - 833_334);

        // one base unit still costs one payment unit, never zero
        vm.prank(buyer);
        assertEq(accessToken.buy(1), 1);
        assertEq(usdc.balanceOf(payout), 833_335);
        assertEq(accessToken.balanceOf(buyer), amount + 1);
    }

    function testFuzz_buy_costIsCeilingAndAllGoesToPayout(uint256 amount, uint256 price) public {
        amount = bound(amount, 1, 1e30);
        price = bound(price, 1, 1e12);
        vm.prank(modelOwner);
        accessToken.configureSale(price, payout);
        uint256 exact = amount * price;
        uint256 expected = exact / 1e18 + (exact % 1e18 == 0 ? 0 : 1);
        _prepareBuyer(expected, expected);
        vm.prank(buyer);
        uint256 cost = accessToken.buy(amount);
        assertEq(cost, expected);
        assertGe(cost * 1e18, exact);
        assertLt((cost - 1) * 1e18, exact);
        assertEq(usdc.balanceOf(payout), cost);
        assertEq(usdc.balanceOf(buyer), 0);
        assertEq(accessToken.balanceOf(buyer), amount);
    }

    function test_buy_revertsWhenSaleClosed() public {
        vm.prank(modelOwner);
        accessToken.configureSale(0, payout);
        _prepareBuyer(1e6, 1e6);
        vm.expectRevert(IModelAccessToken.SaleClosed.selector);
        vm.prank(buyer);
        accessToken.buy(1e18);
    }

    function test_buy_revertsOnZeroAmount() public {
        vm.expectRevert(IModelAccessToken.ZeroAmount.selector);
        vm.prank(buyer);
        accessToken.buy(0);
    }

    function test_buy_revertsOnInsufficientAllowance() public {
        _prepareBuyer(2_500_000, 2_499_999);
        vm.expectRevert(
            abi.encodeWithSelector(
                IERC20Errors.ERC20InsufficientAllowance.selector, address(accessToken), 2_499_999, 2_500_000
            )
        );
        vm.prank(buyer);
        accessToken.buy(1e18);
        assertEq(accessToken.balanceOf(buyer), 0);
    }

    function test_buy_revertsOnInsufficientPaymentBalance() public {
        _prepareBuyer(2_499_999, type(uint256).max);
        vm.expectRevert(
            abi.encodeWithSelector(
                IERC20Errors.ERC20InsufficientBalance.selector, buyer, 2_499_999, 2_500_000
            )
        );
        vm.prank(buyer);
        accessToken.buy(1e18);
    }

    // ------------------------------------------------------------ mint / burn

    function test_mint_byMinter() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 42e18);
        assertEq(accessToken.balanceOf(buyer), 42e18);
        assertEq(accessToken.totalSupply(), 42e18);
    }

    function test_mint_byGrantedMinter() public {
        vm.prank(modelOwner);
        accessToken.grantRole(minterRole, stranger);
        vm.prank(stranger);
        accessToken.mint(buyer, 1e18);
        assertEq(accessToken.balanceOf(buyer), 1e18);
    }

    function test_mint_revertsForNonMinter() public {
        vm.expectRevert(_unauthorized(stranger, minterRole));
        vm.prank(stranger);
        accessToken.mint(stranger, 1e18);
    }

    function test_mint_revertsAfterMinterRoleRevoked() public {
        vm.prank(modelOwner);
        accessToken.revokeRole(minterRole, modelOwner);
        vm.expectRevert(_unauthorized(modelOwner, minterRole));
        vm.prank(modelOwner);
        accessToken.mint(modelOwner, 1);
    }

    function test_burn_reducesBalanceAndAccess() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 1e18);
        assertTrue(accessToken.hasAccess(buyer));
        vm.prank(buyer);
        accessToken.burn(1);
        assertEq(accessToken.balanceOf(buyer), 1e18 - 1);
        assertEq(accessToken.totalSupply(), 1e18 - 1);
        assertFalse(accessToken.hasAccess(buyer));
    }

    function test_burn_revertsBeyondBalance() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 1e18);
        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientBalance.selector, buyer, 1e18, 1e18 + 1)
        );
        vm.prank(buyer);
        accessToken.burn(1e18 + 1);
    }

    function test_burnFrom_spendsAllowance() public {
        vm.prank(modelOwner);
        accessToken.mint(buyer, 3e18);
        vm.prank(buyer);
        accessToken.approve(stranger, 2e18);
        vm.prank(stranger);
        accessToken.burnFrom(buyer, 2e18);
        assertEq(accessToken.balanceOf(buyer), 1e18);
        assertEq(accessToken.allowance(buyer, stranger), 0);

        vm.expectRevert(
            abi.encodeWithSelector(IERC20Errors.ERC20InsufficientAllowance.selector, stranger, 0, 1)
        );
        vm.prank(stranger);
        accessToken.burnFrom(buyer, 1);
    }

    function test_permit_setsAllowanceFromSignature() public {
        uint256 deadline = block.timestamp + 1 hours;
        bytes32 structHash = keccak256(
            abi.encode(ERC2612_PERMIT_TYPEHASH, user, stranger, 5e18, accessToken.nonces(user), deadline)
        );
        bytes32 digest = keccak256(abi.encodePacked(hex"1901", accessToken.DOMAIN_SEPARATOR(), structHash));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(USER_KEY, digest);
        accessToken.permit(user, stranger, 5e18, deadline, v, r, s);
        assertEq(accessToken.allowance(user, stranger), 5e18);
        assertEq(accessToken.nonces(user), 1);
    }

    // ------------------------------------------------------------ upgrades

    function test_upgrade_byAdminKeepsStorage() public {
        vm.startPrank(modelOwner);
        accessToken.mint(buyer, 12e18);
        accessToken.mint(stranger, 3e18);
        accessToken.setThresholds(2e18, 10e18);
        accessToken.configureSale(4e6, stranger);
        accessToken.grantRole(minterRole, stranger);
        vm.stopPrank();
        vm.prank(buyer);
        accessToken.approve(stranger, 1e18);

        ModelAccessTokenV2 next = new ModelAccessTokenV2();
        vm.expectEmit(address(accessToken));
        emit IERC1967.Upgraded(address(next));
        vm.prank(modelOwner);
        accessToken.upgradeToAndCall(address(next), "");

        assertEq(implementationOf(address(accessToken)), address(next));
        assertEq(ModelAccessTokenV2(address(accessToken)).version(), 2);
        assertEq(accessToken.name(), "MiniLM access");
        assertEq(accessToken.balanceOf(buyer), 12e18);
        assertEq(accessToken.balanceOf(stranger), 3e18);
        assertEq(accessToken.totalSupply(), 15e18);
        assertEq(accessToken.allowance(buyer, stranger), 1e18);
        assertEq(accessToken.accessThreshold(), 2e18);
        assertEq(accessToken.premiumThreshold(), 10e18);
        assertEq(accessToken.pricePerToken(), 4e6);
        assertEq(accessToken.payout(), stranger);
        assertEq(accessToken.paymentToken(), address(usdc));
        assertTrue(accessToken.hasRole(DEFAULT_ADMIN_ROLE, modelOwner));
        assertTrue(accessToken.hasRole(minterRole, stranger));
        assertTrue(accessToken.hasAccess(buyer));
        assertTrue(accessToken.isPremium(buyer));
        assertFalse(accessToken.isPremium(stranger));
    }

    function test_upgrade_revertsForNonAdmin() public {
        ModelAccessTokenV2 next = new ModelAccessTokenV2();
        vm.prank(modelOwner);
        accessToken.grantRole(minterRole, stranger);
        vm.expectRevert(_unauthorized(stranger, DEFAULT_ADMIN_ROLE));
        vm.prank(stranger);
        accessToken.upgradeToAndCall(address(next), "");
    }

    function test_upgrade_revertsForNonUupsImplementation() public {
        vm.expectRevert(
            abi.encodeWithSelector(ERC1967Utils.ERC1967InvalidImplementation.selector, address(usdc))
        );
        vm.prank(modelOwner);
        accessToken.upgradeToAndCall(address(usdc), "");
    }

    function test_upgrade_revertsWhenCalledOnImplementation() public {
        ModelAccessToken impl = ModelAccessToken(implementationOf(address(accessToken)));
        address next = address(new ModelAccessTokenV2());
        vm.expectRevert(UUPSUpgradeable.UUPSUnauthorizedCallContext.selector);
        impl.upgradeToAndCall(next, "");
    }
}
