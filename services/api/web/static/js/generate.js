// Generate: the form, live x̂0 previews from the step events, cancel, the images, parameters and timings.

import { fetchBlob } from "./api.js";
import { JobPanel } from "./job.js";
import { modelNamed, nativeRatio, onModels, showDefaults, strengthDefault } from "./models.js";
import { regimeFor } from "./regimes.js";
import { $, addPicture, el, formValues, seconds, seedValue, UrlBag } from "./ui.js";

export const generated = { blob: null, jobId: null }; // the last picture, for the forward panel

// Fixed rows, filled in place, so the panel never changes height when a job reports back.
const PARAM_ROWS = [
  ["job", (j) => j.id],
  ["status", (j) => j.status],
  ["model", (j) => j.params.model],
  ["seed", (j) => String(j.params.seed)],
  ["size", (j) => `${j.params.width} × ${j.params.height}`],
  ["steps", (j) => j.params.num_inference_steps],
  ["sampler", (j) => j.params.sampler],
  ["guidance scale", (j) => j.params.guidance_scale],
  ["guidance rescale", (j) => j.params.guidance_rescale],
  ["guidance interval", (j) => `${j.params.guidance_start ?? 0} – ${j.params.guidance_stop ?? 1}`],
  ["eta", (j) => j.params.eta],
  ["strength", (j) => (j.params.has_image ? `${j.params.strength}${j.params.has_mask ? ", masked" : ""}` : "—")],
  ["images", (j) => j.params.num_images],
  ["negative prompt", (j) => j.params.negative_prompt || "—"],
  ["queue wait", (j) => seconds(j.timings?.queue_s)],
  ["run time", (j) => seconds(j.timings?.run_s)],
];

function sizeOptions(model) {
  if (!model) return [];
  const { native_width: w, native_height: h, size_multiple: m } = model;
  const seen = new Set();
  const sizes = [];
  for (const f of [0.5, 0.75, 1, 1.5, 2]) {
    const sw = Math.max(m, Math.round((w * f) / m) * m);
    const sh = Math.max(m, Math.round((h * f) / m) * m);
    const key = `${sw}x${sh}`;
    if (sw < 8 || sh < 8 || sw > 2 * w || sh > 2 * h || seen.has(key)) continue;
    seen.add(key);
    sizes.push(el("option", { value: key, text: `${sw} × ${sh}${f === 1 ? " (native)" : ""}`, selected: f === 1 }));
  }
  return sizes;
}

export function initGenerate() {
  const panel = new JobPanel("gen", { aliases: { width: "size", height: "size", n: "num_images" } });
  const form = panel.form;
  const guidance = $("#gen-guidance");
  const seed = $("#gen-seed");
  const randomSeed = $("#gen-seed-random");
  const preview = $("#gen-preview");
  const previewFrame = $("#gen-preview-frame");
  const grid = $("#gen-images");
  const params = $("#gen-params");
  const urls = new UrlBag();

  const showGuidance = () => {
    const scale = Number(guidance.value);
    const regime = regimeFor(scale);
    $("#gen-guidance-out").value = String(scale);
    guidance.setAttribute("aria-valuetext", `${scale}, ${regime.label}`);
    $("#gen-guidance-regime").textContent = `${regime.label}: ${regime.words}`;
  };
  guidance.addEventListener("input", showGuidance);
  showGuidance();

  randomSeed.addEventListener("change", () => {
    seed.disabled = randomSeed.checked;
  });

  const sizeSelect = $("#gen-size");
  const modelSelect = $("#gen-model");
  const samplerSelect = $("#gen-sampler");
  showDefaults(modelSelect, [
    ["#gen-rescale", (m) => m.default_guidance_rescale],
    ["#gen-guidance-start", (m) => m.default_guidance_start],
    ["#gen-guidance-stop", (m) => m.default_guidance_stop],
    ["#gen-strength", strengthDefault],
  ]);
  const fillSizes = () => {
    const model = modelNamed(modelSelect.value);
    sizeSelect.replaceChildren(...sizeOptions(model));
    const names = model?.samplers || [];
    samplerSelect.replaceChildren(
      ...names.map((name) =>
        el("option", {
          value: name,
          text: name === model.default_sampler ? `${name} (default)` : name,
          selected: name === model.default_sampler,
        }),
      ),
    );
  };
  modelSelect.addEventListener("change", fillSizes);
  onModels(fillSizes);

  const renderParams = (job) => {
    params.replaceChildren(
      ...PARAM_ROWS.map(([name, read]) => {
        const value = job ? String(read(job) ?? "—") : "—";
        return el("div", {}, el("dt", { text: name }), el("dd", { text: value, title: value }));
      }),
    );
  };
  renderParams(null);

  const frameBox = (ratio) => {
    const box = el("div", { class: "frame" }, el("img", { alt: "", hidden: true }));
    box.style.aspectRatio = ratio; // through the CSSOM: the page's CSP allows no inline style attributes
    return box;
  };
  const boxes = (count, ratio) => {
    grid.replaceChildren(
      ...Array.from({ length: count }, (_, i) =>
        el(
          "figure",
          { class: "picture" },
          frameBox(ratio),
          el("figcaption", { text: `Image ${i + 1}` }),
        ),
      ),
    );
  };
  boxes(1, "1 / 1");

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const v = formValues(form);
    const model = modelNamed(v.model);
    const [width, height] = (v.size || "").split("x").map(Number);
    const body = {
      prompt: v.prompt,
      negative_prompt: v.negative_prompt,
      num_inference_steps: v.num_inference_steps,
      guidance_scale: v.guidance_scale,
      num_images: v.num_images,
      preview_every: v.preview_every,
      seed: randomSeed.checked ? null : seedValue(seed),
      output_format: "png",
    };
    if (v.sampler) body.sampler = v.sampler;
    for (const name of ["guidance_rescale", "guidance_start", "guidance_stop"]) {
      if (v[name] !== null && v[name] !== undefined) body[name] = v[name];
    }
    if (v.model) body.model = v.model;
    if (width && height) Object.assign(body, { width, height });
    const sizeRatio = width && height ? `${width} / ${height}` : nativeRatio(model);
    // image to image, inpainting: the picture's size is the size (read while run() already shows the panel busy)
    const prepared = addPicture(form, body).then((pictureRatio) => {
      const ratio = pictureRatio || sizeRatio;
      urls.clear();
      preview.hidden = true;
      preview.removeAttribute("src");
      previewFrame.style.aspectRatio = ratio;
      const count = Number.isInteger(v.num_images) && v.num_images >= 1 && v.num_images <= 16 ? v.num_images : 1;
      boxes(count, ratio);
      return body;
    });

    const result = await panel.run("v1/generations", prepared, {
      onEvent: (name, data) => {
        if (name === "step" && data.preview) {
          preview.src = `data:image/png;base64,${data.preview}`;
          preview.alt = `Predicted clean image x̂0 at step ${data.step} of ${data.total}`;
          preview.hidden = false;
        }
      },
    });
    if (!result) return;
    renderParams(result.job);
    if (result.outcome !== "succeeded") return;
    const figures = [...grid.children];
    await Promise.all(
      result.job.images.map(async (path, i) => {
        const blob = await fetchBlob(path);
        const url = urls.add(blob);
        const figure = figures[i];
        if (!figure) return;
        const img = figure.querySelector("img");
        img.src = url;
        img.alt = `Image ${i + 1} of ${result.job.images.length}: ${result.job.params.prompt}`;
        img.hidden = false;
        const link = el("a", {
          href: url,
          download: `latentd-${result.job.params.seed}-${i}.png`,
          text: `Download image ${i + 1}`,
        });
        figure.querySelector("figcaption").replaceChildren(link);
        if (i === 0) {
          generated.blob = blob;
          generated.jobId = result.job.id;
          document.dispatchEvent(new CustomEvent("latentd:generated", { detail: { jobId: result.job.id } }));
        }
      }),
    ).catch((error) => panel.status(`Could not fetch the images: ${error.message}`, true));
  });
}
