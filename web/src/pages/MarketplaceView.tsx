// The list of models, as plain props: the first page renders it before the wallet libraries have
// loaded (shell.tsx), and the full app renders it again from its own query (Marketplace.tsx).
import { useEffect, useState } from 'react';
import { formatUnits } from 'viem';
import type { ChainModel } from '../catalog';
import type { HostModel, Stablecoin } from '../host';
import { amount, priceIn } from '../units';

/** Marks, once per page load, when the catalogue was first on screen (for the browser test). */
function useFirstDataMark(shown: boolean) {
  useEffect(() => {
    if (shown && performance.getEntriesByName('div:models-on-screen').length === 0) {
      // after the frame that shows the rows
      requestAnimationFrame(() => performance.mark('div:models-on-screen'));
    }
  }, [shown]);
}

export function MarketplaceView({
  models,
  error,
  hostModels,
  stablecoin,
}: {
  models?: ChainModel[];
  error?: string;
  hostModels: HostModel[];
  stablecoin: Stablecoin;
}) {
  const [q, setQ] = useState('');
  const taskOf = (id: string) => hostModels.find((m) => m.model_id?.toLowerCase() === id.toLowerCase())?.task;
  const shown = (models ?? []).filter((m) => {
    const needle = q.trim().toLowerCase();
    return !needle || m.name.toLowerCase().includes(needle) || (taskOf(m.id) ?? '').includes(needle);
  });
  useFirstDataMark(shown.length > 0);
  return (
    <section>
      <h1>Models</h1>
      <input
        className="search"
        placeholder="Search by name or task"
        value={q}
        onChange={(e) => setQ(e.target.value)}
        aria-label="search models"
      />
      {!models && !error && <p className="loading">Reading ModelVault…</p>}
      {error && <p className="error">{error}</p>}
      {models && models.length === 0 && <p className="empty">No model is published yet. Publish one with `div publish`.</p>}
      {models && models.length > 0 && shown.length === 0 && <p className="empty">No model matches “{q}”.</p>}
      {shown.length > 0 && (
        <table className="models" data-testid="models">
          <thead>
            <tr>
              <th>Model</th>
              <th>Task</th>
              <th>Price / request</th>
              <th>Access needs</th>
              <th>Inferences</th>
              <th>Status</th>
            </tr>
          </thead>
          <tbody>
            {shown.map((m) => (
              <tr key={m.id} data-testid="model-row">
                <td>
                  <a href={`#/model/${m.id}`}>{m.name}</a>
                </td>
                <td>{taskOf(m.id) ?? '—'}</td>
                <td>{amount(priceIn(m.pricePerRequest, stablecoin.decimals), stablecoin.decimals, stablecoin.symbol)}</td>
                <td>
                  {formatUnits(m.token.accessThreshold, 18)} {m.token.symbol}
                </td>
                <td>{m.totalInferences.toString()}</td>
                <td>{m.active ? <span className="ok">active</span> : <span className="warn">paused</span>}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
    </section>
  );
}
