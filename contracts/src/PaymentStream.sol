// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {
    Ownable2StepUpgradeable
} from "@openzeppelin/contracts-upgradeable/access/Ownable2StepUpgradeable.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {UUPSUpgradeable} from "@openzeppelin/contracts-upgradeable/proxy/utils/UUPSUpgradeable.sol";
import {
    EIP712Upgradeable
} from "@openzeppelin/contracts-upgradeable/utils/cryptography/EIP712Upgradeable.sol";
import {IModelVault} from "./interfaces/IModelVault.sol";
import {IPaymentStream} from "./interfaces/IPaymentStream.sol";

/// @title PaymentStream
/// @notice Prepaid balances and commission-free settlement by EIP-712 spending permits.
///
/// How a charge travels: the user deposits a whitelisted stablecoin and signs one
/// `SpendingPermit{user, modelId, host, token, maxAmount, expiry, nonce}`. The host meters requests
/// off-chain and now and then calls `settle` (or `settleBatch`) with the permit's latest
/// *cumulative* amount and request count. Only the difference to what was settled before moves,
/// from the user's balance to the model's credit, so a settlement that was mined but not seen can
/// be sent again without paying twice. A permit settles in full or not at all. Anyone may `claim`
/// a model's credit: all of it goes to the model's payout address in one transfer.
///
/// Why credit and claim: a settlement then writes only this contract's storage (the permit's
/// state, the user's balance, the model's credit and request count) and makes no transfer and no
/// call that writes, ~40 % less gas than paying out each time. The vault is read once per permit,
/// at its first settlement, to check that the model's owner authorised the host.
///
/// Time rules: a permit settles until `expiry + settleGrace`; a permit the user revoked settles
/// until `revokedAt + settleGrace` (requests the host served before it saw the revocation still get
/// paid). Withdrawals wait `withdrawDelay` after a request, and the balance stays chargeable during
/// the wait, so hosts settle what they served before the money leaves.
contract PaymentStream is
    Initializable,
    Ownable2StepUpgradeable,
    UUPSUpgradeable,
    EIP712Upgradeable,
    ReentrancyGuardTransient,
    IPaymentStream
{
    using SafeERC20 for IERC20;

    bytes32 public constant PERMIT_TYPEHASH = keccak256(
        "SpendingPermit(address user,bytes32 modelId,address host,address token,uint256 maxAmount,uint64 expiry,uint256 nonce)"
    );
    /// @notice Longest withdraw delay or settle grace governance may set.
    uint64 public constant MAX_DELAY = 30 days;
    /// @notice Most entries one `settleBatch` takes (bounds the loop).
    uint256 public constant MAX_BATCH = 256;

    struct PendingWithdrawal {
        uint192 amount;
        uint64 readyAt;
    }

    /// @custom:storage-location erc7201:div.storage.PaymentStream
    struct StreamStorage {
        IModelVault vault;
        uint64 withdrawDelay;
        uint64 settleGrace;
        mapping(address token => bool) allowedTokens;
        mapping(address user => mapping(address token => uint256)) balances;
        mapping(address user => mapping(address token => PendingWithdrawal)) pending;
        mapping(bytes32 permitHash => PermitState) permits;
        // v2: settlement credits the model instead of paying it; `claim` pays the credit out
        mapping(bytes32 modelId => mapping(address token => uint256)) credits;
        mapping(bytes32 modelId => uint64) inferences;
    }

    // keccak256(abi.encode(uint256(keccak256("div.storage.PaymentStream")) - 1)) & ~bytes32(uint256(0xff))
    bytes32 private constant STORAGE_SLOT =
        0x5259b02bce741c131a26d92802be23e886bcf6eff4d6b678ecfb87665cb4f300;

    function _s() private pure returns (StreamStorage storage $) {
        assembly {
            $.slot := STORAGE_SLOT
        }
    }

    /// @custom:oz-upgrades-unsafe-allow constructor
    constructor() {
        _disableInitializers();
    }

    /// @param governance may upgrade, whitelist tokens and tune the delays
    /// @param vault_ the model registry (payout addresses, authorised hosts)
    /// @param tokens stablecoins accepted from the start
    function initialize(address governance, IModelVault vault_, address[] calldata tokens)
        external
        initializer
    {
        if (address(vault_) == address(0)) revert ZeroAddress();
        __Ownable_init(governance);
        __Ownable2Step_init();
        __EIP712_init("DIV PaymentStream", "1");
        StreamStorage storage $ = _s();
        $.vault = vault_;
        $.withdrawDelay = 1 hours;
        $.settleGrace = 1 hours;
        emit WithdrawDelaySet(1 hours);
        emit SettleGraceSet(1 hours);
        for (uint256 i; i < tokens.length; ++i) {
            _setTokenAllowed(tokens[i], true);
        }
    }

    // ---------------------------------------------------------------- governance

    /// @notice Governance: accept or stop accepting deposits of `token`. Existing balances stay
    /// withdrawable and chargeable either way.
    function setTokenAllowed(address token, bool allowed) external onlyOwner {
        _setTokenAllowed(token, allowed);
    }

    /// @notice Governance: how long a withdrawal waits after it is requested.
    function setWithdrawDelay(uint64 delay) external onlyOwner {
        if (delay > MAX_DELAY) revert DelayTooLong(delay, MAX_DELAY);
        _s().withdrawDelay = delay;
        emit WithdrawDelaySet(delay);
    }

    /// @notice Governance: how long after expiry or revocation a permit still settles.
    function setSettleGrace(uint64 grace) external onlyOwner {
        if (grace > MAX_DELAY) revert DelayTooLong(grace, MAX_DELAY);
        _s().settleGrace = grace;
        emit SettleGraceSet(grace);
    }

    function _setTokenAllowed(address token, bool allowed) private {
        if (token == address(0)) revert ZeroAddress();
        _s().allowedTokens[token] = allowed;
        emit TokenAllowed(token, allowed);
    }

    // ---------------------------------------------------------------- deposits and withdrawals

    /// @inheritdoc IPaymentStream
    function deposit(address token, uint256 amount) public nonReentrant {
        StreamStorage storage $ = _s();
        if (!$.allowedTokens[token]) revert TokenNotAllowed(token);
        if (amount == 0) revert ZeroAmount();
        uint256 before = IERC20(token).balanceOf(address(this));
        IERC20(token).safeTransferFrom(msg.sender, address(this), amount);
        // credit what arrived, not what was asked for
        uint256 received = IERC20(token).balanceOf(address(this)) - before;
        uint256 balance = $.balances[msg.sender][token] + received;
        $.balances[msg.sender][token] = balance;
        emit Deposited(msg.sender, token, received, balance);
    }

    /// @inheritdoc IPaymentStream
    function depositWithPermit(address token, uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
    {
        // A front-runner may have used the signature already; the allowance is what counts.
        try IERC20Permit(token).permit(msg.sender, address(this), amount, deadline, v, r, s) {} catch {}
        deposit(token, amount);
    }

    /// @inheritdoc IPaymentStream
    function requestWithdraw(address token, uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        StreamStorage storage $ = _s();
        uint256 balance = $.balances[msg.sender][token];
        if (balance < amount) revert InsufficientBalance(msg.sender, token, balance, amount);
        uint64 readyAt = uint64(block.timestamp) + $.withdrawDelay;
        $.pending[msg.sender][token] = PendingWithdrawal(SafeCast.toUint192(amount), readyAt);
        emit WithdrawRequested(msg.sender, token, amount, readyAt);
    }

    /// @inheritdoc IPaymentStream
    function cancelWithdraw(address token) external {
        StreamStorage storage $ = _s();
        if ($.pending[msg.sender][token].readyAt == 0) revert NoPendingWithdrawal(msg.sender, token);
        delete $.pending[msg.sender][token];
        emit WithdrawCancelled(msg.sender, token);
    }

    /// @inheritdoc IPaymentStream
    /// @dev Pays `min(requested, balance)`: charges settled during the delay come first.
    function withdraw(address token) external nonReentrant returns (uint256 amount) {
        StreamStorage storage $ = _s();
        PendingWithdrawal memory p = $.pending[msg.sender][token];
        if (p.readyAt == 0) revert NoPendingWithdrawal(msg.sender, token);
        // delays are hours long: the few seconds a block producer can shift the clock do not matter
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp < p.readyAt) revert WithdrawalNotReady(msg.sender, token, p.readyAt);
        uint256 balance = $.balances[msg.sender][token];
        amount = p.amount < balance ? p.amount : balance;
        delete $.pending[msg.sender][token];
        balance -= amount;
        $.balances[msg.sender][token] = balance;
        emit Withdrawn(msg.sender, token, amount, balance);
        if (amount != 0) IERC20(token).safeTransfer(msg.sender, amount);
    }

    // ---------------------------------------------------------------- settlement

    /// @inheritdoc IPaymentStream
    function hashPermit(SpendingPermit calldata permit) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(PERMIT_TYPEHASH, permit)));
    }

    /// @inheritdoc IPaymentStream
    function settle(
        SpendingPermit calldata permit,
        bytes calldata signature,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) external nonReentrant returns (uint256 amount) {
        bytes32 permitHash = hashPermit(permit);
        SkipReason reason = _check(permit, permitHash, signature, cumulativeAmount, cumulativeRequests);
        if (reason != SkipReason.None) {
            _revertFor(reason, permit, permitHash, cumulativeAmount, cumulativeRequests);
        }
        amount = _apply(permit, permitHash, cumulativeAmount, cumulativeRequests);
    }

    /// @inheritdoc IPaymentStream
    /// @dev An entry that would revert on its own is skipped with `SettlementSkipped` and moves
    /// nothing, so one user's empty balance cannot hold up everyone else's settlement.
    function settleBatch(Settlement[] calldata settlements)
        external
        nonReentrant
        returns (uint256 settledCount)
    {
        uint256 n = settlements.length;
        if (n > MAX_BATCH) revert BatchTooLarge(n, MAX_BATCH);
        for (uint256 i; i < n; ++i) {
            Settlement calldata e = settlements[i];
            bytes32 permitHash = hashPermit(e.permit);
            SkipReason reason =
                _check(e.permit, permitHash, e.signature, e.cumulativeAmount, e.cumulativeRequests);
            if (reason != SkipReason.None) {
                emit SettlementSkipped(permitHash, reason);
                continue;
            }
            _apply(e.permit, permitHash, e.cumulativeAmount, e.cumulativeRequests);
            ++settledCount;
        }
    }

    /// @inheritdoc IPaymentStream
    function claim(bytes32 modelId, address token) external nonReentrant returns (uint256 amount) {
        StreamStorage storage $ = _s();
        amount = $.credits[modelId][token];
        if (amount == 0) revert NothingToClaim(modelId, token);
        address payout = _payoutOf($.vault, modelId);
        delete $.credits[modelId][token];
        emit Claimed(modelId, token, payout, amount);
        IERC20(token).safeTransfer(payout, amount);
    }

    /// @dev The vault's payout address of the model, with this contract's error when it has none.
    function _payoutOf(IModelVault vault_, bytes32 modelId) private view returns (address) {
        try vault_.payoutOf(modelId) returns (address payout) {
            return payout;
        } catch {
            revert ModelNotFound(modelId);
        }
    }

    /// @inheritdoc IPaymentStream
    function revokePermit(SpendingPermit calldata permit) external {
        if (msg.sender != permit.user) revert NotPermitUser(msg.sender, permit.user);
        bytes32 permitHash = hashPermit(permit);
        PermitState storage st = _s().permits[permitHash];
        if (st.revokedAt != 0) revert AlreadyRevoked(permitHash);
        st.revokedAt = uint64(block.timestamp);
        emit PermitRevokedByUser(permitHash, msg.sender, uint64(block.timestamp));
    }

    /// @dev Every check of a settlement, without side effects.
    function _check(
        SpendingPermit calldata permit,
        bytes32 permitHash,
        bytes calldata signature,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) private view returns (SkipReason) {
        StreamStorage storage $ = _s();
        if (msg.sender != permit.host) return SkipReason.HostMismatch;
        PermitState memory st = $.permits[permitHash];
        uint64 grace = $.settleGrace;
        // windows are hours to days long: the few seconds a block producer can shift the clock do not matter
        // forge-lint: disable-next-line(block-timestamp)
        if (block.timestamp > uint256(permit.expiry) + grace) return SkipReason.Expired;
        // forge-lint: disable-next-line(block-timestamp)
        if (st.revokedAt != 0 && block.timestamp > uint256(st.revokedAt) + grace) return SkipReason.Revoked;
        if (cumulativeAmount > permit.maxAmount) return SkipReason.OverCap;
        if (cumulativeRequests < st.settledRequests) return SkipReason.RequestCountDecreased;
        if (cumulativeAmount <= st.settledAmount && cumulativeRequests == st.settledRequests) {
            return SkipReason.NothingToSettle;
        }
        if (cumulativeAmount < st.settledAmount) return SkipReason.NothingToSettle;
        // The first settlement of a permit checks the signature and that the model's owner
        // authorised the host; after that the stored state proves both (the hash binds every field).
        if (st.settledAmount == 0 && st.settledRequests == 0) {
            if (!_isUsersSignature(permit.user, permitHash, signature)) return SkipReason.BadSignature;
            IModelVault vault_ = $.vault;
            if (!vault_.wasHostAuthorized(permit.modelId, permit.host)) {
                // never authorised: the host, or the model does not exist
                try vault_.payoutOf(permit.modelId) returns (address payout) {
                    return payout == address(0) ? SkipReason.ModelNotFound : SkipReason.HostNotAuthorized;
                } catch {
                    return SkipReason.ModelNotFound;
                }
            }
        }
        uint256 delta = cumulativeAmount - st.settledAmount;
        uint256 balance = $.balances[permit.user][permit.token];
        if (balance < delta) return SkipReason.InsufficientBalance;
        return SkipReason.None;
    }

    /// @dev An ECDSA signature by `user`'s key, or else one `user` accepts by ERC-1271. Recovering
    /// first spares the common case the look at `user`'s code (a cold account, 2.6k gas) that
    /// `SignatureChecker.isValidSignatureNow` starts with; an ERC-1271 call to an account without
    /// code returns nothing and is refused.
    function _isUsersSignature(address user, bytes32 permitHash, bytes calldata signature)
        private
        view
        returns (bool)
    {
        (address recovered, ECDSA.RecoverError err, bytes32 errArg) = ECDSA.tryRecover(permitHash, signature);
        if (err == ECDSA.RecoverError.NoError && errArg == 0 && recovered == user) return true;
        return SignatureChecker.isValidERC1271SignatureNow(user, permitHash, signature);
    }

    /// @dev Moves the checked difference from the user's balance to the model's credit.
    function _apply(
        SpendingPermit calldata permit,
        bytes32 permitHash,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) private returns (uint256 amount) {
        StreamStorage storage $ = _s();
        PermitState storage st = $.permits[permitHash];
        amount = cumulativeAmount - st.settledAmount;
        uint64 requests = cumulativeRequests - st.settledRequests;
        st.settledAmount = cumulativeAmount;
        st.settledRequests = cumulativeRequests;
        $.balances[permit.user][permit.token] -= amount;
        if (amount != 0) $.credits[permit.modelId][permit.token] += amount;
        if (requests != 0) {
            // Saturate: a host may settle any count on its own zero-cap permit, and an overflow
            // here would block every later settlement of the model.
            uint64 total = $.inferences[permit.modelId];
            unchecked {
                total = requests > type(uint64).max - total ? type(uint64).max : total + requests;
            }
            $.inferences[permit.modelId] = total;
        }
        emit Settled(
            permitHash,
            permit.modelId,
            permit.user,
            permit.token,
            amount,
            requests,
            cumulativeAmount,
            cumulativeRequests
        );
    }

    function _revertFor(
        SkipReason reason,
        SpendingPermit calldata permit,
        bytes32 permitHash,
        uint128 cumulativeAmount,
        uint64 cumulativeRequests
    ) private view {
        PermitState memory st = _s().permits[permitHash];
        if (reason == SkipReason.HostMismatch) revert HostMismatch(msg.sender, permit.host);
        if (reason == SkipReason.Expired) revert PermitExpired(permitHash, permit.expiry);
        if (reason == SkipReason.Revoked) revert PermitRevoked(permitHash, st.revokedAt);
        if (reason == SkipReason.OverCap) {
            revert ExceedsPermitCap(permitHash, cumulativeAmount, permit.maxAmount);
        }
        if (reason == SkipReason.RequestCountDecreased) {
            revert RequestCountDecreased(permitHash, cumulativeRequests, st.settledRequests);
        }
        if (reason == SkipReason.NothingToSettle) {
            revert NothingToSettle(permitHash, cumulativeAmount, st.settledAmount);
        }
        if (reason == SkipReason.BadSignature) revert InvalidSignature(permitHash);
        if (reason == SkipReason.ModelNotFound) revert ModelNotFound(permit.modelId);
        if (reason == SkipReason.HostNotAuthorized) revert HostNotAuthorized(permit.modelId, permit.host);
        uint256 balance = _s().balances[permit.user][permit.token];
        revert InsufficientBalance(permit.user, permit.token, balance, cumulativeAmount - st.settledAmount);
    }

    // ---------------------------------------------------------------- views

    /// @inheritdoc IPaymentStream
    function getBalance(address user, address token) external view returns (uint256) {
        return _s().balances[user][token];
    }

    /// @inheritdoc IPaymentStream
    function permitState(bytes32 permitHash) external view returns (PermitState memory) {
        return _s().permits[permitHash];
    }

    /// @inheritdoc IPaymentStream
    function pendingWithdrawal(address user, address token)
        external
        view
        returns (uint256 amount, uint64 readyAt)
    {
        PendingWithdrawal memory p = _s().pending[user][token];
        return (p.amount, p.readyAt);
    }

    /// @inheritdoc IPaymentStream
    function claimable(bytes32 modelId, address token) external view returns (uint256) {
        return _s().credits[modelId][token];
    }

    /// @inheritdoc IPaymentStream
    function inferencesOf(bytes32 modelId) external view returns (uint64) {
        return _s().inferences[modelId];
    }

    /// @notice Whether deposits of `token` are accepted.
    function isTokenAllowed(address token) external view returns (bool) {
        return _s().allowedTokens[token];
    }

    /// @notice The model registry this contract pays out through.
    function vault() external view returns (address) {
        return address(_s().vault);
    }

    /// @notice How long a withdrawal waits after it is requested.
    function withdrawDelay() external view returns (uint64) {
        return _s().withdrawDelay;
    }

    /// @notice How long after expiry or revocation a permit still settles.
    function settleGrace() external view returns (uint64) {
        return _s().settleGrace;
    }

    /// @dev The domain's name and version as constants: `EIP712Upgradeable` would read both from
    /// storage for every permit hashed (two cold slots, ~4k gas a settlement). The same values
    /// `initialize` stored, so the domain, and every permit signed for it, is unchanged.
    function _EIP712Name() internal pure override returns (string memory) {
        return "DIV PaymentStream";
    }

    function _EIP712Version() internal pure override returns (string memory) {
        return "1";
    }

    function _authorizeUpgrade(address) internal override onlyOwner {}
}
