// The user's money in PaymentStream: deposit, and withdraw after the delay (shown as a countdown;
// the balance stays chargeable by hosts until then, which is what lets them serve before settling).
import { useEffect, useState } from 'react';
import { useConnection } from 'wagmi';
import { parseUnits } from 'viem';
import { useApp } from '../context';
import { paymentStreamAbi } from '../contracts';
import { amount, duration } from '../format';
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
    </section>
  );
}
