import { useConnection } from 'wagmi';
import { formatUnits, type Hex } from 'viem';
import { useApp } from '../context';
import { hostUrl, useHostProbe, useModel, usePublishedHosts, type PublishedHost } from '../models';
import { amount, describeError, short } from '../format';
import { priceIn } from '../units';
import { AccessPanel } from './Access';
import { TryIt } from './TryIt';
import { DaoPanel } from './Dao';

/** One authorised host: where it serves, whether it is up and answers as the address that
 * registered, how fast, and a link to use the model through it (its own dApp). */
function HostItem({ id, h }: { id: Hex; h: PublishedHost }) {
  const { info } = useApp();
  const url = hostUrl(h.url);
  const probe = useHostProbe(h.serving ? url : undefined);
  const here = h.address.toLowerCase() === info.host?.toLowerCase();
  const p = probe.data;
  const status = !h.url
    ? 'authorised, not registered: not serving'
    : !url
      ? 'registered an address that is not an http(s) URL'
      : !h.serving
        ? 'registered, does not serve this model'
        : probe.isPending
          ? 'checking…'
          : !p?.up
            ? `down (${p?.error ?? 'no answer'})`
            : p.answersAs && p.answersAs.toLowerCase() !== h.address.toLowerCase()
              ? `answers as another host (${short(p.answersAs as Hex)})`
              : `up · ${p.ms} ms`;
  const usable = !!url && h.serving && !!p?.up && (!p.answersAs || p.answersAs.toLowerCase() === h.address.toLowerCase());
  return (
    <li data-testid="host" data-serving={h.serving} data-up={!!p?.up}>
      <code title={h.address}>{short(h.address)}</code> {url ? <code data-testid="host-url">{url.href}</code> : null}{' '}
      <span className={usable ? 'ok small' : 'muted small'} data-testid="host-status">{status}</span>{' '}
      {here ? <span className="chip">this host</span> : usable && <a href={`${url!.href.replace(/\/$/, '')}/#/model/${id}`}>use this host</a>}
    </li>
  );
}

export function ModelPage({ id }: { id: Hex }) {
  const { hostModels, stablecoin } = useApp();
  const { address } = useConnection();
  const model = useModel(id);
  const hosts = usePublishedHosts(id);
  if (model.isPending) return <p className="loading">Reading the model…</p>;
  if (model.error) return <p className="error">{describeError(model.error)}</p>;
  const m = model.data;
  const served = hostModels.find((h) => h.model_id?.toLowerCase() === id.toLowerCase());
  return (
    <section>
      <p>
        <a href="#/">← all models</a>
      </p>
      <h1 data-testid="model-name">
        {m.name} {m.active ? <span className="ok small">active</span> : <span className="warn small">paused</span>}
      </h1>
      <div className="panel">
        <dl className="facts">
          <dt>Task</dt>
          <dd>{served ? `${served.task}${served.dimensions ? ` (${served.dimensions} dimensions)` : ''}` : '—'}</dd>
          <dt>Price</dt>
          <dd data-testid="price">
            {amount(priceIn(m.pricePerRequest, stablecoin.decimals), stablecoin.decimals, stablecoin.symbol)} per request
            {m.pricePer1kTokens > 0n && ` + ${amount(priceIn(m.pricePer1kTokens, stablecoin.decimals), stablecoin.decimals, stablecoin.symbol)} per 1000 tokens`}
          </dd>
          <dt>Access token</dt>
          <dd>
            {m.token.symbol} <span className="muted">{short(m.accessToken)}</span>: {formatUnits(m.token.accessThreshold, 18)} for access,{' '}
            {formatUnits(m.token.premiumThreshold, 18)} for premium; sold at {amount(m.token.pricePerToken, stablecoin.decimals, stablecoin.symbol)}
          </dd>
          <dt>Inferences</dt>
          <dd>{m.totalInferences.toString()} settled on chain</dd>
          <dt>Owner</dt>
          <dd title={m.owner}>{short(m.owner)}{address?.toLowerCase() === m.owner.toLowerCase() && ' (you)'}</dd>
          <dt>Ciphertext</dt>
          <dd><code>{m.cid}</code></dd>
          <dt>Plugin</dt>
          <dd><code>{m.pluginCid || '—'}</code></dd>
          <dt>Key custody</dt>
          <dd>{m.threshold} of {m.custodians.length} custodians</dd>
          <dt>Hosts</dt>
          <dd data-testid="hosts">
            {hosts.isPending && 'reading…'}
            {hosts.data?.length === 0 && 'no host is authorised yet'}
            <ul className="hosts">
              {hosts.data?.map((h) => <HostItem key={h.address} id={id} h={h} />)}
            </ul>
          </dd>
        </dl>
      </div>
      <DaoPanel model={m} />
      <AccessPanel model={m} />
      <TryIt key={address ?? 'none'} model={m} served={served} />
    </section>
  );
}
