// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {CatalogLens} from "../src/lens/CatalogLens.sol";
import {DevPlainStablecoin} from "../src/DevPlainStablecoin.sol";
import {IModelVault} from "../src/interfaces/IModelVault.sol";
import {Fixture} from "./utils/Fixture.sol";

contract CatalogLensTest is Fixture {
    /// @dev Runs the lens as the dApp does (creation code with arguments; the constructor's
    /// answer comes back where code would) and decodes it.
    function _read(uint256 offset, uint256 limit, bytes32[] memory ids)
        internal
        returns (CatalogLens.Entry[] memory entries, uint256 total)
    {
        address answer = address(new CatalogLens(vault, offset, limit, ids));
        (entries, total) = abi.decode(answer.code, (CatalogLens.Entry[], uint256));
    }

    function test_catalog_readsEveryModelWithItsTokenTerms() public {
        (CatalogLens.Entry[] memory entries, uint256 total) = _read(0, 10, new bytes32[](0));
        assertEq(total, vault.modelCount());
        assertEq(entries.length, total);
        CatalogLens.Entry memory e = entries[0];
        assertEq(e.id, modelId);
        assertEq(e.model.name, MODEL_NAME);
        assertEq(e.model.owner, modelOwner);
        assertEq(e.model.accessToken, address(accessToken));
        assertEq(e.model.custodians.length, 3);
        assertEq(e.symbol, accessToken.symbol());
        assertEq(e.accessThreshold, accessToken.accessThreshold());
        assertEq(e.premiumThreshold, accessToken.premiumThreshold());
        assertEq(e.pricePerToken, TOKEN_PRICE);
        assertEq(e.paymentToken, address(usdc));
        assertEq(e.totalSupply, accessToken.totalSupply());
    }

    function test_catalog_readsModelsById() public {
        bytes32[] memory ids = new bytes32[](1);
        ids[0] = modelId;
        (CatalogLens.Entry[] memory entries,) = _read(0, 0, ids);
        assertEq(entries.length, 1);
        assertEq(entries[0].model.name, MODEL_NAME);
    }

    function test_catalog_pagesStopAtTheEnd() public {
        uint256 n = vault.modelCount();
        (CatalogLens.Entry[] memory past, uint256 total) = _read(n, 5, new bytes32[](0));
        assertEq(past.length, 0);
        assertEq(total, n);
        (CatalogLens.Entry[] memory none,) = _read(0, 0, new bytes32[](0));
        assertEq(none.length, 0);
        (CatalogLens.Entry[] memory far,) = _read(type(uint256).max - 1, 5, new bytes32[](0));
        assertEq(far.length, 0, "an offset near the top does not overflow");
    }

    function test_catalog_revertsForAnUnknownModel() public {
        bytes32[] memory ids = new bytes32[](1);
        ids[0] = keccak256("no such model");
        vm.expectRevert(abi.encodeWithSelector(IModelVault.ModelNotFound.selector, ids[0]));
        new CatalogLens(vault, 0, 0, ids);
    }

    function test_plainStablecoin_hasNoPermit() public {
        DevPlainStablecoin usdt = new DevPlainStablecoin("Tether USD (dev)", "USDT", 6);
        assertEq(usdt.decimals(), 6);
        usdt.mint(stranger, 5e6);
        assertEq(usdt.balanceOf(stranger), 5e6);
        // no EIP-2612: `nonces` and `DOMAIN_SEPARATOR` do not exist, so wallets must approve
        (bool ok,) = address(usdt).call(abi.encodeWithSignature("nonces(address)", stranger));
        assertFalse(ok);
        (ok,) = address(usdt).call(abi.encodeWithSignature("DOMAIN_SEPARATOR()"));
        assertFalse(ok);
    }
}
