// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title IModelVault
/// @notice The registry of encrypted models: where the ciphertext lives, who is paid, which
/// custodians hold the key shares and which hosts may receive them. Hosts and custodians follow
/// its events; custodians release a share only while `isHostAuthorized` says yes.
interface IModelVault {
    /// @notice What an owner registers; the id is `keccak256(abi.encode(owner, name))`.
    struct ModelConfig {
        string name;
        string cid;
        string pluginCid;
        address accessToken;
        address payout;
        uint256 pricePerRequest;
        uint256 pricePer1kTokens;
        address[] custodians;
        uint8 threshold;
    }

    /// @notice A registered model as stored.
    struct Model {
        address owner;
        address payout;
        address accessToken;
        uint8 threshold;
        bool active;
        /// Requests settled for the model. Stored: what vault v1 counted (it counted at each
        /// settlement); `getModel` adds what the payment contract has counted since.
        uint64 totalInferences;
        uint256 pricePerRequest;
        uint256 pricePer1kTokens;
        string name;
        string cid;
        string pluginCid;
        address[] custodians;
    }

    /// @notice What a host published about itself (`registerHost`).
    struct HostRecord {
        string url;
        bytes32[] models;
        uint64 registeredAt;
    }

    /// @notice No model has this id.
    error ModelNotFound(bytes32 modelId);
    /// @notice The caller already registered a model under this name.
    error ModelAlreadyRegistered(bytes32 modelId);
    /// @notice The caller is not the model's owner.
    error NotModelOwner(bytes32 modelId, address caller);
    /// @notice A zero address where an account is required.
    error ZeroAddress();
    /// @notice An empty name or content id.
    error EmptyField(string field);
    /// @notice The custodian set is empty, too large, has a duplicate or a zero address, or `t` is
    /// outside `1..=n`.
    error InvalidCustodianSet(uint256 custodians, uint8 threshold);
    /// @notice The host is already in the state asked for.
    error HostAlreadyInState(bytes32 modelId, address host, bool authorized);
    /// @notice A host URL that is empty or longer than `MAX_HOST_URL` bytes.
    error InvalidHostUrl(uint256 length);
    /// @notice More models in one registration than `MAX_HOST_MODELS`.
    error TooManyHostModels(uint256 count, uint256 max);
    /// @notice The caller has no host registration.
    error HostNotRegistered(address host);
    /// @notice `modelIdAt` past the end of the list.
    error IndexOutOfRange(uint256 index, uint256 length);

    /// @notice A model was registered.
    event ModelRegistered(
        bytes32 indexed modelId, address indexed owner, string name, string cid, address accessToken
    );
    /// @notice The encrypted package or plugin moved to new content ids.
    event ModelContentUpdated(bytes32 indexed modelId, string cid, string pluginCid);
    /// @notice Prices changed (payment-token base units).
    event ModelPriceUpdated(bytes32 indexed modelId, uint256 pricePerRequest, uint256 pricePer1kTokens);
    /// @notice The payout address changed.
    event ModelPayoutUpdated(bytes32 indexed modelId, address payout);
    /// @notice The custodian set or threshold changed.
    event ModelCustodiansUpdated(bytes32 indexed modelId, address[] custodians, uint8 threshold);
    /// @notice The model was activated or deactivated.
    event ModelActiveSet(bytes32 indexed modelId, bool active);
    /// @notice The model changed owner.
    event ModelOwnershipTransferred(bytes32 indexed modelId, address indexed from, address indexed to);
    /// @notice `host` may now receive key shares for and serve the model.
    event HostAuthorized(bytes32 indexed modelId, address indexed host);
    /// @notice `host` may no longer receive key shares for or serve the model.
    event HostRevoked(bytes32 indexed modelId, address indexed host);
    /// @notice `host` (re)published where it serves and which models; its authorisations now
    /// take effect.
    event HostRegistered(address indexed host, string url, bytes32[] models);
    /// @notice `host` withdrew its registration: no authorisation of it takes effect any more.
    event HostUnregistered(address indexed host);
    /// @notice The payment contract whose settled-request counts `getModel` reports changed.
    event PaymentStreamSet(address paymentStream);

    function registerModel(ModelConfig calldata config) external returns (bytes32 modelId);
    function updateContent(bytes32 modelId, string calldata cid, string calldata pluginCid) external;
    function updatePrice(bytes32 modelId, uint256 pricePerRequest, uint256 pricePer1kTokens) external;
    function updatePayout(bytes32 modelId, address payout) external;
    function updateCustodians(bytes32 modelId, address[] calldata custodians, uint8 threshold) external;
    function setActive(bytes32 modelId, bool active) external;
    function transferModelOwnership(bytes32 modelId, address newOwner) external;
    function authorizeHost(bytes32 modelId, address host) external;
    function revokeHost(bytes32 modelId, address host) external;
    /// @notice The caller, a host, publishes its public URL and the models it serves there
    /// (replacing what it published before). Until a host has registered, no owner's
    /// authorisation of it takes effect: `isHostAuthorized` is false, custodians release nothing.
    function registerHost(string calldata url, bytes32[] calldata models) external;
    /// @notice The caller withdraws its host registration.
    function unregisterHost() external;
    /// @notice What `host` published (empty `url` and `registeredAt` 0 if it never registered).
    function hostRecord(address host) external view returns (HostRecord memory);
    /// @notice Whether `host` published that it serves the model, is authorised for it, and the
    /// model is active: the hosts a user can pick for the model.
    function isHostServing(bytes32 modelId, address host) external view returns (bool);
    /// @notice Whether `host` was ever authorised for the model (it may have been revoked since).
    function wasHostAuthorized(bytes32 modelId, address host) external view returns (bool);

    function isHostAuthorized(bytes32 modelId, address host) external view returns (bool);
    function getModel(bytes32 modelId) external view returns (Model memory);
    function payoutOf(bytes32 modelId) external view returns (address);
    function modelIdOf(address owner, string calldata name) external pure returns (bytes32);
    function modelCount() external view returns (uint256);
    function modelIdAt(uint256 index) external view returns (bytes32);
}
