// Reverse process: a reverse trajectory whose frames (x_t and x̂0 of every kept step) arrive live, shown
// side by side, with play, pause and a scrubber over the steps. From pure noise, or from a picture noised to the
// step its strength picks (image to image: fewer steps, counted by the step events' total).

import { fetchBlob } from "./api.js";
import { JobPanel } from "./job.js";
import { modelNamed, nativeRatio, showDefaults, strengthDefault } from "./models.js";
import { $, addPicture, formValues, seedValue, UrlBag } from "./ui.js";

const FRAME_MS = 120;

export function initReverse() {
  const panel = new JobPanel("rev");
  const form = panel.form;
  showDefaults($("#rev-model"), [["#rev-strength", strengthDefault]]);
  const scrub = $("#rev-scrub");
  const play = $("#rev-play");
  const xt = $("#rev-xt");
  const x0 = $("#rev-x0");
  const urls = new UrlBag();
  let steps = []; // one per kept step: {step, timestep, alpha_bar, x_t, x0_pred} (object URLs)
  let total = 0; // steps the job runs, from its step events (a picture's strength makes it fewer)
  let running = false;
  let follow = true; // show each new frame as it arrives, until the person scrubs away
  let timer = null;

  const ready = () => {
    let n = 0; // the leading steps whose two pictures are both here
    while (steps[n]?.x_t && steps[n]?.x0_pred) n += 1;
    return n;
  };
  const setImage = (img, url, text) => {
    if (!url) return;
    img.src = url;
    img.alt = text;
    img.hidden = false;
  };

  const show = (i) => {
    const s = steps[i];
    if (!s) return;
    scrub.value = String(i);
    const of = total || "…";
    setImage(xt, s.x_t, `x_t at step ${s.step} of ${of}, t = ${s.timestep}`);
    setImage(x0, s.x0_pred, `predicted x̂0 at step ${s.step} of ${of}, t = ${s.timestep}`);
    const text = `${s.step} of ${of} · t = ${s.timestep}`;
    $("#rev-pos").value = text;
    scrub.setAttribute("aria-valuetext", `step ${text}`);
  };

  const updateRange = () => {
    const n = ready();
    scrub.max = String(Math.max(0, n - 1));
    scrub.disabled = n === 0;
    play.disabled = n === 0;
    if (follow && n > 0 && !timer) show(n - 1);
  };

  const stop = () => {
    clearInterval(timer);
    timer = null;
    play.textContent = "Play";
  };
  const start = () => {
    if (Number(scrub.value) >= ready() - 1 && !running) show(0); // at the end: play again from the start
    follow = false;
    play.textContent = "Pause";
    timer = setInterval(() => {
      const next = Number(scrub.value) + 1;
      if (next < ready()) show(next);
      else if (!running) stop(); // the end of a finished job; a running one waits for the next frame
    }, FRAME_MS);
  };
  play.addEventListener("click", () => (timer ? stop() : start()));
  scrub.addEventListener("input", () => {
    stop();
    follow = Number(scrub.value) >= ready() - 1;
    show(Number(scrub.value));
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const v = formValues(form);
    const body = {
      kind: "reverse",
      prompt: v.prompt,
      num_inference_steps: v.num_inference_steps,
      guidance_scale: v.guidance_scale,
      trajectory_every: v.trajectory_every,
      seed: seedValue($("#rev-seed")),
    };
    if (v.model) body.model = v.model;
    const model = modelNamed(v.model);
    // image to image: the picture's size is the size, and its strength how many of the steps run (read while
    // run() already shows the panel busy)
    const prepared = addPicture(form, body).then((pictureRatio) => {
      const ratio = pictureRatio || nativeRatio(model);
      stop();
      urls.clear();
      steps = [];
      follow = true;
      total = 0; // until the first step event says
      for (const img of [xt, x0]) img.parentElement.style.aspectRatio = ratio; // CSSOM: the CSP allows no style=""
      running = true;
      updateRange();
      return body;
    });
    const result = await panel.run("v1/trajectories", prepared, {
      onEvent: (name, data) => {
        if (name === "started") {
          steps = [];
          updateRange();
        }
        if (name === "step") total = data.total;
        if (name !== "frame") return;
        const slot = Math.floor(data.index / 2);
        const s = (steps[slot] ||= { step: data.step, timestep: data.timestep, alpha_bar: data.alpha_bar });
        fetchBlob(data.url)
          .then((blob) => {
            s[data.what] = urls.add(blob);
            updateRange();
          })
          .catch((error) => panel.status(`Could not fetch frame ${data.index}: ${error.message}`));
      },
    });
    running = false;
    if (result) updateRange();
  });
}
