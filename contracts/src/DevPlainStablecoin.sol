// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title DevPlainStablecoin
/// @notice A stand-in for a stablecoin without EIP-2612 `permit` (USDT is one) on local chains,
/// so wallets and the dApp exercise the approve-then-deposit path. A `mint` anyone may call, like
/// `DevStablecoin`. Never deploy it where its tokens could be mistaken for money.
contract DevPlainStablecoin is ERC20 {
    uint8 private immutable DECIMALS;

    constructor(string memory name_, string memory symbol_, uint8 decimals_) ERC20(name_, symbol_) {
        DECIMALS = decimals_;
    }

    function decimals() public view override returns (uint8) {
        return DECIMALS;
    }

    /// @notice Create `amount` tokens for `to` (local chains only).
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}
