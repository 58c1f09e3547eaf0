// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {IERC1967} from "@openzeppelin/contracts/interfaces/IERC1967.sol";
import {IGovernor} from "@openzeppelin/contracts/governance/IGovernor.sol";
import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";
import {IAccessControl} from "@openzeppelin/contracts/access/IAccessControl.sol";
import {DivProxy} from "../src/DivProxy.sol";
import {ModelAccessToken} from "../src/ModelAccessToken.sol";
import {ModelVault} from "../src/ModelVault.sol";
import {PaymentStream} from "../src/PaymentStream.sol";
import {DaoTimelock} from "../src/dao/DaoTimelock.sol";
import {ModelGovernor} from "../src/dao/ModelGovernor.sol";
import {IModelVault} from "../src/interfaces/IModelVault.sol";
import {IPaymentStream} from "../src/interfaces/IPaymentStream.sol";
import {Fixture} from "./utils/Fixture.sol";

/// @notice A model owned by its Data DAO: the access token's holders propose and vote, the
/// timelock runs what passes and is the model's owner and payout. And the DIV contracts'
/// own upgrades going through a timelock.
contract DataDaoTest is Fixture {
    uint256 internal constant DELAY = 1 days;
    uint48 internal constant VOTING_DELAY = 1;
    uint32 internal constant VOTING_PERIOD = 3 days;
    uint256 internal constant QUORUM_PERCENT = 20;

    DaoTimelock internal timelock;
    ModelGovernor internal governor;
    address internal alice = makeAddr("alice");
    address internal bob = makeAddr("bob");
    address internal carol = makeAddr("carol");

    function setUp() public override {
        super.setUp();
        // members: 60, 30 and 10 tokens, minted by the owner before the hand-over
        vm.startPrank(modelOwner);
        accessToken.mint(alice, 60e18);
        accessToken.mint(bob, 30e18);
        accessToken.mint(carol, 10e18);
        vm.stopPrank();
        vm.warp(block.timestamp + 1);

        // the DAO: a timelock (admin renounced once the governor holds its roles) and the governor
        address[] memory none = new address[](0);
        address[] memory anyone = new address[](1); // address(0): anyone may execute what passed
        timelock = new DaoTimelock(DELAY, none, anyone, address(this));
        governor = new ModelGovernor(
            "minilm DAO", accessToken, timelock, VOTING_DELAY, VOTING_PERIOD, 1e18, QUORUM_PERCENT
        );
        timelock.grantRole(timelock.PROPOSER_ROLE(), address(governor));
        timelock.grantRole(timelock.CANCELLER_ROLE(), address(governor));
        timelock.renounceRole(timelock.DEFAULT_ADMIN_ROLE(), address(this));

        // the owner hands the model, its payout and its token over to the DAO
        vm.startPrank(modelOwner);
        vault.updatePayout(modelId, address(timelock));
        vault.transferModelOwnership(modelId, address(timelock));
        accessToken.configureSale(TOKEN_PRICE, address(timelock));
        accessToken.grantRole(accessToken.DEFAULT_ADMIN_ROLE(), address(timelock));
        accessToken.renounceRole(accessToken.MINTER_ROLE(), modelOwner);
        accessToken.renounceRole(accessToken.DEFAULT_ADMIN_ROLE(), modelOwner);
        vm.stopPrank();
    }

    function _one(address target, bytes memory data)
        internal
        pure
        returns (address[] memory targets, uint256[] memory values, bytes[] memory calldatas)
    {
        targets = new address[](1);
        targets[0] = target;
        values = new uint256[](1);
        calldatas = new bytes[](1);
        calldatas[0] = data;
    }

    /// @dev `proposer` proposes one call, `voters` vote for it, it is queued and, after the
    /// timelock's delay, executed.
    function _pass(
        address proposer,
        address target,
        bytes memory data,
        string memory what,
        address[] memory voters
    ) internal returns (uint256 id) {
        (address[] memory t, uint256[] memory v, bytes[] memory c) = _one(target, data);
        vm.prank(proposer);
        id = governor.propose(t, v, c, what);
        vm.warp(block.timestamp + VOTING_DELAY + 1);
        for (uint256 i; i < voters.length; ++i) {
            vm.prank(voters[i]);
            governor.castVote(id, 1);
        }
        vm.warp(block.timestamp + VOTING_PERIOD);
        assertEq(uint256(governor.state(id)), uint256(IGovernor.ProposalState.Succeeded));
        governor.queue(t, v, c, keccak256(bytes(what)));
        // not before the delay: members who disagree have that long to leave
        vm.expectRevert();
        governor.execute(t, v, c, keccak256(bytes(what)));
        vm.warp(block.timestamp + DELAY);
        governor.execute(t, v, c, keccak256(bytes(what)));
        assertEq(uint256(governor.state(id)), uint256(IGovernor.ProposalState.Executed));
    }

    function _two(address a, address b) internal pure returns (address[] memory v) {
        v = new address[](2);
        v[0] = a;
        v[1] = b;
    }

    function test_holdersVoteAPriceChangeThroughTheTimelock() public {
        _pass(
            alice,
            address(vault),
            abi.encodeCall(IModelVault.updatePrice, (modelId, 2_000, 70)),
            "raise the price to 0.002 USDC",
            _two(alice, bob)
        );
        IModelVault.Model memory m = vault.getModel(modelId);
        assertEq(m.pricePerRequest, 2_000);
        assertEq(m.pricePer1kTokens, 70);
        assertEq(m.owner, address(timelock));
    }

    function test_holdersAuthoriseAHostThroughTheTimelock() public {
        address newHost = makeAddr("newHost");
        _pass(
            bob,
            address(vault),
            abi.encodeCall(IModelVault.authorizeHost, (modelId, newHost)),
            "authorise newHost",
            _two(alice, bob)
        );
        assertTrue(vault.wasHostAuthorized(modelId, newHost));
        registerHost(newHost, "https://new-host.example");
        assertTrue(vault.isHostAuthorized(modelId, newHost));
    }

    function test_theFormerOwnerControlsNothing() public {
        vm.startPrank(modelOwner);
        vm.expectRevert(abi.encodeWithSelector(IModelVault.NotModelOwner.selector, modelId, modelOwner));
        vault.updatePrice(modelId, 1, 1);
        vm.expectRevert(
            abi.encodeWithSelector(
                IAccessControl.AccessControlUnauthorizedAccount.selector,
                modelOwner,
                accessToken.MINTER_ROLE()
            )
        );
        accessToken.mint(modelOwner, 1e18);
        vm.stopPrank();
    }

    function test_aNonHolderCannotProposeAndItsVoteWeighsNothing() public {
        (address[] memory t, uint256[] memory v, bytes[] memory c) =
            _one(address(vault), abi.encodeCall(IModelVault.updatePrice, (modelId, 1, 0)));
        vm.expectRevert(
            abi.encodeWithSelector(IGovernor.GovernorInsufficientProposerVotes.selector, stranger, 0, 1e18)
        );
        vm.prank(stranger);
        governor.propose(t, v, c, "make it free");

        vm.prank(carol);
        uint256 id = governor.propose(t, v, c, "make it free");
        vm.warp(block.timestamp + VOTING_DELAY + 1);
        vm.prank(stranger);
        governor.castVote(id, 1);
        vm.prank(carol);
        governor.castVote(id, 1);
        (, uint256 forVotes,) = governor.proposalVotes(id);
        assertEq(forVotes, 10e18); // carol's 10; the stranger's vote weighs 0
        vm.warp(block.timestamp + VOTING_PERIOD);
        // 10 % of the supply voted, the quorum is 20 %
        assertEq(uint256(governor.state(id)), uint256(IGovernor.ProposalState.Defeated));
        vm.expectRevert();
        governor.queue(t, v, c, keccak256(bytes("make it free")));
        assertEq(vault.getModel(modelId).pricePerRequest, PRICE_PER_REQUEST);
    }

    /// @dev Votes are read at the proposal's snapshot: tokens bought after it (a flash purchase to
    /// swing a vote) weigh nothing.
    function test_tokensBoughtAfterTheSnapshotDoNotVote() public {
        (address[] memory t, uint256[] memory v, bytes[] memory c) =
            _one(address(vault), abi.encodeCall(IModelVault.updatePrice, (modelId, 1, 0)));
        vm.prank(carol);
        uint256 id = governor.propose(t, v, c, "make it free");
        vm.warp(block.timestamp + VOTING_DELAY + 1);
        usdc.mint(stranger, 1_000e6);
        vm.startPrank(stranger);
        usdc.approve(address(accessToken), type(uint256).max);
        accessToken.buy(200e18);
        governor.castVote(id, 1);
        vm.stopPrank();
        assertEq(accessToken.getVotes(stranger), 200e18, "votes now");
        (, uint256 forVotes,) = governor.proposalVotes(id);
        assertEq(forVotes, 0);
        // and the sale paid the DAO's treasury
        assertEq(usdc.balanceOf(address(timelock)), 200 * TOKEN_PRICE);
    }

    function test_theTreasuryReceivesSettlements() public {
        fund(user, usdc, 100e6);
        IPaymentStream.SpendingPermit memory p = permitFor(user, address(usdc), 50e6);
        bytes memory sig = signPermit(USER_KEY, p);
        vm.prank(host);
        stream.settle(p, sig, 7e6, 7);
        assertEq(stream.claim(modelId, address(usdc)), 7e6);
        assertEq(usdc.balanceOf(address(timelock)), 7e6);
        assertEq(usdc.balanceOf(modelOwner), 0);
    }

    function test_votesFollowBalancesAndDelegation() public {
        // a first receipt makes the holder its own delegate
        assertEq(accessToken.delegates(alice), alice);
        assertEq(accessToken.getVotes(alice), 60e18);
        vm.prank(alice);
        accessToken.transfer(bob, 20e18);
        assertEq(accessToken.getVotes(alice), 40e18);
        assertEq(accessToken.getVotes(bob), 50e18);
        vm.prank(carol);
        accessToken.delegate(bob);
        assertEq(accessToken.getVotes(bob), 60e18);
        assertEq(accessToken.getVotes(carol), 0);
        // a chosen delegate is kept when more tokens arrive
        vm.prank(alice);
        accessToken.transfer(carol, 1e18);
        assertEq(accessToken.delegates(carol), bob);
        assertEq(accessToken.getVotes(bob), 61e18);
        assertEq(accessToken.clock(), block.timestamp);
        assertEq(accessToken.CLOCK_MODE(), "mode=timestamp");
        vm.warp(block.timestamp + 1);
        assertEq(accessToken.getPastTotalSupply(block.timestamp - 1), 100e18);
    }

    /// @dev The DIV contracts' governance can be a timelock too: then an upgrade waits for its
    /// delay, in public, and nobody (not even the proposer) can skip it.
    function test_contractUpgradesWaitForTheTimelock() public {
        address council = makeAddr("council");
        address[] memory proposers = new address[](1);
        proposers[0] = council;
        DaoTimelock upgrades = new DaoTimelock(2 days, proposers, proposers, address(0));
        vm.prank(governance);
        stream.transferOwnership(address(upgrades));
        vm.prank(address(upgrades));
        stream.acceptOwnership();

        PaymentStream next = new PaymentStream();
        bytes memory call = abi.encodeCall(stream.upgradeToAndCall, (address(next), ""));
        vm.expectRevert();
        vm.prank(council);
        stream.upgradeToAndCall(address(next), "");
        vm.prank(council);
        upgrades.schedule(address(stream), 0, call, bytes32(0), bytes32(0), 2 days);
        vm.warp(block.timestamp + 2 days - 1);
        vm.expectRevert();
        vm.prank(council);
        upgrades.execute(address(stream), 0, call, bytes32(0), bytes32(0));
        vm.warp(block.timestamp + 1);
        vm.expectEmit(address(stream));
        emit IERC1967.Upgraded(address(next));
        vm.prank(council);
        upgrades.execute(address(stream), 0, call, bytes32(0), bytes32(0));
        assertEq(implementationOf(address(stream)), address(next));
    }
}

/// @notice The released access token (v1, no vote checkpoints) upgraded in place: balances stay,
/// the total supply is checkpointed in the same transaction, holders vote after delegating.
contract AccessTokenVotesUpgradeTest is Fixture {
    function test_upgradeFromV1_addsVotesWithoutLosingBalances() public {
        bytes memory code = vm.getCode("test/legacy/ModelAccessToken.v1.json");
        address impl;
        assembly ("memory-safe") {
            impl := create(0, add(code, 0x20), mload(code))
        }
        assertTrue(impl != address(0));
        ModelAccessToken t = ModelAccessToken(
            address(
                new DivProxy(
                    impl,
                    abi.encodeCall(
                        ModelAccessToken.initialize,
                        ("v1", "V1", modelOwner, address(usdc), TOKEN_PRICE, payout)
                    )
                )
            )
        );
        address alice = makeAddr("alice");
        vm.startPrank(modelOwner);
        t.mint(alice, 70e18);
        t.mint(user, 30e18);
        t.upgradeToAndCall(
            address(new ModelAccessToken()), abi.encodeCall(ModelAccessToken.checkpointTotalSupply, ())
        );
        vm.stopPrank();

        assertEq(t.balanceOf(alice), 70e18);
        assertEq(t.totalSupply(), 100e18);
        assertTrue(t.hasAccess(alice));
        // v1 holders have not delegated yet: no votes until they do
        assertEq(t.getVotes(alice), 0);
        vm.prank(alice);
        t.delegate(alice);
        assertEq(t.getVotes(alice), 70e18);
        vm.warp(block.timestamp + 1);
        assertEq(t.getPastTotalSupply(block.timestamp - 1), 100e18, "the quorum sees v1's supply");
        // seeding again changes nothing; burning and minting move the total as they should
        t.checkpointTotalSupply();
        vm.prank(user);
        t.burn(10e18);
        vm.prank(modelOwner);
        t.mint(user, 5e18);
        vm.warp(block.timestamp + 1);
        assertEq(t.getPastTotalSupply(block.timestamp - 1), 95e18);
        assertEq(t.getVotes(user), 25e18, "a v1 holder receiving tokens becomes its own delegate");
    }
}
