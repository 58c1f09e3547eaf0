// Addresses and amounts as people read them; kept apart from the error wording (format.ts) so the
// first page's code stays small.
import { formatUnits } from 'viem';

export const short = (a?: string | null) => (a ? `${a.slice(0, 6)}…${a.slice(-4)}` : '—');

export function amount(v: bigint | string | undefined, decimals: number, symbol = ''): string {
  if (v === undefined) return '—';
  const n = formatUnits(BigInt(v), decimals);
  const [i, f = ''] = n.split('.');
  const frac = f.slice(0, Math.max(2, Math.min(6, f.replace(/0+$/, '').length)));
  return `${i}${frac ? `.${frac.padEnd(2, '0')}` : '.00'}${symbol ? ` ${symbol}` : ''}`;
}
