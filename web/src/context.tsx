// App-wide context (the host and its deployment) and a small hash router: the dApp is static
// files any host can serve, so routes live after `#`.
import { createContext, useContext, useEffect, useState } from 'react';
import type { Deployment, HostInfo, HostModel, Stablecoin } from './host';

export type AppCtx = {
  info: HostInfo;
  deployment: Deployment;
  hostModels: HostModel[];
  stablecoin: Stablecoin;
};

export const AppContext = createContext<AppCtx | null>(null);

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
