// Numbers and errors as people read them.
import { BaseError, ContractFunctionRevertedError, UserRejectedRequestError, type Address } from 'viem';

import { amount, short } from './units';

export { amount, short };

export function duration(seconds: number): string {
  if (seconds <= 0) return 'now';
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = Math.floor(seconds % 60);
  return h ? `${h}h ${m}m ${s}s` : m ? `${m}m ${s}s` : `${s}s`;
}

/** Plain words for the contracts' custom errors (the raw name and arguments follow them). */
const EXPLAIN: Record<string, string> = {
  InsufficientBalance: 'Not enough deposited in PaymentStream',
  ERC20InsufficientBalance: 'Not enough tokens in the wallet',
  ERC20InsufficientAllowance: 'The token allowance is too small',
  WithdrawalNotReady: 'The withdrawal is still in its delay',
  NoPendingWithdrawal: 'No withdrawal was requested',
  HostAlreadyInState: 'That host already has that authorisation',
  NotModelOwner: 'Only the model owner may do this',
  ModelNotFound: 'No such model',
  SaleClosed: 'The token sale is closed',
  ZeroAmount: 'The amount must be more than zero',
  ZeroAddress: 'An address is missing',
  InvalidThresholds: 'The premium threshold must be at least the access threshold',
  TokenNotAllowed: 'PaymentStream does not accept this token',
  AccessControlUnauthorizedAccount: 'This account lacks the role for that',
  ERC2612ExpiredSignature: 'The deposit signature expired',
  ERC2612InvalidSigner: 'The deposit signature is not from this account',
};

function argText(v: unknown): string {
  if (typeof v === 'bigint') return v.toString();
  if (typeof v === 'string' && /^0x[0-9a-fA-F]{40}$/.test(v)) return short(v as Address);
  if (Array.isArray(v)) return `[${v.map(argText).join(', ')}]`;
  return String(v);
}

/** One sentence for any error a wallet, viem, the chain or the host can throw. */
export function describeError(e: unknown): string {
  if (e instanceof BaseError) {
    const reverted = e.walk((x) => x instanceof ContractFunctionRevertedError);
    if (reverted instanceof ContractFunctionRevertedError) {
      const name = reverted.data?.errorName;
      if (name) {
        const args = (reverted.data?.args ?? []).map(argText).join(', ');
        return `${EXPLAIN[name] ? `${EXPLAIN[name]}: ` : ''}${name}(${args})`;
      }
      if (reverted.reason) return `Reverted: ${reverted.reason}`;
      return 'The contract reverted without a reason';
    }
    if (e.walk((x) => x instanceof UserRejectedRequestError)) return 'You rejected the request in your wallet';
    return e.shortMessage;
  }
  if (e instanceof Error) return e.message;
  return String(e);
}
