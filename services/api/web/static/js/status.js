// The status strip: models served, live workers, queue depth, from GET /readyz and GET /v1/models.

import { apiURL } from "./api.js";
import { refreshModels } from "./models.js";
import { $ } from "./ui.js";

const POLL_MS = 5000;

async function readiness() {
  try {
    const response = await fetch(apiURL("readyz"), { cache: "no-store" });
    return await response.json();
  } catch {
    return null;
  }
}

function show(ready, models, modelsError) {
  const set = (id, text) => {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  };
  if (!ready) set("#status-ready", "gateway unreachable");
  else if (ready.status === "ready") set("#status-ready", "ready");
  else if (!ready.redis) set("#status-ready", "not ready: Redis unreachable");
  else set("#status-ready", `not ready: ${ready.reason || "no live worker"}`);

  const workers = Object.values(ready?.workers || {}).reduce((a, b) => a + b, 0);
  set("#status-workers", ready ? String(workers) : "—");

  if (modelsError) {
    set("#status-models", modelsError.status === 401 ? "needs an API key" : "—");
    set("#status-queue", "—");
    return;
  }
  set("#status-models", models.length ? models.map((m) => m.name).join(", ") : "none");
  // queue_depth per model, where the gateway reports it (jobs waiting for a worker)
  const depths = models.map((m) => m.queue_depth).filter((d) => Number.isFinite(d));
  set("#status-queue", depths.length ? String(depths.reduce((a, b) => a + b, 0)) : "not reported");
}

export async function updateStatus() {
  const ready = await readiness();
  let models = [];
  let modelsError = null;
  try {
    models = await refreshModels();
  } catch (error) {
    modelsError = error;
  }
  show(ready, models, modelsError);
  return modelsError;
}

export function startStatus() {
  setInterval(() => {
    if (!document.hidden) updateStatus();
  }, POLL_MS);
}
