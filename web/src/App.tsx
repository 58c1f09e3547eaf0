import { createElement, lazy, Suspense, useEffect, useState, type ComponentType } from 'react';
import { useConnect, useConnection, useConnectors, useDisconnect, useSwitchChain } from 'wagmi';
import { useApp, useRoute } from './context';
import { DEV_ROLES } from './devWallet';
import { chainName } from './host';
import { short, describeError } from './format';
import { TxPanel } from './tx';
import { SignIn } from './session';
import { Marketplace } from './pages/Marketplace';

// the marketplace is the first page most visitors see: it is in the main bundle; every other
// page is a chunk of its own, fetched when the browser is idle after the first render. A page
// whose chunk has arrived renders at once: React.lazy would still suspend on its first render,
// and React holds a revealed boundary back a few hundred milliseconds.
function lazyPage<P extends object>(load: () => Promise<ComponentType<P>>) {
  let loaded: ComponentType<P> | undefined;
  const prefetch = () => load().then((c) => (loaded = c));
  const Lazy = lazy(() => prefetch().then((c) => ({ default: c })));
  function Page(props: P) {
    return loaded ? createElement(loaded, props) : createElement(Lazy as ComponentType<P>, props);
  }
  return { Page, prefetch };
}

const modelPage = lazyPage(() => import('./pages/ModelPage').then((m) => m.ModelPage));
const account = lazyPage(() => import('./pages/Account').then((m) => m.Account));
const owner = lazyPage(() => import('./pages/Owner').then((m) => m.Owner));
const ModelPage = modelPage.Page;
const Account = account.Page;
const Owner = owner.Page;

/** Loads the chunk of the page a route shows (before the first render of a deep link, so it
 * renders without a fallback). */
export function preloadRoute(page: string): Promise<unknown> {
  if (page === 'model') return modelPage.prefetch();
  if (page === 'account') return account.prefetch();
  if (page === 'owner') return owner.prefetch();
  return Promise.resolve();
}

function usePrefetchPages() {
  useEffect(() => {
    const later = window.requestIdleCallback ?? ((f: () => void) => window.setTimeout(f, 200));
    later(() => {
      void modelPage.prefetch();
      void account.prefetch();
      void owner.prefetch();
    });
  }, []);
}
import type { Hex } from 'viem';

function Wallet() {
  const { deployment } = useApp();
  const { address, isConnected, chainId, connector } = useConnection();
  const connectors = useConnectors();
  const connect = useConnect();
  const disconnect = useDisconnect();
  const [dev, setDev] = useState('7');
  const injected = connectors.filter((c) => c.type !== 'devWallet');
  const devs = connectors.filter((c) => c.type === 'devWallet');
  if (isConnected && address) {
    const devIndex = connector?.type === 'devWallet' ? Number(connector.id.replace('dev-', '')) : undefined;
    return (
      <div className="wallet" data-testid="wallet">
        <span title={address} data-testid="wallet-address">
          {short(address)}
          {devIndex !== undefined && ` · dev #${devIndex}${DEV_ROLES[devIndex] ? ` ${DEV_ROLES[devIndex]}` : ''}`}
        </span>
        {chainId !== deployment.chainId && <span className="warn"> wrong network</span>}
        <button onClick={() => disconnect.mutate()}>Disconnect</button>
      </div>
    );
  }
  return (
    <div className="wallet">
      {injected.map((c) => (
        <button key={c.uid} onClick={() => connect.mutate({ connector: c, chainId: deployment.chainId })}>
          {c.name === 'Injected' ? 'Browser wallet' : c.name}
        </button>
      ))}
      {devs.length > 0 && (
        <span className="dev-connect">
          <select value={dev} onChange={(e) => setDev(e.target.value)} aria-label="dev account" data-testid="dev-account">
            {devs.map((c, i) => (
              <option key={c.uid} value={String(i)}>
                #{i} {DEV_ROLES[i] ?? 'test account'}
              </option>
            ))}
          </select>
          <button data-testid="connect-dev" onClick={() => connect.mutate({ connector: devs[Number(dev)]!, chainId: deployment.chainId })}>
            Connect dev wallet
          </button>
        </span>
      )}
      {connect.error && <span className="error">{describeError(connect.error)}</span>}
    </div>
  );
}

/** Which of the deployment's stablecoins the user pays with (deposits, permits, balances). */
function PayWith() {
  const { deployment, stablecoin, setStablecoin } = useApp();
  if (deployment.stablecoins.length < 2) return null;
  return (
    <label className="pay-with">
      pay with{' '}
      <select
        value={stablecoin.address}
        onChange={(e) => setStablecoin(e.target.value as Hex)}
        aria-label="pay with"
        data-testid="pay-with"
      >
        {deployment.stablecoins.map((c) => (
          <option key={c.address} value={c.address}>
            {c.symbol}
          </option>
        ))}
      </select>
    </label>
  );
}

/** Which of the host's chains the app works on (shown when the host takes payment on several):
 * switching asks the wallet to switch too; deposits, permits, balances and the catalogue are
 * that chain's. */
function Network() {
  const { deployment, deployments } = useApp();
  const switchChain = useSwitchChain();
  if (deployments.length < 2) return null;
  return (
    <label className="pay-with">
      network{' '}
      <select
        value={deployment.chainId}
        onChange={(e) => switchChain.mutate({ chainId: Number(e.target.value) })}
        aria-label="network"
        data-testid="network"
      >
        {deployments.map((d) => (
          <option key={d.chainId} value={d.chainId}>
            {chainName(d)}
          </option>
        ))}
      </select>
      {switchChain.error && <span className="error"> {describeError(switchChain.error)}</span>}
    </label>
  );
}

function NetworkBanner() {
  const { deployment } = useApp();
  const { isConnected, chainId } = useConnection();
  const switchChain = useSwitchChain();
  if (!isConnected || chainId === deployment.chainId) return null;
  return (
    <div className="banner warn" role="alert" data-testid="wrong-network">
      Your wallet is on chain {chainId}; DIV here runs on chain {deployment.chainId}.{' '}
      <button onClick={() => switchChain.mutate({ chainId: deployment.chainId })}>Switch network</button>
      {switchChain.error && <span className="error"> {describeError(switchChain.error)}</span>}
    </div>
  );
}

export function App() {
  usePrefetchPages();
  const route = useRoute();
  const [page, arg] = route;
  return (
    <>
      <header>
        <a href="#/" className="brand">
          DIV <small>Decentralized Inference Vault</small>
        </a>
        <nav>
          <a href="#/" className={!page ? 'active' : ''}>Models</a>
          <a href="#/account" className={page === 'account' ? 'active' : ''}>Account</a>
          <a href="#/owner" className={page === 'owner' ? 'active' : ''}>Owner</a>
        </nav>
        <Network />
        <PayWith />
        <Wallet />
        <SignIn />
      </header>
      <NetworkBanner />
      <main>
        <Suspense fallback={<p className="loading">Loading the page…</p>}>
          {!page && <Marketplace />}
          {page === 'model' && arg && <ModelPage id={arg as Hex} />}
          {page === 'account' && <Account />}
          {page === 'owner' && <Owner />}
          {page && !['model', 'account', 'owner'].includes(page) && <p className="empty">No such page.</p>}
        </Suspense>
      </main>
      <TxPanel />
    </>
  );
}
