// One job at a time per panel: submit it, show field errors, follow its events with a progress bar and a
// status line, cancel it, and read the finished job back (resolved parameters, timings).

import { ApiError, request, streamEvents } from "./api.js";
import { $, clearErrors, seconds, showError } from "./ui.js";

export class JobPanel {
  /** prefix: the panel's id prefix (gen, fwd, rev, sweep); aliases: error param -> control name. */
  constructor(prefix, { aliases = {} } = {}) {
    this.form = $(`#${prefix}-form`);
    this.submitButton = $(`#${prefix}-submit`);
    this.cancelButton = $(`#${prefix}-cancel`);
    this.progress = $(`#${prefix}-progress`);
    this.statusLine = $(`#${prefix}-status`);
    this.announcer = $(`#${prefix}-announce`);
    this.aliases = aliases;
    this.job = null;
    this.cancelButton.addEventListener("click", () => this.cancel());
  }

  status(text, announce = false) {
    this.statusLine.textContent = text;
    if (announce) this.announcer.textContent = text;
  }

  /** Show an error next to its field (or under the form). */
  error(error) {
    showError(this.form, error, this.aliases);
  }

  /**
   * POST the job and follow it. body: the request, or a promise of it (pictures still being read): the panel
   * shows "Submitting…" at once either way, so the last job's outcome never reads as this one's. parts: how
   * many engine requests report steps (a sweep has one per scale). onEvent(name, data) sees every event.
   * Once the job is accepted, a "latentd:submitted" event on document carries it (the Your jobs panel reloads).
   * Returns {job, outcome} once it has ended, or null if refused (or the body could not be made).
   */
  async run(path, body, { parts = 1, onEvent = () => {} } = {}) {
    clearErrors(this.form);
    this.submitButton.disabled = true;
    this.progress.value = 0;
    this.status("Submitting…");
    let job;
    try {
      job = await request(path, { method: "POST", body: await body });
    } catch (error) {
      this.submitButton.disabled = false;
      this.error(error);
      this.status(`Not started: ${error.message}`, true);
      return null;
    }
    this.job = job;
    document.dispatchEvent(new CustomEvent("latentd:submitted", { detail: { job } }));
    this.cancelButton.disabled = false;
    const steps = new Map();
    let attempt = 0;
    let last = null;
    let outcome = null;
    let failure = null;
    try {
      outcome = await streamEvents(job.id, (name, data) => {
        if (name === "queued") this.status("Queued.", true);
        else if (name === "started") {
          if ((data.attempt || 1) !== attempt) steps.clear(); // a redelivered job starts over
          attempt = data.attempt || 1;
          this.status(attempt > 1 ? `Running again (attempt ${attempt}).` : "Running.", true);
        } else if (name === "step") {
          steps.set(data.index ?? 0, data);
          last = data;
          let done = 0;
          for (const s of steps.values()) done += s.step;
          this.progress.value = Math.min(1, done / (parts * data.total));
          const batch = parts > 1 ? ` (${parts} requests in one batch)` : "";
          this.status(`Step ${data.step} of ${data.total} · t = ${data.timestep}${batch}`);
        } else if (name === "failed") failure = data;
        onEvent(name, data);
      });
    } catch (error) {
      this.status(`Lost the job's event stream: ${error.message}`, true);
    } finally {
      this.cancelButton.disabled = true;
      this.submitButton.disabled = false;
    }
    try {
      this.job = await request(`v1/jobs/${encodeURIComponent(job.id)}`);
    } catch {
      // keep the submitted view
    }
    const timings = this.job.timings || {};
    if (outcome === "succeeded") {
      this.progress.value = 1;
      this.status(`Done: ran ${seconds(timings.run_s)}, queued ${seconds(timings.queue_s)}.`, true);
    } else if (outcome === "cancelled") {
      const where = last ? ` at step ${last.step} of ${last.total}` : " before it started";
      this.status(`Cancelled${where}.`, true);
    } else if (outcome === "failed") {
      this.status(`Failed: ${failure?.message || "unknown error"}`, true);
      this.error(new ApiError(0, failure || {}));
    }
    return { job: this.job, outcome };
  }

  async cancel() {
    if (!this.job) return;
    this.cancelButton.disabled = true;
    this.status("Cancelling…", true);
    try {
      await request(`v1/jobs/${encodeURIComponent(this.job.id)}/cancel`, { method: "POST" });
    } catch (error) {
      if (error.status !== 409) this.status(`Could not cancel: ${error.message}`, true); // 409: it had already ended
    }
  }
}
