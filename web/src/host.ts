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
  /** The first chain's deployment. */
  deployment?: Deployment;
  /** Every chain this host takes payment on, the first first. */
  deployments?: Deployment[];
};

/** Every deployment the host takes payment on (older hosts name only one). */
export function deploymentsOf(info: HostInfo): Deployment[] {
  if (info.deployments?.length) return info.deployments;
  return info.deployment ? [info.deployment] : [];
}

const CHAIN_KEY = 'div.chain';

/** The deployment the user last chose in this browser, else the host's first. */
export function chosenDeployment(info: HostInfo): Deployment | undefined {
  const all = deploymentsOf(info);
  const want = Number(localStorage.getItem(CHAIN_KEY));
  return all.find((d) => d.chainId === want) ?? all[0];
}

/** Remembers the chain the user works on (the first paint of the next visit reads it). */
export function rememberChain(chainId: number) {
  localStorage.setItem(CHAIN_KEY, String(chainId));
}

/** Whether a deployment is a local chain (its stablecoins are the dev stand-ins anyone mints). */
export const isLocal = (d: Deployment) => d.stablecoins.some((c) => c.dev);

const CHAIN_NAMES: Record<number, string> = {
  1: 'Ethereum',
  10: 'Optimism',
  137: 'Polygon',
  314: 'Filecoin',
  8453: 'Base',
  42161: 'Arbitrum One',
  84532: 'Base Sepolia',
  314159: 'Filecoin Calibration',
  11155111: 'Sepolia',
};

/** A chain's name as the network picker shows it. */
export function chainName(d: Deployment): string {
  if (d.chainId === 31337) return 'Local anvil (31337)';
  const name = CHAIN_NAMES[d.chainId] ?? 'Chain';
  return `${name} (${d.chainId}${isLocal(d) ? ', local' : ''})`;
}

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

/** The host's answer as JSON, or its JSON error as a [`HostError`]. */
function parseAnswer<T>(status: number, ok: boolean, text: string): T {
  let body: unknown;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    throw new HostError(status, `the host answered ${status} with a body that is not JSON`);
  }
  if (!ok) {
    const err = (body as { error?: { message?: string; code?: string } } | undefined)?.error;
    throw new HostError(status, err?.message ?? `the host answered ${status}`, err?.code);
  }
  return body as T;
}

export async function hostFetch<T>(path: string, init?: RequestInit): Promise<{ body: T; headers: Headers }> {
  const res = await fetch(path, init);
  return { body: parseAnswer<T>(res.status, res.ok, await res.text()), headers: res.headers };
}

type Raw = { ok: boolean; status: number; text: string };

declare global {
  interface Window {
    /** `GET /v1/host` and `GET /v1/models`, asked by index.html before the app's code loads. */
    __divBoot?: Promise<[Raw, Raw]>;
  }
}

/** What the host says about itself and the models it serves: the answers index.html asked for
 * early when there are some, else asked now. */
export async function loadBoot(): Promise<{ info: HostInfo; hostModels: HostModel[] }> {
  const early = window.__divBoot;
  window.__divBoot = undefined;
  const [host, models] = early
    ? await early
    : await Promise.all(
        ['/v1/host', '/v1/models'].map(async (u): Promise<Raw> => {
          const r = await fetch(u);
          return { ok: r.ok, status: r.status, text: await r.text() };
        }),
      );
  return {
    info: parseAnswer<HostInfo>(host!.status, host!.ok, host!.text),
    hostModels: parseAnswer<{ data: HostModel[] }>(models!.status, models!.ok, models!.text).data,
  };
}
