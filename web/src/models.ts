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

/** An authorised host of a model with what it published on ModelVault (`registerHost`). */
export type PublishedHost = {
  address: Address;
  /** Its public URL, when it registered (an authorisation takes effect only then). */
  url?: string;
  /** Whether it published that it serves this model (and is authorised, the model active). */
  serving: boolean;
};

/** The model's authorised hosts with their registrations, serving ones first. */
export function usePublishedHosts(id: Hex) {
  const client = usePublicClient();
  const { deployment } = useApp();
  const hosts = useModelHosts(id);
  return useQuery({
    queryKey: ['published-hosts', id, hosts.data],
    enabled: !!client && !!hosts.data,
    queryFn: async (): Promise<PublishedHost[]> => {
      const c = client as PublicClient;
      const vault = { address: deployment.modelVault, abi: modelVaultAbi } as const;
      const out = await Promise.all(
        (hosts.data ?? []).map(async (address) => {
          const [record, serving] = await Promise.all([
            c.readContract({ ...vault, functionName: 'hostRecord', args: [address] }),
            c.readContract({ ...vault, functionName: 'isHostServing', args: [id, address] }),
          ]);
          return { address, url: record.registeredAt > 0n ? record.url : undefined, serving };
        }),
      );
      return out.sort((a, b) => Number(b.serving) - Number(a.serving));
    },
  });
}

/** A host URL safe to link to and fetch: http(s) only (a registration is anyone's string). */
export function hostUrl(url: string | undefined): URL | undefined {
  if (!url) return undefined;
  try {
    const u = new URL(url);
    return u.protocol === 'http:' || u.protocol === 'https:' ? u : undefined;
  } catch {
    return undefined;
  }
}

export type HostProbe = { up: boolean; ms?: number; answersAs?: string; error?: string };

/** Asks a host's `GET /v1/host` (readable from any origin): is it up, how fast, and which
 * address it answers as (it must be the one that registered the URL). */
export function useHostProbe(url: URL | undefined) {
  return useQuery({
    queryKey: ['probe', url?.href],
    enabled: !!url,
    refetchInterval: 15_000,
    retry: false,
    queryFn: async (): Promise<HostProbe> => {
      const base = url!.href.replace(/\/$/, '');
      const t0 = performance.now();
      try {
        const res = await fetch(`${base}/v1/host`, { signal: AbortSignal.timeout(3_000) });
        const ms = Math.round(performance.now() - t0);
        if (!res.ok) return { up: false, ms, error: `answered ${res.status}` };
        const body = (await res.json()) as { host?: string };
        return { up: true, ms, answersAs: body.host };
      } catch (e) {
        return { up: false, error: e instanceof Error ? e.message : String(e) };
      }
    },
  });
}
