// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

import {
    Ownable2StepUpgradeable
} from "@openzeppelin/contracts-upgradeable/access/Ownable2StepUpgradeable.sol";
import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {UUPSUpgradeable} from "@openzeppelin/contracts-upgradeable/proxy/utils/UUPSUpgradeable.sol";
import {IModelVault} from "./interfaces/IModelVault.sol";
import {IPaymentStream} from "./interfaces/IPaymentStream.sol";

/// @title ModelVault
/// @notice The registry of encrypted models. A model id is `keccak256(abi.encode(owner, name))`,
/// so an owner's names never collide with another owner's. Each model names its ciphertext and
/// plugin content ids, its access token, prices, payout address and the t-of-n custodian set
/// holding its key shares. The owner authorises hosts; custodians release shares only to hosts
/// for which `isHostAuthorized` is true on an active model. The contract owner (governance) may
/// only upgrade the implementation and name the payment contract.
contract ModelVault is Initializable, Ownable2StepUpgradeable, UUPSUpgradeable, IModelVault {
    /// @notice Largest custodian set a model may name (keeps every loop bounded).
    uint256 public constant MAX_CUSTODIANS = 16;
    /// @notice Longest host URL, in bytes.
    uint256 public constant MAX_HOST_URL = 256;
    /// @notice Most models one host registration names (keeps every loop bounded).
    uint256 public constant MAX_HOST_MODELS = 64;

    /// @custom:storage-location erc7201:div.storage.ModelVault
    struct VaultStorage {
        mapping(bytes32 => Model) models;
        mapping(bytes32 => mapping(address => bool)) hosts;
        bytes32[] modelIds;
        address paymentStream;
        mapping(bytes32 => mapping(address => bool)) everAuthorized;
        // v2: hosts publish their URL and the models they serve
        mapping(address => HostRecord) hostRecords;
        mapping(bytes32 => mapping(address => bool)) serving;
    }

    // keccak256(abi.encode(uint256(keccak256("div.storage.ModelVault")) - 1)) & ~bytes32(uint256(0xff))
    bytes32 private constant STORAGE_SLOT =
        0x879e50c4d1ede79fc289505394922d3828b5027566da2f325da3f3a37b8cc300;

    function _s() private pure returns (VaultStorage storage $) {
        assembly {
            $.slot := STORAGE_SLOT
        }
    }

    /// @custom:oz-upgrades-unsafe-allow constructor
    constructor() {
        _disableInitializers();
    }

    /// @param governance may upgrade the vault and set the payment contract
    function initialize(address governance) external initializer {
        __Ownable_init(governance);
        __Ownable2Step_init();
    }

    modifier onlyModelOwner(bytes32 modelId) {
        _checkModelOwner(modelId);
        _;
    }

    function _checkModelOwner(bytes32 modelId) private view {
        address owner_ = _s().models[modelId].owner;
        if (owner_ == address(0)) revert ModelNotFound(modelId);
        if (owner_ != msg.sender) revert NotModelOwner(modelId, msg.sender);
    }

    /// @notice Governance: the payment contract whose settled-request counts `getModel` reports.
    function setPaymentStream(address paymentStream_) external onlyOwner {
        if (paymentStream_ == address(0)) revert ZeroAddress();
        _s().paymentStream = paymentStream_;
        emit PaymentStreamSet(paymentStream_);
    }

    /// @notice The payment contract whose settled-request counts `getModel` reports.
    function paymentStream() external view returns (address) {
        return _s().paymentStream;
    }

    /// @inheritdoc IModelVault
    function modelIdOf(address owner_, string calldata name) public pure returns (bytes32) {
        return keccak256(abi.encode(owner_, name));
    }

    /// @inheritdoc IModelVault
    function registerModel(ModelConfig calldata config) external returns (bytes32 modelId) {
        if (bytes(config.name).length == 0) revert EmptyField("name");
        if (bytes(config.cid).length == 0) revert EmptyField("cid");
        if (config.accessToken == address(0) || config.payout == address(0)) revert ZeroAddress();
        _checkCustodians(config.custodians, config.threshold);
        modelId = modelIdOf(msg.sender, config.name);
        VaultStorage storage $ = _s();
        Model storage m = $.models[modelId];
        if (m.owner != address(0)) revert ModelAlreadyRegistered(modelId);
        m.owner = msg.sender;
        m.payout = config.payout;
        m.accessToken = config.accessToken;
        m.threshold = config.threshold;
        m.active = true;
        m.pricePerRequest = config.pricePerRequest;
        m.pricePer1kTokens = config.pricePer1kTokens;
        m.name = config.name;
        m.cid = config.cid;
        m.pluginCid = config.pluginCid;
        m.custodians = config.custodians;
        $.modelIds.push(modelId);
        emit ModelRegistered(modelId, msg.sender, config.name, config.cid, config.accessToken);
        emit ModelPriceUpdated(modelId, config.pricePerRequest, config.pricePer1kTokens);
        emit ModelPayoutUpdated(modelId, config.payout);
        emit ModelCustodiansUpdated(modelId, config.custodians, config.threshold);
        emit ModelActiveSet(modelId, true);
    }

    /// @inheritdoc IModelVault
    function updateContent(bytes32 modelId, string calldata cid, string calldata pluginCid)
        external
        onlyModelOwner(modelId)
    {
        if (bytes(cid).length == 0) revert EmptyField("cid");
        Model storage m = _s().models[modelId];
        m.cid = cid;
        m.pluginCid = pluginCid;
        emit ModelContentUpdated(modelId, cid, pluginCid);
    }

    /// @inheritdoc IModelVault
    function updatePrice(bytes32 modelId, uint256 pricePerRequest, uint256 pricePer1kTokens)
        external
        onlyModelOwner(modelId)
    {
        Model storage m = _s().models[modelId];
        m.pricePerRequest = pricePerRequest;
        m.pricePer1kTokens = pricePer1kTokens;
        emit ModelPriceUpdated(modelId, pricePerRequest, pricePer1kTokens);
    }

    /// @inheritdoc IModelVault
    function updatePayout(bytes32 modelId, address payout) external onlyModelOwner(modelId) {
        if (payout == address(0)) revert ZeroAddress();
        _s().models[modelId].payout = payout;
        emit ModelPayoutUpdated(modelId, payout);
    }

    /// @inheritdoc IModelVault
    function updateCustodians(bytes32 modelId, address[] calldata custodians, uint8 threshold)
        external
        onlyModelOwner(modelId)
    {
        _checkCustodians(custodians, threshold);
        Model storage m = _s().models[modelId];
        m.custodians = custodians;
        m.threshold = threshold;
        emit ModelCustodiansUpdated(modelId, custodians, threshold);
    }

    /// @inheritdoc IModelVault
    function setActive(bytes32 modelId, bool active) external onlyModelOwner(modelId) {
        _s().models[modelId].active = active;
        emit ModelActiveSet(modelId, active);
    }

    /// @inheritdoc IModelVault
    function transferModelOwnership(bytes32 modelId, address newOwner) external onlyModelOwner(modelId) {
        if (newOwner == address(0)) revert ZeroAddress();
        _s().models[modelId].owner = newOwner;
        emit ModelOwnershipTransferred(modelId, msg.sender, newOwner);
    }

    /// @inheritdoc IModelVault
    function authorizeHost(bytes32 modelId, address host) external onlyModelOwner(modelId) {
        if (host == address(0)) revert ZeroAddress();
        mapping(address => bool) storage hosts = _s().hosts[modelId];
        if (hosts[host]) revert HostAlreadyInState(modelId, host, true);
        hosts[host] = true;
        _s().everAuthorized[modelId][host] = true;
        emit HostAuthorized(modelId, host);
    }

    /// @inheritdoc IModelVault
    function revokeHost(bytes32 modelId, address host) external onlyModelOwner(modelId) {
        mapping(address => bool) storage hosts = _s().hosts[modelId];
        if (!hosts[host]) revert HostAlreadyInState(modelId, host, false);
        hosts[host] = false;
        emit HostRevoked(modelId, host);
    }

    /// @inheritdoc IModelVault
    function registerHost(string calldata url, bytes32[] calldata models) external {
        uint256 length = bytes(url).length;
        if (length == 0 || length > MAX_HOST_URL) revert InvalidHostUrl(length);
        if (models.length > MAX_HOST_MODELS) revert TooManyHostModels(models.length, MAX_HOST_MODELS);
        VaultStorage storage $ = _s();
        _clearServing($, msg.sender);
        for (uint256 i; i < models.length; ++i) {
            if ($.models[models[i]].owner == address(0)) revert ModelNotFound(models[i]);
            $.serving[models[i]][msg.sender] = true;
        }
        HostRecord storage r = $.hostRecords[msg.sender];
        r.url = url;
        r.models = models;
        r.registeredAt = uint64(block.timestamp);
        emit HostRegistered(msg.sender, url, models);
    }

    /// @inheritdoc IModelVault
    function unregisterHost() external {
        VaultStorage storage $ = _s();
        if ($.hostRecords[msg.sender].registeredAt == 0) revert HostNotRegistered(msg.sender);
        _clearServing($, msg.sender);
        delete $.hostRecords[msg.sender];
        emit HostUnregistered(msg.sender);
    }

    function _clearServing(VaultStorage storage $, address host) private {
        bytes32[] storage old = $.hostRecords[host].models;
        for (uint256 i; i < old.length; ++i) {
            delete $.serving[old[i]][host];
        }
    }

    /// @inheritdoc IModelVault
    function hostRecord(address host) external view returns (HostRecord memory) {
        return _s().hostRecords[host];
    }

    /// @inheritdoc IModelVault
    function isHostServing(bytes32 modelId, address host) external view returns (bool) {
        return _isHostAuthorized(modelId, host) && _s().serving[modelId][host];
    }

    /// @inheritdoc IModelVault
    /// @dev Also false for a host that has not registered (v2): an owner's authorisation takes
    /// effect only once the host has published where it serves, so no host serves by surprise.
    function isHostAuthorized(bytes32 modelId, address host) external view returns (bool) {
        return _isHostAuthorized(modelId, host);
    }

    function _isHostAuthorized(bytes32 modelId, address host) private view returns (bool) {
        VaultStorage storage $ = _s();
        return $.models[modelId].active && $.hosts[modelId][host] && $.hostRecords[host].registeredAt != 0;
    }

    /// @inheritdoc IModelVault
    function wasHostAuthorized(bytes32 modelId, address host) external view returns (bool) {
        return _s().everAuthorized[modelId][host];
    }

    /// @inheritdoc IModelVault
    /// @dev Settlement counts requests in the payment contract, beside the permit state it writes
    /// anyway (a call into this contract per settlement cost ~20k gas); the stored count is what
    /// this contract counted before that moved.
    function getModel(bytes32 modelId) external view returns (Model memory m) {
        VaultStorage storage $ = _s();
        m = $.models[modelId];
        if (m.owner == address(0)) revert ModelNotFound(modelId);
        address stream = $.paymentStream;
        if (stream != address(0)) {
            uint64 counted = IPaymentStream(stream).inferencesOf(modelId);
            unchecked {
                uint64 stored = m.totalInferences;
                m.totalInferences = counted > type(uint64).max - stored ? type(uint64).max : stored + counted;
            }
        }
    }

    /// @inheritdoc IModelVault
    function payoutOf(bytes32 modelId) external view returns (address payout) {
        payout = _s().models[modelId].payout;
        if (payout == address(0)) revert ModelNotFound(modelId);
    }

    /// @inheritdoc IModelVault
    function modelCount() external view returns (uint256) {
        return _s().modelIds.length;
    }

    /// @inheritdoc IModelVault
    function modelIdAt(uint256 index) external view returns (bytes32) {
        bytes32[] storage ids = _s().modelIds;
        if (index >= ids.length) revert IndexOutOfRange(index, ids.length);
        return ids[index];
    }

    function _checkCustodians(address[] calldata custodians, uint8 threshold) private pure {
        uint256 n = custodians.length;
        if (n == 0 || n > MAX_CUSTODIANS || threshold == 0 || threshold > n) {
            revert InvalidCustodianSet(n, threshold);
        }
        for (uint256 i; i < n; ++i) {
            if (custodians[i] == address(0)) revert InvalidCustodianSet(n, threshold);
            for (uint256 j = i + 1; j < n; ++j) {
                if (custodians[i] == custodians[j]) revert InvalidCustodianSet(n, threshold);
            }
        }
    }

    function _authorizeUpgrade(address) internal override onlyOwner {}
}
