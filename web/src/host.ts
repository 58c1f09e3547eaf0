// What the dApp learns from the host that serves it (`GET /v1/host`): the chain, the contracts
// and the host's own address. Nothing about the deployment is baked into the build.
import type { Address, Hex } from 'viem';

export type Stablecoin = { symbol: string; address: Address; decimals: number; dev?: boolean };

export type Deployment = {
  chainId: number;
  rpcUrl: string;
  governance: Address;
  modelVault: Address;
  paymentStream: Address;
  stablecoins: Stablecoin[];
  deployedAtBlock: number;
};

export type HostInfo = {
  host?: Address;
  metered: boolean;
  deployment?: Deployment;
};

/** A model as the host lists it (`GET /v1/models`). */
export type HostModel = {
  id: string;
  task: string;
  dimensions?: number | null;
  max_input_tokens?: number | null;
  model_id?: Hex | null;
};

export type ModelUsage = {
  permits: number;
  charged_amount: string;
  charged_requests: number;
  settled_amount: string;
  settled_requests: number;
  unsettled_amount: string;
};

/** The host's JSON error body, as an Error whose message is the host's own words. */
export class HostError extends Error {
  status: number;
  code?: string;
  constructor(status: number, message: string, code?: string) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function hostFetch<T>(path: string, init?: RequestInit): Promise<{ body: T; headers: Headers }> {
  const res = await fetch(path, init);
  const text = await res.text();
  let body: unknown;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    throw new HostError(res.status, `the host answered ${res.status} with a body that is not JSON`);
  }
  if (!res.ok) {
    const err = (body as { error?: { message?: string; code?: string } } | undefined)?.error;
    throw new HostError(res.status, err?.message ?? `the host answered ${res.status}`, err?.code);
  }
  return { body: body as T, headers: res.headers };
}

export async function loadHostInfo(): Promise<HostInfo> {
  return (await hostFetch<HostInfo>('/v1/host')).body;
}

export async function loadHostModels(): Promise<HostModel[]> {
  return (await hostFetch<{ data: HostModel[] }>('/v1/models')).body.data;
}
