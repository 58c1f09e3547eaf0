// The marketplace's chain read, with no wallet code: ModelVault's catalogue with every model's
// access-token terms from one `eth_call` of CatalogLens's creation code (the constructor returns
// the answer; contracts/src/lens). It uses `fetch` and viem's ABI coder only, so the first page
// can show the models before the wallet libraries have loaded.
import { concatHex, decodeAbiParameters, encodeAbiParameters, type Address, type Hex } from 'viem';
import { catalogLensAnswer, catalogLensBytecode, catalogLensConstructor } from './generated/lens';

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

/** Models per read: an answer is bound by the 24 KiB code-size limit (about 1 KiB a model).
 * index.html's early call asks for the same first page (limit 0x10): keep them equal. */
const PAGE = 16n;

/** A JSON-RPC error, with the revert data when there is some. */
export class RpcError extends Error {
  code?: number;
  data?: Hex;
  constructor(message: string, code?: number, data?: Hex) {
    super(message);
    this.code = code;
    this.data = data;
  }
}

async function ethCall(rpcUrl: string, data: Hex): Promise<Hex> {
  const res = await fetch(rpcUrl, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'eth_call', params: [{ data }, 'latest'] }),
  });
  if (!res.ok) throw new RpcError(`the chain's RPC answered ${res.status}`);
  const body = (await res.json()) as RpcBody;
  if (body.error) throw new RpcError(body.error.message, body.error.code, body.error.data);
  if (!body.result) throw new RpcError('the chain answered nothing');
  return body.result;
}

type RpcBody = { result?: Hex; error?: { message: string; code?: number; data?: Hex } };

declare global {
  interface Window {
    /** The catalogue's first page (offset 0, PAGE models), asked by index.html's inline script
     * before this code loaded. */
    __divCatalogue?: Promise<{ rpcUrl: string; vault: Address; body: RpcBody }>;
  }
}

function decode(out: Hex) {
  const [entries, total] = decodeAbiParameters(catalogLensAnswer, out);
  return { models: entries.map(fromEntry), total };
}

async function lens(rpcUrl: string, vault: Address, offset: bigint, limit: bigint, ids: readonly Hex[]) {
  const args = encodeAbiParameters(catalogLensConstructor[0].inputs, [vault, offset, limit, ids]);
  return decode(await ethCall(rpcUrl, concatHex([catalogLensBytecode, args])));
}

/** The first page, from index.html's early call when it asked this chain and vault and got an
 * answer; else asked now. */
async function firstPage(rpcUrl: string, vault: Address) {
  const early = window.__divCatalogue;
  window.__divCatalogue = undefined;
  const got = await early?.catch(() => undefined);
  if (got && got.rpcUrl === rpcUrl && got.vault.toLowerCase() === vault.toLowerCase() && got.body.result) {
    return decode(got.body.result);
  }
  return lens(rpcUrl, vault, 0n, PAGE, []);
}

type Entry = ReturnType<typeof decodeAbiParameters<typeof catalogLensAnswer>>[0][number];

function fromEntry(e: Entry): ChainModel {
  const m = e.model;
  return {
    id: e.id,
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
    token: {
      symbol: e.symbol,
      accessThreshold: e.accessThreshold,
      premiumThreshold: e.premiumThreshold,
      pricePerToken: e.pricePerToken,
      paymentToken: e.paymentToken,
      totalSupply: e.totalSupply,
    },
  };
}

/** Every model in the vault: one eth_call for the first 16, the further pages at once after. */
export async function readCatalog(rpcUrl: string, vault: Address): Promise<ChainModel[]> {
  const first = await firstPage(rpcUrl, vault);
  const rest: Promise<{ models: ChainModel[] }>[] = [];
  for (let offset = PAGE; offset < first.total; offset += PAGE) rest.push(lens(rpcUrl, vault, offset, PAGE, []));
  return [...first.models, ...(await Promise.all(rest)).flatMap((p) => p.models)];
}

/** One model by id (its page); an unknown id is an error. */
export async function readModel(rpcUrl: string, vault: Address, id: Hex): Promise<ChainModel> {
  const { models } = await lens(rpcUrl, vault, 0n, 0n, [id]).catch((e: unknown) => {
    // the lens reverts (ModelNotFound) for an id the vault does not list
    if (e instanceof RpcError && e.data) throw new RpcError(`No model with id ${id} in ModelVault`, e.code, e.data);
    throw e;
  });
  const m = models[0];
  if (!m) throw new RpcError('no such model');
  return m;
}
