// A model owned by its Data DAO: the governor is found from the chain alone (the model's owner
// is a timelock whose proposer is a governor of the model's access token), its proposals are
// read from ProposalCreated events, and a member votes here with the votes it held at each
// proposal's snapshot, proposes a new price, and queues and executes what passed (anyone may:
// the timelock runs exactly the calls the members voted on). Host authorisations are proposed
// with `div dao propose`.
import { useState } from 'react';
import { useQuery } from '@tanstack/react-query';
import { useConnection, usePublicClient } from 'wagmi';
import { encodeFunctionData, formatUnits, keccak256, parseUnits, toBytes, type Address, type Hex, type PublicClient } from 'viem';
import { daoTimelockAbi, modelGovernorAbi } from '../generated/dao';
import { modelVaultAbi } from '../contracts';
import { useApp } from '../context';
import { describeError, duration, short } from '../format';
import { PRICE_DECIMALS } from '../units';
import { useTx } from '../tx';
import type { ChainModel } from '../models';

const STATES = ['pending', 'active', 'canceled', 'defeated', 'succeeded', 'queued', 'expired', 'executed'] as const;
const votes = (v: bigint) => formatUnits(v, 18).replace(/\.0+$/, '');

export function useDao(m: ChainModel) {
  const client = usePublicClient();
  const { deployment } = useApp();
  return useQuery({
    queryKey: ['dao', m.id, m.owner],
    enabled: !!client,
    queryFn: async (): Promise<{ governor: Address; timelock: Address } | null> => {
      const c = client as PublicClient;
      const code = await c.getCode({ address: m.owner });
      if (!code || code === '0x') return null;
      const timelock = { address: m.owner, abi: daoTimelockAbi } as const;
      let role: Hex;
      try {
        role = await c.readContract({ ...timelock, functionName: 'PROPOSER_ROLE' });
      } catch {
        return null;
      }
      const grants = await c.getContractEvents({ ...timelock, eventName: 'RoleGranted', args: { role }, fromBlock: BigInt(deployment.deployedAtBlock) });
      for (const g of grants.reverse()) {
        const account = g.args.account;
        if (!account) continue;
        const [has, token] = await Promise.all([
          c.readContract({ ...timelock, functionName: 'hasRole', args: [role, account] }),
          c.readContract({ address: account, abi: modelGovernorAbi, functionName: 'token' }).catch(() => undefined),
        ]);
        if (has && token?.toLowerCase() === m.accessToken.toLowerCase()) return { governor: account, timelock: m.owner };
      }
      return null;
    },
  });
}

type Proposal = {
  id: bigint;
  description: string;
  /** What the proposal runs, as it was proposed (queue and execute take them again). */
  targets: readonly Address[];
  values: readonly bigint[];
  calldatas: readonly Hex[];
  /** When a queued proposal may run (unix seconds). */
  eta: bigint;
  state: (typeof STATES)[number];
  forVotes: bigint;
  againstVotes: bigint;
  abstainVotes: bigint;
  mine?: bigint;
  voted: boolean;
};

export function DaoPanel({ model }: { model: ChainModel }) {
  const dao = useDao(model);
  const client = usePublicClient();
  const { deployment } = useApp();
  const { address } = useConnection();
  const tx = useTx();
  const proposals = useQuery({
    queryKey: ['proposals', dao.data?.governor, address],
    enabled: !!client && !!dao.data,
    refetchInterval: 5_000,
    queryFn: async (): Promise<Proposal[]> => {
      const c = client as PublicClient;
      const gov = { address: dao.data!.governor, abi: modelGovernorAbi } as const;
      const created = await c.getContractEvents({ ...gov, eventName: 'ProposalCreated', fromBlock: BigInt(deployment.deployedAtBlock) });
      return Promise.all(
        created.reverse().map(async (e) => {
          const id = e.args.proposalId!;
          const [state, [againstVotes, forVotes, abstainVotes], snapshot, eta] = await Promise.all([
            c.readContract({ ...gov, functionName: 'state', args: [id] }),
            c.readContract({ ...gov, functionName: 'proposalVotes', args: [id] }),
            c.readContract({ ...gov, functionName: 'proposalSnapshot', args: [id] }),
            c.readContract({ ...gov, functionName: 'proposalEta', args: [id] }),
          ]);
          const [mine, voted] = address
            ? await Promise.all([
                c.readContract({ ...gov, functionName: 'getVotes', args: [address, snapshot] }).catch(() => undefined),
                c.readContract({ ...gov, functionName: 'hasVoted', args: [id, address] }),
              ])
            : [undefined, false];
          return {
            id,
            description: e.args.description ?? '',
            targets: e.args.targets ?? [],
            values: e.args.values ?? [],
            calldatas: e.args.calldatas ?? [],
            eta,
            state: STATES[state] ?? 'pending',
            forVotes,
            againstVotes,
            abstainVotes,
            mine,
            voted,
          };
        }),
      );
    },
  });
  const chainNow = useQuery({
    queryKey: ['chain-time'],
    enabled: !!client,
    refetchInterval: 5_000,
    queryFn: async () => (await (client as PublicClient).getBlock()).timestamp,
  });
  if (dao.isPending || !dao.data) return null;
  const gov = dao.data.governor;
  const cast = (p: Proposal, support: 0 | 1 | 2, word: string) =>
    tx(`Vote ${word} “${p.description.slice(0, 40)}”`, [{ address: gov, abi: modelGovernorAbi, functionName: 'castVote', args: [p.id, support] }]);
  // queue and execute take the proposal as it was made; the description is hashed, not sent
  const run = (p: Proposal, step: 'queue' | 'execute') =>
    tx(`${step === 'queue' ? 'Queue' : 'Execute'} “${p.description.slice(0, 40)}”`, [
      {
        address: gov,
        abi: modelGovernorAbi,
        functionName: step,
        args: [p.targets, p.values, p.calldatas, keccak256(toBytes(p.description))],
      },
    ]);
  return (
    <div className="panel" data-testid="dao">
      <h2>Data DAO</h2>
      <p className="muted">
        The model is owned by its token holders: governor <code title={gov}>{short(gov)}</code>, treasury and timelock{' '}
        <code title={dao.data.timelock}>{short(dao.data.timelock)}</code> (settlements are paid there). Each member votes with
        the tokens it held when voting opened; what passes is queued in the timelock and runs after its delay. Host
        authorisations are proposed with <code>div dao propose</code>.
      </p>
      <ProposePrice model={model} governor={gov} />
      {proposals.error && <p className="error">{describeError(proposals.error)}</p>}
      {proposals.data?.length === 0 && <p className="empty">No proposal yet.</p>}
      <ul className="proposals">
        {proposals.data?.map((p) => (
          <li key={p.id.toString()} data-testid="proposal" data-state={p.state}>
            <strong>{p.description}</strong> <span className="chip" data-testid="proposal-state">{p.state}</span>
            <div className="small" data-testid="proposal-votes">
              for {votes(p.forVotes)} · against {votes(p.againstVotes)} · abstain {votes(p.abstainVotes)}
            </div>
            {p.state === 'succeeded' && (
              <div className="form-row">
                <button data-testid="queue" onClick={() => run(p, 'queue')}>Queue in the timelock</button>
              </div>
            )}
            {p.state === 'queued' && (
              <div className="form-row">
                {chainNow.data !== undefined && chainNow.data < p.eta ? (
                  <span className="muted small" data-testid="eta">
                    runs in {duration(Number(p.eta - chainNow.data))}
                  </span>
                ) : (
                  <button data-testid="execute" onClick={() => run(p, 'execute')}>Execute</button>
                )}
              </div>
            )}
            {p.state === 'active' && address && (
              <div className="form-row">
                {p.voted ? (
                  <span className="ok small">you voted</span>
                ) : !p.mine ? (
                  <span className="muted small" data-testid="no-votes">you held no {model.token.symbol} when voting opened</span>
                ) : (
                  <>
                    <span className="small">your votes: {votes(p.mine)}</span>
                    <button data-testid="vote-for" onClick={() => cast(p, 1, 'for')}>For</button>
                    <button onClick={() => cast(p, 0, 'against')}>Against</button>
                    <button onClick={() => cast(p, 2, 'abstain')}>Abstain</button>
                  </>
                )}
              </div>
            )}
          </li>
        ))}
      </ul>
    </div>
  );
}

/** A member proposes a new price per request (in US dollars, as the vault stores it). */
function ProposePrice({ model, governor }: { model: ChainModel; governor: Address }) {
  const client = usePublicClient();
  const { deployment } = useApp();
  const { address } = useConnection();
  const tx = useTx();
  const [price, setPrice] = useState(formatUnits(model.pricePerRequest, PRICE_DECIMALS));
  const [error, setError] = useState<string>();
  // the governor counts the proposer's votes as of the previous second
  const standing = useQuery({
    queryKey: ['proposer', governor, address],
    enabled: !!client && !!address,
    queryFn: async () => {
      const c = client as PublicClient;
      const gov = { address: governor, abi: modelGovernorAbi } as const;
      const now = await c.readContract({ ...gov, functionName: 'clock' });
      const [votes, threshold] = await Promise.all([
        c.readContract({ ...gov, functionName: 'getVotes', args: [address!, BigInt(now) - 1n] }),
        c.readContract({ ...gov, functionName: 'proposalThreshold' }),
      ]);
      return { votes, threshold };
    },
  });
  if (!address || !standing.data) return null;
  if (standing.data.votes < standing.data.threshold || standing.data.votes === 0n) {
    return <p className="muted small" data-testid="cannot-propose">Members holding {model.token.symbol} propose changes here.</p>;
  }
  const propose = () => {
    setError(undefined);
    let micro: bigint;
    try {
      micro = parseUnits(price, PRICE_DECIMALS);
    } catch {
      setError(`${price} is not a price in dollars`);
      return;
    }
    const description = `Set the price of ${model.name} to ${price} USD per request`;
    const call = encodeFunctionData({ abi: modelVaultAbi, functionName: 'updatePrice', args: [model.id, micro, model.pricePer1kTokens] });
    void tx(`Propose: ${description}`, [
      { address: governor, abi: modelGovernorAbi, functionName: 'propose', args: [[deployment.modelVault], [0n], [call], description] },
    ]);
  };
  return (
    <div className="form-row" data-testid="propose">
      <label>
        Propose a price of <input value={price} onChange={(e) => setPrice(e.target.value)} aria-label="proposed price" size={8} /> USD
        per request
      </label>
      <button data-testid="propose-price" onClick={propose}>Propose</button>
      {error && <span className="error">{error}</span>}
    </div>
  );
}
