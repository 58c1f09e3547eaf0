// A model owned by its Data DAO: the governor is found from the chain alone (the model's owner
// is a timelock whose proposer is a governor of the model's access token), its proposals are
// read from ProposalCreated events, and a member votes here with the votes it held at each
// proposal's snapshot. Proposing stays with `div dao propose` (it builds the calls).
import { useQuery } from '@tanstack/react-query';
import { useConnection, usePublicClient } from 'wagmi';
import { formatUnits, type Address, type Hex, type PublicClient } from 'viem';
import { daoTimelockAbi, modelGovernorAbi } from '../generated/dao';
import { useApp } from '../context';
import { describeError, short } from '../format';
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
          const [state, [againstVotes, forVotes, abstainVotes], snapshot] = await Promise.all([
            c.readContract({ ...gov, functionName: 'state', args: [id] }),
            c.readContract({ ...gov, functionName: 'proposalVotes', args: [id] }),
            c.readContract({ ...gov, functionName: 'proposalSnapshot', args: [id] }),
          ]);
          const [mine, voted] = address
            ? await Promise.all([
                c.readContract({ ...gov, functionName: 'getVotes', args: [address, snapshot] }).catch(() => undefined),
                c.readContract({ ...gov, functionName: 'hasVoted', args: [id, address] }),
              ])
            : [undefined, false];
          return { id, description: e.args.description ?? '', state: STATES[state] ?? 'pending', forVotes, againstVotes, abstainVotes, mine, voted };
        }),
      );
    },
  });
  if (dao.isPending || !dao.data) return null;
  const gov = dao.data.governor;
  const cast = (p: Proposal, support: 0 | 1 | 2, word: string) =>
    tx(`Vote ${word} “${p.description.slice(0, 40)}”`, [{ address: gov, abi: modelGovernorAbi, functionName: 'castVote', args: [p.id, support] }]);
  return (
    <div className="panel" data-testid="dao">
      <h2>Data DAO</h2>
      <p className="muted">
        The model is owned by its token holders: governor <code title={gov}>{short(gov)}</code>, treasury and timelock{' '}
        <code title={dao.data.timelock}>{short(dao.data.timelock)}</code> (settlements are paid there). Proposals are made with{' '}
        <code>div dao propose</code>; each member votes with the tokens it held at the proposal's start.
      </p>
      {proposals.error && <p className="error">{describeError(proposals.error)}</p>}
      {proposals.data?.length === 0 && <p className="empty">No proposal yet.</p>}
      <ul className="proposals">
        {proposals.data?.map((p) => (
          <li key={p.id.toString()} data-testid="proposal" data-state={p.state}>
            <strong>{p.description}</strong> <span className="chip" data-testid="proposal-state">{p.state}</span>
            <div className="small" data-testid="proposal-votes">
              for {votes(p.forVotes)} · against {votes(p.againstVotes)} · abstain {votes(p.abstainVotes)}
            </div>
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
