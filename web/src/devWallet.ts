// A wallet built into the dApp for local chains: it holds one of anvil's well-known test keys
// (derived from the mnemonic every Foundry user knows, printed by anvil at start) and signs in the
// page, so the demo and the browser tests need no extension. It is offered only on local chains
// (31337, or a deployment of dev stand-in stablecoins) and never for real funds; it switches
// between them as a browser wallet would.
import { createConnector } from 'wagmi';
import {
  createWalletClient,
  custom,
  getAddress,
  http,
  numberToHex,
  type Chain,
  type EIP1193RequestFn,
} from 'viem';
import type { PrivateKeyAccount } from 'viem/accounts';

/** `test test … junk` at m/44'/60'/0'/0/i, as `cast wallet private-key` derives them: listed, because
 * deriving in the page costs a PBKDF2 (tens of ms) per account at every start. */
const ANVIL_KEYS = [
  '0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80',
  '0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d',
  '0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a',
  '0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6',
  '0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a',
  '0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba',
  '0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e',
  '0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356',
  '0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97',
  '0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6',
] as const;
/** Their addresses, listed too: showing and connecting a dev wallet needs no key maths; the
 * signing code (secp256k1) is fetched only when a dev wallet first signs. */
const ANVIL_ADDRESSES = [
  '0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266',
  '0x70997970C51812dc3A010C7d01b50e0d17dc79C8',
  '0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC',
  '0x90F79bf6EB2c4f870365E785982E1f101E93b906',
  '0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65',
  '0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc',
  '0x976EA74026E726554dB657fA54763abd0C3a0aa9',
  '0x14dC79964da2C08b23698B3D3cc7Ca32193d9955',
  '0x23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f',
  '0xa0Ee7A142d267C1f36714E4a8F75612F20a79720',
] as const;
export const DEV_ACCOUNTS = ANVIL_KEYS.length;
export const DEV_CHAIN_ID = 31337;
/** The roles `make demo` gives anvil's accounts. */
export const DEV_ROLES: Record<number, string> = {
  0: 'governance',
  1: 'model owner',
  2: 'demo user',
  3: 'host',
  4: 'custodian 1',
  5: 'custodian 2',
  6: 'custodian 3',
};

const accounts = new Map<number, PrivateKeyAccount>();
export async function devAccount(index: number): Promise<PrivateKeyAccount> {
  let a = accounts.get(index);
  if (!a) {
    const { privateKeyToAccount } = await import('viem/accounts');
    a = privateKeyToAccount(ANVIL_KEYS[index]!);
    if (a.address !== ANVIL_ADDRESSES[index]) throw new Error(`dev wallet #${index}: the key and the address disagree`);
    accounts.set(index, a);
  }
  return a;
}

const STORAGE_KEY = 'div.devWallet.connected';

export function devWallet(index: number, chains: Chain[]) {
  return createConnector((config) => {
    let chain = chains[0]!;
    const rpc = () => chain.rpcUrls.default.http[0]!;
    let client: ReturnType<typeof createWalletClient> | undefined;
    const wallet = async () =>
      (client ??= createWalletClient({ account: await devAccount(index), chain, transport: http(rpc()) }));
    const account = { address: ANVIL_ADDRESSES[index]! };
    // everything but accounts and signing goes to the current chain's RPC
    const forward = custom({
      async request({ method, params }) {
        const res = await fetch(rpc(), {
          method: 'POST',
          headers: { 'content-type': 'application/json' },
          body: JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }),
        });
        const json = await res.json();
        if (json.error) throw Object.assign(new Error(json.error.message), json.error);
        return json.result;
      },
    })({ chain: chains[0] });
    const request: EIP1193RequestFn = async ({ method, params }) => {
      switch (method) {
        case 'eth_chainId':
          return numberToHex(chain.id);
        case 'eth_accounts':
        case 'eth_requestAccounts':
          return [account.address];
        case 'personal_sign':
          return (await devAccount(index)).signMessage({ message: { raw: (params as [`0x${string}`])[0] } });
        default:
          return forward.request({ method, params } as never);
      }
    };
    return {
      id: `dev-${index}`,
      name: `Dev wallet #${index}${DEV_ROLES[index] ? ` (${DEV_ROLES[index]})` : ''}`,
      type: 'devWallet',
      async connect({ chainId }: { chainId?: number } = {}) {
        const want = chains.find((c) => c.id === chainId);
        if (want && want.id !== chain.id) {
          chain = want;
          client = undefined;
        }
        localStorage.setItem(STORAGE_KEY, String(index));
        config.emitter.emit('change', { accounts: [account.address] });
        return { accounts: [getAddress(account.address)] as never, chainId: chain.id };
      },
      async disconnect() {
        localStorage.removeItem(STORAGE_KEY);
      },
      async getAccounts() {
        return [getAddress(account.address)];
      },
      async getChainId() {
        return chain.id;
      },
      async switchChain({ chainId }: { chainId: number }) {
        const next = chains.find((c) => c.id === chainId);
        if (!next) throw new Error(`the dev wallet knows no chain ${chainId}`);
        chain = next;
        client = undefined;
        config.emitter.emit('change', { chainId });
        return next;
      },
      async getProvider() {
        return { request };
      },
      async getClient() {
        return wallet();
      },
      async isAuthorized() {
        return localStorage.getItem(STORAGE_KEY) === String(index);
      },
      onAccountsChanged() {},
      onChainChanged() {},
      onDisconnect() {
        config.emitter.emit('disconnect');
      },
    };
  });
}
