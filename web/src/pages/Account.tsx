// The user's money in PaymentStream: deposit, and withdraw after the delay (shown as a countdown;
// the balance stays chargeable by hosts until then, which is what lets them serve before settling);
// and, signed in with Ethereum, their permits on this host with what each has charged and settled.
import { useEffect, useState } from 'react';
import { useQuery } from '@tanstack/react-query';
import { useConnection } from 'wagmi';
import { parseUnits } from 'viem';
import { useApp } from '../context';
import { paymentStreamAbi } from '../contracts';
import { amount, describeError, duration, short } from '../format';
import { hostFetch } from '../host';
import { useSession } from '../session';
import { useStanding } from '../balances';
import { useTx } from '../tx';
import { DepositForm, MintTestTokens } from './Access';

function useNow() {
  const [now, setNow] = useState(() => Math.floor(Date.now() / 1000));
  useEffect(() => {
    const t = setInterval(() => setNow(Math.floor(Date.now() / 1000)), 1000);
    return () => clearInterval(t);
  }, []);
  return now;
}

type MyPermit = {
  permit_hash: string;
  model: string;
  model_id: string;
  token: string;
  max_amount: string;
  expiry: number;
  charged_amount: string;
  charged_requests: number;
  settled_amount: string;
  settled_requests: number;
  rejected?: string | null;
};

/** The signed-in user's permits on this host (`GET /v1/me`). */
function MyPermits() {
  const { deployment } = useApp();
  const { session, signIn, busy } = useSession();
  const me = useQuery({
    queryKey: ['me', session?.token],
    enabled: !!session,
    refetchInterval: 5_000,
    queryFn: async () =>
      (await hostFetch<{ address: string; permits: MyPermit[] }>('/v1/me', { headers: { authorization: `Bearer ${session!.token}` } })).body,
  });
  const coin = (t: string) => deployment.stablecoins.find((c) => c.address.toLowerCase() === t.toLowerCase());
  const money = (v: string, t: string) => {
    const c = coin(t);
    return c ? amount(v, c.decimals, c.symbol) : `${v} (token ${short(t)})`;
  };
  if (!session) {
    return (
      <div className="panel">
        <h2>Your permits on this host</h2>
        <p className="empty">
          Sign in with Ethereum to see what each of your permits has been charged and what has been settled.{' '}
          <button onClick={() => void signIn()} disabled={busy}>
            Sign in
          </button>
        </p>
      </div>
    );
  }
  const permits = me.data?.permits ?? [];
  return (
    <div className="panel" data-testid="my-permits">
      <h2>Your permits on this host</h2>
      {me.isPending && <p className="loading">Asking the host…</p>}
      {me.error && <p className="error">{describeError(me.error)}</p>}
      {me.data && permits.length === 0 && <p className="empty">No permit on this host yet.</p>}
      {permits.length > 0 && (
        <table className="permits">
          <thead>
            <tr>
              <th>Model</th>
              <th>Permit</th>
              <th>Cap</th>
              <th>Charged</th>
              <th>Settled</th>
              <th>Expires</th>
            </tr>
          </thead>
          <tbody>
            {permits.map((p) => (
              <tr key={p.permit_hash} data-testid="my-permit">
                <td>{p.model}</td>
                <td title={p.permit_hash}>{short(p.permit_hash)}</td>
                <td>{money(p.max_amount, p.token)}</td>
                <td data-testid="permit-charged">
                  {money(p.charged_amount, p.token)} ({p.charged_requests} requests)
                </td>
                <td data-testid="permit-settled">
                  {money(p.settled_amount, p.token)} ({p.settled_requests} requests)
                  {p.rejected && <span className="error"> refused on chain: {p.rejected}</span>}
                </td>
                <td>{new Date(p.expiry * 1000).toLocaleString()}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </div>
  );
}

export function Account() {
  const { stablecoin, deployment } = useApp();
  const { address } = useConnection();
  const standing = useStanding();
  const tx = useTx();
  const now = useNow();
  const [value, setValue] = useState('1');
  if (!address) return <section><h1>Account</h1><p className="empty">Connect a wallet to see your balances.</p></section>;
  const s = standing.data;
  const ps = { address: deployment.paymentStream, abi: paymentStreamAbi } as const;
  const left = s ? Number(s.pending.readyAt) - now : 0;
  return (
    <section>
      <h1>Account</h1>
      <div className="panel">
        {standing.isPending && <p className="loading">Reading your balances…</p>}
        {s && (
          <dl className="facts">
            <dt>Wallet</dt>
            <dd data-testid="wallet-balance">{amount(s.wallet, stablecoin.decimals, stablecoin.symbol)}</dd>
            <dt>Deposited in PaymentStream</dt>
            <dd data-testid="deposit-balance">{amount(s.deposit, stablecoin.decimals, stablecoin.symbol)}</dd>
            <dt>Withdraw delay</dt>
            <dd>{duration(Number(s.withdrawDelay))}</dd>
          </dl>
        )}
        <div className="form-row"><MintTestTokens /></div>
        <DepositForm />
      </div>
      <div className="panel">
        <h2>Withdraw</h2>
        {s && s.pending.amount > 0n ? (
          <div data-testid="pending-withdrawal">
            <p>
              {amount(s.pending.amount, stablecoin.decimals, stablecoin.symbol)} requested;{' '}
              {left > 0 ? <>ready in <strong data-testid="countdown">{duration(left)}</strong></> : <strong>ready now</strong>}
            </p>
            <button disabled={left > 0} data-testid="withdraw" onClick={() => tx('Withdraw', [{ ...ps, functionName: 'withdraw', args: [stablecoin.address] }])}>
              Withdraw
            </button>{' '}
            <button onClick={() => tx('Cancel withdrawal', [{ ...ps, functionName: 'cancelWithdraw', args: [stablecoin.address] }])}>Cancel</button>
          </div>
        ) : (
          <div className="form-row">
            <label>
              Amount <input value={value} onChange={(e) => setValue(e.target.value)} aria-label="withdraw amount" size={8} /> {stablecoin.symbol}
            </label>
            <button
              data-testid="request-withdraw"
              onClick={() =>
                tx(`Request withdrawal of ${value} ${stablecoin.symbol}`, async () => [
                  { ...ps, functionName: 'requestWithdraw', args: [stablecoin.address, parseUnits(value, stablecoin.decimals)] },
                ])
              }
            >
              Request withdrawal
            </button>
          </div>
        )}
      </div>
      <MyPermits />
    </section>
  );
}
