// Code a user copies from a model's page to call it: curl, the stock OpenAI Python client and the
// stock OpenAI JavaScript client (6.x), written for the model's task — chat models get
// /v1/chat/completions with `messages` (streamed, with usage and the host's receipt), embedding
// models /v1/embeddings with `input`. The browser test copies each from the page and runs it
// against the real stack, so a snippet that stops working fails the build.

export type Snippet = { id: 'curl' | 'python' | 'js'; title: string; code: string };

const q = (s: string) => JSON.stringify(s);

function chat(origin: string, key: string, model: string): Snippet[] {
  const body = JSON.stringify({
    model,
    messages: [{ role: 'user', content: 'What is the capital of France?' }],
    max_tokens: 32,
    stream: true,
    stream_options: { include_usage: true },
  });
  return [
    {
      id: 'curl',
      title: 'curl (streamed)',
      code: `curl -sN ${origin}/v1/chat/completions \\
  -H "Authorization: Bearer ${key}" \\
  -H "Content-Type: application/json" \\
  -d '${body}'`,
    },
    {
      id: 'python',
      title: 'Python (openai)',
      code: `from openai import OpenAI

client = OpenAI(base_url=${q(`${origin}/v1`)}, api_key=${q(key)})
stream = client.chat.completions.create(
    model=${q(model)},
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=32,
    stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    if chunk.usage:
        print("\\nusage:", chunk.usage.total_tokens, "tokens")
    receipt = (chunk.model_extra or {}).get("receipt")
    if receipt:
        print("receipt: paid", receipt["amount"])`,
    },
    {
      id: 'js',
      title: 'JavaScript (openai)',
      code: `import OpenAI from 'openai';

const client = new OpenAI({ baseURL: ${q(`${origin}/v1`)}, apiKey: ${q(key)} });
const stream = await client.chat.completions.create({
  model: ${q(model)},
  messages: [{ role: 'user', content: 'What is the capital of France?' }],
  max_tokens: 32,
  stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  process.stdout.write(chunk.choices[0]?.delta?.content ?? '');
  if (chunk.usage) console.log('\\nusage:', chunk.usage.total_tokens, 'tokens');
  if (chunk.receipt) console.log('receipt: paid', chunk.receipt.amount);
}`,
    },
  ];
}

function embeddings(origin: string, key: string, model: string): Snippet[] {
  const body = JSON.stringify({ model, input: ['The vault keeps weights encrypted.'] });
  return [
    {
      id: 'curl',
      title: 'curl',
      code: `curl -s ${origin}/v1/embeddings \\
  -H "Authorization: Bearer ${key}" \\
  -H "Content-Type: application/json" \\
  -d '${body}'`,
    },
    {
      id: 'python',
      title: 'Python (openai)',
      code: `from openai import OpenAI

client = OpenAI(base_url=${q(`${origin}/v1`)}, api_key=${q(key)})
r = client.embeddings.create(model=${q(model)}, input=["The vault keeps weights encrypted."])
print(len(r.data[0].embedding), "dimensions;", r.usage.total_tokens, "tokens")
print("receipt: paid", r.model_extra["receipt"]["amount"])`,
    },
    {
      id: 'js',
      title: 'JavaScript (openai)',
      code: `import OpenAI from 'openai';

const client = new OpenAI({ baseURL: ${q(`${origin}/v1`)}, apiKey: ${q(key)} });
const models = await client.models.list();
console.log('models:', models.data.map((m) => m.id).join(', '));
const r = await client.embeddings.create({ model: ${q(model)}, input: ['The vault keeps weights encrypted.'] });
console.log(r.data[0].embedding.length, 'dimensions;', r.usage.total_tokens, 'tokens');
console.log('receipt: paid', r.receipt.amount);`,
    },
  ];
}

/** The snippets for a model of `task` served at `origin`, called with `key`. */
export function snippetsFor(task: string, origin: string, key: string, model: string): Snippet[] {
  return task === 'chat' ? chat(origin, key, model) : embeddings(origin, key, model);
}
