// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IModelAccessToken
/// @notice The access token of one model: holding `accessThreshold` of it admits a caller to
/// inference, `premiumThreshold` to batch work. Hosts read `hasAccess`/`isPremium` (or follow
/// `Transfer` and the threshold events) to gate requests.
interface IModelAccessToken {
    /// @notice A threshold pair that does not satisfy `0 < access <= premium`.
    error InvalidThresholds(uint256 accessThreshold, uint256 premiumThreshold);
    /// @notice `buy` while the primary sale is closed (price 0).
    error SaleClosed();
    /// @notice `buy` of zero tokens.
    error ZeroAmount();
    /// @notice A zero address where an account is required.
    error ZeroAddress();

    /// @notice The access threshold changed.
    event AccessThresholdSet(uint256 oldThreshold, uint256 newThreshold);
    /// @notice The premium threshold changed.
    event PremiumThresholdSet(uint256 oldThreshold, uint256 newThreshold);
    /// @notice The primary sale terms changed; `pricePerToken` 0 closes the sale.
    event SaleConfigured(address indexed paymentToken, uint256 pricePerToken, address indexed payout);
    /// @notice `buyer` bought `amount` tokens for `cost` payment-token units, all sent to `payout`.
    event TokensPurchased(address indexed buyer, uint256 amount, uint256 cost, address indexed payout);

    /// @notice Whether `user` holds at least `accessThreshold` tokens.
    function hasAccess(address user) external view returns (bool);
    /// @notice Whether `user` holds at least `premiumThreshold` tokens.
    function isPremium(address user) external view returns (bool);
    /// @notice The balance that admits a caller to inference.
    function accessThreshold() external view returns (uint256);
    /// @notice The balance that admits a caller to batch work and the higher rate limit.
    function premiumThreshold() external view returns (uint256);
    /// @notice Admin: set both thresholds (token base units).
    function setThresholds(uint256 access, uint256 premium) external;
    /// @notice Admin: set the primary sale's price per whole token and where proceeds go.
    function configureSale(uint256 pricePerToken, address payout) external;
    /// @notice Buy `amount` token base units at the sale price, paid in full to the payout address.
    function buy(uint256 amount) external returns (uint256 cost);
    /// @notice Cost in payment-token units of `amount` token base units (rounded up).
    function quote(uint256 amount) external view returns (uint256);
    /// @notice Minter: create `amount` tokens for `to`.
    function mint(address to, uint256 amount) external;
}
