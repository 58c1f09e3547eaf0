// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IModelVault} from "../interfaces/IModelVault.sol";
import {ModelAccessToken} from "../ModelAccessToken.sol";

/// @title CatalogLens
/// @notice Reads ModelVault's catalogue, each model with its access token's terms, in one
/// `eth_call`. It is never deployed: the dApp sends its creation code with the constructor's
/// arguments as an `eth_call` without a `to`, and the constructor returns the ABI-encoded answer
/// `(Entry[] entries, uint256 total)` instead of code. So the marketplace loads in one JSON-RPC
/// round trip on any chain, trusting nothing but the vault and the tokens it reads. A returned
/// answer is bound by the code-size limit (24 KiB): the dApp asks for pages of 16 models.
contract CatalogLens {
    /// @notice A model and the terms of its access token.
    struct Entry {
        bytes32 id;
        IModelVault.Model model;
        string symbol;
        uint256 accessThreshold;
        uint256 premiumThreshold;
        uint256 pricePerToken;
        address paymentToken;
        uint256 totalSupply;
    }

    /// @param vault The ModelVault to read.
    /// @param offset With `ids` empty: the first model of the page, by the vault's listing order.
    /// @param limit With `ids` empty: the most models in the page.
    /// @param ids The models to read by id instead (a model page); an unknown id reverts.
    constructor(IModelVault vault, uint256 offset, uint256 limit, bytes32[] memory ids) {
        uint256 total = vault.modelCount();
        Entry[] memory entries;
        if (ids.length > 0) {
            entries = new Entry[](ids.length);
            for (uint256 i = 0; i < ids.length; ++i) {
                entries[i] = _entry(vault, ids[i]);
            }
        } else {
            // written so no offset or limit can overflow
            uint256 n = offset < total ? total - offset : 0;
            if (limit < n) n = limit;
            entries = new Entry[](n);
            for (uint256 i = 0; i < n; ++i) {
                entries[i] = _entry(vault, vault.modelIdAt(offset + i));
            }
        }
        bytes memory answer = abi.encode(entries, total);
        assembly ("memory-safe") {
            return(add(answer, 32), mload(answer))
        }
    }

    function _entry(IModelVault vault, bytes32 id) private view returns (Entry memory e) {
        e.id = id;
        e.model = vault.getModel(id);
        ModelAccessToken t = ModelAccessToken(e.model.accessToken);
        e.symbol = t.symbol();
        e.accessThreshold = t.accessThreshold();
        e.premiumThreshold = t.premiumThreshold();
        e.pricePerToken = t.pricePerToken();
        e.paymentToken = t.paymentToken();
        e.totalSupply = t.totalSupply();
    }
}
