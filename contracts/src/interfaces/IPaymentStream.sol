// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IPaymentStream
/// @notice Prepaid balances and commission-free settlement. A user deposits a whitelisted
/// stablecoin and signs one EIP-712 `SpendingPermit` per (model, host); the named host settles the
/// permit's latest cumulative charge as often as it likes, and each settlement credits only the
/// difference to the model; a `claim` pays a model's whole credit to its payout address in one
/// transfer: 100 %, no fee. A permit can never be charged past its
/// `maxAmount`, and the same charge can never be paid twice.
interface IPaymentStream {
    /// @notice What a user signs (EIP-712, domain "DIV PaymentStream", version "1").
    struct SpendingPermit {
        address user;
        bytes32 modelId;
        address host;
        address token;
        uint256 maxAmount;
        uint64 expiry;
        uint256 nonce;
    }

    /// @notice One entry of a batch settlement.
    struct Settlement {
        SpendingPermit permit;
        bytes signature;
        uint128 cumulativeAmount;
        uint64 cumulativeRequests;
    }

    /// @notice What has been settled on a permit so far (one storage slot).
    struct PermitState {
        uint128 settledAmount;
        uint64 settledRequests;
        uint64 revokedAt;
    }

    /// @notice Why a batch entry was skipped (single `settle` reverts with the matching error).
    enum SkipReason {
        None,
        HostMismatch,
        Expired,
        Revoked,
        BadSignature,
        OverCap,
        NothingToSettle,
        InsufficientBalance,
        RequestCountDecreased,
        ModelNotFound,
        HostNotAuthorized
    }

    error TokenNotAllowed(address token);
    error ZeroAmount();
    error ZeroAddress();
    error InsufficientBalance(address user, address token, uint256 balance, uint256 needed);
    error NoPendingWithdrawal(address user, address token);
    error WithdrawalNotReady(address user, address token, uint64 readyAt);
    error DelayTooLong(uint64 delay, uint64 max);
    /// @notice `msg.sender` is not the host the permit names.
    error HostMismatch(address caller, address host);
    /// @notice The permit's settlement window (expiry + grace) has passed.
    error PermitExpired(bytes32 permitHash, uint64 expiry);
    /// @notice The user revoked the permit and its grace period has passed.
    error PermitRevoked(bytes32 permitHash, uint64 revokedAt);
    /// @notice The signature is not the user's (ECDSA or ERC-1271) over this permit on this chain
    /// and contract.
    error InvalidSignature(bytes32 permitHash);
    /// @notice The cumulative charge exceeds what the user signed.
    error ExceedsPermitCap(bytes32 permitHash, uint256 cumulativeAmount, uint256 maxAmount);
    /// @notice The cumulative amount and request count are not above what was settled before.
    error NothingToSettle(bytes32 permitHash, uint256 cumulativeAmount, uint256 settledAmount);
    /// @notice A request count that goes backwards.
    error RequestCountDecreased(bytes32 permitHash, uint64 cumulativeRequests, uint64 settledRequests);
    /// @notice Only the permit's user may revoke it.
    error NotPermitUser(address caller, address user);
    /// @notice The permit was revoked already.
    error AlreadyRevoked(bytes32 permitHash);
    /// @notice A batch larger than `MAX_BATCH`.
    error BatchTooLarge(uint256 size, uint256 max);
    /// @notice The model's owner never authorised the permit's host (checked when a permit first
    /// settles; a host revoked since may still settle what it served).
    error HostNotAuthorized(bytes32 modelId, address host);
    /// @notice No model has this id in the vault.
    error ModelNotFound(bytes32 modelId);
    /// @notice The model has no credit in this token.
    error NothingToClaim(bytes32 modelId, address token);

    event TokenAllowed(address indexed token, bool allowed);
    event Deposited(address indexed user, address indexed token, uint256 amount, uint256 balance);
    event WithdrawRequested(address indexed user, address indexed token, uint256 amount, uint64 readyAt);
    event WithdrawCancelled(address indexed user, address indexed token);
    event Withdrawn(address indexed user, address indexed token, uint256 amount, uint256 balance);
    event WithdrawDelaySet(uint64 delay);
    event SettleGraceSet(uint64 grace);
    /// @notice `amount` moved from `user`'s balance to the model's credit; cumulative totals after it.
    event Settled(
        bytes32 indexed permitHash,
        bytes32 indexed modelId,
        address indexed user,
        address token,
        uint256 amount,
        uint64 requests,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    );
    /// @notice A batch entry that was not settled, and why; nothing moved for it.
    event SettlementSkipped(bytes32 indexed permitHash, SkipReason reason);
    event PermitRevokedByUser(bytes32 indexed permitHash, address indexed user, uint64 revokedAt);
    /// @notice The model's whole credit in `token`, `amount`, was paid to its payout address.
    event Claimed(bytes32 indexed modelId, address indexed token, address indexed payout, uint256 amount);

    function deposit(address token, uint256 amount) external;
    function depositWithPermit(address token, uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external;
    function requestWithdraw(address token, uint256 amount) external;
    function cancelWithdraw(address token) external;
    function withdraw(address token) external returns (uint256 amount);
    function settle(
        SpendingPermit calldata permit,
        bytes calldata signature,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) external returns (uint256 amount);
    function settleBatch(Settlement[] calldata settlements) external returns (uint256 settledCount);
    function revokePermit(SpendingPermit calldata permit) external;
    /// @notice Pays the model's whole credit in `token` to its payout address (as the vault names
    /// it now). Anyone may call it: the money can only go to the payout.
    function claim(bytes32 modelId, address token) external returns (uint256 amount);
    /// @notice What settlements credited to the model in `token` and nobody claimed yet.
    function claimable(bytes32 modelId, address token) external view returns (uint256);
    /// @notice Requests settled for the model through this contract (saturates at 2^64 - 1).
    function inferencesOf(bytes32 modelId) external view returns (uint64);

    function getBalance(address user, address token) external view returns (uint256);
    function hashPermit(SpendingPermit calldata permit) external view returns (bytes32);
    function permitState(bytes32 permitHash) external view returns (PermitState memory);
    function pendingWithdrawal(address user, address token)
        external
        view
        returns (uint256 amount, uint64 readyAt);
}
