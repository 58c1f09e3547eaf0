// The whole app: React, wallets (wagmi), transactions, sessions and every page. main.ts paints the
// first page without it and loads it after; `mount` then takes the page over (React replaces the
// shell's DOM), reusing the catalogue the first paint already read.
import { StrictMode, useEffect } from 'react';
import { createRoot } from 'react-dom/client';
import { QueryClient, QueryClientProvider } from '@tanstack/react-query';
import { WagmiProvider } from 'wagmi';
import type { ChainModel } from './catalog';
import type { Deployment, HostInfo, HostModel } from './host';
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
  const config = makeConfig(deployment);
  const queryClient = new QueryClient({ defaultOptions: { queries: { staleTime: 2_000, retry: 1 } } });
  // the first paint's chain read is this query's first answer (shared if it is still on its way)
  if (catalogue) void queryClient.prefetchQuery({ queryKey: ['models', deployment.modelVault], queryFn: () => catalogue });
  root.render(
    <StrictMode>
      <WagmiProvider config={config}>
        <QueryClientProvider client={queryClient}>
          <AppProvider info={info} deployment={deployment} hostModels={hostModels}>
            <SessionProvider>
              <TxProvider>
                <App />
                <Mounted />
              </TxProvider>
            </SessionProvider>
          </AppProvider>
        </QueryClientProvider>
      </WagmiProvider>
    </StrictMode>,
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
