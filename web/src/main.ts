// The entry: take the host's answers about itself (asked by index.html before this code loaded),
// paint the first page from the chain with little code (shell.ts: plain DOM, no React, no wallet
// libraries), then load the full app (full.tsx), which takes the page over. What the first page
// needs — those two answers and one eth_call for the catalogue — is done before the big chunk is
// even asked for.
import { chosenDeployment, loadBoot, type Stablecoin } from './host';
import { readCatalog } from './catalog';
import { paintShell } from './shell';
import './styles.css';

const container = document.getElementById('root')!;

/** Resolves after the browser has painted what was rendered last. */
const painted = () => new Promise<void>((r) => requestAnimationFrame(() => setTimeout(r, 0)));

function fail(e: unknown) {
  const box = document.createElement('div');
  box.className = 'boot error';
  box.setAttribute('role', 'alert');
  const title = document.createElement('h1');
  title.textContent = 'DIV cannot start';
  const text = document.createElement('p');
  text.textContent = e instanceof Error ? e.message : String(e);
  box.append(title, text);
  container.replaceChildren(box);
}

async function start() {
  const page = window.location.hash.replace(/^#\/?/, '').split('/')[0] ?? '';
  const shell = paintShell(container, page);
  const { info, hostModels } = await loadBoot();
  // the chain the user last worked on here, of those the host takes payment on
  const deployment = chosenDeployment(info);
  if (!deployment) throw new Error('this host publishes no deployment (run it with an address book)');
  if (!deployment.stablecoins[0]) throw new Error('the deployment accepts no stablecoin');
  const catalogue = page ? undefined : readCatalog(deployment.rpcUrl, deployment.modelVault);
  if (catalogue) {
    // the coin the user pays with, as the full app will choose it (context.tsx)
    const chosen = localStorage.getItem(`div.stablecoin.${deployment.chainId}`)?.toLowerCase();
    const coin: Stablecoin = deployment.stablecoins.find((c) => c.address.toLowerCase() === chosen) ?? deployment.stablecoins[0];
    // the full app's code takes the main thread for a while when it runs: it waits until the
    // models are on screen
    await catalogue.then(
      (models) => shell.models(models, hostModels, coin),
      (e: unknown) => shell.error(e instanceof Error ? e.message : String(e)),
    );
    await painted();
  }
  const { mount, preloadRoute } = await import('./full');
  await preloadRoute(page).catch(() => undefined);
  mount(container, { info, deployment, hostModels, catalogue });
}

start().catch(fail);
