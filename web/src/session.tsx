// Sign-In with Ethereum (EIP-4361) with the host that serves the dApp: one signature, no funds
// moved, gives a session token. The owner of a model uses it to try their own model free; anyone
// uses it to read their permits on this host (`GET /v1/me`). The token lives in this tab's
// sessionStorage (a host restart, or closing the tab, signs out) and is used only while the wallet
// is on the account that signed in.
import { createContext, useCallback, useContext, useState, type ReactNode } from 'react';
import { useConnection, useWalletClient } from 'wagmi';
import { createSiweMessage } from 'viem/siwe';
import type { Address } from 'viem';
import { hostFetch } from './host';
import { describeError, short } from './format';
import { useApp } from './context';

export type Session = { token: string; address: Address };

type Ctx = {
  session?: Session;
  busy: boolean;
  error?: string;
  signIn: () => Promise<void>;
  signOut: () => Promise<void>;
};

const SessionContext = createContext<Ctx | null>(null);

const storageKey = (chain: number) => `div.session.${chain}`;

function load(chain: number): Session | undefined {
  try {
    const v = sessionStorage.getItem(storageKey(chain));
    return v ? (JSON.parse(v) as Session) : undefined;
  } catch {
    return undefined;
  }
}

export function SessionProvider({ children }: { children: ReactNode }) {
  const { deployment } = useApp();
  const { address } = useConnection();
  const { data: wallet } = useWalletClient();
  const [session, setSession] = useState<Session | undefined>(() => load(deployment.chainId));
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string>();

  const forget = useCallback(() => {
    sessionStorage.removeItem(storageKey(deployment.chainId));
    setSession(undefined);
  }, [deployment.chainId]);

  // a session belongs to one address: it is used only while the wallet is on that account
  const active = session && address && session.address.toLowerCase() === address.toLowerCase() ? session : undefined;

  const signIn = useCallback(async () => {
    setError(undefined);
    setBusy(true);
    try {
      if (!wallet || !address) throw new Error('Connect a wallet first');
      const { body: n } = await hostFetch<{ nonce: string; domain?: string | null }>('/v1/siwe/nonce');
      const now = new Date();
      const message = createSiweMessage({
        domain: n.domain ?? window.location.host,
        address,
        statement: 'Sign in to this DIV host. This signature moves no funds.',
        uri: window.location.origin,
        version: '1',
        // the chain the session pays on: the one the app works on (sessions are per chain)
        chainId: deployment.chainId,
        nonce: n.nonce,
        issuedAt: now,
        expirationTime: new Date(now.getTime() + 12 * 3600_000),
      });
      const signature = await wallet.signMessage({ account: wallet.account!, message });
      const { body } = await hostFetch<{ token: string; address: Address }>('/v1/siwe', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ message, signature }),
      });
      const s = { token: body.token, address: body.address };
      sessionStorage.setItem(storageKey(deployment.chainId), JSON.stringify(s));
      setSession(s);
    } catch (e) {
      setError(describeError(e));
    } finally {
      setBusy(false);
    }
  }, [wallet, address, deployment.chainId]);

  const signOut = useCallback(async () => {
    setError(undefined);
    const token = active?.token;
    forget();
    if (token) {
      // the host forgets it too; a failure here leaves nothing usable in the page
      await hostFetch('/v1/siwe', { method: 'DELETE', headers: { authorization: `Bearer ${token}` } }).catch(() => undefined);
    }
  }, [active, forget]);

  return <SessionContext.Provider value={{ session: active, busy, error, signIn, signOut }}>{children}</SessionContext.Provider>;
}

export function useSession(): Ctx {
  const c = useContext(SessionContext);
  if (!c) throw new Error('useSession outside SessionProvider');
  return c;
}

/** The header's sign-in control: "Sign in" while connected, then "signed in as …" and "Sign out". */
export function SignIn() {
  const { address } = useConnection();
  const { session, busy, error, signIn, signOut } = useSession();
  if (!address) return null;
  if (session) {
    return (
      <span className="session">
        <span className="ok" data-testid="signed-in" title={session.address}>
          signed in as {short(session.address)}
        </span>{' '}
        <button onClick={() => void signOut()} data-testid="sign-out">
          Sign out
        </button>
      </span>
    );
  }
  return (
    <span className="session">
      <button onClick={() => void signIn()} disabled={busy} data-testid="sign-in" title="Sign-In with Ethereum (EIP-4361): one signature, no funds moved">
        {busy ? 'Signing in…' : 'Sign in'}
      </button>
      {error && <span className="error" data-testid="sign-in-error"> {error}</span>}
    </span>
  );
}
