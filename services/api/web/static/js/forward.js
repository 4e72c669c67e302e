// Forward process: one forward trajectory over t = 0…T from a generated or uploaded picture (one noise
// sample ε for every t), then a slider over its frames with ᾱ_t, √ᾱ_t and √(1−ᾱ_t) printed.

import { fetchBlob } from "./api.js";
import { generated } from "./generate.js";
import { JobPanel } from "./job.js";
import { modelNamed } from "./models.js";
import { $, $$, fixed, formValues, readFile, seedValue, UrlBag } from "./ui.js";

export function timestepsFor(T, stride) {
  const ts = [];
  for (let t = 0; t <= T; t += stride) ts.push(t);
  if (ts[ts.length - 1] !== T) ts.push(T);
  return ts;
}

export function initForward() {
  const panel = new JobPanel("fwd", { aliases: { timesteps: "stride" } });
  const form = panel.form;
  const slider = $("#fwd-t");
  const frame = $("#fwd-frame");
  const urls = new UrlBag();
  let frames = [];

  const source = () => form.elements.namedItem("source").value;
  const showSource = () => {
    for (const part of $$("[data-source]", form)) {
      const on = part.dataset.source === source();
      part.hidden = !on;
      for (const control of $$("input, select, textarea", part)) control.disabled = !on;
    }
  };
  for (const radio of $$("input[name=source]", form)) radio.addEventListener("change", showSource);
  showSource();

  document.addEventListener("latentd:generated", () => {
    const radio = $("#fwd-src-generated");
    radio.disabled = false;
    $("#fwd-src-generated-hint").textContent = "The first picture of the last Generate job.";
  });

  const show = (i) => {
    const f = frames[i];
    if (!f) return;
    const a = f.alpha_bar;
    if (f.src) {
      frame.src = f.src;
      frame.hidden = false;
    }
    frame.alt = `x_t at t = ${f.timestep}`;
    $("#fwd-caption").textContent = `x_t at t = ${f.timestep} (${f.space} space)`;
    $("#fwd-t-out").value = String(f.timestep);
    $("#fwd-t-value").textContent = String(f.timestep);
    if (f.sigma !== undefined) {
      // a flow-matching model (SD3, Flux): the straight line x_σ = (1 − σ)·x_0 + σ·ε, σ = t/T
      const s = f.sigma;
      $("#fwd-abar-label").textContent = "σ";
      $("#fwd-sqrt-abar-label").textContent = "1 − σ";
      $("#fwd-sqrt-noise-label").textContent = "σ";
      $("#fwd-abar").textContent = fixed(s);
      $("#fwd-sqrt-abar").textContent = fixed(1 - s);
      $("#fwd-sqrt-noise").textContent = fixed(s);
      $("#fwd-formula").textContent = `x_σ = ${fixed(1 - s)} · x_0 + ${fixed(s)} · ε`;
      slider.setAttribute("aria-valuetext", `t = ${f.timestep}, σ = ${fixed(s)}`);
      return;
    }
    $("#fwd-abar-label").innerHTML = "ᾱ<sub>t</sub>";
    $("#fwd-sqrt-abar-label").innerHTML = "√ᾱ<sub>t</sub>";
    $("#fwd-sqrt-noise-label").innerHTML = "√(1−ᾱ<sub>t</sub>)";
    $("#fwd-abar").textContent = fixed(a);
    $("#fwd-sqrt-abar").textContent = fixed(Math.sqrt(a));
    $("#fwd-sqrt-noise").textContent = fixed(Math.sqrt(Math.max(0, 1 - a)));
    $("#fwd-formula").textContent = `x_t = ${fixed(Math.sqrt(a))} · x_0 + ${fixed(Math.sqrt(Math.max(0, 1 - a)))} · ε`;
    slider.setAttribute("aria-valuetext", `t = ${f.timestep}, ᾱ_t = ${fixed(a)}`);
  };
  slider.addEventListener("input", () => show(Number(slider.value)));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const v = formValues(form);
    const model = modelNamed(v.model);
    const T = model?.num_train_timesteps ?? 1000;
    const body = {
      kind: "forward",
      space: v.space,
      noise_seed: v.noise_seed,
      timesteps: timestepsFor(T, v.stride ? Number(v.stride) : 20),
    };
    if (v.model) body.model = v.model;
    const from = source();
    if (from === "prompt") {
      Object.assign(body, { prompt: v.prompt, seed: seedValue($("#fwd-seed")), num_inference_steps: v.num_inference_steps });
    }
    // the picture is read while the panel already says "Submitting…" (panel.run takes the request's promise)
    const withPicture = async () => {
      if (from === "generated" && generated.blob) body.image = await readFile(generated.blob);
      const file = from === "upload" ? $("#fwd-image").files[0] : null;
      if (file) body.image = await readFile(file); // without one, the API says which field is missing
      return body;
    };

    urls.clear();
    frames = [];
    slider.disabled = true;
    slider.value = "0";
    const result = await panel.run("v1/trajectories", withPicture(), {
      onEvent: (name, data) => {
        if (name === "started") frames = [];
        if (name === "frame") frames[data.index] = { ...data, src: null };
      },
    });
    if (!result || result.outcome !== "succeeded") return;
    try {
      // a forward trajectory's frame URLs answer once the job has succeeded: fetched after it
      await Promise.all(
        frames.filter(Boolean).map(async (f) => {
          f.src = urls.add(await fetchBlob(f.url));
        }),
      );
    } catch (error) {
      panel.status(`Could not fetch the frames: ${error.message}`, true);
    }
    frames = frames.filter(Boolean);
    slider.max = String(Math.max(0, frames.length - 1));
    slider.disabled = frames.length === 0;
    show(0);
  });
}
