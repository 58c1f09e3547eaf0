// The first paint, in plain DOM: the header and, on the marketplace route, the catalogue read
// straight from the chain (catalog.ts). No React and no wallet code are on this path, so a new
// visitor sees the models after one small script, the host's two preloaded answers and one
// eth_call; the full app (full.tsx) then takes the page over and renders the same table with
// React (pages/MarketplaceView.tsx, whose markup this mirrors: same classes and test ids).
import { formatUnits } from 'viem';
import type { ChainModel } from './catalog';
import type { HostModel, Stablecoin } from './host';
import { amount, priceIn } from './units';

type Child = Node | string | null | undefined | false;

function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const c of children) if (c) el.append(c);
  return el;
}

/** Paints the shell into `root`; returns where the catalogue goes once it is read. */
export function paintShell(root: HTMLElement, page: string) {
  const link = (href: string, text: string, active: boolean) => h('a', { href, class: active ? 'active' : '' }, text);
  const main = h('main', {}, h('p', { class: 'loading' }, page ? 'Loading the page…' : 'Reading ModelVault…'));
  root.replaceChildren(
    h(
      'header',
      {},
      h('a', { href: '#/', class: 'brand' }, 'DIV ', h('small', {}, 'Decentralized Inference Vault')),
      h('nav', {}, link('#/', 'Models', !page), link('#/account', 'Account', page === 'account'), link('#/owner', 'Owner', page === 'owner')),
      h('div', { class: 'wallet muted' }, 'loading the wallet…'),
    ),
    main,
  );
  return {
    models(models: ChainModel[], hostModels: HostModel[], coin: Stablecoin) {
      const taskOf = (id: string) => hostModels.find((m) => m.model_id?.toLowerCase() === id.toLowerCase())?.task;
      const search = h('input', { class: 'search', placeholder: 'Search by name or task', 'aria-label': 'search models', disabled: '' });
      const body =
        models.length === 0
          ? h('p', { class: 'empty' }, 'No model is published yet. Publish one with `div publish`.')
          : h(
              'table',
              { class: 'models', 'data-testid': 'models' },
              h('thead', {}, h('tr', {}, ...['Model', 'Task', 'Price / request', 'Access needs', 'Inferences', 'Status'].map((t) => h('th', {}, t)))),
              h(
                'tbody',
                {},
                ...models.map((m) =>
                  h(
                    'tr',
                    { 'data-testid': 'model-row' },
                    h('td', {}, h('a', { href: `#/model/${m.id}` }, m.name)),
                    h('td', {}, taskOf(m.id) ?? '—'),
                    h('td', {}, amount(priceIn(m.pricePerRequest, coin.decimals), coin.decimals, coin.symbol)),
                    h('td', {}, `${formatUnits(m.token.accessThreshold, 18)} ${m.token.symbol}`),
                    h('td', {}, m.totalInferences.toString()),
                    h('td', {}, m.active ? h('span', { class: 'ok' }, 'active') : h('span', { class: 'warn' }, 'paused')),
                  ),
                ),
              ),
            );
      main.replaceChildren(h('section', {}, h('h1', {}, 'Models'), search, body));
      // after the frame that shows the rows
      requestAnimationFrame(() => performance.mark('div:models-on-screen'));
    },
    error(message: string) {
      main.replaceChildren(h('section', {}, h('h1', {}, 'Models'), h('p', { class: 'error' }, message)));
    },
  };
}
