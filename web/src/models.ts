// Reading models from ModelVault and their access tokens: the whole catalogue in one eth_call
// (CatalogLens, deployless), a model's authorised hosts from the vault's events.
import { useQuery, useQueryClient } from '@tanstack/react-query';
import { usePublicClient } from 'wagmi';
import type { Address, Hex, PublicClient } from 'viem';
import { modelVaultAbi } from './contracts';
import { readCatalog, readModel, type ChainModel } from './catalog';
import { useApp } from './context';

export type { ChainModel };

export function useModels() {
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['models', deployment.modelVault],
    queryFn: () => readCatalog(deployment.rpcUrl, deployment.modelVault),
  });
}

export function useModel(id: Hex) {
  const { deployment } = useApp();
  const queries = useQueryClient();
  return useQuery({
    queryKey: ['model', id],
    queryFn: () => readModel(deployment.rpcUrl, deployment.modelVault, id),
    // the marketplace already read it: show that at once, and refresh behind it
    initialData: () =>
      queries
        .getQueryData<ChainModel[]>(['models', deployment.modelVault])
        ?.find((m) => m.id.toLowerCase() === id.toLowerCase()),
    initialDataUpdatedAt: () => queries.getQueryState(['models', deployment.modelVault])?.dataUpdatedAt,
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
