// The dApp's whole story in Debian's chromium (playwright-core, no downloaded browser), against
// the stack scripts/web-e2e.sh starts: a new user connects the dev wallet, is refused below the
// token threshold (and sees why), buys tokens, deposits, signs a permit, runs the playground and
// gets vectors with a verified receipt, then copies each code snippet from the page (curl, the
// OpenAI Python and JavaScript clients, written for the model's task) and runs it against the
// stack; streams a chat; signs in with Ethereum and reads their permits; deposits a token without
// EIP-2612 by approve-then-deposit; a wallet on the wrong network sees the banner and switches;
// a rejected transaction shows its decoded custom error; the owner, signed in, uses their own
// model free, and sees earnings rise after a settlement. The first load is timed over fresh
// browser contexts (cold caches) and held to the PRD's 200 ms. A screenshot of every step lands
// in web/e2e/artifacts, with the page timings (and the machine's load) in timings.json.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { loadavg, cpus } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

const here = dirname(fileURLToPath(import.meta.url));
const artifacts = join(here, 'artifacts');
mkdirSync(artifacts, { recursive: true });
// the F32 MiniLM, not its int8 variant (whose name starts the same)
const F32_MINILM = /all-minilm-l6-v2(?!-int8)/;
const url = process.env.DIV_WEB_URL;
assert.ok(url, 'DIV_WEB_URL is not set (run scripts/web-e2e.sh)');
const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const root = join(here, '..', '..');

const results = [];
let step = 0;
const timings = {};

async function check(name, fn) {
  const t0 = Date.now();
  try {
    await fn();
    results.push({ name, ok: true, ms: Date.now() - t0 });
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push({ name, ok: false, ms: Date.now() - t0, error: String(e?.message ?? e) });
    console.log(`FAIL ${name}: ${e?.message ?? e}`);
    throw e;
  }
}

async function shot(page, name) {
  step += 1;
  await page.screenshot({ path: join(artifacts, `${String(step).padStart(2, '0')}-${name}.png`), fullPage: true });
}

/** Waits for the newest transaction card to settle and returns its status and error text. */
async function lastTx(page, label) {
  const card = page.getByTestId('tx').filter({ hasText: label }).first();
  await card.waitFor();
  await page.waitForFunction(
    (l) => {
      const c = [...document.querySelectorAll('[data-testid="tx"]')].find((x) => x.textContent.includes(l));
      return c && ['confirmed', 'failed'].includes(c.getAttribute('data-status'));
    },
    label,
    { timeout: 30_000 },
  );
  return { status: await card.getAttribute('data-status'), error: (await card.getByTestId('tx-error').allTextContents()).join(' ') };
}

async function confirmed(page, label) {
  const t = await lastTx(page, label);
  assert.equal(t.status, 'confirmed', `${label}: ${t.error}`);
}

/** Waits until the full app (React, wallets) has taken over the first paint's plain page. */
async function ready(page) {
  await page.locator('#root[data-app="full"]').waitFor();
}

/** Time from asking for a route to its content on screen. */
async function timed(page, name, go, ready) {
  const t0 = Date.now();
  await go();
  await ready();
  timings[name] = Date.now() - t0;
}

async function connect(page, index) {
  const connected = page.getByTestId('wallet-address');
  if (await connected.count()) await page.getByRole('button', { name: 'Disconnect' }).click();
  await page.getByTestId('dev-account').selectOption(String(index));
  await page.getByTestId('connect-dev').click();
  await connected.waitFor();
}

/** Moves the local chain's clock `secs` ahead and mines a block (a vote's period, a timelock's
 * delay). */
function tick(secs) {
  const rpc = ['--rpc-url', process.env.DIV_RPC_URL];
  execFileSync('cast', ['rpc', 'evm_increaseTime', String(secs), ...rpc], { stdio: 'ignore' });
  execFileSync('cast', ['rpc', 'evm_mine', ...rpc], { stdio: 'ignore' });
}

/** Buys one access token on the model page, then signs a permit until the host gives its key:
 * the host's balance cache follows Transfer events, so retry like a user would until it has. */
async function buyAndGetKey(page) {
  await page.getByTestId('buy').click();
  await confirmed(page, 'Buy 1 DIVA');
  await page.getByTestId('tier').filter({ hasText: 'access' }).waitFor();
  const deadline = Date.now() + 20_000;
  for (;;) {
    await page.getByTestId('sign-permit').click();
    await page.waitForFunction(() => document.querySelector('[data-testid="api-key"]') || document.querySelector('[data-testid="permit-error"]'));
    await page.waitForFunction(() => !document.querySelector('[data-testid="sign-permit"]').disabled);
    if (await page.getByTestId('api-key').count()) return;
    assert.ok(Date.now() < deadline, `still no key: ${await page.getByTestId('permit-error').textContent()}`);
    await page.waitForTimeout(500);
  }
}

/** Runs a snippet copied from the page the way a user would: curl in a shell, Python with the
 * project's venv (the stock `openai` package), JavaScript with node and the stock `openai` npm
 * package. Returns its output; a non-zero exit fails the check with what it printed. */
function runSnippet(kind, code) {
  const opts = { encoding: 'utf8', timeout: 120_000, stdio: ['ignore', 'pipe', 'pipe'] };
  try {
    if (kind === 'curl') return execFileSync('bash', ['-c', code], opts);
    if (kind === 'python') return execFileSync(join(root, '.venv', 'bin', 'python'), ['-c', code], opts);
    if (kind === 'js') return execFileSync('node', ['--input-type=module', '-e', code], { ...opts, cwd: join(root, 'web') });
  } catch (e) {
    throw new Error(`the ${kind} snippet failed: ${e.message}\n${e.stdout ?? ''}\n${e.stderr ?? ''}\n--- snippet ---\n${code}`, { cause: e });
  }
  throw new Error(`unknown snippet kind ${kind}`);
}

/** Copies the page's three snippets and runs each; returns their outputs by kind. */
async function runSnippets(page, task) {
  const box = page.getByTestId('snippets').first();
  assert.equal(await box.getAttribute('data-task'), task);
  const out = {};
  for (const kind of ['curl', 'python', 'js']) {
    const code = await box.getByTestId(`snippet-${kind}`).textContent();
    out[kind] = runSnippet(kind, code);
  }
  return out;
}

/** An EIP-1193 wallet injected into the page (window.ethereum) that starts on Ethereum mainnet
 * (chain 1): it cannot switch while the dApp connects (a request is pending, as a real wallet's
 * popup may be), and switches when asked again. Everything else goes to the local chain. */
function wrongNetworkWallet({ rpc, account }) {
  let chainId = '0x1';
  let switches = 0;
  const listeners = {};
  const emit = (ev, v) => (listeners[ev] ?? []).slice().forEach((f) => f(v));
  const fail = (code, message) => Object.assign(new Error(message), { code });
  window.ethereum = {
    async request({ method, params }) {
      switch (method) {
        case 'eth_chainId':
          return chainId;
        case 'eth_accounts':
        case 'eth_requestAccounts':
          return [account];
        case 'wallet_requestPermissions':
          throw fail(-32601, 'not supported');
        case 'wallet_switchEthereumChain':
          switches += 1;
          if (switches === 1) throw fail(-32002, 'a request is already pending');
          chainId = params[0].chainId;
          setTimeout(() => emit('chainChanged', chainId), 0);
          return null;
        default: {
          const res = await fetch(rpc, {
            method: 'POST',
            headers: { 'content-type': 'application/json' },
            body: JSON.stringify({ jsonrpc: '2.0', id: 1, method, params }),
          });
          const json = await res.json();
          if (json.error) throw fail(json.error.code, json.error.message);
          return json.result;
        }
      }
    },
    on(ev, f) {
      (listeners[ev] ??= []).push(f);
    },
    removeListener(ev, f) {
      listeners[ev] = (listeners[ev] ?? []).filter((g) => g !== f);
    },
  };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

// The machine's idle share over `ms`, from /proc/stat (all cores).
async function idleShare(ms) {
  const read = () => {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/).slice(1).map(Number);
    return { idle: f[3] + (f[4] ?? 0), total: f.reduce((a, b) => a + b, 0) };
  };
  const a = read();
  await new Promise((r) => setTimeout(r, ms));
  const b = read();
  return b.total > a.total ? (b.idle - a.idle) / (b.total - a.total) : 1;
}

// The page budget is about the page, not about the step before it: the demo that started this
// stack has just run a dozen CLI processes. Wait (at most 60 s) until the machine is quiet — the
// host, chain and custodians idle — and note how long that took and how idle it was.
async function quietMachine() {
  const t0 = Date.now();
  let idle = 0;
  while (Date.now() - t0 < 60_000) {
    idle = await idleShare(500);
    if (idle >= 0.9) break;
  }
  timings.quiet_wait_ms = Date.now() - t0;
  timings.cpu_idle_before_timing = Number(idle.toFixed(2));
}

const browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on('pageerror', (e) => consoleErrors.push(String(e)));

  await check('the marketplace lists the published model', async () => {
    // the first load of a new visitor: a fresh browser context each time (no cache, no storage);
    // the median of eleven, with the machine's load beside it
    await quietMachine();
    const runs = [];
    const wall = [];
    for (let i = 0; i < 12; i++) {
      const fresh = await browser.newContext({ viewport: { width: 1200, height: 900 } });
      const p = await fresh.newPage();
      const t0 = Date.now();
      await p.goto(url, { waitUntil: 'commit' });
      await p.getByTestId('model-row').first().waitFor();
      const ms = Date.now() - t0;
      // the page's own clock: from navigation start to the frame that shows the models
      const onScreen = await p.evaluate(async () => {
        for (;;) {
          const m = performance.getEntriesByName('div:models-on-screen')[0];
          if (m) return m.startTime;
          await new Promise((r) => setTimeout(r, 5));
        }
      });
      // the first run also starts the browser's own machinery (its network and GPU processes): not a visit
      if (i > 0) {
        runs.push(Math.round(onScreen));
        wall.push(ms);
      }
      if (i === 11) {
        const nav = await p.evaluate(() => {
          const n = performance.getEntriesByType('navigation')[0];
          return { document: n.responseEnd - n.requestStart, domContentLoaded: n.domContentLoadedEventEnd - n.startTime };
        });
        timings.document_response_ms = Math.round(nav.document);
        timings.dom_content_loaded_ms = Math.round(nav.domContentLoaded);
        await ready(p);
        timings.full_app_ready_ms = Math.round(await p.evaluate(() => performance.now()));
      }
      await fresh.close();
    }
    timings.marketplace_first_load_runs_ms = runs;
    timings.marketplace_first_load_ms = median(runs);
    timings.marketplace_first_load_wall_ms = median(wall);
    timings.loadavg_1m = Number(loadavg()[0].toFixed(2));
    timings.cores = cpus().length;
    await page.goto(url);
    await page.getByTestId('model-row').first().waitFor();
    await ready(page);
    // a returning visitor: the bundle is cached, the chain is read again
    await timed(page, 'marketplace_reload_ms', () => page.reload(), () => page.getByTestId('model-row').first().waitFor());
    await ready(page);
    const row = page.getByTestId('model-row').filter({ hasText: F32_MINILM });
    await row.waitFor();
    assert.match(await row.textContent(), /embeddings/);
    assert.match(await row.textContent(), /0\.001 USDC/);
    await page.getByLabel('search models').fill('no-such-model');
    await page.getByText('No model matches').waitFor();
    await page.getByLabel('search models').fill('minilm');
    await row.waitFor();
    await shot(page, 'marketplace');
  });

  await check('a new user connects the dev wallet and sees the model page', async () => {
    await connect(page, 7);
    await timed(
      page,
      'model_page_ms',
      () => page.getByRole('link', { name: 'all-minilm-l6-v2', exact: true }).click(),
      () => page.getByTestId('tier').waitFor(),
    );
    // the hosts the model is served on, as they published themselves on chain: this one, at its
    // URL, up (it answered GET /v1/host as the address that registered), and how fast
    const here = page.getByTestId('host').filter({ hasText: 'this host' });
    await here.getByTestId('host-status').filter({ hasText: /^up · \d+ ms$/ }).waitFor({ timeout: 10_000 });
    assert.equal(await here.getByTestId('host-url').textContent(), `${new URL(url).origin}/`);
    // hosts whose registrations lie (scripts/web-e2e.sh): none is trusted, none is linked
    const status = (re) => page.getByTestId('host').getByTestId('host-status').filter({ hasText: re });
    await status(/^down \(/).waitFor({ timeout: 10_000 });
    await status(/^answers as another host/).waitFor({ timeout: 10_000 });
    await status(/^registered an address that is not an http\(s\) URL$/).waitFor();
    assert.equal(await page.getByTestId('host').count(), 4);
    assert.equal(await page.locator('[data-testid="hosts"] a').count(), 0, 'no lying host is linked');
    assert.equal(await page.locator('a[href^="javascript"]').count(), 0);
    assert.match(await page.getByTestId('tier').textContent(), /no access yet/);
    await shot(page, 'model-page');
  });

  await check('below the threshold the host gives no key and says why', async () => {
    await page.getByTestId('mint').click();
    await confirmed(page, 'Mint 100 test USDC');
    await page.getByLabel('deposit amount').fill('5');
    await page.getByTestId('deposit').click();
    await confirmed(page, 'Deposit 5 USDC');
    await page.getByTestId('deposit-balance').filter({ hasText: '5.00 USDC' }).waitFor();
    // the permit names exactly which model, and whose, it pays for
    assert.match(await page.getByTestId('permit-model-id').textContent(), /^0x[0-9a-f]{64}$/);
    assert.match(await page.getByTestId('permit-model-owner').textContent(), /^0x[0-9a-fA-F]{40}$/);
    await page.getByTestId('sign-permit').click();
    const err = page.getByTestId('permit-error');
    await err.waitFor();
    assert.match(await err.textContent(), /holding 0 of the model's access token; 1 needed/);
    await shot(page, 'refused-below-threshold');
  });

  await check('the user buys tokens, gets a key, runs the playground and gets vectors with a verified receipt', async () => {
    await buyAndGetKey(page);
    assert.match(await page.getByTestId('api-key').textContent(), /^div-/);
    assert.match(await page.getByTestId('snippet-curl').textContent(), /Authorization: Bearer div-/);
    assert.match(await page.getByTestId('snippet-python').textContent(), /OpenAI\(base_url=/);
    const deadline = Date.now() + 20_000;
    for (;;) {
      await page.getByTestId('run').click();
      await page.waitForFunction(() => document.querySelector('[data-testid="receipt"]') || document.querySelector('[data-testid="playground-error"]'));
      await page.waitForFunction(() => !document.querySelector('[data-testid="run"]').disabled);
      if (await page.getByTestId('receipt').count()) break;
      assert.ok(Date.now() < deadline, `still refused: ${await page.getByTestId('playground-error').textContent()}`);
      await page.waitForTimeout(500);
    }
    assert.match(await page.getByTestId('vectors').textContent(), /3 vectors of 384 dimensions/);
    const cells = await page.getByTestId('heatmap').locator('td').allTextContents();
    assert.equal(cells.length, 9);
    const v = cells.map(Number);
    assert.equal(v[0], 1);
    assert.ok(v[1] > v[2], `similar sentences score higher (${v[1]} vs ${v[2]})`);
    await page.getByTestId('receipt-verified').waitFor();
    assert.match(await page.getByTestId('cost').textContent(), /0\.001 USDC/);
    assert.match(await page.getByTestId('spent').textContent(), /0\.001 USDC of 1\.00 USDC \(1 requests\)/);
    await page.getByTestId('run').click();
    await page.getByTestId('spent').filter({ hasText: '(2 requests)' }).waitFor();
    await shot(page, 'playground');
  });

  await check('the embeddings snippets, copied from the page, run against the host', async () => {
    const box = page.getByTestId('snippets').first();
    assert.match(await box.getByTestId('snippet-curl').textContent(), /\/v1\/embeddings[\s\S]*"input"/);
    const out = await runSnippets(page, 'embeddings');
    const curl = JSON.parse(out.curl);
    assert.equal(curl.data[0].embedding.length, 384, out.curl.slice(0, 200));
    assert.ok(curl.receipt?.amount, 'curl: a receipt');
    assert.match(out.python, /^384 dimensions; \d+ tokens$/m);
    assert.match(out.python, /receipt: paid 1000/);
    assert.match(out.js, /models: .*all-minilm-l6-v2/);
    assert.match(out.js, /^384 dimensions; \d+ tokens$/m);
    assert.match(out.js, /receipt: paid 1000/);
    await box.scrollIntoViewIfNeeded();
    await shot(page, 'embeddings-snippets');
  });

  await check('the user streams a chat completion token by token, priced per token', async () => {
    await page.goto(url);
    await ready(page);
    await page.getByRole('link', { name: 'smollm2-135m-instruct' }).click();
    await page.getByTestId('tier').waitFor();
    await page.getByLabel('tokens to buy').fill('1');
    await page.getByTestId('buy').click();
    await confirmed(page, 'Buy 1 DIVA');
    await page.getByTestId('sign-permit').click();
    await page.getByTestId('api-key').waitFor();
    const deadline = Date.now() + 20_000;
    for (;;) {
      await page.getByTestId('send').click();
      await page.waitForFunction(() => document.querySelector('[data-testid="receipt"]') || document.querySelector('[data-testid="playground-error"]'), null, { timeout: 60_000 });
      await page.waitForFunction(() => !document.querySelector('[data-testid="send"]').disabled, null, { timeout: 60_000 });
      if (await page.getByTestId('receipt').count()) break;
      assert.ok(Date.now() < deadline, `still refused: ${await page.getByTestId('playground-error').textContent()}`);
      await page.waitForTimeout(500);
    }
    const text = await page.getByTestId('chat-output').textContent();
    assert.ok(text.trim().length > 10, `generated ${JSON.stringify(text)}`);
    const stats = await page.getByTestId('chat-stats').textContent();
    const chunks = Number(stats.match(/(\d+) chunks streamed/)[1]);
    assert.ok(chunks >= 3, `streamed in pieces: ${stats}`);
    const tokens = stats.match(/(\d+) prompt \+ (\d+) completion tokens/).slice(1).map(Number);
    // 0.0005 per request + 0.002 per 1000 tokens, rounded up to the base unit (6 decimals)
    const expected = 500 + Math.ceil((2000 * (tokens[0] + tokens[1])) / 1000);
    assert.match(await page.getByTestId('cost').textContent(), new RegExp(`^${(expected / 1e6).toFixed(6).replace(/0+$/, '')}`));
    await page.getByTestId('receipt-verified').waitFor();
    await shot(page, 'chat-stream');
  });

  await check('the chat snippets, copied from the page, stream a chat from the host', async () => {
    const box = page.getByTestId('snippets').first();
    for (const kind of ['curl', 'python', 'js']) {
      const code = await box.getByTestId(`snippet-${kind}`).textContent();
      assert.doesNotMatch(code, /embeddings/, `${kind}: a chat model's snippet calls chat`);
      assert.match(code, /chat[/.]completions|chat\.completions/, kind);
      assert.match(code, /messages/, kind);
    }
    const out = await runSnippets(page, 'chat');
    assert.match(out.curl, /"object":"chat\.completion\.chunk"/);
    assert.match(out.curl, /data: \[DONE\]/);
    assert.match(out.curl, /"receipt":/);
    for (const kind of ['python', 'js']) {
      assert.match(out[kind], /usage: \d+ tokens/, `${kind}: ${out[kind]}`);
      assert.match(out[kind], /receipt: paid \d+/, `${kind}: ${out[kind]}`);
      assert.ok(out[kind].split('usage:')[0].trim().length > 0, `${kind} streamed no text: ${out[kind]}`);
    }
    await box.scrollIntoViewIfNeeded();
    await shot(page, 'chat-snippets');
  });

  await check('the user signs in with Ethereum, sees their permits on this host, and signs out', async () => {
    await page.goto(`${url}#/account`);
    await ready(page);
    await page.getByTestId('sign-in').click();
    await page.getByTestId('signed-in').waitFor();
    assert.match(await page.getByTestId('signed-in').textContent(), /signed in as 0x/);
    const rows = page.getByTestId('my-permit');
    await rows.nth(1).waitFor();
    assert.equal(await rows.count(), 2, 'a permit for each model');
    const minilm = rows.filter({ hasText: F32_MINILM });
    // two playground runs and three snippets at 0.001 each
    assert.match(await minilm.getByTestId('permit-charged').textContent(), /0\.005 USDC \(5 requests\)/);
    assert.match(await minilm.getByTestId('permit-settled').textContent(), /0\.00 USDC \(0 requests\)/);
    await shot(page, 'signed-in-permits');
    const token = await page.evaluate(() => JSON.parse(sessionStorage.getItem('div.session.31337')).token);
    await page.getByTestId('sign-out').click();
    await page.getByTestId('sign-in').waitFor();
    const status = await page.evaluate(async (t) => (await fetch('/v1/me', { headers: { authorization: `Bearer ${t}` } })).status, token);
    assert.equal(status, 401, 'the host forgot the session');
  });

  await check('a stablecoin without EIP-2612 is deposited by approve, then deposit', async () => {
    await page.getByTestId('pay-with').selectOption({ label: 'USDT' });
    await page.getByTestId('deposit-balance').filter({ hasText: 'USDT' }).waitFor();
    await page.getByTestId('mint').click();
    await confirmed(page, 'Mint 100 test USDT');
    await page.getByLabel('deposit amount').fill('3');
    await page.getByTestId('deposit').click();
    await confirmed(page, 'Deposit 3 USDT');
    const card = page.getByTestId('tx').filter({ hasText: 'Deposit 3 USDT' }).first();
    assert.equal(await card.getAttribute('data-steps'), '2');
    assert.match(await card.getByTestId('tx-steps').textContent(), /approve, then deposit/);
    assert.match(await page.getByTestId('deposit-note').textContent(), /USDT has no EIP-2612 permit/);
    await page.getByTestId('deposit-balance').filter({ hasText: '3.00 USDT' }).waitFor();
    await shot(page, 'approve-then-deposit');
    await page.getByTestId('pay-with').selectOption({ label: 'USDC' });
    await page.getByTestId('deposit-balance').filter({ hasText: 'USDC' }).waitFor();
    await page.goto(url);
    await page.getByTestId('model-row').first().waitFor();
    await ready(page);
  });

  await check('the user switches to the second chain and pays there in USDFC, then switches back', async () => {
    // the host takes payment on chain 314159 too (scripts/demo.sh): the header offers it
    await page.getByTestId('network').selectOption('314159');
    // on that chain the owner registered the F32 MiniLM only
    await page.waitForFunction(() => document.querySelectorAll('[data-testid="model-row"]').length === 1);
    await page.getByRole('link', { name: 'all-minilm-l6-v2', exact: true }).click();
    await page.getByTestId('tier').filter({ hasText: /no access yet/ }).waitFor();
    await page.getByTestId('wallet-address').waitFor();
    await page.getByTestId('pay-with').selectOption({ label: 'USDFC' });
    await page.getByTestId('mint').click();
    await confirmed(page, 'Mint 100 test USDFC');
    await page.getByLabel('deposit amount').fill('2');
    await page.getByTestId('deposit').click();
    await confirmed(page, 'Deposit 2 USDFC');
    await page.getByTestId('deposit-balance').filter({ hasText: '2.00 USDFC' }).waitFor();
    await buyAndGetKey(page);
    await page.getByTestId('run').click();
    await page.getByTestId('receipt-verified').waitFor();
    // the same 0.001 dollars, in an 18-decimal stablecoin
    assert.match(await page.getByTestId('cost').textContent(), /0\.001 USDFC/);
    await shot(page, 'paid-on-second-chain');
    // back on the first chain the user's USDC key and balance are as they were
    await page.getByTestId('network').selectOption('31337');
    await page.getByTestId('deposit-balance').filter({ hasText: 'USDC' }).waitFor();
    await page.goto(url);
    await page.getByTestId('model-row').first().waitFor();
    await ready(page);
    assert.ok((await page.getByTestId('model-row').count()) > 1, 'the first chain lists its models again');
  });

  await check('a wallet on the wrong network sees the banner and switches', async () => {
    const ctx = await browser.newContext({ viewport: { width: 1200, height: 900 } });
    await ctx.addInitScript(wrongNetworkWallet, { rpc: process.env.DIV_RPC_URL, account: process.env.DIV_USER });
    const p = await ctx.newPage();
    p.on('pageerror', (e) => consoleErrors.push(String(e)));
    await p.goto(url);
    await ready(p);
    await p.getByRole('button', { name: 'Browser wallet' }).click();
    const banner = p.getByTestId('wrong-network');
    await banner.waitFor();
    assert.match(await banner.textContent(), /on chain 1; DIV here runs on chain 31337/);
    await shot(p, 'wrong-network');
    await banner.getByRole('button', { name: 'Switch network' }).click();
    await banner.waitFor({ state: 'detached' });
    await p.getByTestId('wallet-address').waitFor();
    await ctx.close();
  });

  await check('a rejected transaction shows the decoded custom error', async () => {
    await timed(page, 'account_page_ms', () => page.goto(`${url}#/account`), () => page.getByTestId('deposit-balance').waitFor());
    await page.getByLabel('withdraw amount').fill('1000');
    await page.getByTestId('request-withdraw').click();
    const t = await lastTx(page, 'Request withdrawal of 1000 USDC');
    assert.equal(t.status, 'failed');
    assert.match(t.error, /Not enough deposited in PaymentStream: InsufficientBalance\(0x/);
    assert.doesNotMatch(t.error, /0x[0-9a-f]{64}/, 'no raw revert data');
    await shot(page, 'decoded-error');
  });

  await check('a withdrawal shows its delay as a countdown', async () => {
    await page.getByLabel('withdraw amount').fill('1');
    await page.getByTestId('request-withdraw').click();
    await confirmed(page, 'Request withdrawal of 1 USDC');
    await page.getByTestId('countdown').waitFor();
    assert.match(await page.getByTestId('countdown').textContent(), /\d+m \d+s|\d+h/);
    await shot(page, 'withdraw-countdown');
    await page.getByRole('button', { name: 'Cancel' }).click();
    await confirmed(page, 'Cancel withdrawal');
  });

  await check('the owner sees earnings rise after settlement', async () => {
    await page.goto(`${url}#/owner`);
    await ready(page);
    await connect(page, 1);
    const card = page.getByTestId('owner-model').filter({ hasText: F32_MINILM });
    const earned = card.getByTestId('earned');
    await timed(page, 'owner_page_ms', () => page.reload(), () => earned.filter({ hasText: 'USDC' }).waitFor());
    const before = Number((await earned.textContent()).split(' ')[0]);
    await card.getByTestId('unsettled').filter({ hasText: '0.005' }).waitFor();
    execFileSync(process.env.DIV_BIN, ['settle', '--now', '--url', process.env.DIV_URL, '--state-dir', process.env.DIV_HOST_STATE], { stdio: 'inherit' });
    await page.waitForFunction(
      (b) => {
        const cards = [...document.querySelectorAll('[data-testid="owner-model"]')].filter((c) => /all-minilm-l6-v2(?!-int8)/.test(c.textContent));
        const e = cards[0]?.querySelector('[data-testid="earned"]');
        return e && Number(e.textContent.split(' ')[0]) >= b + 0.005 - 1e-9;
      },
      before,
      { timeout: 20_000 },
    );
    await card.getByTestId('earnings-chart').waitFor();
    // settlement credited the model; the claim pays the credit to the payout in one transfer
    const claimable = card.getByTestId('claimable');
    await page.waitForFunction(
      () => {
        const cards = [...document.querySelectorAll('[data-testid="owner-model"]')].filter((c) => /all-minilm-l6-v2(?!-int8)/.test(c.textContent));
        const e = cards[0]?.querySelector('[data-testid="claimable"]');
        return e && Number(e.textContent.split(' ')[0]) >= 0.005 - 1e-9;
      },
      undefined,
      { timeout: 20_000 },
    );
    await shot(page, 'owner-earnings');
    const credit = Number((await claimable.textContent()).split(' ')[0]);
    const payoutBefore = Number((await card.getByTestId('payout-balance').textContent()).split(' ')[0]);
    await card.getByTestId('claim').click();
    await confirmed(page, 'Claim');
    await claimable.filter({ hasText: /^0\.00 USDC$/ }).waitFor({ timeout: 20_000 });
    assert.ok(await card.getByTestId('claim').isDisabled(), 'nothing left to claim');
    await page.waitForFunction(
      (want) => {
        const cards = [...document.querySelectorAll('[data-testid="owner-model"]')].filter((c) => /all-minilm-l6-v2(?!-int8)/.test(c.textContent));
        return Number(cards[0]?.querySelector('[data-testid="payout-balance"]')?.textContent.split(' ')[0]) >= want - 1e-6;
      },
      payoutBefore + credit,
      { timeout: 20_000 },
    );
  });

  await check('the owner authorising a host twice is refused with the decoded error', async () => {
    const card = page.getByTestId('owner-model').filter({ hasText: F32_MINILM });
    await card.getByLabel('host to authorise').fill(process.env.DIV_HOST);
    await card.getByTestId('authorize').click();
    const t = await lastTx(page, 'Authorise host');
    assert.equal(t.status, 'failed');
    assert.match(t.error, /That host already has that authorisation: HostAlreadyInState\(/);
    await shot(page, 'owner-decoded-error');
  });

  await check('a member of a Data DAO votes, proposes, and queues and executes what passed', async () => {
    await page.goto(`${url}#/model/${process.env.DIV_DAO_MODEL_ID}`);
    await ready(page);
    await connect(page, 7);
    const dao = page.getByTestId('dao');
    await dao.waitFor({ timeout: 20_000 });
    const p = dao.getByTestId('proposal').filter({ hasText: 'Lower the int8 price to 0.0004 USDC' });
    await p.getByTestId('proposal-state').filter({ hasText: /^active$/ }).waitFor({ timeout: 20_000 });
    await p.getByTestId('vote-for').click();
    await confirmed(page, 'Vote for');
    await p.getByTestId('proposal-votes').filter({ hasText: /^for 5 · against 0 · abstain 0$/ }).waitFor({ timeout: 20_000 });
    await p.getByText('you voted').waitFor();
    await shot(page, 'dao-vote');
    // an account that held no tokens when voting opened is told so, and offered no vote
    await connect(page, 9);
    await p.getByTestId('no-votes').waitFor({ timeout: 20_000 });
    assert.equal(await p.getByTestId('vote-for').count(), 0);
    assert.equal(await dao.getByTestId('propose-price').count(), 0, 'a non-member is offered no proposal');
    // a member proposes a new price from the page
    await connect(page, 7);
    await dao.getByLabel('proposed price').fill('0.0003');
    await dao.getByTestId('propose-price').click();
    await confirmed(page, 'Propose');
    await dao.getByTestId('proposal').filter({ hasText: 'to 0.0003 USD per request' }).waitFor({ timeout: 20_000 });
    // the first proposal's vote ends (the chain's clock moves past its voting period): it is
    // queued in the timelock from the page, waits out the delay, and runs from the page
    tick(3601);
    await p.getByTestId('queue').click({ timeout: 20_000 });
    await confirmed(page, 'Queue');
    await p.getByTestId('eta').waitFor({ timeout: 20_000 });
    tick(61);
    await p.getByTestId('execute').click({ timeout: 20_000 });
    await confirmed(page, 'Execute');
    await p.getByTestId('proposal-state').filter({ hasText: /^executed$/ }).waitFor({ timeout: 20_000 });
    await page.reload();
    await ready(page);
    await page.getByTestId('price').filter({ hasText: /^0\.0004 USDC per request/ }).waitFor({ timeout: 20_000 });
    await shot(page, 'dao-executed');
    await connect(page, 1); // the owner again, for the checks that follow
  });

  await check('the owner, signed in with Ethereum, uses their own model free', async () => {
    await page.getByTestId('sign-in').click();
    await page.getByTestId('signed-in').waitFor();
    await page.goto(url);
    await ready(page);
    await page.getByRole('link', { name: 'smollm2-135m-instruct' }).click();
    await page.getByTestId('owner-free').waitFor();
    const usage = async () =>
      (await page.evaluate(async () => (await fetch('/v1/models/smollm2-135m-instruct')).json())).usage;
    const before = await usage();
    await page.getByLabel('max tokens').fill('12');
    await page.getByTestId('send').click();
    await page.getByTestId('chat-stats').filter({ hasText: /\((stop|length)\)/ }).waitFor({ timeout: 60_000 });
    assert.ok((await page.getByTestId('chat-output').textContent()).trim().length > 0, 'the owner got an answer');
    assert.equal(await page.getByTestId('receipt').count(), 0, 'nothing charged, no receipt');
    assert.deepEqual(await usage(), before, 'the model charged nobody for the owner');
    await shot(page, 'owner-free');
    await page.getByTestId('sign-out').click();
    await page.getByTestId('owner-hint').waitFor();
  });

  await check('pages answer within the PRD budget of 200 ms', async () => {
    // the first load of a new visitor (median of eleven cold loads), the host's answer for the
    // page, and every in-app page switch to its data on screen
    for (const k of ['marketplace_first_load_ms', 'document_response_ms', 'model_page_ms', 'account_page_ms']) {
      assert.ok(
        timings[k] <= 200,
        `${k} = ${timings[k]} ms (load ${timings.loadavg_1m} on ${timings.cores} cores, ${timings.cpu_idle_before_timing} idle before)`,
      );
    }
  });

  assert.deepEqual(consoleErrors, [], 'no uncaught errors in the page');
} catch {
  failed = true;
} finally {
  await browser.close();
  writeFileSync(join(artifacts, 'timings.json'), JSON.stringify(timings, null, 2));
  writeFileSync(join(artifacts, 'results.json'), JSON.stringify(results, null, 2));
}
const passed = results.filter((r) => r.ok).length;
console.log(`web e2e: ${passed} passed; ${results.length - passed} failed; page timings (ms) ${JSON.stringify(timings)}`);
process.exit(failed ? 1 : 0);
