// The dApp's whole story in Debian's chromium (playwright-core, no downloaded browser), against
// the stack scripts/web-e2e.sh starts: a new user connects the dev wallet, is refused below the
// token threshold (and sees why), buys tokens, deposits, signs a permit, runs the playground and
// gets vectors with a verified receipt; a rejected transaction shows its decoded custom error;
// the owner sees earnings rise after a settlement. A screenshot of every step lands in
// web/e2e/artifacts, with the measured page timings in timings.json.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import assert from 'node:assert/strict';

const here = dirname(fileURLToPath(import.meta.url));
const artifacts = join(here, 'artifacts');
mkdirSync(artifacts, { recursive: true });
const url = process.env.DIV_WEB_URL;
assert.ok(url, 'DIV_WEB_URL is not set (run scripts/web-e2e.sh)');
const chromiumPath = process.env.CHROMIUM ?? '/usr/bin/chromium';

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

const browser = await chromium.launch({ executablePath: chromiumPath, args: ['--no-sandbox'] });
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on('pageerror', (e) => consoleErrors.push(String(e)));

  await check('the marketplace lists the published model', async () => {
    await timed(page, 'marketplace_first_load_ms', () => page.goto(url), () => page.getByTestId('model-row').first().waitFor());
    const nav = await page.evaluate(() => {
      const n = performance.getEntriesByType('navigation')[0];
      return { document: n.responseEnd - n.requestStart, domContentLoaded: n.domContentLoadedEventEnd - n.startTime };
    });
    timings.document_response_ms = Math.round(nav.document);
    timings.dom_content_loaded_ms = Math.round(nav.domContentLoaded);
    // a returning visitor: the bundle is cached, the chain is read again
    await timed(page, 'marketplace_reload_ms', () => page.reload(), () => page.getByTestId('model-row').first().waitFor());
    const row = page.getByTestId('model-row').filter({ hasText: 'all-minilm-l6-v2' });
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
      () => page.getByRole('link', { name: 'all-minilm-l6-v2' }).click(),
      () => page.getByTestId('tier').waitFor(),
    );
    assert.match(await page.getByTestId('hosts').textContent(), /this host/);
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
    await page.getByTestId('buy').click();
    await confirmed(page, 'Buy 1 DIVA');
    await page.getByTestId('tier').filter({ hasText: 'access' }).waitFor();
    // the host's balance cache follows Transfer events; retry like a user would until it has
    const keyDeadline = Date.now() + 20_000;
    for (;;) {
      await page.getByTestId('sign-permit').click();
      await page.waitForFunction(() => document.querySelector('[data-testid="api-key"]') || document.querySelector('[data-testid="permit-error"]'));
      await page.waitForFunction(() => !document.querySelector('[data-testid="sign-permit"]').disabled);
      if (await page.getByTestId('api-key').count()) break;
      assert.ok(Date.now() < keyDeadline, `still no key: ${await page.getByTestId('permit-error').textContent()}`);
      await page.waitForTimeout(500);
    }
    assert.match(await page.getByTestId('api-key').textContent(), /^div-/);
    assert.match(await page.getByTestId('curl-snippet').textContent(), /Authorization: Bearer div-/);
    assert.match(await page.getByTestId('python-snippet').textContent(), /OpenAI\(base_url=/);
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

  await check('the user streams a chat completion token by token, priced per token', async () => {
    await page.goto(url);
    await page.getByRole('link', { name: 'gemma-3-270m' }).click();
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
    await connect(page, 1);
    const card = page.getByTestId('owner-model').filter({ hasText: 'all-minilm-l6-v2' });
    const earned = card.getByTestId('earned');
    await timed(page, 'owner_page_ms', () => page.reload(), () => earned.filter({ hasText: 'USDC' }).waitFor());
    const before = Number((await earned.textContent()).split(' ')[0]);
    await card.getByTestId('unsettled').filter({ hasText: '0.002' }).waitFor();
    execFileSync(process.env.DIV_BIN, ['settle', '--now', '--url', process.env.DIV_URL, '--state-dir', process.env.DIV_HOST_STATE], { stdio: 'inherit' });
    await page.waitForFunction(
      (b) => {
        const cards = [...document.querySelectorAll('[data-testid="owner-model"]')].filter((c) => c.textContent.includes('all-minilm-l6-v2'));
        const e = cards[0]?.querySelector('[data-testid="earned"]');
        return e && Number(e.textContent.split(' ')[0]) >= b + 0.002 - 1e-9;
      },
      before,
      { timeout: 20_000 },
    );
    await card.getByTestId('earnings-chart').waitFor();
    await shot(page, 'owner-earnings');
  });

  await check('the owner authorising a host twice is refused with the decoded error', async () => {
    const card = page.getByTestId('owner-model').filter({ hasText: 'all-minilm-l6-v2' });
    await card.getByLabel('host to authorise').fill(process.env.DIV_HOST);
    await card.getByTestId('authorize').click();
    const t = await lastTx(page, 'Authorise host');
    assert.equal(t.status, 'failed');
    assert.match(t.error, /That host already has that authorisation: HostAlreadyInState\(/);
    await shot(page, 'owner-decoded-error');
  });

  await check('pages answer within the PRD budget of 200 ms', async () => {
    // the host's answer for the page, and every in-app page switch to its data on screen; the
    // very first load (bundle parse and four JSON-RPC rounds) is reported, not held to it
    for (const k of ['document_response_ms', 'model_page_ms', 'account_page_ms']) {
      assert.ok(timings[k] < 200, `${k} = ${timings[k]} ms`);
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
