// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {
    AccessControlUpgradeable
} from "@openzeppelin/contracts-upgradeable/access/AccessControlUpgradeable.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {UUPSUpgradeable} from "@openzeppelin/contracts-upgradeable/proxy/utils/UUPSUpgradeable.sol";
import {ERC20Upgradeable} from "@openzeppelin/contracts-upgradeable/token/ERC20/ERC20Upgradeable.sol";
import {
    ERC20BurnableUpgradeable
} from "@openzeppelin/contracts-upgradeable/token/ERC20/extensions/ERC20BurnableUpgradeable.sol";
import {
    ERC20PermitUpgradeable
} from "@openzeppelin/contracts-upgradeable/token/ERC20/extensions/ERC20PermitUpgradeable.sol";
import {
    ERC20VotesUpgradeable
} from "@openzeppelin/contracts-upgradeable/token/ERC20/extensions/ERC20VotesUpgradeable.sol";
import {NoncesUpgradeable} from "@openzeppelin/contracts-upgradeable/utils/NoncesUpgradeable.sol";
import {IModelAccessToken} from "./interfaces/IModelAccessToken.sol";

/// @title ModelAccessToken
/// @notice One per model. Holding `accessThreshold` admits a caller to inference on hosts, holding
/// `premiumThreshold` admits batch work. Tokens come from the owner's minters or from a primary
/// sale whose proceeds go, in full, to the owner's payout address. Upgradeable (UUPS) by the admin.
///
/// It is also the membership of the model's Data DAO: balances carry vote checkpoints
/// (`ERC20Votes`, timestamp clock) that an OpenZeppelin `Governor` reads. A holder votes with its
/// own balance from the moment it first receives tokens (it delegates to itself then, unless it
/// chose a delegate before); `delegate` moves its votes elsewhere.
contract ModelAccessToken is
    Initializable,
    ERC20Upgradeable,
    ERC20BurnableUpgradeable,
    ERC20PermitUpgradeable,
    ERC20VotesUpgradeable,
    AccessControlUpgradeable,
    UUPSUpgradeable,
    IModelAccessToken
{
    using SafeERC20 for IERC20;

    bytes32 public constant MINTER_ROLE = keccak256("MINTER_ROLE");

    /// @custom:storage-location erc7201:div.storage.ModelAccessToken
    struct TokenStorage {
        uint256 accessThreshold;
        uint256 premiumThreshold;
        IERC20 paymentToken;
        uint256 pricePerToken;
        address payout;
    }

    // keccak256(abi.encode(uint256(keccak256("div.storage.ModelAccessToken")) - 1)) & ~bytes32(uint256(0xff))
    bytes32 private constant STORAGE_SLOT =
        0x8226fab464c4bc432c810e245edbd2fd372275b56fb948adab9db803c769f300;

    function _s() private pure returns (TokenStorage storage $) {
        assembly {
            $.slot := STORAGE_SLOT
        }
    }

    /// @custom:oz-upgrades-unsafe-allow constructor
    constructor() {
        _disableInitializers();
    }

    /// @param name_ token name, e.g. "MiniLM access"
    /// @param symbol_ token symbol
    /// @param admin gets DEFAULT_ADMIN_ROLE and MINTER_ROLE (the model owner)
    /// @param paymentToken_ stablecoin the primary sale takes
    /// @param pricePerToken_ price of one whole token (1e18 base units) in payment-token units; 0 = closed
    /// @param payout_ where sale proceeds go
    function initialize(
        string calldata name_,
        string calldata symbol_,
        address admin,
        address paymentToken_,
        uint256 pricePerToken_,
        address payout_
    ) external initializer {
        if (admin == address(0) || paymentToken_ == address(0) || payout_ == address(0)) revert ZeroAddress();
        __ERC20_init(name_, symbol_);
        __ERC20Burnable_init();
        __ERC20Permit_init(name_);
        __ERC20Votes_init();
        __AccessControl_init();
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(MINTER_ROLE, admin);
        TokenStorage storage $ = _s();
        $.accessThreshold = 1e18;
        $.premiumThreshold = 100e18;
        $.paymentToken = IERC20(paymentToken_);
        $.pricePerToken = pricePerToken_;
        $.payout = payout_;
        emit AccessThresholdSet(0, 1e18);
        emit PremiumThresholdSet(0, 100e18);
        emit SaleConfigured(paymentToken_, pricePerToken_, payout_);
    }

    /// @inheritdoc IModelAccessToken
    function hasAccess(address user) external view returns (bool) {
        return balanceOf(user) >= _s().accessThreshold;
    }

    /// @inheritdoc IModelAccessToken
    function isPremium(address user) external view returns (bool) {
        return balanceOf(user) >= _s().premiumThreshold;
    }

    /// @inheritdoc IModelAccessToken
    function accessThreshold() external view returns (uint256) {
        return _s().accessThreshold;
    }

    /// @inheritdoc IModelAccessToken
    function premiumThreshold() external view returns (uint256) {
        return _s().premiumThreshold;
    }

    /// @notice The stablecoin the primary sale takes.
    function paymentToken() external view returns (address) {
        return address(_s().paymentToken);
    }

    /// @notice Price of one whole token in payment-token units (0: sale closed).
    function pricePerToken() external view returns (uint256) {
        return _s().pricePerToken;
    }

    /// @notice Where sale proceeds go.
    function payout() external view returns (address) {
        return _s().payout;
    }

    /// @inheritdoc IModelAccessToken
    function setThresholds(uint256 access, uint256 premium) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (access == 0 || premium < access) revert InvalidThresholds(access, premium);
        TokenStorage storage $ = _s();
        uint256 oldAccess = $.accessThreshold;
        uint256 oldPremium = $.premiumThreshold;
        $.accessThreshold = access;
        $.premiumThreshold = premium;
        if (oldAccess != access) emit AccessThresholdSet(oldAccess, access);
        if (oldPremium != premium) emit PremiumThresholdSet(oldPremium, premium);
    }

    /// @inheritdoc IModelAccessToken
    function configureSale(uint256 pricePerToken_, address payout_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (payout_ == address(0)) revert ZeroAddress();
        TokenStorage storage $ = _s();
        $.pricePerToken = pricePerToken_;
        $.payout = payout_;
        emit SaleConfigured(address($.paymentToken), pricePerToken_, payout_);
    }

    /// @inheritdoc IModelAccessToken
    function quote(uint256 amount) public view returns (uint256) {
        return Math.mulDiv(amount, _s().pricePerToken, 1e18, Math.Rounding.Ceil);
    }

    /// @inheritdoc IModelAccessToken
    function buy(uint256 amount) external returns (uint256 cost) {
        if (amount == 0) revert ZeroAmount();
        TokenStorage storage $ = _s();
        if ($.pricePerToken == 0) revert SaleClosed();
        cost = quote(amount);
        address payout_ = $.payout;
        _mint(msg.sender, amount);
        emit TokensPurchased(msg.sender, amount, cost, payout_);
        $.paymentToken.safeTransferFrom(msg.sender, payout_, cost);
    }

    /// @inheritdoc IModelAccessToken
    function mint(address to, uint256 amount) external onlyRole(MINTER_ROLE) {
        _mint(to, amount);
    }

    /// @notice Makes the total-supply checkpoint match the supply: tokens minted before this
    /// contract had vote checkpoints (v1) are counted once. Idempotent, anyone may call it; the
    /// upgrade from v1 calls it in the same transaction (`upgradeToAndCall`), before any burn.
    function checkpointTotalSupply() external {
        uint256 missing = totalSupply() - _getTotalSupply();
        // from the zero address to this contract, which holds and delegates nothing: only the
        // total-supply checkpoint moves
        if (missing != 0) _transferVotingUnits(address(0), address(this), missing);
    }

    /// @notice Votes count by timestamp (the Governor's periods are in seconds; block numbers
    /// mean different things on different chains).
    function clock() public view override returns (uint48) {
        return uint48(block.timestamp);
    }

    /// @notice The clock's mode (ERC-6372).
    // solhint-disable-next-line func-name-mixedcase
    function CLOCK_MODE() public pure override returns (string memory) {
        return "mode=timestamp";
    }

    /// @dev Moves vote checkpoints with the balance, and makes a first-time receiver its own
    /// delegate so every holder votes without an extra transaction.
    function _update(address from, address to, uint256 value)
        internal
        override(ERC20Upgradeable, ERC20VotesUpgradeable)
    {
        super._update(from, to, value);
        if (to != address(0) && to != address(this) && delegates(to) == address(0)) _delegate(to, to);
    }

    function nonces(address owner_)
        public
        view
        override(ERC20PermitUpgradeable, NoncesUpgradeable)
        returns (uint256)
    {
        return super.nonces(owner_);
    }

    function _authorizeUpgrade(address) internal override onlyRole(DEFAULT_ADMIN_ROLE) {}
}
