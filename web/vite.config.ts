import { defineConfig } from 'vite';
import react from '@vitejs/plugin-react';

// `div serve --web-dir web/dist` serves the build on the host's own origin. In development Vite
// proxies the host's API, so the app always calls relative `/v1/...` URLs.
export default defineConfig({
  plugins: [react()],
  server: {
    proxy: { '/v1': process.env.DIV_URL ?? 'http://127.0.0.1:8080' },
  },
  build: { outDir: 'dist', sourcemap: false, chunkSizeWarningLimit: 1200 },
});
