// Trying a model: sign a spending permit with a cap, trade it for an API key (shown once, with
// curl and OpenAI snippets), then run the playground; every call shows its cost and the host's
// signed receipt, checked here against the host's address.
import { useMemo, useState } from 'react';
import { useConnection, useWalletClient } from 'wagmi';
import { hashTypedData, parseUnits, recoverMessageAddress, toHex, type Address, type Hex } from 'viem';
import { useApp } from '../context';
import { HostError, hostFetch, type HostModel } from '../host';
import { amount, describeError, short } from '../format';
import type { ChainModel } from '../models';
import { snippetsFor } from '../snippets';
import { useSession } from '../session';

type SavedKey = { key: string; cap: string; permitHash: Hex; expiry: number };

type Receipt = {
  request_id: string;
  client_request_id?: string | null;
  model_id: Hex;
  permit_hash: Hex;
  amount: string;
  cumulative_amount: string;
  cumulative_requests: number;
  host: Address;
  signature: Hex;
};

type EmbeddingsAnswer = {
  data: { embedding: number[]; index: number }[];
  usage: { prompt_tokens: number; total_tokens: number };
  receipt?: Receipt;
};

const storageKey = (chain: number, user: string, model: string) => `div.key.${chain}.${user.toLowerCase()}.${model.toLowerCase()}`;

function loadKey(k: string): SavedKey | undefined {
  try {
    const v = localStorage.getItem(k);
    return v ? (JSON.parse(v) as SavedKey) : undefined;
  } catch {
    return undefined;
  }
}

function randomNonce(): bigint {
  const b = new Uint32Array(2);
  crypto.getRandomValues(b);
  return (BigInt(b[0]!) << 32n) | BigInt(b[1]!);
}

function receiptMessage(r: Receipt): string {
  return [
    'DIV receipt',
    `request: ${r.request_id}`,
    `client request: ${r.client_request_id ?? '-'}`,
    `model: ${r.model_id.toLowerCase()}`,
    `permit: ${r.permit_hash.toLowerCase()}`,
    `amount: ${r.amount}`,
    `cumulative: ${r.cumulative_amount}`,
    `requests: ${r.cumulative_requests}`,
    `host: ${r.host.toLowerCase()}`,
  ].join('\n');
}

/** What the host asks a user to sign to get an API key (div_meter::key_proof_message). */
function keyProofMessage(host: Address, permitHash: Hex, challenge: string): string {
  return [
    'DIV API key request',
    `host: ${host.toLowerCase()}`,
    `permit: ${permitHash.toLowerCase()}`,
    `challenge: ${challenge}`,
    '',
    'Signing this proves you hold the key that signed the permit. It moves no funds.',
  ].join('\n');
}

function cosine(a: number[], b: number[]): number {
  let dot = 0,
    na = 0,
    nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i]! * b[i]!;
    na += a[i]! * a[i]!;
    nb += b[i]! * b[i]!;
  }
  return dot / Math.sqrt(na * nb || 1);
}

function Snippets({ apiKey, model, task }: { apiKey: string; model: string; task: string }) {
  const list = snippetsFor(task, window.location.origin, apiKey, model);
  return (
    <div className="snippets" data-testid="snippets" data-task={task}>
      {list.map((s) => (
        <div key={s.id}>
          <h3>
            {s.title}{' '}
            <button className="small" onClick={() => void navigator.clipboard?.writeText(s.code)}>
              Copy
            </button>
          </h3>
          <pre data-testid={`snippet-${s.id}`}>{s.code}</pre>
        </div>
      ))}
    </div>
  );
}

export function TryIt({ model, served }: { model: ChainModel; served?: HostModel }) {
  const { info, deployment, stablecoin } = useApp();
  const { address } = useConnection();
  const { data: wallet } = useWalletClient();
  const { session } = useSession();
  const k = address ? storageKey(deployment.chainId, address, model.id) : '';
  const [saved, setSaved] = useState<SavedKey | undefined>(() => (k ? loadKey(k) : undefined));
  const [freshKey, setFreshKey] = useState<string>();
  const [cap, setCap] = useState('1');
  const [days, setDays] = useState('7');
  const [signing, setSigning] = useState(false);
  const [error, setError] = useState<string>();
  const current = saved;

  if (!served) {
    return (
      <div className="panel">
        <h2>Try it</h2>
        <p className="empty">This host does not serve {model.name}; pick a host from the list above.</p>
      </div>
    );
  }
  if (!info.metered || !info.host) {
    return (
      <div className="panel">
        <h2>Try it</h2>
        <p className="empty">This host serves {model.name} without metering.</p>
        {served.task === 'chat' ? <ChatPlayground model={served} /> : <Playground model={served} />}
      </div>
    );
  }
  if (!address || !wallet) return <div className="panel"><h2>Try it</h2><p className="empty">Connect a wallet to sign a spending permit.</p></div>;
  const isOwner = address.toLowerCase() === model.owner.toLowerCase();
  if (isOwner && session && session.address.toLowerCase() === address.toLowerCase()) {
    // the owner, signed in: their own model is free, no permit, the session is the key
    return (
      <div className="panel" data-testid="try-panel">
        <h2>Try it</h2>
        <p data-testid="owner-free">
          You own {model.name} and are signed in: you use it free, with your session as the key (no permit, nothing
          charged).
        </p>
        {served.task === 'chat' ? <ChatPlayground model={served} apiKey={session.token} /> : <Playground model={served} apiKey={session.token} />}
        <details>
          <summary>Call it from code (with your session token; it ends when you sign out)</summary>
          <Snippets apiKey={session.token} model={served.id} task={served.task} />
        </details>
      </div>
    );
  }

  const forget = () => {
    localStorage.removeItem(k);
    setSaved(undefined);
    setFreshKey(undefined);
  };

  const signPermit = async () => {
    setError(undefined);
    setSigning(true);
    try {
      const maxAmount = parseUnits(cap, stablecoin.decimals);
      const expiry = BigInt(Math.floor(Date.now() / 1000) + Math.round(Number(days) * 86400));
      if (!(Number(days) > 0)) throw new Error('the permit must last more than 0 days');
      const permit = {
        user: address,
        modelId: model.id,
        host: info.host as Address,
        token: stablecoin.address,
        maxAmount,
        expiry,
        nonce: randomNonce(),
      };
      const typed = {
        domain: { name: 'DIV PaymentStream', version: '1', chainId: deployment.chainId, verifyingContract: deployment.paymentStream },
        types: {
          SpendingPermit: [
            { name: 'user', type: 'address' },
            { name: 'modelId', type: 'bytes32' },
            { name: 'host', type: 'address' },
            { name: 'token', type: 'address' },
            { name: 'maxAmount', type: 'uint256' },
            { name: 'expiry', type: 'uint64' },
            { name: 'nonce', type: 'uint256' },
          ],
        },
        primaryType: 'SpendingPermit',
        message: permit,
      } as const;
      const signature = await wallet.signTypedData({ account: wallet.account!, ...typed });
      // a permit is public once settled: prove this wallet asks for the key, over the host's
      // single-use challenge
      const { body: ch } = await hostFetch<{ challenge: string }>('/v1/keys/challenge');
      const proof = await wallet.signMessage({
        account: wallet.account!,
        message: keyProofMessage(info.host as Address, hashTypedData(typed), ch.challenge),
      });
      const { body } = await hostFetch<{ key: string; permit_hash: Hex; expires_at: number }>('/v1/keys', {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({
          permit: { ...permit, maxAmount: toHex(maxAmount), expiry: Number(expiry), nonce: toHex(permit.nonce) },
          signature,
          // the chain the permit is signed for: the host keeps it in that chain's ledger
          chainId: deployment.chainId,
          verifyingContract: deployment.paymentStream,
          proof: { challenge: ch.challenge, signature: proof },
        }),
      });
      const s: SavedKey = { key: body.key, cap: maxAmount.toString(), permitHash: body.permit_hash, expiry: body.expires_at };
      localStorage.setItem(k, JSON.stringify(s));
      setSaved(s);
      setFreshKey(body.key);
    } catch (e) {
      setError(describeError(e));
    } finally {
      setSigning(false);
    }
  };

  return (
    <div className="panel" data-testid="try-panel">
      <h2>Try it</h2>
      <div className="form-row">
        <label>
          Cap <input value={cap} onChange={(e) => setCap(e.target.value)} aria-label="permit cap" size={6} /> {stablecoin.symbol}
        </label>
        <label>
          valid for <input value={days} onChange={(e) => setDays(e.target.value)} aria-label="permit days" size={3} /> days
        </label>
        <button onClick={signPermit} disabled={signing} data-testid="sign-permit">
          {signing ? 'Signing…' : current ? 'Sign a new permit' : 'Sign permit & get API key'}
        </button>
      </div>
      {isOwner && (
        <p className="muted" data-testid="owner-hint">
          You own this model: sign in (top right) to use it free, without a permit.
        </p>
      )}
      <p className="muted">
        The permit lets host {short(info.host)} charge you up to the cap for {model.name}, settled on chain with 100 % to the owner.
        It pays for exactly this model: <code data-testid="permit-model-id">{model.id}</code> of owner{' '}
        <code data-testid="permit-model-owner">{model.owner}</code> (a name alone can be copied).
      </p>
      {error && <p className="error" role="alert" data-testid="permit-error">{error}</p>}
      {freshKey && (
        <div className="key-once">
          <p>
            <strong>Your API key</strong> (shown once; this browser keeps it for the playground):
          </p>
          <code data-testid="api-key">{freshKey}</code>{' '}
          <button onClick={() => void navigator.clipboard?.writeText(freshKey)}>Copy</button>
          <Snippets apiKey={freshKey} model={served.id} task={served.task} />
        </div>
      )}
      {current && !freshKey && (
        <details>
          <summary>Call it from code (with the key this browser keeps)</summary>
          <Snippets apiKey={current.key} model={served.id} task={served.task} />
        </details>
      )}
      {current && served.task === 'chat' && (
        <ChatPlayground
          model={served}
          apiKey={current.key}
          cap={BigInt(current.cap)}
          onForget={forget}
        />
      )}
      {current && served.task !== 'chat' && (
        <Playground
          model={served}
          apiKey={current.key}
          cap={BigInt(current.cap)}
          onForget={forget}
        />
      )}
    </div>
  );
}

function Playground({
  model,
  apiKey,
  cap,
  onForget,
}: {
  model: HostModel;
  apiKey?: string;
  cap?: bigint;
  onForget?: () => void;
}) {
  const { info } = useApp();
  const [text, setText] = useState('The vault keeps the weights encrypted.\nModel weights stay sealed in storage.\nI had pasta for dinner.');
  const [running, setRunning] = useState(false);
  const [answer, setAnswer] = useState<{ inputs: string[]; vectors: number[][]; receipt?: Receipt; ms: number }>();
  const [verified, setVerified] = useState<boolean>();
  const [error, setError] = useState<string>();
  const run = async () => {
    setError(undefined);
    setRunning(true);
    const inputs = text.split('\n').map((s) => s.trim()).filter(Boolean);
    const t0 = performance.now();
    try {
      const { body } = await hostFetch<EmbeddingsAnswer>('/v1/embeddings', {
        method: 'POST',
        headers: { 'content-type': 'application/json', ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}) },
        body: JSON.stringify({ model: model.id, input: inputs }),
      });
      const vectors = body.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
      setAnswer({ inputs, vectors, receipt: body.receipt, ms: performance.now() - t0 });
      setVerified(undefined);
      if (body.receipt) setVerified(await verifyReceipt(body.receipt, info.host));
    } catch (e) {
      setError(e instanceof HostError ? `${e.status}: ${e.message}` : describeError(e));
    } finally {
      setRunning(false);
    }
  };
  const sims = useMemo(() => answer?.vectors.map((a) => answer.vectors.map((b) => cosine(a, b))), [answer]);
  return (
    <div className="playground" data-testid="playground">
      <h3>Playground — {model.id}</h3>
      <textarea rows={4} value={text} onChange={(e) => setText(e.target.value)} aria-label="sentences, one per line" />
      <div className="form-row">
        <button onClick={run} disabled={running} data-testid="run">
          {running ? 'Running…' : 'Embed'}
        </button>
        {onForget && <button onClick={onForget}>Forget this key</button>}
      </div>
      {error && <p className="error" role="alert" data-testid="playground-error">{error}</p>}
      {answer && sims && (
        <>
          <p data-testid="vectors">
            {answer.vectors.length} vectors of {answer.vectors[0]?.length ?? 0} dimensions in {answer.ms.toFixed(0)} ms; first:{' '}
            <code>[{answer.vectors[0]?.slice(0, 4).map((x) => x.toFixed(4)).join(', ')}, …]</code>
          </p>
          <table className="heatmap" data-testid="heatmap" aria-label="cosine similarity">
            <tbody>
              {sims.map((row, i) => (
                <tr key={i}>
                  <th title={answer.inputs[i]}>{answer.inputs[i]!.slice(0, 28)}</th>
                  {row.map((v, j) => (
                    <td key={j} style={{ background: `rgba(46, 111, 219, ${Math.max(0, v).toFixed(3)})`, color: v > 0.55 ? '#fff' : '#111' }}>
                      {v.toFixed(2)}
                    </td>
                  ))}
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
      {answer?.receipt && <ReceiptView receipt={answer.receipt} verified={verified} cap={cap} />}
    </div>
  );
}

function ReceiptView({ receipt, verified, cap }: { receipt: Receipt; verified?: boolean; cap?: bigint }) {
  const { stablecoin } = useApp();
  const spent = BigInt(receipt.cumulative_amount);
  return (
    <div className="receipt" data-testid="receipt">
      <strong>Receipt</strong>{' '}
      {verified === true && <span className="ok" data-testid="receipt-verified">signed by host {short(receipt.host)} ✓</span>}
      {verified === false && <span className="error">signature does not match this host</span>}
      <dl className="facts">
        <dt>This call</dt>
        <dd data-testid="cost">{amount(receipt.amount, stablecoin.decimals, stablecoin.symbol)}</dd>
        <dt>Total on this permit</dt>
        <dd data-testid="spent">
          {amount(receipt.cumulative_amount, stablecoin.decimals, stablecoin.symbol)} of{' '}
          {cap !== undefined ? amount(cap, stablecoin.decimals, stablecoin.symbol) : '—'} ({receipt.cumulative_requests} requests)
        </dd>
        <dt>Request</dt>
        <dd>{receipt.request_id}</dd>
        <dt>Permit</dt>
        <dd>{short(receipt.permit_hash)}</dd>
      </dl>
      {cap !== undefined && cap > 0n && <progress max={1000} value={Number((spent * 1000n) / cap)} aria-label="spent of cap" />}
    </div>
  );
}

/** Checks the host's EIP-191 signature on a receipt against the host's address. */
async function verifyReceipt(r: Receipt, host?: string): Promise<boolean> {
  const signer = await recoverMessageAddress({ message: receiptMessage(r), signature: r.signature });
  return signer.toLowerCase() === (host ?? '').toLowerCase();
}

/** Reads a server-sent-events body, calling `onData` with each event's data. */
async function readEvents(body: ReadableStream<Uint8Array>, onData: (data: string) => void) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf('\n\n')) >= 0) {
      const event = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of event.split('\n')) if (line.startsWith('data: ')) onData(line.slice(6));
    }
  }
}

function ChatPlayground({ model, apiKey, cap, onForget }: { model: HostModel; apiKey?: string; cap?: bigint; onForget?: () => void }) {
  const { info } = useApp();
  const [message, setMessage] = useState('What is the capital of France?');
  const [maxTokens, setMaxTokens] = useState('64');
  const [output, setOutput] = useState('');
  const [chunks, setChunks] = useState(0);
  const [running, setRunning] = useState(false);
  const [abort, setAbort] = useState<AbortController>();
  const [receipt, setReceipt] = useState<Receipt>();
  const [verified, setVerified] = useState<boolean>();
  const [usage, setUsage] = useState<{ prompt_tokens: number; completion_tokens: number }>();
  const [finish, setFinish] = useState<string>();
  const [ttft, setTtft] = useState<number>();
  const [error, setError] = useState<string>();
  const send = async () => {
    setError(undefined);
    setOutput('');
    setChunks(0);
    setReceipt(undefined);
    setVerified(undefined);
    setUsage(undefined);
    setFinish(undefined);
    setTtft(undefined);
    setRunning(true);
    const ctl = new AbortController();
    setAbort(ctl);
    const t0 = performance.now();
    try {
      const res = await fetch('/v1/chat/completions', {
        method: 'POST',
        signal: ctl.signal,
        headers: { 'content-type': 'application/json', ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}) },
        body: JSON.stringify({
          model: model.id,
          messages: [{ role: 'user', content: message }],
          max_tokens: Number(maxTokens) || 64,
          temperature: 0,
          stream: true,
          stream_options: { include_usage: true },
        }),
      });
      if (!res.ok || !res.body) {
        const body = await res.json().catch(() => undefined);
        throw new HostError(res.status, body?.error?.message ?? `the host answered ${res.status}`);
      }
      let first = true;
      await readEvents(res.body, (data) => {
        if (data === '[DONE]') return;
        const v = JSON.parse(data);
        if (v.error) throw new HostError(500, v.error.message);
        const piece: string | undefined = v.choices?.[0]?.delta?.content;
        if (piece) {
          if (first) setTtft(performance.now() - t0);
          first = false;
          setOutput((o) => o + piece);
          setChunks((n) => n + 1);
        }
        if (v.choices?.[0]?.finish_reason) setFinish(v.choices[0].finish_reason);
        if (v.usage) setUsage(v.usage);
        if (v.receipt) {
          setReceipt(v.receipt);
          void verifyReceipt(v.receipt, info.host).then(setVerified);
        }
      });
    } catch (e) {
      if (!(e instanceof DOMException && e.name === 'AbortError')) {
        setError(e instanceof HostError ? `${e.status}: ${e.message}` : describeError(e));
      }
    } finally {
      setRunning(false);
      setAbort(undefined);
    }
  };
  return (
    <div className="playground" data-testid="playground">
      <h3>Chat — {model.id}</h3>
      <textarea rows={3} value={message} onChange={(e) => setMessage(e.target.value)} aria-label="message" />
      <div className="form-row">
        <label>
          max tokens <input value={maxTokens} onChange={(e) => setMaxTokens(e.target.value)} aria-label="max tokens" size={5} />
        </label>
        <button onClick={send} disabled={running} data-testid="send">{running ? 'Generating…' : 'Send'}</button>
        {running && <button onClick={() => abort?.abort()}>Stop</button>}
        {onForget && <button onClick={onForget}>Forget this key</button>}
      </div>
      {error && <p className="error" role="alert" data-testid="playground-error">{error}</p>}
      {(output || running) && (
        <pre className="chat-output" data-testid="chat-output">{output}{running ? '▍' : ''}</pre>
      )}
      {(chunks > 0 || finish) && (
        <p className="muted" data-testid="chat-stats">
          {chunks} chunks streamed{ttft !== undefined ? `, first after ${ttft.toFixed(0)} ms` : ''}
          {usage ? `; ${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : ''}
          {finish ? ` (${finish})` : ''}
        </p>
      )}
      {receipt && <ReceiptView receipt={receipt} verified={verified} cap={cap} />}
    </div>
  );
}
