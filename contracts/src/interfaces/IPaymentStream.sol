// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IPaymentStream
/// @notice Prepaid balances and commission-free settlement. A user deposits a whitelisted
/// stablecoin and signs one EIP-712 `SpendingPermit` per (model, host); the named host settles the
/// permit's latest cumulative charge as often as it likes, and each settlement moves only the
/// difference to the model's payout address: 100 %, no fee. A permit can never be charged past its
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

    event TokenAllowed(address indexed token, bool allowed);
    event Deposited(address indexed user, address indexed token, uint256 amount, uint256 balance);
    event WithdrawRequested(address indexed user, address indexed token, uint256 amount, uint64 readyAt);
    event WithdrawCancelled(address indexed user, address indexed token);
    event Withdrawn(address indexed user, address indexed token, uint256 amount, uint256 balance);
    event WithdrawDelaySet(uint64 delay);
    event SettleGraceSet(uint64 grace);
    /// @notice `amount` moved from `user` to the model's `payout`; cumulative totals after it.
    event Settled(
        bytes32 indexed permitHash,
        bytes32 indexed modelId,
        address indexed user,
        address payout,
        address token,
        uint256 amount,
        uint64 requests,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    );
    /// @notice A batch entry that was not settled, and why; nothing moved for it.
    event SettlementSkipped(bytes32 indexed permitHash, SkipReason reason);
    event PermitRevokedByUser(bytes32 indexed permitHash, address indexed user, uint64 revokedAt);

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

    function getBalance(address user, address token) external view returns (uint256);
    function hashPermit(SpendingPermit calldata permit) external view returns (bytes32);
    function permitState(bytes32 permitHash) external view returns (PermitState memory);
    function pendingWithdrawal(address user, address token)
        external
        view
        returns (uint256 amount, uint64 readyAt);
}
