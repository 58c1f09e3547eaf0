// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";

/// @title DevStablecoin
/// @notice A stand-in for USDC (6 decimals) or USDFC (18 decimals) on local chains: EIP-2612
/// `permit` like the real ones, and a `mint` anyone may call, so demos and tests can fund
/// accounts. Never deploy it where its tokens could be mistaken for money.
contract DevStablecoin is ERC20, ERC20Permit {
    uint8 private immutable DECIMALS;

    constructor(string memory name_, string memory symbol_, uint8 decimals_)
        ERC20(name_, symbol_)
        ERC20Permit(name_)
    {
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
