// Every transaction the dApp sends goes through `useTx`: simulate first (so a revert is decoded
// from the contract's custom error before anything is signed), then sign and send, then wait for
// the receipt. The panel shows each one as signing → pending → confirmed / failed.
import { createContext, useCallback, useContext, useState, type ReactNode } from 'react';
import { usePublicClient, useWalletClient } from 'wagmi';
import { useQueryClient } from '@tanstack/react-query';
import type { Abi, Hash } from 'viem';
import { describeError, short } from './format';
import { allErrors } from './contracts';

export type TxState = {
  id: number;
  label: string;
  status: 'signing' | 'pending' | 'confirmed' | 'failed';
  hash?: Hash;
  error?: string;
  /** The transactions this action sends, in order (more than one: approve, then deposit). */
  steps?: string[];
  /** Which of them is on its way (0-based). */
  step?: number;
};

type Ctx = { txs: TxState[]; update: (t: TxState) => void };
const TxContext = createContext<Ctx>({ txs: [], update: () => {} });

export function TxProvider({ children }: { children: ReactNode }) {
  const [txs, setTxs] = useState<TxState[]>([]);
  const update = useCallback((t: TxState) => {
    setTxs((old) => {
      const rest = old.filter((x) => x.id !== t.id);
      return [t, ...rest].sort((a, b) => b.id - a.id).slice(0, 8);
    });
  }, []);
  return <TxContext.Provider value={{ txs, update }}>{children}</TxContext.Provider>;
}

let nextId = 1;

export type Call = {
  address: `0x${string}`;
  abi: Abi;
  functionName: string;
  args?: readonly unknown[];
  /** What this transaction does, when an action takes several. */
  label?: string;
};

/** The gas limit sent for an estimate: a quarter more plus one new storage slot. */
export function withGasMargin(estimate: bigint): bigint {
  return estimate + estimate / 4n + 25_000n;
}

/** Runs contract calls as transactions, one after another; resolves true when all confirmed. */
export function useTx() {
  const { update } = useContext(TxContext);
  const publicClient = usePublicClient();
  const { data: wallet } = useWalletClient();
  const queries = useQueryClient();
  return useCallback(
    async (label: string, calls: Call[] | (() => Promise<Call[]>)): Promise<boolean> => {
      const id = nextId++;
      update({ id, label, status: 'signing' });
      try {
        if (!wallet || !publicClient) throw new Error('Connect a wallet first');
        const list = typeof calls === 'function' ? await calls() : calls;
        let hash: Hash | undefined;
        const steps = list.map((c) => c.label ?? c.functionName);
        for (const [step, c] of list.entries()) {
          if (list.length > 1) update({ id, label, status: 'signing', hash, steps, step });
          const abi = [...c.abi, ...allErrors] as Abi;
          const { request } = await publicClient.simulateContract({
            ...c,
            abi,
            account: wallet.account,
          } as never);
          // the node estimates against the block being built; a call mined a second later can
          // cost more (vote checkpoints are kept by timestamp), so send a margin over it as
          // div_chain::gas does: unused gas is not paid for
          const estimate = await publicClient.estimateContractGas({ ...c, abi, account: wallet.account } as never);
          hash = await wallet.writeContract({ ...(request as object), gas: withGasMargin(estimate) } as never);
          update({ id, label, status: 'pending', hash, steps, step });
          const receipt = await publicClient.waitForTransactionReceipt({ hash });
          if (receipt.status !== 'success') throw new Error(`the transaction ${short(hash)} reverted`);
        }
        update({ id, label, status: 'confirmed', hash, steps });
        await queries.invalidateQueries();
        return true;
      } catch (e) {
        update({ id, label, status: 'failed', error: describeError(e) });
        return false;
      }
    },
    [update, publicClient, wallet, queries],
  );
}

export function TxPanel() {
  const { txs } = useContext(TxContext);
  if (txs.length === 0) return null;
  return (
    <aside className="txs" aria-label="transactions">
      {txs.map((t) => (
        <div key={t.id} className={`tx tx-${t.status}`} data-testid="tx" data-status={t.status} data-steps={t.steps?.length ?? 1}>
          <strong>{t.label}</strong>{' '}
          {t.steps && t.steps.length > 1 && (
            <span className="muted" data-testid="tx-steps">
              {t.status === 'confirmed' ? t.steps.join(', then ') : `step ${(t.step ?? 0) + 1} of ${t.steps.length}: ${t.steps[t.step ?? 0]}`}
            </span>
          )}{' '}
          <span className="tx-status">
            {t.status === 'signing' && 'waiting for signature…'}
            {t.status === 'pending' && `pending ${short(t.hash)}…`}
            {t.status === 'confirmed' && `confirmed ${short(t.hash)}`}
            {t.status === 'failed' && 'failed'}
          </span>
          {t.error && <div className="tx-error" data-testid="tx-error">{t.error}</div>}
        </div>
      ))}
    </aside>
  );
}
