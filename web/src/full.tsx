// The whole app: React, wallets (wagmi), transactions, sessions and every page. main.ts paints the
// first page without it and loads it after; `mount` then takes the page over (React replaces the
// shell's DOM), reusing the catalogue the first paint already read.
import { StrictMode, useEffect, useMemo, type ReactNode } from 'react';
import { createRoot } from 'react-dom/client';
import { QueryClient, QueryClientProvider } from '@tanstack/react-query';
import { useChainId, WagmiProvider } from 'wagmi';
import type { ChainModel } from './catalog';
import { deploymentsOf, rememberChain, type Deployment, type HostInfo, type HostModel } from './host';
import { makeConfig } from './wagmi';
import { AppProvider } from './context';
import { SessionProvider } from './session';
import { App, preloadRoute } from './App';

export { preloadRoute };
import { TxProvider } from './tx';

export function mount(
  container: HTMLElement,
  { info, deployment, hostModels, catalogue }: { info: HostInfo; deployment: Deployment; hostModels: HostModel[]; catalogue?: Promise<ChainModel[]> },
) {
  const root = createRoot(container);
  const deployments = deploymentsOf(info);
  const config = makeConfig(deployments, deployment);
  root.render(
    <StrictMode>
      <WagmiProvider config={config}>
        <OnChain info={info} initial={deployment} deployments={deployments} hostModels={hostModels} catalogue={catalogue}>
          <SessionProvider>
            <TxProvider>
              <App />
              <Mounted />
            </TxProvider>
          </SessionProvider>
        </OnChain>
      </WagmiProvider>
    </StrictMode>,
  );
}

/** The app on the chain wagmi is on (the user switches it in the header, or in the wallet):
 * everything under it is that chain's, with a query cache of its own (the contracts may sit at
 * the same addresses on every chain), and is mounted afresh when the chain changes. */
function OnChain({
  info,
  initial,
  deployments,
  hostModels,
  catalogue,
  children,
}: {
  info: HostInfo;
  initial: Deployment;
  deployments: Deployment[];
  hostModels: HostModel[];
  catalogue?: Promise<ChainModel[]>;
  children: ReactNode;
}) {
  const chainId = useChainId();
  const deployment = deployments.find((d) => d.chainId === chainId) ?? initial;
  useEffect(() => rememberChain(deployment.chainId), [deployment.chainId]);
  const queryClient = useMemo(() => {
    const q = new QueryClient({ defaultOptions: { queries: { staleTime: 2_000, retry: 1 } } });
    // the first paint's chain read is this query's first answer (shared if it is still on its way)
    if (catalogue && deployment.chainId === initial.chainId) {
      void q.prefetchQuery({ queryKey: ['models', deployment.modelVault], queryFn: () => catalogue });
    }
    return q;
  }, [deployment, initial.chainId, catalogue]);
  return (
    <QueryClientProvider client={queryClient} key={deployment.chainId}>
      <AppProvider info={info} deployment={deployment} deployments={deployments} hostModels={hostModels}>
        {children}
      </AppProvider>
    </QueryClientProvider>
  );
}

/** Marks the page as the full app's once React has committed it (the browser test waits for it
 * before typing into inputs the shell had painted). */
function Mounted() {
  useEffect(() => {
    document.getElementById('root')?.setAttribute('data-app', 'full');
  }, []);
  return null;
}
