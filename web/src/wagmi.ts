// The wagmi config, made at start-up from what the host says about its chains: any injected
// EIP-1193 wallet, plus the built-in dev wallets when the chains are local anvils.
import { createConfig, http } from 'wagmi';
import { injected } from 'wagmi/connectors';
import { defineChain, type Chain } from 'viem';
import { chainName, isLocal, type Deployment } from './host';
import { DEV_ACCOUNTS, DEV_CHAIN_ID, devWallet } from './devWallet';

export function chainOf(d: Deployment): Chain {
  return defineChain({
    id: d.chainId,
    name: chainName(d),
    nativeCurrency: { name: 'Ether', symbol: 'ETH', decimals: 18 },
    rpcUrls: { default: { http: [d.rpcUrl] } },
  });
}

/** Every chain of `all`, `first` (the one the user works on) first: wagmi starts there. */
export function makeConfig(all: Deployment[], first: Deployment) {
  const ordered = [first, ...all.filter((d) => d.chainId !== first.chainId)];
  const chains = ordered.map(chainOf) as [Chain, ...Chain[]];
  const local = chains.filter((_, i) => ordered[i]!.chainId === DEV_CHAIN_ID || isLocal(ordered[i]!));
  const dev = local.length ? Array.from({ length: DEV_ACCOUNTS }, (_, i) => devWallet(i, local)) : [];
  return createConfig({
    chains,
    connectors: [injected(), ...dev],
    // anvil has no multicall contract; JSON-RPC batching keeps page loads to a few round trips
    transports: Object.fromEntries(ordered.map((d) => [d.chainId, http(d.rpcUrl, { batch: { wait: 5 } })])),
    multiInjectedProviderDiscovery: true,
  });
}
