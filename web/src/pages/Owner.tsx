// The owner's dashboard: earnings and requests over time from PaymentStream's Settled events,
// the credit settlement left to claim (and the claim that pays it out in one transfer), what this
// host has charged but not yet settled, authorised hosts, price, thresholds, pause.
import { useState } from 'react';
import { useQuery } from '@tanstack/react-query';
import { useConnection, usePublicClient } from 'wagmi';
import { formatUnits, isAddress, parseUnits, type Address, type PublicClient } from 'viem';
import { useApp } from '../context';
import { modelAccessTokenAbi, modelVaultAbi, paymentStreamAbi, stablecoinAbi } from '../contracts';
import { hostFetch, type ModelUsage } from '../host';
import { amount, describeError, short } from '../format';
import { PRICE_DECIMALS } from '../units';
import { useModels, useModelHosts, type ChainModel } from '../models';
import { useTx } from '../tx';

type Point = { t: number; amount: bigint; requests: bigint };

function useEarnings(m: ChainModel) {
  const client = usePublicClient();
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['earnings', m.id],
    enabled: !!client,
    refetchInterval: 5_000,
    queryFn: async () => {
      const c = client as PublicClient;
      const logs = await c.getContractEvents({
        address: deployment.paymentStream,
        abi: paymentStreamAbi,
        eventName: 'Settled',
        args: { modelId: m.id },
        fromBlock: BigInt(deployment.deployedAtBlock),
      });
      const blocks = [...new Set(logs.map((l) => l.blockNumber))];
      const times = new Map(
        await Promise.all(blocks.map(async (b) => [b, Number((await c.getBlock({ blockNumber: b })).timestamp)] as const)),
      );
      let amountSum = 0n,
        requests = 0n;
      const points: Point[] = logs.map((l) => {
        amountSum += l.args.amount ?? 0n;
        requests += BigInt(l.args.requests ?? 0);
        return { t: times.get(l.blockNumber) ?? 0, amount: amountSum, requests };
      });
      return { points, total: amountSum, requests };
    },
  });
}

// Settlement credits the model inside PaymentStream; `claim` pays all of it to the payout.
function useClaimable(m: ChainModel, token: Address) {
  const client = usePublicClient();
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['claimable', m.id, token],
    enabled: !!client,
    refetchInterval: 5_000,
    queryFn: async () => {
      const c = client as PublicClient;
      const [credit, payoutBalance] = await Promise.all([
        c.readContract({ address: deployment.paymentStream, abi: paymentStreamAbi, functionName: 'claimable', args: [m.id, token] }),
        c.readContract({ address: token, abi: stablecoinAbi, functionName: 'balanceOf', args: [m.payout] }),
      ]);
      return { credit, payoutBalance };
    },
  });
}

function Chart({ points, decimals }: { points: Point[]; decimals: number }) {
  if (points.length === 0) return <p className="empty">No settlement yet: earnings appear here once a host settles.</p>;
  const W = 520,
    H = 140,
    P = 28;
  const t0 = points[0]!.t,
    t1 = Math.max(points[points.length - 1]!.t, t0 + 1);
  const maxA = Number(formatUnits(points[points.length - 1]!.amount, decimals)) || 1;
  const maxR = Number(points[points.length - 1]!.requests) || 1;
  const x = (t: number) => P + ((t - t0) / (t1 - t0)) * (W - 2 * P);
  const ya = (p: Point) => H - P - (Number(formatUnits(p.amount, decimals)) / maxA) * (H - 2 * P);
  const yr = (p: Point) => H - P - (Number(p.requests) / maxR) * (H - 2 * P);
  const path = (y: (p: Point) => number) =>
    [{ ...points[0]!, amount: 0n, requests: 0n }, ...points].map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p).toFixed(1)}`).join(' ');
  return (
    <svg viewBox={`0 0 ${W} ${H}`} className="chart" role="img" aria-label="earnings and requests over time" data-testid="earnings-chart">
      <line x1={P} y1={H - P} x2={W - P} y2={H - P} stroke="#bbb" />
      <path d={path(yr)} fill="none" stroke="#9aa7b8" strokeDasharray="4 3" strokeWidth={1.5} />
      <path d={path(ya)} fill="none" stroke="#2e6fdb" strokeWidth={2} />
      <text x={P} y={14} fontSize={11} fill="#2e6fdb">earned {maxA}</text>
      <text x={W - P} y={14} fontSize={11} fill="#667" textAnchor="end">{maxR} requests</text>
      <text x={P} y={H - 8} fontSize={10} fill="#667">{new Date(t0 * 1000).toLocaleTimeString()}</text>
      <text x={W - P} y={H - 8} fontSize={10} fill="#667" textAnchor="end">{new Date(t1 * 1000).toLocaleTimeString()}</text>
    </svg>
  );
}

function ModelCard({ m }: { m: ChainModel }) {
  const { stablecoin, hostModels, deployment } = useApp();
  const tx = useTx();
  const earnings = useEarnings(m);
  const claimable = useClaimable(m, stablecoin.address);
  const hosts = useModelHosts(m.id);
  const served = hostModels.find((h) => h.model_id?.toLowerCase() === m.id.toLowerCase());
  const usage = useQuery({
    queryKey: ['usage', served?.id],
    enabled: !!served,
    refetchInterval: 5_000,
    queryFn: async () => (await hostFetch<{ usage?: ModelUsage }>(`/v1/models/${encodeURIComponent(served!.id)}?chain_id=${deployment.chainId}`)).body.usage,
  });
  const [newHost, setNewHost] = useState('');
  const [price, setPrice] = useState(formatUnits(m.pricePerRequest, PRICE_DECIMALS));
  const [access, setAccess] = useState(formatUnits(m.token.accessThreshold, 18));
  const [premium, setPremium] = useState(formatUnits(m.token.premiumThreshold, 18));
  const vault = { address: deployment.modelVault, abi: modelVaultAbi } as const;
  const d = stablecoin.decimals;
  return (
    <div className="panel" data-testid="owner-model">
      <h2>
        {m.name} {m.active ? <span className="ok small">active</span> : <span className="warn small">paused</span>}
      </h2>
      <dl className="facts">
        <dt>Earned (settled)</dt>
        <dd data-testid="earned">{earnings.data ? amount(earnings.data.total, d, stablecoin.symbol) : '…'}</dd>
        <dt>To claim</dt>
        <dd>
          <span data-testid="claimable">{claimable.data ? amount(claimable.data.credit, d, stablecoin.symbol) : '…'}</span>{' '}
          <button
            data-testid="claim"
            disabled={!claimable.data?.credit}
            title={`pays the whole credit to the payout address ${m.payout}`}
            onClick={() =>
              tx(`Claim ${amount(claimable.data?.credit ?? 0n, d, stablecoin.symbol)} for ${m.name}`, [
                { address: deployment.paymentStream, abi: paymentStreamAbi, functionName: 'claim', args: [m.id, stablecoin.address] },
              ])
            }
          >
            Claim
          </button>
        </dd>
        <dt>Payout balance</dt>
        <dd>
          <span data-testid="payout-balance">{claimable.data ? amount(claimable.data.payoutBalance, d, stablecoin.symbol) : '…'}</span>{' '}
          <code title={m.payout}>{short(m.payout)}</code>
        </dd>
        <dt>Requests settled</dt>
        <dd data-testid="settled-requests">{earnings.data ? earnings.data.requests.toString() : '…'}</dd>
        <dt>Unsettled on this host</dt>
        <dd data-testid="unsettled">
          {!served ? 'not served here' : usage.data ? `${amount(usage.data.unsettled_amount, d, stablecoin.symbol)} (${usage.data.charged_requests - usage.data.settled_requests} requests)` : '…'}
        </dd>
      </dl>
      {earnings.isPending ? <p className="loading">Reading settlements…</p> : earnings.error ? <p className="error">{describeError(earnings.error)}</p> : <Chart points={earnings.data.points} decimals={d} />}
      <h3>Authorised hosts</h3>
      {hosts.isPending && <p className="loading">Reading…</p>}
      {hosts.data?.length === 0 && <p className="empty">No host is authorised: nobody can serve this model.</p>}
      <ul className="hosts">
        {hosts.data?.map((h) => (
          <li key={h}>
            <code title={h}>{h}</code>{' '}
            <button onClick={() => tx(`Revoke host ${short(h)}`, [{ ...vault, functionName: 'revokeHost', args: [m.id, h] }])}>Revoke</button>
          </li>
        ))}
      </ul>
      <div className="form-row">
        <input placeholder="0x host address" value={newHost} onChange={(e) => setNewHost(e.target.value)} aria-label="host to authorise" size={44} />
        <button
          data-testid="authorize"
          onClick={() =>
            tx(`Authorise host ${short(newHost)}`, async () => {
              if (!isAddress(newHost)) throw new Error(`“${newHost}” is not an address`);
              return [{ ...vault, functionName: 'authorizeHost', args: [m.id, newHost as Address] }];
            })
          }
        >
          Authorise
        </button>
      </div>
      <h3>Price and thresholds</h3>
      <div className="form-row">
        <label>
          Price <input value={price} onChange={(e) => setPrice(e.target.value)} aria-label="price per request" size={8} /> USD/request (charged in any accepted stablecoin)
        </label>
        <button
          data-testid="update-price"
          onClick={() =>
            tx(`Set price to ${price} USD`, async () => [
              { ...vault, functionName: 'updatePrice', args: [m.id, parseUnits(price, PRICE_DECIMALS), m.pricePer1kTokens] },
            ])
          }
        >
          Update price
        </button>
      </div>
      <div className="form-row">
        <label>
          Access <input value={access} onChange={(e) => setAccess(e.target.value)} aria-label="access threshold" size={5} />
        </label>
        <label>
          Premium <input value={premium} onChange={(e) => setPremium(e.target.value)} aria-label="premium threshold" size={5} />
        </label>
        <button
          data-testid="update-thresholds"
          onClick={() =>
            tx(`Set thresholds ${access} / ${premium} ${m.token.symbol}`, async () => [
              { address: m.accessToken, abi: modelAccessTokenAbi, functionName: 'setThresholds', args: [parseUnits(access, 18), parseUnits(premium, 18)] },
            ])
          }
        >
          Update thresholds
        </button>
      </div>
      <div className="form-row">
        <button data-testid="toggle-active" onClick={() => tx(m.active ? `Pause ${m.name}` : `Resume ${m.name}`, [{ ...vault, functionName: 'setActive', args: [m.id, !m.active] }])}>
          {m.active ? 'Pause model' : 'Resume model'}
        </button>
      </div>
    </div>
  );
}

export function Owner() {
  const { address } = useConnection();
  const models = useModels();
  if (!address) return <section><h1>Owner dashboard</h1><p className="empty">Connect the wallet that published your models.</p></section>;
  const mine = (models.data ?? []).filter((m) => m.owner.toLowerCase() === address.toLowerCase());
  return (
    <section>
      <h1>Owner dashboard</h1>
      {models.isPending && <p className="loading">Reading ModelVault…</p>}
      {models.error && <p className="error">{describeError(models.error)}</p>}
      {models.data && mine.length === 0 && <p className="empty">This account owns no model. Publish one with `div publish`.</p>}
      {mine.map((m) => <ModelCard key={m.id} m={m} />)}
    </section>
  );
}
