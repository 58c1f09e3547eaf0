//! Typed bindings for the deployable contracts, generated at compile time from `abi/*.json`
//! (forge artifacts slimmed to ABI + creation bytecode by `contracts/tools/export-artifacts`).

#![allow(missing_docs, clippy::too_many_arguments)]

use alloy::sol;

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    ModelAccessToken,
    "abi/ModelAccessToken.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    ModelVault,
    "abi/ModelVault.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    PaymentStream,
    "abi/PaymentStream.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    DevStablecoin,
    "abi/DevStablecoin.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    DevPlainStablecoin,
    "abi/DevPlainStablecoin.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    DivProxy,
    "abi/DivProxy.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    ModelGovernor,
    "abi/ModelGovernor.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    DaoTimelock,
    "abi/DaoTimelock.json"
);
