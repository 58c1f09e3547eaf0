// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC1967} from "@openzeppelin/contracts/interfaces/IERC1967.sol";
import {OwnableUpgradeable} from "@openzeppelin/contracts-upgradeable/access/OwnableUpgradeable.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {DivProxy} from "../src/DivProxy.sol";
import {ModelVault} from "../src/ModelVault.sol";
import {PaymentStream} from "../src/PaymentStream.sol";
import {IModelVault} from "../src/interfaces/IModelVault.sol";
import {IPaymentStream} from "../src/interfaces/IPaymentStream.sol";
import {Fixture} from "./utils/Fixture.sol";
import {ModelVaultV2} from "./utils/UpgradeMocks.sol";

contract ModelVaultTest is Fixture {
    bytes32 internal constant UNKNOWN_MODEL = keccak256("no such model");

    function _notOwner(bytes32 id, address caller) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(IModelVault.NotModelOwner.selector, id, caller);
    }

    function _notFound(bytes32 id) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(IModelVault.ModelNotFound.selector, id);
    }

    function _badSet(uint256 n, uint8 t) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(IModelVault.InvalidCustodianSet.selector, n, t);
    }

    function _ownableUnauthorized(address account) internal pure returns (bytes memory) {
        return abi.encodeWithSelector(OwnableUpgradeable.OwnableUnauthorizedAccount.selector, account);
    }

    /// @dev Registers `config` as `stranger`, expecting `err`.
    function _expectRegisterRevert(IModelVault.ModelConfig memory config, bytes memory err) internal {
        vm.expectRevert(err);
        vm.prank(stranger);
        vault.registerModel(config);
    }

    // ------------------------------------------------------------ initialize

    function test_initialize_setsGovernance() public view {
        assertEq(vault.owner(), governance);
        assertEq(vault.paymentStream(), address(stream));
        assertEq(vault.MAX_CUSTODIANS(), 16);
    }

    function test_initialize_revertsOnZeroGovernance() public {
        address impl = address(new ModelVault());
        vm.expectRevert(abi.encodeWithSelector(OwnableUpgradeable.OwnableInvalidOwner.selector, address(0)));
        new DivProxy(impl, abi.encodeCall(ModelVault.initialize, (address(0))));
    }

    function test_initialize_revertsWhenCalledTwice() public {
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        vault.initialize(stranger);
    }

    function test_initialize_implementationCannotBeInitialized() public {
        ModelVault impl = new ModelVault();
        vm.expectRevert(Initializable.InvalidInitialization.selector);
        impl.initialize(stranger);
    }

    // ------------------------------------------------------------ registerModel

    function test_registerModel_storesModel() public view {
        IModelVault.Model memory m = vault.getModel(modelId);
        assertEq(modelId, keccak256(abi.encode(modelOwner, MODEL_NAME)));
        assertEq(m.owner, modelOwner);
        assertEq(m.payout, payout);
        assertEq(m.accessToken, address(accessToken));
        assertEq(m.threshold, 2);
        assertTrue(m.active);
        assertEq(m.totalInferences, 0);
        assertEq(m.pricePerRequest, PRICE_PER_REQUEST);
        assertEq(m.pricePer1kTokens, PRICE_PER_1K_TOKENS);
        assertEq(m.name, MODEL_NAME);
        assertEq(m.cid, MODEL_CID);
        assertEq(m.pluginCid, PLUGIN_CID);
        assertEq(m.custodians.length, 3);
        for (uint256 i; i < 3; ++i) {
            assertEq(m.custodians[i], custodianSet(3)[i]);
        }
        assertEq(vault.payoutOf(modelId), payout);
        assertEq(vault.modelCount(), 1);
        assertEq(vault.modelIdAt(0), modelId);
    }

    function test_registerModel_emitsEvents() public {
        IModelVault.ModelConfig memory config = modelConfig("second", address(accessToken), payout);
        bytes32 id = keccak256(abi.encode(stranger, "second"));
        vm.expectEmit(address(vault));
        emit IModelVault.ModelRegistered(id, stranger, "second", MODEL_CID, address(accessToken));
        vm.expectEmit(address(vault));
        emit IModelVault.ModelPriceUpdated(id, PRICE_PER_REQUEST, PRICE_PER_1K_TOKENS);
        vm.expectEmit(address(vault));
        emit IModelVault.ModelPayoutUpdated(id, payout);
        vm.expectEmit(address(vault));
        emit IModelVault.ModelCustodiansUpdated(id, custodianSet(3), 2);
        vm.expectEmit(address(vault));
        emit IModelVault.ModelActiveSet(id, true);
        vm.prank(stranger);
        assertEq(vault.registerModel(config), id);
    }

    function test_registerModel_sameNameForDifferentOwners() public {
        bytes32 id = registerModel(stranger, MODEL_NAME, address(accessToken), payout);
        assertTrue(id != modelId);
        assertEq(id, vault.modelIdOf(stranger, MODEL_NAME));
        assertEq(vault.getModel(id).owner, stranger);
        assertEq(vault.modelCount(), 2);
        assertEq(vault.modelIdAt(1), id);
    }

    function test_registerModel_allowsEmptyPluginCid() public {
        IModelVault.ModelConfig memory config = modelConfig("no-plugin", address(accessToken), payout);
        config.pluginCid = "";
        vm.prank(stranger);
        bytes32 id = vault.registerModel(config);
        assertEq(vault.getModel(id).pluginCid, "");
    }

    function test_registerModel_revertsOnDuplicate() public {
        vm.expectRevert(abi.encodeWithSelector(IModelVault.ModelAlreadyRegistered.selector, modelId));
        vm.prank(modelOwner);
        vault.registerModel(modelConfig(MODEL_NAME, address(accessToken), stranger));
    }

    function test_registerModel_revertsOnEmptyName() public {
        _expectRegisterRevert(
            modelConfig("", address(accessToken), payout),
            abi.encodeWithSelector(IModelVault.EmptyField.selector, "name")
        );
    }

    function test_registerModel_revertsOnEmptyCid() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.cid = "";
        _expectRegisterRevert(config, abi.encodeWithSelector(IModelVault.EmptyField.selector, "cid"));
    }

    function test_registerModel_revertsOnZeroAccessToken() public {
        _expectRegisterRevert(
            modelConfig("x", address(0), payout), abi.encodeWithSelector(IModelVault.ZeroAddress.selector)
        );
    }

    function test_registerModel_revertsOnZeroPayout() public {
        _expectRegisterRevert(
            modelConfig("x", address(accessToken), address(0)),
            abi.encodeWithSelector(IModelVault.ZeroAddress.selector)
        );
    }

    function test_registerModel_revertsOnEmptyCustodianSet() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.custodians = new address[](0);
        config.threshold = 1;
        _expectRegisterRevert(config, _badSet(0, 1));
    }

    function test_registerModel_acceptsSixteenCustodians() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.custodians = custodianSet(16);
        config.threshold = 16;
        vm.prank(stranger);
        bytes32 id = vault.registerModel(config);
        assertEq(vault.getModel(id).custodians.length, 16);
        assertEq(vault.getModel(id).threshold, 16);
    }

    function test_registerModel_revertsOnSeventeenCustodians() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.custodians = custodianSet(17);
        config.threshold = 9;
        _expectRegisterRevert(config, _badSet(17, 9));
    }

    function test_registerModel_revertsOnDuplicateCustodian() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.custodians = custodianSet(5);
        config.custodians[4] = config.custodians[1];
        _expectRegisterRevert(config, _badSet(5, 2));
    }

    function test_registerModel_revertsOnZeroCustodian() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.custodians[2] = address(0);
        _expectRegisterRevert(config, _badSet(3, 2));
    }

    function test_registerModel_revertsOnZeroThreshold() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.threshold = 0;
        _expectRegisterRevert(config, _badSet(3, 0));
    }

    function test_registerModel_revertsOnThresholdAboveCustodians() public {
        IModelVault.ModelConfig memory config = modelConfig("x", address(accessToken), payout);
        config.threshold = 4;
        _expectRegisterRevert(config, _badSet(3, 4));
    }

    function testFuzz_registerModel_custodianThreshold(uint256 n, uint8 t) public {
        n = bound(n, 0, 20);
        IModelVault.ModelConfig memory config = modelConfig("fuzz", address(accessToken), payout);
        config.custodians = custodianSet(n);
        config.threshold = t;
        vm.prank(stranger);
        if (n == 0 || n > 16 || t == 0 || t > n) {
            vm.expectRevert(_badSet(n, t));
            vault.registerModel(config);
        } else {
            bytes32 id = vault.registerModel(config);
            assertEq(vault.getModel(id).threshold, t);
            assertEq(vault.getModel(id).custodians.length, n);
        }
    }

    function testFuzz_modelIdOf_isKeccakOfAbiEncode(address owner_, string memory name) public view {
        assertEq(vault.modelIdOf(owner_, name), keccak256(abi.encode(owner_, name)));
    }

    // ------------------------------------------------------------ updateContent

    function test_updateContent_updatesAndEmits() public {
        vm.expectEmit(address(vault));
        emit IModelVault.ModelContentUpdated(modelId, "new-cid", "");
        vm.prank(modelOwner);
        vault.updateContent(modelId, "new-cid", "");
        assertEq(vault.getModel(modelId).cid, "new-cid");
        assertEq(vault.getModel(modelId).pluginCid, "");
    }

    function test_updateContent_revertsOnEmptyCid() public {
        vm.expectRevert(abi.encodeWithSelector(IModelVault.EmptyField.selector, "cid"));
        vm.prank(modelOwner);
        vault.updateContent(modelId, "", "plugin");
    }

    function test_updateContent_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.updateContent(modelId, "cid", "plugin");
    }

    function test_updateContent_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.updateContent(UNKNOWN_MODEL, "cid", "plugin");
    }

    // ------------------------------------------------------------ updatePrice

    function test_updatePrice_updatesAndEmits() public {
        vm.expectEmit(address(vault));
        emit IModelVault.ModelPriceUpdated(modelId, 7, 0);
        vm.prank(modelOwner);
        vault.updatePrice(modelId, 7, 0);
        assertEq(vault.getModel(modelId).pricePerRequest, 7);
        assertEq(vault.getModel(modelId).pricePer1kTokens, 0);
    }

    function test_updatePrice_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.updatePrice(modelId, 1, 1);
    }

    function test_updatePrice_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.updatePrice(UNKNOWN_MODEL, 1, 1);
    }

    // ------------------------------------------------------------ updatePayout

    function test_updatePayout_updatesAndEmits() public {
        vm.expectEmit(address(vault));
        emit IModelVault.ModelPayoutUpdated(modelId, stranger);
        vm.prank(modelOwner);
        vault.updatePayout(modelId, stranger);
        assertEq(vault.payoutOf(modelId), stranger);
        assertEq(vault.getModel(modelId).payout, stranger);
    }

    function test_updatePayout_revertsOnZeroAddress() public {
        vm.expectRevert(IModelVault.ZeroAddress.selector);
        vm.prank(modelOwner);
        vault.updatePayout(modelId, address(0));
    }

    function test_updatePayout_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.updatePayout(modelId, stranger);
    }

    function test_updatePayout_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.updatePayout(UNKNOWN_MODEL, stranger);
    }

    // ------------------------------------------------------------ updateCustodians

    function test_updateCustodians_updatesAndEmits() public {
        address[] memory next = custodianSet(5);
        vm.expectEmit(address(vault));
        emit IModelVault.ModelCustodiansUpdated(modelId, next, 3);
        vm.prank(modelOwner);
        vault.updateCustodians(modelId, next, 3);
        IModelVault.Model memory m = vault.getModel(modelId);
        assertEq(m.custodians.length, 5);
        assertEq(m.custodians[4], next[4]);
        assertEq(m.threshold, 3);
    }

    function test_updateCustodians_canShrinkTheSet() public {
        vm.prank(modelOwner);
        vault.updateCustodians(modelId, custodianSet(1), 1);
        assertEq(vault.getModel(modelId).custodians.length, 1);
        assertEq(vault.getModel(modelId).threshold, 1);
    }

    function test_updateCustodians_validatesTheSet() public {
        address[] memory set = custodianSet(4);
        set[3] = set[0];
        vm.startPrank(modelOwner);
        vm.expectRevert(_badSet(4, 2));
        vault.updateCustodians(modelId, set, 2);
        vm.expectRevert(_badSet(0, 1));
        vault.updateCustodians(modelId, new address[](0), 1);
        vm.expectRevert(_badSet(17, 1));
        vault.updateCustodians(modelId, custodianSet(17), 1);
        vm.expectRevert(_badSet(2, 0));
        vault.updateCustodians(modelId, custodianSet(2), 0);
        vm.expectRevert(_badSet(2, 3));
        vault.updateCustodians(modelId, custodianSet(2), 3);
        set = custodianSet(2);
        set[0] = address(0);
        vm.expectRevert(_badSet(2, 1));
        vault.updateCustodians(modelId, set, 1);
        vm.stopPrank();
        assertEq(vault.getModel(modelId).custodians.length, 3);
    }

    function test_updateCustodians_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.updateCustodians(modelId, custodianSet(2), 1);
    }

    function test_updateCustodians_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.updateCustodians(UNKNOWN_MODEL, custodianSet(2), 1);
    }

    // ------------------------------------------------------------ setActive

    function test_setActive_togglesAndEmits() public {
        vm.expectEmit(address(vault));
        emit IModelVault.ModelActiveSet(modelId, false);
        vm.prank(modelOwner);
        vault.setActive(modelId, false);
        assertFalse(vault.getModel(modelId).active);
        vm.prank(modelOwner);
        vault.setActive(modelId, true);
        assertTrue(vault.getModel(modelId).active);
    }

    function test_setActive_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.setActive(modelId, false);
    }

    function test_setActive_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.setActive(UNKNOWN_MODEL, false);
    }

    // ------------------------------------------------------------ hosts

    function test_authorizeHost_authorizesAndEmits() public {
        assertFalse(vault.isHostAuthorized(modelId, otherHost));
        vm.expectEmit(address(vault));
        emit IModelVault.HostAuthorized(modelId, otherHost);
        vm.prank(modelOwner);
        vault.authorizeHost(modelId, otherHost);
        assertTrue(vault.isHostAuthorized(modelId, otherHost));
        assertTrue(vault.isHostAuthorized(modelId, host));
    }

    function test_authorizeHost_revertsWhenAlreadyAuthorized() public {
        vm.expectRevert(abi.encodeWithSelector(IModelVault.HostAlreadyInState.selector, modelId, host, true));
        vm.prank(modelOwner);
        vault.authorizeHost(modelId, host);
    }

    function test_authorizeHost_revertsOnZeroAddress() public {
        vm.expectRevert(IModelVault.ZeroAddress.selector);
        vm.prank(modelOwner);
        vault.authorizeHost(modelId, address(0));
    }

    function test_authorizeHost_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.authorizeHost(modelId, stranger);
    }

    function test_authorizeHost_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.authorizeHost(UNKNOWN_MODEL, host);
    }

    function test_revokeHost_revokesAndEmits() public {
        vm.expectEmit(address(vault));
        emit IModelVault.HostRevoked(modelId, host);
        vm.prank(modelOwner);
        vault.revokeHost(modelId, host);
        assertFalse(vault.isHostAuthorized(modelId, host));
    }

    function test_revokeHost_revertsWhenNotAuthorized() public {
        vm.expectRevert(
            abi.encodeWithSelector(IModelVault.HostAlreadyInState.selector, modelId, otherHost, false)
        );
        vm.prank(modelOwner);
        vault.revokeHost(modelId, otherHost);
    }

    function test_revokeHost_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.revokeHost(modelId, host);
    }

    function test_revokeHost_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.revokeHost(UNKNOWN_MODEL, host);
    }

    function test_isHostAuthorized_falseWhileModelInactive() public {
        vm.prank(modelOwner);
        vault.setActive(modelId, false);
        assertFalse(vault.isHostAuthorized(modelId, host));
        vm.prank(modelOwner);
        vault.setActive(modelId, true);
        assertTrue(vault.isHostAuthorized(modelId, host));
    }

    function test_isHostAuthorized_falseForUnknownModelOrHost() public view {
        assertFalse(vault.isHostAuthorized(UNKNOWN_MODEL, host));
        assertFalse(vault.isHostAuthorized(modelId, stranger));
        assertFalse(vault.isHostAuthorized(modelId, address(0)));
    }

    // ------------------------------------------------------------ transferModelOwnership

    function test_transferModelOwnership_movesControl() public {
        vm.expectEmit(address(vault));
        emit IModelVault.ModelOwnershipTransferred(modelId, modelOwner, stranger);
        vm.prank(modelOwner);
        vault.transferModelOwnership(modelId, stranger);
        assertEq(vault.getModel(modelId).owner, stranger);

        // the old owner lost control, the new one has it; the id and the hosts stay
        vm.expectRevert(_notOwner(modelId, modelOwner));
        vm.prank(modelOwner);
        vault.updatePrice(modelId, 1, 1);
        vm.prank(stranger);
        vault.updatePrice(modelId, 1, 1);
        assertEq(vault.getModel(modelId).pricePerRequest, 1);
        assertTrue(vault.isHostAuthorized(modelId, host));
    }

    function test_transferModelOwnership_revertsOnZeroAddress() public {
        vm.expectRevert(IModelVault.ZeroAddress.selector);
        vm.prank(modelOwner);
        vault.transferModelOwnership(modelId, address(0));
    }

    function test_transferModelOwnership_revertsForNonOwner() public {
        vm.expectRevert(_notOwner(modelId, stranger));
        vm.prank(stranger);
        vault.transferModelOwnership(modelId, stranger);
    }

    function test_transferModelOwnership_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vm.prank(modelOwner);
        vault.transferModelOwnership(UNKNOWN_MODEL, stranger);
    }

    // ------------------------------------------------------------ host registration

    function _ids(bytes32 a) internal pure returns (bytes32[] memory ids) {
        ids = new bytes32[](1);
        ids[0] = a;
    }

    function test_registerHost_storesAndEmits() public {
        address h = makeAddr("freshHost");
        vm.warp(START_TIME + 10);
        vm.expectEmit(address(vault));
        emit IModelVault.HostRegistered(h, "https://h.example:8080", _ids(modelId));
        vm.prank(h);
        vault.registerHost("https://h.example:8080", _ids(modelId));
        IModelVault.HostRecord memory r = vault.hostRecord(h);
        assertEq(r.url, "https://h.example:8080");
        assertEq(r.models.length, 1);
        assertEq(r.models[0], modelId);
        assertEq(r.registeredAt, START_TIME + 10);
    }

    /// @dev An owner's authorisation takes effect only for a host that published where it serves:
    /// custodians (which ask `isHostAuthorized`) release nothing to a host before it registers.
    function test_isHostAuthorized_onlyOnceTheHostRegistered() public {
        address h = makeAddr("freshHost");
        vm.prank(modelOwner);
        vault.authorizeHost(modelId, h);
        assertFalse(vault.isHostAuthorized(modelId, h)); // authorised but not registered
        assertTrue(vault.wasHostAuthorized(modelId, h));
        vm.prank(h);
        vault.registerHost("https://h.example", new bytes32[](0));
        assertTrue(vault.isHostAuthorized(modelId, h));
        vm.expectEmit(address(vault));
        emit IModelVault.HostUnregistered(h);
        vm.prank(h);
        vault.unregisterHost();
        assertFalse(vault.isHostAuthorized(modelId, h)); // unregistered
        assertEq(vault.hostRecord(h).registeredAt, 0);
        assertEq(vault.hostRecord(h).url, "");
    }

    function test_registerHost_aRegistrationWithoutAuthorisationServesNothing() public {
        address h = makeAddr("freshHost");
        vm.prank(h);
        vault.registerHost("https://h.example", _ids(modelId));
        assertFalse(vault.isHostAuthorized(modelId, h));
        assertFalse(vault.isHostServing(modelId, h));
    }

    function test_isHostServing_needsServingAuthorisedAndActive() public {
        assertFalse(vault.isHostServing(modelId, host)); // registered without naming the model
        vm.prank(host);
        vault.registerHost(HOST_URL, _ids(modelId));
        assertTrue(vault.isHostServing(modelId, host));
        vm.prank(modelOwner);
        vault.setActive(modelId, false);
        assertFalse(vault.isHostServing(modelId, host)); // paused
        vm.startPrank(modelOwner);
        vault.setActive(modelId, true);
        vault.revokeHost(modelId, host);
        vm.stopPrank();
        assertFalse(vault.isHostServing(modelId, host)); // revoked
    }

    function test_registerHost_replacesWhatWasPublished() public {
        bytes32 second = registerModel(stranger, "second", address(accessToken), payout);
        vm.prank(stranger);
        vault.authorizeHost(second, host);
        vm.prank(host);
        vault.registerHost(HOST_URL, _ids(modelId));
        vm.prank(host);
        vault.registerHost("https://moved.example", _ids(second));
        assertFalse(vault.isHostServing(modelId, host)); // no longer named
        assertTrue(vault.isHostServing(second, host));
        assertEq(vault.hostRecord(host).url, "https://moved.example");
        vm.prank(host);
        vault.unregisterHost();
        assertFalse(vault.isHostServing(second, host));
    }

    function test_registerHost_isTheCallersOwn() public {
        vm.prank(stranger);
        vault.registerHost("https://evil.example", _ids(modelId));
        assertEq(vault.hostRecord(host).url, HOST_URL); // a stranger cannot move another host
        assertFalse(vault.isHostServing(modelId, stranger));
    }

    function test_registerHost_refusesBadInput() public {
        vm.startPrank(host);
        vm.expectRevert(abi.encodeWithSelector(IModelVault.InvalidHostUrl.selector, 0));
        vault.registerHost("", new bytes32[](0));
        bytes memory long = new bytes(257);
        for (uint256 i; i < long.length; ++i) {
            long[i] = "a";
        }
        vm.expectRevert(abi.encodeWithSelector(IModelVault.InvalidHostUrl.selector, 257));
        vault.registerHost(string(long), new bytes32[](0));
        vm.expectRevert(abi.encodeWithSelector(IModelVault.TooManyHostModels.selector, 65, 64));
        vault.registerHost(HOST_URL, new bytes32[](65));
        vm.expectRevert(abi.encodeWithSelector(IModelVault.ModelNotFound.selector, UNKNOWN_MODEL));
        vault.registerHost(HOST_URL, _ids(UNKNOWN_MODEL));
        vm.stopPrank();
        // nothing of the refused calls stuck
        assertEq(vault.hostRecord(host).url, HOST_URL);
        vm.expectRevert(abi.encodeWithSelector(IModelVault.HostNotRegistered.selector, stranger));
        vm.prank(stranger);
        vault.unregisterHost();
    }

    // ------------------------------------------------------------ settled-request count

    /// @dev Settles `requests` requests (and as many micro-units) on a fresh permit of `user` for
    /// model `id` through the fixture's payment stream.
    function _settleRequests(bytes32 id, uint64 requests) internal {
        fund(user, usdc, requests);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), requests);
        p.modelId = id;
        p.nonce = uint256(keccak256(abi.encode(id, requests, block.timestamp)));
        bytes memory signature = signPermit(USER_KEY, p);
        vm.prank(host);
        stream.settle(p, signature, requests, requests);
    }

    function test_getModel_countsRequestsThePaymentStreamSettled() public {
        _settleRequests(modelId, 5);
        _settleRequests(modelId, 7);
        assertEq(vault.getModel(modelId).totalInferences, 12);
    }

    function test_getModel_countsForAnInactiveModel() public {
        _settleRequests(modelId, 3);
        vm.prank(modelOwner);
        vault.setActive(modelId, false);
        assertEq(vault.getModel(modelId).totalInferences, 3);
    }

    function test_getModel_countsNothingBeforeAPaymentStreamIsSet() public {
        ModelVault fresh = deployVault(governance);
        vm.prank(modelOwner);
        bytes32 id = fresh.registerModel(modelConfig(MODEL_NAME, address(accessToken), payout));
        assertEq(fresh.getModel(id).totalInferences, 0);
    }

    // ------------------------------------------------------------ setPaymentStream

    function test_setPaymentStream_byGovernance() public {
        vm.expectEmit(address(vault));
        emit IModelVault.PaymentStreamSet(stranger);
        vm.prank(governance);
        vault.setPaymentStream(stranger);
        assertEq(vault.paymentStream(), stranger);
    }

    function test_setPaymentStream_getModelReadsTheNewOnesCount() public {
        _settleRequests(modelId, 4);
        PaymentStream next = deployStream(governance, vault, twoTokens(address(usdc), address(usdfc)));
        vm.prank(governance);
        vault.setPaymentStream(address(next));
        assertEq(vault.getModel(modelId).totalInferences, 0);
    }

    function test_setPaymentStream_revertsOnZeroAddress() public {
        vm.expectRevert(IModelVault.ZeroAddress.selector);
        vm.prank(governance);
        vault.setPaymentStream(address(0));
    }

    function test_setPaymentStream_revertsForNonGovernance() public {
        vm.expectRevert(_ownableUnauthorized(modelOwner));
        vm.prank(modelOwner);
        vault.setPaymentStream(stranger);
    }

    function test_transferOwnership_isTwoStep() public {
        vm.prank(governance);
        vault.transferOwnership(stranger);
        assertEq(vault.owner(), governance);
        assertEq(vault.pendingOwner(), stranger);
        vm.prank(stranger);
        vault.acceptOwnership();
        assertEq(vault.owner(), stranger);
        vm.expectRevert(_ownableUnauthorized(governance));
        vm.prank(governance);
        vault.setPaymentStream(governance);
    }

    // ------------------------------------------------------------ views

    function test_modelIdAt_revertsPastTheEnd() public {
        vm.expectRevert(abi.encodeWithSelector(IModelVault.IndexOutOfRange.selector, 1, 1));
        vault.modelIdAt(1);
    }

    function test_modelIdAt_listsInRegistrationOrder() public {
        bytes32 a = registerModel(stranger, "a", address(accessToken), payout);
        bytes32 b = registerModel(modelOwner, "b", address(accessToken), payout);
        assertEq(vault.modelCount(), 3);
        assertEq(vault.modelIdAt(0), modelId);
        assertEq(vault.modelIdAt(1), a);
        assertEq(vault.modelIdAt(2), b);
        vm.expectRevert(abi.encodeWithSelector(IModelVault.IndexOutOfRange.selector, type(uint256).max, 3));
        vault.modelIdAt(type(uint256).max);
    }

    function test_modelCount_emptyVault() public {
        ModelVault fresh = deployVault(governance);
        assertEq(fresh.modelCount(), 0);
        vm.expectRevert(abi.encodeWithSelector(IModelVault.IndexOutOfRange.selector, 0, 0));
        fresh.modelIdAt(0);
    }

    function test_getModel_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vault.getModel(UNKNOWN_MODEL);
    }

    function test_payoutOf_revertsForUnknownModel() public {
        vm.expectRevert(_notFound(UNKNOWN_MODEL));
        vault.payoutOf(UNKNOWN_MODEL);
    }

    // ------------------------------------------------------------ upgrades

    function test_upgrade_byGovernanceKeepsStorage() public {
        bytes32 second = registerModel(stranger, "second", address(accessToken), stranger);
        vm.startPrank(modelOwner);
        vault.updatePrice(modelId, 11, 22);
        vault.authorizeHost(modelId, otherHost);
        vault.setActive(modelId, false);
        vm.stopPrank();
        vm.prank(stranger);
        vault.authorizeHost(second, host);
        _settleRequests(second, 9);

        ModelVaultV2 next = new ModelVaultV2();
        vm.expectEmit(address(vault));
        emit IERC1967.Upgraded(address(next));
        vm.prank(governance);
        vault.upgradeToAndCall(address(next), "");

        assertEq(implementationOf(address(vault)), address(next));
        assertEq(ModelVaultV2(address(vault)).version(), 2);
        assertEq(vault.owner(), governance);
        assertEq(vault.paymentStream(), address(stream));
        assertEq(vault.modelCount(), 2);
        assertEq(vault.modelIdAt(0), modelId);
        assertEq(vault.modelIdAt(1), second);
        IModelVault.Model memory m = vault.getModel(modelId);
        assertEq(m.owner, modelOwner);
        assertEq(m.pricePerRequest, 11);
        assertEq(m.pricePer1kTokens, 22);
        assertEq(m.cid, MODEL_CID);
        assertEq(m.custodians.length, 3);
        assertFalse(m.active);
        assertEq(vault.getModel(second).totalInferences, 9);
        assertEq(vault.payoutOf(second), stranger);
        vm.prank(modelOwner);
        vault.setActive(modelId, true);
        assertTrue(vault.isHostAuthorized(modelId, host));
        assertTrue(vault.isHostAuthorized(modelId, otherHost));
    }

    function test_upgrade_revertsForNonGovernance() public {
        address next = address(new ModelVaultV2());
        vm.expectRevert(_ownableUnauthorized(modelOwner));
        vm.prank(modelOwner);
        vault.upgradeToAndCall(next, "");
    }
}
