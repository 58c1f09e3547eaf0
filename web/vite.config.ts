import { readFileSync } from 'node:fs';
import { defineConfig, type Plugin } from 'vite';
import react from '@vitejs/plugin-react';

/** Puts CatalogLens's creation code into index.html, whose inline script sends the marketplace's
 * first eth_call before the app's code has loaded (see src/catalog.ts). */
function lensBytecode(): Plugin {
  return {
    name: 'div-lens-bytecode',
    transformIndexHtml(html) {
      const art = JSON.parse(readFileSync(new URL('../host/chain/abi/CatalogLens.json', import.meta.url), 'utf8'));
      return html.replace('__DIV_LENS_BYTECODE__', art.bytecode.object);
    },
  };
}

// `div serve --web-dir web/dist` serves the build on the host's own origin. In development Vite
// proxies the host's API, so the app always calls relative `/v1/...` URLs.
export default defineConfig({
  plugins: [react(), lensBytecode()],
  server: {
    proxy: { '/v1': process.env.DIV_URL ?? 'http://127.0.0.1:8080' },
  },
  build: { outDir: 'dist', sourcemap: false, chunkSizeWarningLimit: 1200 },
});
