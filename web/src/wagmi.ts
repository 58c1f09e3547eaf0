// The wagmi config, made at start-up from what the host says about its chain: any injected
// EIP-1193 wallet, plus the built-in dev wallets when the chain is a local anvil.
import { createConfig, http } from 'wagmi';
import { injected } from 'wagmi/connectors';
import { defineChain, type Chain } from 'viem';
import type { Deployment } from './host';
import { DEV_ACCOUNTS, DEV_CHAIN_ID, devWallet } from './devWallet';

export function chainOf(d: Deployment): Chain {
  return defineChain({
    id: d.chainId,
    name: d.chainId === DEV_CHAIN_ID ? 'Local anvil' : `Chain ${d.chainId}`,
    nativeCurrency: { name: 'Ether', symbol: 'ETH', decimals: 18 },
    rpcUrls: { default: { http: [d.rpcUrl] } },
  });
}

export function makeConfig(d: Deployment) {
  const chain = chainOf(d);
  const dev = d.chainId === DEV_CHAIN_ID ? Array.from({ length: DEV_ACCOUNTS }, (_, i) => devWallet(i, chain)) : [];
  return createConfig({
    chains: [chain],
    connectors: [injected(), ...dev],
    // anvil has no multicall contract; JSON-RPC batching keeps page loads to a few round trips
    transports: { [chain.id]: http(d.rpcUrl, { batch: { wait: 5 } }) },
    multiInjectedProviderDiscovery: true,
  });
}
