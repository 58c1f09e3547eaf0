// Getting access to a model: its access token (primary sale in the stablecoin) and a deposit in
// PaymentStream (EIP-2612: one signature and one transaction where the token supports it).
import { useState } from 'react';
import { useConnection, usePublicClient, useWalletClient } from 'wagmi';
import { formatUnits, parseSignature, parseUnits, type Address, type Hex, type PublicClient } from 'viem';
import { useQuery } from '@tanstack/react-query';
import { useApp, useCoin } from '../context';
import { modelAccessTokenAbi, paymentStreamAbi, stablecoinAbi } from '../contracts';
import { amount, describeError } from '../format';
import { useStanding } from '../balances';
import { useTx } from '../tx';
import type { ChainModel } from '../models';

export function MintTestTokens() {
  const { stablecoin } = useApp();
  const { address } = useConnection();
  const tx = useTx();
  if (!stablecoin.dev || !address) return null;
  return (
    <button
      data-testid="mint"
      onClick={() =>
        tx(`Mint 100 test ${stablecoin.symbol}`, [
          {
            address: stablecoin.address,
            abi: stablecoinAbi,
            functionName: 'mint',
            args: [address, parseUnits('100', stablecoin.decimals)],
          },
        ])
      }
    >
      Mint 100 test {stablecoin.symbol}
    </button>
  );
}

export function DepositForm() {
  const { stablecoin, deployment } = useApp();
  const { address } = useConnection();
  const client = usePublicClient();
  const { data: wallet } = useWalletClient();
  const tx = useTx();
  const [value, setValue] = useState('10');
  const [note, setNote] = useState<string>();
  const deposit = async () => {
    setNote(undefined);
    let units: bigint;
    try {
      units = parseUnits(value, stablecoin.decimals);
    } catch {
      setNote(`“${value}” is not an amount`);
      return;
    }
    const label = `Deposit ${value} ${stablecoin.symbol}`;
    await tx(label, async () => {
      if (!wallet || !client || !address) throw new Error('Connect a wallet first');
      const c = client as PublicClient;
      const token = { address: stablecoin.address, abi: stablecoinAbi } as const;
      const approveThenDeposit = [
        { ...token, functionName: 'approve', args: [deployment.paymentStream, units], label: 'approve' },
        {
          address: deployment.paymentStream,
          abi: paymentStreamAbi,
          functionName: 'deposit',
          args: [stablecoin.address, units],
          label: 'deposit',
        },
      ];
      // EIP-2612 when the token has it: sign the allowance, and one transaction deposits
      const terms = await Promise.all([
        c.readContract({ ...token, functionName: 'name' }),
        c.readContract({ ...token, functionName: 'nonces', args: [address] }),
        c.readContract({ ...token, functionName: 'DOMAIN_SEPARATOR' }),
      ]).catch(() => undefined);
      if (!terms) {
        setNote(`${stablecoin.symbol} has no EIP-2612 permit: approve, then deposit (two transactions)`);
        return approveThenDeposit;
      }
      const [name, nonce] = terms;
      const deadline = BigInt(Math.floor(Date.now() / 1000) + 3600);
      let signature: Hex;
      try {
        signature = await wallet.signTypedData({
          account: wallet.account!,
          domain: { name, version: '1', chainId: deployment.chainId, verifyingContract: stablecoin.address },
          types: {
            Permit: [
              { name: 'owner', type: 'address' },
              { name: 'spender', type: 'address' },
              { name: 'value', type: 'uint256' },
              { name: 'nonce', type: 'uint256' },
              { name: 'deadline', type: 'uint256' },
            ],
          },
          primaryType: 'Permit',
          message: { owner: address, spender: deployment.paymentStream, value: units, nonce, deadline },
        });
      } catch (e) {
        if (describeError(e).includes('rejected')) throw e;
        // a wallet that cannot sign typed data: approve, then deposit
        setNote('this wallet cannot sign an EIP-2612 permit: approve, then deposit (two transactions)');
        return approveThenDeposit;
      }
      const { r, s, v, yParity } = parseSignature(signature);
      const vv = Number(v ?? BigInt(yParity + 27));
      return [
        {
          address: deployment.paymentStream,
          abi: paymentStreamAbi,
          functionName: 'depositWithPermit',
          args: [stablecoin.address, units, deadline, vv, r, s],
        },
      ];
    });
  };
  return (
    <div className="form-row">
      <label>
        Deposit{' '}
        <input value={value} onChange={(e) => setValue(e.target.value)} aria-label="deposit amount" size={8} />{' '}
        {stablecoin.symbol}
      </label>
      <button onClick={deposit} data-testid="deposit">Deposit</button>
      {note && <span className="muted" data-testid="deposit-note">{note}</span>}
    </div>
  );
}

export function AccessPanel({ model }: { model: ChainModel }) {
  const { stablecoin } = useApp();
  // the sale is priced in the token's own payment token, whatever the user pays hosts with
  const saleCoin = useCoin(model.token.paymentToken);
  const { address } = useConnection();
  const standing = useStanding(model.accessToken);
  const client = usePublicClient();
  const tx = useTx();
  const need = model.token.accessThreshold;
  const have = standing.data?.accessTokens ?? 0n;
  const missing = need > have ? need - have : 0n;
  const [count, setCount] = useState<string>();
  const wanted = count ?? (missing > 0n ? formatUnits(missing, 18) : '1');
  let units: bigint | undefined;
  try {
    units = parseUnits(wanted, 18);
  } catch {
    units = undefined;
  }
  const quote = useQuery({
    queryKey: ['quote', model.accessToken, units?.toString()],
    enabled: !!client && units !== undefined && units > 0n,
    queryFn: () =>
      (client as PublicClient).readContract({
        address: model.accessToken,
        abi: modelAccessTokenAbi,
        functionName: 'quote',
        args: [units as bigint],
      }),
  });
  if (!address) return <p className="empty">Connect a wallet to buy access.</p>;
  const tier =
    have >= model.token.premiumThreshold ? 'premium' : have >= need ? 'access' : 'none';
  const buy = () =>
    tx(`Buy ${wanted} ${model.token.symbol}`, async () => {
      if (units === undefined || units <= 0n) throw new Error(`“${wanted}” is not a number of tokens`);
      const cost = quote.data ?? 0n;
      return [
        {
          address: model.token.paymentToken as Address,
          abi: stablecoinAbi,
          functionName: 'approve',
          args: [model.accessToken, cost],
          label: 'approve',
        },
        { address: model.accessToken, abi: modelAccessTokenAbi, functionName: 'buy', args: [units], label: 'buy' },
      ];
    });
  return (
    <div className="panel" data-testid="access-panel">
      <h2>Get access</h2>
      {standing.isPending && <p className="loading">Reading your balances…</p>}
      {standing.data && (
        <dl className="facts">
          <dt>Your {model.token.symbol}</dt>
          <dd data-testid="token-balance">
            {formatUnits(have, 18)} of {formatUnits(need, 18)} needed for access,{' '}
            {formatUnits(model.token.premiumThreshold, 18)} for premium (batches)
          </dd>
          <dt>Tier</dt>
          <dd data-testid="tier">
            {tier === 'none' ? <span className="warn">no access yet</span> : <span className="ok">{tier}</span>}
          </dd>
          <dt>Wallet</dt>
          <dd data-testid="wallet-balance">{amount(standing.data.wallet, stablecoin.decimals, stablecoin.symbol)}</dd>
          <dt>Deposited</dt>
          <dd data-testid="deposit-balance">{amount(standing.data.deposit, stablecoin.decimals, stablecoin.symbol)}</dd>
        </dl>
      )}
      <div className="form-row">
        <label>
          Buy <input value={wanted} onChange={(e) => setCount(e.target.value)} aria-label="tokens to buy" size={6} />{' '}
          {model.token.symbol}
        </label>
        <span className="muted">
          {quote.data !== undefined ? `costs ${amount(quote.data, saleCoin.decimals, saleCoin.symbol)}` : ''}
        </span>
        <button onClick={buy} data-testid="buy" disabled={units === undefined || units <= 0n}>
          Buy tokens
        </button>
        <MintTestTokens />
      </div>
      <DepositForm />
    </div>
  );
}
