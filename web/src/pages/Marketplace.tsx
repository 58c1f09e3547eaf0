import { useState } from 'react';
import { formatUnits } from 'viem';
import { useApp } from '../context';
import { useModels } from '../models';
import { amount, describeError } from '../format';

export function Marketplace() {
  const { hostModels, stablecoin } = useApp();
  const models = useModels();
  const [q, setQ] = useState('');
  const taskOf = (id: string) => hostModels.find((m) => m.model_id?.toLowerCase() === id.toLowerCase())?.task;
  const shown = (models.data ?? []).filter((m) => {
    const needle = q.trim().toLowerCase();
    return !needle || m.name.toLowerCase().includes(needle) || (taskOf(m.id) ?? '').includes(needle);
  });
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
      {models.isPending && <p className="loading">Reading ModelVault…</p>}
      {models.error && <p className="error">{describeError(models.error)}</p>}
      {models.data && models.data.length === 0 && <p className="empty">No model is published yet. Publish one with `div publish`.</p>}
      {models.data && models.data.length > 0 && shown.length === 0 && <p className="empty">No model matches “{q}”.</p>}
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
                <td>{amount(m.pricePerRequest, stablecoin.decimals, stablecoin.symbol)}</td>
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
