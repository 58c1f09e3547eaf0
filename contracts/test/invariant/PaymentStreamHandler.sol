// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {DevStablecoin} from "../../src/DevStablecoin.sol";
import {PaymentStream} from "../../src/PaymentStream.sol";
import {IPaymentStream} from "../../src/interfaces/IPaymentStream.sol";
import {Base} from "../utils/Test.sol";

/// @title PaymentStreamHandler
/// @notice Drives the payment stream through bounded deposits, withdrawal requests, cancellations
/// and withdrawals, clock moves, single and batch settlements of a few pre-signed permits with
/// growing cumulative amounts, revocations and claims, keeping ghost sums of every unit that moves.
contract PaymentStreamHandler is Base {
    struct Entry {
        IPaymentStream.SpendingPermit permit;
        bytes signature;
        bytes32 permitHash;
        address payout;
    }

    uint256 public constant ACTORS = 3;
    uint256 public constant TOKENS = 2;

    PaymentStream public immutable stream;
    address public immutable host;

    DevStablecoin[TOKENS] internal tokens;
    uint256[ACTORS] internal keys;
    address[ACTORS] internal actors;
    address[] internal payoutList;
    bytes32[] internal modelList;
    Entry[] internal entries;

    /// @notice The handler's clock: forge may reset `block.timestamp` between calls.
    uint256 public currentTime;

    // ghost sums, per token
    mapping(address token => uint256) public ghostDeposited;
    mapping(address token => uint256) public ghostWithdrawn;
    mapping(address token => uint256) public ghostPaid;
    mapping(address token => uint256) public ghostClaimed;
    // per payout and token, and per permit: settled for the payout's model, and claimed to it
    mapping(address payout => mapping(address token => uint256)) public ghostPaidTo;
    mapping(address payout => mapping(address token => uint256)) public ghostClaimedTo;
    mapping(bytes32 permitHash => uint256) public ghostSettled;
    // what each actor's balance must be
    mapping(address user => mapping(address token => uint256)) public ghostBalance;
    /// @notice Withdrawals that paid other than min(requested, balance) (must stay 0).
    uint256 public ghostOverWithdrawals;
    /// @notice Settlements that paid for a permit replayed under another chain id (must stay 0).
    uint256 public ghostCrossChainSettlements;

    mapping(bytes4 selector => uint256) public calls;
    uint256 public settlements;
    uint256 public skippedOrRejected;

    constructor(
        PaymentStream stream_,
        DevStablecoin[TOKENS] memory tokens_,
        address host_,
        bytes32[] memory modelIds,
        address[] memory payouts
    ) {
        stream = stream_;
        tokens = tokens_;
        host = host_;
        currentTime = block.timestamp;
        payoutList = payouts;
        modelList = modelIds;
        for (uint256 i; i < ACTORS; ++i) {
            keys[i] = 0xACE0 + i;
            actors[i] = vm.addr(keys[i]);
            vm.label(actors[i], string.concat("actor", vm.toString(i)));
        }
        // every actor signs one permit per token and model, with caps and lifetimes that differ
        for (uint256 a; a < ACTORS; ++a) {
            for (uint256 t; t < TOKENS; ++t) {
                for (uint256 m; m < modelIds.length; ++m) {
                    uint256 unit = 10 ** tokens_[t].decimals();
                    IPaymentStream.SpendingPermit memory p = IPaymentStream.SpendingPermit({
                        user: actors[a],
                        modelId: modelIds[m],
                        host: host_,
                        token: address(tokens_[t]),
                        maxAmount: (50 + 100 * a + 25 * m) * unit,
                        expiry: SafeCast.toUint64(block.timestamp + (1 + a + m) * 1 days),
                        nonce: entries.length
                    });
                    bytes32 h = stream_.hashPermit(p);
                    (uint8 v, bytes32 r, bytes32 s) = vm.sign(keys[a], h);
                    entries.push(Entry(p, abi.encodePacked(r, s, v), h, payouts[m]));
                }
            }
        }
    }

    modifier tick(bytes4 selector) {
        vm.warp(currentTime);
        ++calls[selector];
        _;
    }

    // ------------------------------------------------------------ actions

    function deposit(uint256 actorSeed, uint256 tokenSeed, uint256 amount)
        external
        tick(this.deposit.selector)
    {
        address actor = actors[actorSeed % ACTORS];
        DevStablecoin token = tokens[tokenSeed % TOKENS];
        amount = bound(amount, 1, 500 * 10 ** token.decimals());
        token.mint(actor, amount);
        vm.startPrank(actor);
        token.approve(address(stream), amount);
        stream.deposit(address(token), amount);
        vm.stopPrank();
        ghostDeposited[address(token)] += amount;
        ghostBalance[actor][address(token)] += amount;
    }

    function requestWithdraw(uint256 actorSeed, uint256 tokenSeed, uint256 amount)
        external
        tick(this.requestWithdraw.selector)
    {
        address actor = actors[actorSeed % ACTORS];
        address token = address(tokens[tokenSeed % TOKENS]);
        uint256 balance = stream.getBalance(actor, token);
        if (balance == 0) return;
        amount = bound(amount, 1, balance);
        vm.prank(actor);
        stream.requestWithdraw(token, amount);
    }

    function cancelWithdraw(uint256 actorSeed, uint256 tokenSeed)
        external
        tick(this.cancelWithdraw.selector)
    {
        address actor = actors[actorSeed % ACTORS];
        address token = address(tokens[tokenSeed % TOKENS]);
        (, uint64 readyAt) = stream.pendingWithdrawal(actor, token);
        if (readyAt == 0) return;
        vm.prank(actor);
        stream.cancelWithdraw(token);
    }

    /// @notice Withdraw the first pending request from `seed` on; when it is not ready yet, the
    /// user waits for it (the clock moves to `readyAt`), so settlements race the withdrawal.
    function withdraw(uint256 seed) external tick(this.withdraw.selector) {
        for (uint256 k; k < ACTORS * TOKENS; ++k) {
            uint256 i = (seed % (ACTORS * TOKENS) + k) % (ACTORS * TOKENS);
            address actor = actors[i / TOKENS];
            DevStablecoin token = tokens[i % TOKENS];
            (uint256 requested, uint64 readyAt) = stream.pendingWithdrawal(actor, address(token));
            if (readyAt == 0) continue;
            if (currentTime < readyAt) {
                currentTime = readyAt;
                vm.warp(currentTime);
            }
            uint256 balance = stream.getBalance(actor, address(token));
            uint256 before = token.balanceOf(actor);
            vm.prank(actor);
            uint256 amount = stream.withdraw(address(token));
            uint256 received = token.balanceOf(actor) - before;
            if (received != amount || amount > requested || amount > balance) ++ghostOverWithdrawals;
            if (amount != (requested < balance ? requested : balance)) ++ghostOverWithdrawals;
            ghostWithdrawn[address(token)] += received;
            ghostBalance[actor][address(token)] -= received;
            return;
        }
    }

    function warp(uint256 seconds_) external tick(this.warp.selector) {
        currentTime += bound(seconds_, 1, 6 hours);
        vm.warp(currentTime);
    }

    /// @notice Settle entry `entrySeed` at a cumulative amount `delta` above what it settled; the
    /// amount sometimes passes the cap and the balance, and the request count sometimes stalls.
    function settle(uint256 entrySeed, uint256 delta, uint256 requests) external tick(this.settle.selector) {
        Entry storage e = entries[entrySeed % entries.length];
        (uint128 cumulativeAmount, uint64 cumulativeRequests) = _nextCharge(e, delta, requests);
        vm.prank(host);
        try stream.settle(e.permit, e.signature, cumulativeAmount, cumulativeRequests) returns (
            uint256 amount
        ) {
            ++settlements;
            _record(e, amount);
        } catch {
            ++skippedOrRejected;
        }
    }

    /// @notice Settle two entries in one batch (possibly the same one twice).
    function settleBatch(uint256 firstSeed, uint256 secondSeed, uint256 delta, uint256 requests)
        external
        tick(this.settleBatch.selector)
    {
        Entry storage a = entries[firstSeed % entries.length];
        Entry storage b = entries[secondSeed % entries.length];
        IPaymentStream.Settlement[] memory batch = new IPaymentStream.Settlement[](2);
        (uint128 amountA, uint64 requestsA) = _nextCharge(a, delta, requests);
        (uint128 amountB, uint64 requestsB) = _nextCharge(b, delta / 2, requests / 2);
        batch[0] = IPaymentStream.Settlement(a.permit, a.signature, amountA, requestsA);
        batch[1] = IPaymentStream.Settlement(b.permit, b.signature, amountB, requestsB);
        uint256 beforeA = stream.permitState(a.permitHash).settledAmount;
        uint256 beforeB = a.permitHash == b.permitHash ? 0 : stream.permitState(b.permitHash).settledAmount;
        vm.prank(host);
        uint256 count = stream.settleBatch(batch);
        settlements += count;
        skippedOrRejected += 2 - count;
        _record(a, stream.permitState(a.permitHash).settledAmount - beforeA);
        if (a.permitHash != b.permitHash) {
            _record(b, stream.permitState(b.permitHash).settledAmount - beforeB);
        }
    }

    /// @notice The host (or anyone holding the calldata) replays entry `entrySeed`'s permit and
    /// signature as if the chain had another id (the same contract deployed at the same address
    /// on another chain, as a deterministic deployer gives): it must never settle.
    function settleOnAnotherChain(uint256 entrySeed, uint256 chainSeed, uint256 delta)
        external
        tick(this.settleOnAnotherChain.selector)
    {
        Entry storage e = entries[entrySeed % entries.length];
        (uint128 cumulativeAmount, uint64 cumulativeRequests) = _nextCharge(e, delta, 1);
        uint256 home = block.chainid;
        uint256 other = bound(chainSeed, 1, type(uint64).max);
        if (other == home) other = home + 1;
        vm.chainId(other);
        vm.prank(host);
        try stream.settle(e.permit, e.signature, cumulativeAmount, cumulativeRequests) returns (
            uint256 amount
        ) {
            if (amount != 0) ++ghostCrossChainSettlements;
        } catch {}
        vm.chainId(home);
    }

    /// @notice Anyone claims a model's credit in a token: it all goes to that model's payout.
    function claim(uint256 modelSeed, uint256 tokenSeed) external tick(this.claim.selector) {
        uint256 m = modelSeed % modelList.length;
        DevStablecoin token = tokens[tokenSeed % TOKENS];
        uint256 credit = stream.claimable(modelList[m], address(token));
        if (credit == 0) return;
        uint256 before = token.balanceOf(payoutList[m]);
        uint256 amount = stream.claim(modelList[m], address(token));
        uint256 received = token.balanceOf(payoutList[m]) - before;
        if (amount != credit || received != credit) ++ghostOverWithdrawals;
        ghostClaimed[address(token)] += received;
        ghostClaimedTo[payoutList[m]][address(token)] += received;
    }

    function revoke(uint256 entrySeed) external tick(this.revoke.selector) {
        Entry storage e = entries[entrySeed % entries.length];
        if (stream.permitState(e.permitHash).revokedAt != 0) return;
        vm.prank(e.permit.user);
        stream.revokePermit(e.permit);
    }

    function _nextCharge(Entry storage e, uint256 delta, uint256 requests)
        internal
        view
        returns (uint128 cumulativeAmount, uint64 cumulativeRequests)
    {
        IPaymentStream.PermitState memory st = stream.permitState(e.permitHash);
        // up to 60 % of the cap per step, so some steps run over the cap
        delta = bound(delta, 0, (e.permit.maxAmount * 3) / 5);
        cumulativeAmount = SafeCast.toUint128(st.settledAmount + delta);
        cumulativeRequests = SafeCast.toUint64(st.settledRequests + bound(requests, 0, 5));
    }

    function _record(Entry storage e, uint256 amount) internal {
        address token = e.permit.token;
        ghostSettled[e.permitHash] += amount;
        ghostPaid[token] += amount;
        ghostPaidTo[e.payout][token] += amount;
        ghostBalance[e.permit.user][token] -= amount;
    }

    // ------------------------------------------------------------ views for the invariants

    function entryCount() external view returns (uint256) {
        return entries.length;
    }

    function entryAt(uint256 i) external view returns (Entry memory) {
        return entries[i];
    }

    function actorAt(uint256 i) external view returns (address) {
        return actors[i];
    }

    function tokenAt(uint256 i) external view returns (DevStablecoin) {
        return tokens[i];
    }

    function payoutAddresses() external view returns (address[] memory) {
        return payoutList;
    }

    /// @notice Σ of the models' unclaimed credits in `token_`.
    function sumCredits(address token_) external view returns (uint256 sum) {
        for (uint256 i; i < modelList.length; ++i) {
            sum += stream.claimable(modelList[i], token_);
        }
    }

    /// @notice What `payoutList[i]`'s model earned in `token_`: claimed to it plus still credited.
    function earned(uint256 i, address token_) external view returns (uint256) {
        return DevStablecoin(token_).balanceOf(payoutList[i]) + stream.claimable(modelList[i], token_);
    }

    /// @notice Σ of the actors' stream balances in `token_`.
    function sumBalances(address token_) external view returns (uint256 sum) {
        for (uint256 i; i < ACTORS; ++i) {
            sum += stream.getBalance(actors[i], token_);
        }
    }

    /// @notice Σ of the signed caps of the permits paying `payout_` in `token_`.
    function sumCaps(address payout_, address token_) external view returns (uint256 sum) {
        for (uint256 i; i < entries.length; ++i) {
            if (entries[i].payout == payout_ && entries[i].permit.token == token_) {
                sum += entries[i].permit.maxAmount;
            }
        }
    }

    /// @notice Σ of `settledAmount` the stream stores for the permits paying `payout_` in `token_`.
    function sumSettled(address payout_, address token_) external view returns (uint256 sum) {
        for (uint256 i; i < entries.length; ++i) {
            if (entries[i].payout == payout_ && entries[i].permit.token == token_) {
                sum += stream.permitState(entries[i].permitHash).settledAmount;
            }
        }
    }
}
