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

/** The decimals of the prices ModelVault stores: micro-dollars, whatever stablecoin pays. */
export const PRICE_DECIMALS = 6;

/** A model price (micro-dollars) in the base units of a stablecoin with `decimals`, rounded up:
 * what the host charges a permit in that stablecoin. */
export function priceIn(microUsd: bigint, decimals: number): bigint {
  if (decimals >= PRICE_DECIMALS) return microUsd * 10n ** BigInt(decimals - PRICE_DECIMALS);
  const d = 10n ** BigInt(PRICE_DECIMALS - decimals);
  return (microUsd + d - 1n) / d;
}
