// Reading models from ModelVault and their access tokens, batched over JSON-RPC.
import { useQuery } from '@tanstack/react-query';
import { usePublicClient } from 'wagmi';
import type { Address, Hex, PublicClient } from 'viem';
import { modelAccessTokenAbi, modelVaultAbi } from './contracts';
import { useApp } from './context';

export type ChainModel = {
  id: Hex;
  name: string;
  owner: Address;
  payout: Address;
  accessToken: Address;
  active: boolean;
  totalInferences: bigint;
  pricePerRequest: bigint;
  pricePer1kTokens: bigint;
  cid: string;
  pluginCid: string;
  custodians: readonly Address[];
  threshold: number;
  token: {
    symbol: string;
    accessThreshold: bigint;
    premiumThreshold: bigint;
    pricePerToken: bigint;
    paymentToken: Address;
    totalSupply: bigint;
  };
};

async function readModel(client: PublicClient, vault: Address, id: Hex): Promise<ChainModel> {
  const m = await client.readContract({ address: vault, abi: modelVaultAbi, functionName: 'getModel', args: [id] });
  const t = { address: m.accessToken, abi: modelAccessTokenAbi } as const;
  const [symbol, accessThreshold, premiumThreshold, pricePerToken, paymentToken, totalSupply] = await Promise.all([
    client.readContract({ ...t, functionName: 'symbol' }),
    client.readContract({ ...t, functionName: 'accessThreshold' }),
    client.readContract({ ...t, functionName: 'premiumThreshold' }),
    client.readContract({ ...t, functionName: 'pricePerToken' }),
    client.readContract({ ...t, functionName: 'paymentToken' }),
    client.readContract({ ...t, functionName: 'totalSupply' }),
  ]);
  return {
    id,
    name: m.name,
    owner: m.owner,
    payout: m.payout,
    accessToken: m.accessToken,
    active: m.active,
    totalInferences: m.totalInferences,
    pricePerRequest: m.pricePerRequest,
    pricePer1kTokens: m.pricePer1kTokens,
    cid: m.cid,
    pluginCid: m.pluginCid,
    custodians: m.custodians,
    threshold: m.threshold,
    token: { symbol, accessThreshold, premiumThreshold, pricePerToken, paymentToken, totalSupply },
  };
}

export function useModels() {
  const client = usePublicClient();
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['models', deployment.modelVault],
    enabled: !!client,
    queryFn: async () => {
      const c = client as PublicClient;
      const n = await c.readContract({ address: deployment.modelVault, abi: modelVaultAbi, functionName: 'modelCount' });
      const ids = await Promise.all(
        Array.from({ length: Number(n) }, (_, i) =>
          c.readContract({ address: deployment.modelVault, abi: modelVaultAbi, functionName: 'modelIdAt', args: [BigInt(i)] }),
        ),
      );
      return Promise.all(ids.map((id) => readModel(c, deployment.modelVault, id)));
    },
  });
}

export function useModel(id: Hex) {
  const client = usePublicClient();
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['model', id],
    enabled: !!client,
    queryFn: () => readModel(client as PublicClient, deployment.modelVault, id),
  });
}

/** Hosts the owner authorised for a model, from HostAuthorized/HostRevoked events. */
export function useModelHosts(id: Hex) {
  const client = usePublicClient();
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['hosts', id],
    enabled: !!client,
    queryFn: async () => {
      const c = client as PublicClient;
      const fromBlock = BigInt(deployment.deployedAtBlock);
      const [added, removed] = await Promise.all([
        c.getContractEvents({ address: deployment.modelVault, abi: modelVaultAbi, eventName: 'HostAuthorized', args: { modelId: id }, fromBlock }),
        c.getContractEvents({ address: deployment.modelVault, abi: modelVaultAbi, eventName: 'HostRevoked', args: { modelId: id }, fromBlock }),
      ]);
      const state = new Map<Address, boolean>();
      const all = [...added.map((l) => ({ l, on: true })), ...removed.map((l) => ({ l, on: false }))].sort((a, b) =>
        a.l.blockNumber === b.l.blockNumber ? a.l.logIndex - b.l.logIndex : Number(a.l.blockNumber - b.l.blockNumber),
      );
      for (const { l, on } of all) if (l.args.host) state.set(l.args.host, on);
      return [...state.entries()].filter(([, on]) => on).map(([h]) => h);
    },
  });
}
