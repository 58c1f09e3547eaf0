// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ModelAccessToken} from "../../src/ModelAccessToken.sol";
import {ModelVault} from "../../src/ModelVault.sol";
import {PaymentStream} from "../../src/PaymentStream.sol";

/// @notice Next versions of the UUPS contracts for upgrade tests: the same storage, one new view.
contract ModelAccessTokenV2 is ModelAccessToken {
    function version() external pure returns (uint256) {
        return 2;
    }
}

contract ModelVaultV2 is ModelVault {
    function version() external pure returns (uint256) {
        return 2;
    }
}

contract PaymentStreamV2 is PaymentStream {
    function version() external pure returns (uint256) {
        return 2;
    }
}
