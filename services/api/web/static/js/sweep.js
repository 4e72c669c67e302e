// Guidance regimes: one prompt and seed at scales 0, 1, 3, 7.5 and 15 (a guidance-sweep job), side by side,
// each labelled with its regime.

import { fetchBlob } from "./api.js";
import { JobPanel } from "./job.js";
import { regimeFor, SWEEP_SCALES } from "./regimes.js";
import { $, el, formValues, seedValue, UrlBag } from "./ui.js";

export function initSweep() {
  const panel = new JobPanel("sweep");
  const form = panel.form;
  const grid = $("#sweep-grid");
  const urls = new UrlBag();

  const items = SWEEP_SCALES.map((scale) => {
    const regime = regimeFor(scale);
    const img = el("img", { alt: "", hidden: true });
    const progress = el("progress", { max: "1", value: "0", "aria-label": `Progress at scale ${scale}` });
    const li = el(
      "li",
      { class: "sweep-item", "data-scale": String(scale) },
      el(
        "figure",
        { class: "picture" },
        el("div", { class: "frame" }, img),
        el(
          "figcaption",
          {},
          el("strong", { class: "regime", text: `scale ${scale} · ${regime.label}` }),
          el("span", { class: "words", text: regime.words }),
        ),
      ),
      progress,
    );
    return { scale, regime, img, progress, li };
  });
  grid.replaceChildren(...items.map((item) => item.li));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const v = formValues(form);
    const body = {
      kind: "guidance_sweep",
      prompt: v.prompt,
      num_inference_steps: v.num_inference_steps,
      seed: seedValue($("#sweep-seed")),
      guidance_scales: SWEEP_SCALES,
    };
    if (v.model) body.model = v.model;
    urls.clear();
    for (const item of items) {
      item.img.hidden = true;
      item.img.removeAttribute("src");
      item.progress.value = 0;
    }
    const frames = []; // a sweep's frame URLs answer once the job has succeeded: fetched after it
    const result = await panel.run("v1/trajectories", body, {
      parts: SWEEP_SCALES.length,
      onEvent: (name, data) => {
        const item = items[data.index ?? -1];
        if (name === "step" && item) item.progress.value = data.step / data.total;
        if (name === "frame" && item) frames.push({ item, ...data });
      },
    });
    if (result?.outcome !== "succeeded") return;
    try {
      await Promise.all(
        frames.map(async ({ item, url, guidance_scale: scale }) => {
          item.img.src = urls.add(await fetchBlob(url));
          item.img.alt = `"${v.prompt}" at guidance scale ${scale}: ${item.regime.label}`;
          item.img.hidden = false;
          item.progress.value = 1;
        }),
      );
    } catch (error) {
      panel.status(`Could not fetch the pictures: ${error.message}`, true);
    }
  });
}
