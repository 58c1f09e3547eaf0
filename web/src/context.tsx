// App-wide context (the host and its deployment) and a small hash router: the dApp is static
// files any host can serve, so routes live after `#`.
import { createContext, useContext, useEffect, useState, type ReactNode } from 'react';
import type { Address } from 'viem';
import type { Deployment, HostInfo, HostModel, Stablecoin } from './host';

export type AppCtx = {
  info: HostInfo;
  /** The chain the app works on now (the user picks it among `deployments`). */
  deployment: Deployment;
  /** Every chain the host takes payment on. */
  deployments: Deployment[];
  hostModels: HostModel[];
  /** The stablecoin the user pays with (deposits, permits, balances): their choice, kept. */
  stablecoin: Stablecoin;
  setStablecoin: (address: Address) => void;
};

export const AppContext = createContext<AppCtx | null>(null);

const coinKey = (chain: number) => `div.stablecoin.${chain}`;

/** The app's context, with the user's choice of stablecoin (remembered in this browser). */
export function AppProvider({
  info,
  deployment,
  deployments,
  hostModels,
  children,
}: {
  info: HostInfo;
  deployment: Deployment;
  deployments: Deployment[];
  hostModels: HostModel[];
  children: ReactNode;
}) {
  const [chosen, setChosen] = useState<string | null>(() => localStorage.getItem(coinKey(deployment.chainId)));
  const stablecoin =
    deployment.stablecoins.find((c) => c.address.toLowerCase() === chosen?.toLowerCase()) ?? deployment.stablecoins[0]!;
  const setStablecoin = (a: Address) => {
    localStorage.setItem(coinKey(deployment.chainId), a);
    setChosen(a);
  };
  return (
    <AppContext.Provider value={{ info, deployment, deployments, hostModels, stablecoin, setStablecoin }}>{children}</AppContext.Provider>
  );
}

/** The deployment's stablecoin at `address` (for amounts in a token other than the chosen one). */
export function useCoin(address?: string): Stablecoin {
  const { deployment, stablecoin } = useApp();
  return deployment.stablecoins.find((c) => c.address.toLowerCase() === address?.toLowerCase()) ?? stablecoin;
}

export function useApp(): AppCtx {
  const c = useContext(AppContext);
  if (!c) throw new Error('useApp outside the app');
  return c;
}

export function useRoute(): string[] {
  const read = () => window.location.hash.replace(/^#\/?/, '').split('/').filter(Boolean);
  const [route, setRoute] = useState(read);
  useEffect(() => {
    const on = () => setRoute(read());
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}

export const go = (path: string) => {
  window.location.hash = path;
};
