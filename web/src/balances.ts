// The connected account's standing: stablecoin in the wallet, deposit in PaymentStream (and any
// withdrawal waiting), and access tokens of a model.
import { useQuery } from '@tanstack/react-query';
import { useConnection, usePublicClient } from 'wagmi';
import type { Address, PublicClient } from 'viem';
import { modelAccessTokenAbi, paymentStreamAbi, stablecoinAbi } from './contracts';
import { useApp } from './context';

export type Standing = {
  wallet: bigint;
  deposit: bigint;
  pending: { amount: bigint; readyAt: bigint };
  withdrawDelay: bigint;
  accessTokens?: bigint;
};

export function useStanding(accessToken?: Address) {
  const { address } = useConnection();
  const client = usePublicClient();
  const { deployment, stablecoin } = useApp();
  return useQuery({
    queryKey: ['standing', address, stablecoin.address, accessToken],
    enabled: !!address && !!client,
    refetchInterval: 4_000,
    queryFn: async (): Promise<Standing> => {
      const c = client as PublicClient;
      const user = address as Address;
      const ps = { address: deployment.paymentStream, abi: paymentStreamAbi } as const;
      const [wallet, deposit, pending, withdrawDelay, accessTokens] = await Promise.all([
        c.readContract({ address: stablecoin.address, abi: stablecoinAbi, functionName: 'balanceOf', args: [user] }),
        c.readContract({ ...ps, functionName: 'getBalance', args: [user, stablecoin.address] }),
        c.readContract({ ...ps, functionName: 'pendingWithdrawal', args: [user, stablecoin.address] }),
        c.readContract({ ...ps, functionName: 'withdrawDelay' }),
        accessToken
          ? c.readContract({ address: accessToken, abi: modelAccessTokenAbi, functionName: 'balanceOf', args: [user] })
          : Promise.resolve(undefined),
      ]);
      return {
        wallet,
        deposit,
        pending: { amount: pending[0], readyAt: BigInt(pending[1]) },
        withdrawDelay: BigInt(withdrawDelay),
        accessTokens,
      };
    },
  });
}
