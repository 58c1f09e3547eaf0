// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {DevStablecoin} from "../../src/DevStablecoin.sol";
import {DivProxy} from "../../src/DivProxy.sol";
import {ModelAccessToken} from "../../src/ModelAccessToken.sol";
import {ModelVault} from "../../src/ModelVault.sol";
import {PaymentStream} from "../../src/PaymentStream.sol";
import {IModelVault} from "../../src/interfaces/IModelVault.sol";
import {IPaymentStream} from "../../src/interfaces/IPaymentStream.sol";
import {Test} from "./Test.sol";

/// @title Fixture
/// @notice The deployment every suite starts from: a 6- and an 18-decimal stablecoin, the vault
/// and the payment stream behind `DivProxy`, a model access token, and one registered model whose
/// owner authorised `host`. Plus helpers to fund balances and to build and sign permits.
abstract contract Fixture is Test {
    /// @dev secp256k1 group order.
    uint256 internal constant SECP256K1_N =
        0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;
    /// @dev EIP-2612 `Permit` type hash (OpenZeppelin `ERC20Permit`).
    bytes32 internal constant ERC2612_PERMIT_TYPEHASH =
        keccak256("Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)");
    /// @dev `ERC1967Utils.IMPLEMENTATION_SLOT`.
    bytes32 internal constant IMPLEMENTATION_SLOT =
        0x360894a13ba1a3210667c828492db98dca3e2076cc3735a920a3ca505d382bbc;

    uint256 internal constant START_TIME = 1_750_000_000;
    uint256 internal constant USER_KEY = 0xA11CE;
    uint256 internal constant OTHER_USER_KEY = 0xB0B;
    uint256 internal constant WALLET_OWNER_KEY = 0xCA11;
    string internal constant MODEL_NAME = "minilm-l6";
    string internal constant MODEL_CID = "bafy-model-cid";
    string internal constant PLUGIN_CID = "bafy-plugin-cid";
    string internal constant HOST_URL = "https://host.example";
    uint256 internal constant PRICE_PER_REQUEST = 1_000; // 0.001 USDC
    uint256 internal constant PRICE_PER_1K_TOKENS = 50;
    /// @dev Sale price of one whole access token: 2.5 USDC.
    uint256 internal constant TOKEN_PRICE = 2_500_000;

    address internal governance = makeAddr("governance");
    address internal modelOwner = makeAddr("modelOwner");
    address internal payout = makeAddr("payout");
    address internal host = makeAddr("host");
    address internal otherHost = makeAddr("otherHost");
    address internal stranger = makeAddr("stranger");
    address internal user;
    address internal otherUser;

    DevStablecoin internal usdc;
    DevStablecoin internal usdfc;
    ModelVault internal vault;
    PaymentStream internal stream;
    ModelAccessToken internal accessToken;
    bytes32 internal modelId;

    function setUp() public virtual {
        vm.warp(START_TIME);
        user = vm.addr(USER_KEY);
        otherUser = vm.addr(OTHER_USER_KEY);
        vm.label(user, "user");
        vm.label(otherUser, "otherUser");

        usdc = new DevStablecoin("USD Coin (dev)", "USDC", 6);
        usdfc = new DevStablecoin("USDFC (dev)", "USDFC", 18);
        vm.label(address(usdc), "USDC");
        vm.label(address(usdfc), "USDFC");

        vault = deployVault(governance);
        stream = deployStream(governance, vault, twoTokens(address(usdc), address(usdfc)));
        vm.prank(governance);
        vault.setPaymentStream(address(stream));

        accessToken = deployAccessToken(modelOwner, address(usdc), TOKEN_PRICE, payout);
        modelId = registerModel(modelOwner, MODEL_NAME, address(accessToken), payout);
        vm.prank(modelOwner);
        vault.authorizeHost(modelId, host);
        // both hosts published where they serve (an authorisation takes effect only then)
        registerHost(host, HOST_URL);
        registerHost(otherHost, "https://other-host.example");
    }

    function registerHost(address who, string memory url) internal {
        vm.prank(who);
        vault.registerHost(url, new bytes32[](0));
    }

    // ------------------------------------------------------------ deployment

    function deployVault(address governance_) internal returns (ModelVault v) {
        v = ModelVault(
            address(
                new DivProxy(address(new ModelVault()), abi.encodeCall(ModelVault.initialize, (governance_)))
            )
        );
        vm.label(address(v), "ModelVault");
    }

    function deployStream(address governance_, IModelVault vault_, address[] memory tokens)
        internal
        returns (PaymentStream s)
    {
        s = PaymentStream(
            address(
                new DivProxy(
                    address(new PaymentStream()),
                    abi.encodeCall(PaymentStream.initialize, (governance_, vault_, tokens))
                )
            )
        );
        vm.label(address(s), "PaymentStream");
    }

    function deployAccessToken(address admin, address paymentToken, uint256 price, address payout_)
        internal
        returns (ModelAccessToken t)
    {
        t = ModelAccessToken(
            address(
                new DivProxy(
                    address(new ModelAccessToken()),
                    abi.encodeCall(
                        ModelAccessToken.initialize,
                        ("MiniLM access", "MINILM", admin, paymentToken, price, payout_)
                    )
                )
            )
        );
        vm.label(address(t), "ModelAccessToken");
    }

    function twoTokens(address a, address b) internal pure returns (address[] memory tokens) {
        tokens = new address[](2);
        tokens[0] = a;
        tokens[1] = b;
    }

    // ------------------------------------------------------------ models

    /// @dev `n` distinct non-zero custodian addresses.
    function custodianSet(uint256 n) internal pure returns (address[] memory custodians) {
        custodians = new address[](n);
        for (uint256 i; i < n; ++i) {
            // casting to 'uint160' is safe because n <= 256 keeps the value far below 2**160
            // forge-lint: disable-next-line(unsafe-typecast)
            custodians[i] = address(uint160(0xC0570D1A0 + i));
        }
    }

    function modelConfig(string memory name, address token, address payout_)
        internal
        pure
        returns (IModelVault.ModelConfig memory)
    {
        return IModelVault.ModelConfig({
            name: name,
            cid: MODEL_CID,
            pluginCid: PLUGIN_CID,
            accessToken: token,
            payout: payout_,
            pricePerRequest: PRICE_PER_REQUEST,
            pricePer1kTokens: PRICE_PER_1K_TOKENS,
            custodians: custodianSet(3),
            threshold: 2
        });
    }

    function registerModel(address owner_, string memory name, address token, address payout_)
        internal
        returns (bytes32 id)
    {
        vm.prank(owner_);
        id = vault.registerModel(modelConfig(name, token, payout_));
    }

    // ------------------------------------------------------------ balances

    /// @dev Mints `amount` of `token` to `who`, who approves and deposits it into `s`.
    function fund(PaymentStream s, address who, DevStablecoin token, uint256 amount) internal {
        token.mint(who, amount);
        vm.startPrank(who);
        token.approve(address(s), amount);
        s.deposit(address(token), amount);
        vm.stopPrank();
    }

    function fund(address who, DevStablecoin token, uint256 amount) internal {
        fund(stream, who, token, amount);
    }

    // ------------------------------------------------------------ permits and signatures

    /// @dev A permit of `user_` for the fixture's model and host, one week long.
    function permitFor(address user_, address token, uint256 maxAmount)
        internal
        view
        returns (IPaymentStream.SpendingPermit memory)
    {
        return IPaymentStream.SpendingPermit({
            user: user_,
            modelId: modelId,
            host: host,
            token: token,
            maxAmount: maxAmount,
            expiry: uint64(block.timestamp + 7 days),
            nonce: 0
        });
    }

    function signDigest(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    /// @dev `key`'s signature over `stream.hashPermit(permit)`.
    function signPermit(uint256 key, IPaymentStream.SpendingPermit memory permit)
        internal
        view
        returns (bytes memory)
    {
        return signPermit(stream, key, permit);
    }

    function signPermit(PaymentStream s, uint256 key, IPaymentStream.SpendingPermit memory permit)
        internal
        view
        returns (bytes memory)
    {
        return signDigest(key, s.hashPermit(permit));
    }

    /// @dev The EIP-2612 digest `owner_` signs to let `spender` take `value` of `token`.
    function erc2612Digest(
        DevStablecoin token,
        address owner_,
        address spender,
        uint256 value,
        uint256 deadline
    ) internal view returns (bytes32) {
        bytes32 structHash = keccak256(
            abi.encode(ERC2612_PERMIT_TYPEHASH, owner_, spender, value, token.nonces(owner_), deadline)
        );
        return keccak256(abi.encodePacked(hex"1901", token.DOMAIN_SEPARATOR(), structHash));
    }

    /// @dev Checked narrowing casts for amounts and counts passed to `settle`.
    function u128(uint256 x) internal pure returns (uint128) {
        return SafeCast.toUint128(x);
    }

    function u64(uint256 x) internal pure returns (uint64) {
        return SafeCast.toUint64(x);
    }

    /// @dev What the upgrade tests store before upgrading `stream`: `revoked` revoked by `user`, a
    /// pending withdrawal of 20 USDC, and governance settings off their defaults (grace 2 h,
    /// withdraw delay 3 h, USDFC no longer accepted). Returns the revocation's time.
    function storeStateToKeep(IPaymentStream.SpendingPermit memory revoked)
        internal
        returns (uint64 revokedAt)
    {
        vm.startPrank(user);
        stream.revokePermit(revoked);
        stream.requestWithdraw(address(usdc), 20e6);
        vm.stopPrank();
        revokedAt = uint64(block.timestamp);
        vm.startPrank(governance);
        stream.setSettleGrace(2 hours);
        stream.setWithdrawDelay(3 hours);
        stream.setTokenAllowed(address(usdfc), false);
        vm.stopPrank();
    }

    function implementationOf(address proxy) internal view returns (address) {
        return address(uint160(uint256(vm.load(proxy, IMPLEMENTATION_SLOT))));
    }
}
