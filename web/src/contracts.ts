// The contracts' ABIs (generated from host/chain/abi) and the union of their custom errors, so a
// revert anywhere in a call chain (the token inside PaymentStream.deposit, say) is decoded.
import type { Abi } from 'viem';
import { modelAccessTokenAbi, modelVaultAbi, paymentStreamAbi, stablecoinAbi } from './generated/abi';
import { daoTimelockAbi, modelGovernorAbi } from './generated/dao';

export { modelAccessTokenAbi, modelVaultAbi, paymentStreamAbi, stablecoinAbi };

const seen = new Set<string>();
export const allErrors: Abi = [
  ...modelVaultAbi,
  ...paymentStreamAbi,
  ...modelAccessTokenAbi,
  ...stablecoinAbi,
  ...modelGovernorAbi,
  ...daoTimelockAbi,
].filter(
  (e) => {
    if (e.type !== 'error') return false;
    const key = `${e.name}(${e.inputs.map((i) => i.type).join(',')})`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  },
) as Abi;
