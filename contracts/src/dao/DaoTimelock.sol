// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";

/// @title DaoTimelock
/// @notice OpenZeppelin's `TimelockController` under a name of its own, so the deployment tools
/// find its artifact: a Data DAO's treasury and the owner of what it governs (its model in
/// `ModelVault`, its access token), and the governance of the DIV contracts themselves, whose
/// upgrades then wait for its delay.
contract DaoTimelock is TimelockController {
    constructor(uint256 minDelay, address[] memory proposers, address[] memory executors, address admin)
        TimelockController(minDelay, proposers, executors, admin)
    {}
}
