// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC1967Proxy} from "@openzeppelin/contracts/proxy/ERC1967/ERC1967Proxy.sol";

/// @title DivProxy
/// @notice The ERC-1967 proxy every upgradeable DIV contract sits behind, compiled here so the
/// deployer (`div deploy`) ships its bytecode with the rest.
contract DivProxy is ERC1967Proxy {
    constructor(address implementation, bytes memory data) payable ERC1967Proxy(implementation, data) {}
}
