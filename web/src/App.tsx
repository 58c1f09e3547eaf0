import { useState } from 'react';
import { useConnect, useConnection, useConnectors, useDisconnect, useSwitchChain } from 'wagmi';
import { useApp, useRoute } from './context';
import { DEV_ROLES } from './devWallet';
import { short, describeError } from './format';
import { TxPanel } from './tx';
import { Marketplace } from './pages/Marketplace';
import { ModelPage } from './pages/ModelPage';
import { Account } from './pages/Account';
import { Owner } from './pages/Owner';
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
          <button data-testid="connect-dev" onClick={() => connect.mutate({ connector: devs[Number(dev)]! })}>
            Connect dev wallet
          </button>
        </span>
      )}
      {connect.error && <span className="error">{describeError(connect.error)}</span>}
    </div>
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
        <Wallet />
      </header>
      <NetworkBanner />
      <main>
        {!page && <Marketplace />}
        {page === 'model' && arg && <ModelPage id={arg as Hex} />}
        {page === 'account' && <Account />}
        {page === 'owner' && <Owner />}
        {page && !['model', 'account', 'owner'].includes(page) && <p className="empty">No such page.</p>}
      </main>
      <TxPanel />
    </>
  );
}
