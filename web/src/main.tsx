import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import { QueryClient, QueryClientProvider } from '@tanstack/react-query';
import { WagmiProvider } from 'wagmi';
import { loadHostInfo, loadHostModels } from './host';
import { makeConfig } from './wagmi';
import { AppContext } from './context';
import { App } from './App';
import { TxProvider } from './tx';
import { describeError } from './format';
import './styles.css';

const root = createRoot(document.getElementById('root')!);

async function start() {
  root.render(<p className="boot">Connecting to the host…</p>);
  try {
    const [info, hostModels] = await Promise.all([loadHostInfo(), loadHostModels()]);
    const deployment = info.deployment;
    if (!deployment) throw new Error('this host publishes no deployment (run it with an address book)');
    const stablecoin = deployment.stablecoins[0];
    if (!stablecoin) throw new Error('the deployment accepts no stablecoin');
    const config = makeConfig(deployment);
    const queryClient = new QueryClient({ defaultOptions: { queries: { staleTime: 2_000, retry: 1 } } });
    root.render(
      <StrictMode>
        <WagmiProvider config={config}>
          <QueryClientProvider client={queryClient}>
            <AppContext.Provider value={{ info, deployment, hostModels, stablecoin }}>
              <TxProvider>
                <App />
              </TxProvider>
            </AppContext.Provider>
          </QueryClientProvider>
        </WagmiProvider>
      </StrictMode>,
    );
  } catch (e) {
    root.render(
      <div className="boot error" role="alert">
        <h1>DIV cannot start</h1>
        <p>{describeError(e)}</p>
      </div>,
    );
  }
}

void start();
