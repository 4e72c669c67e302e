// The page's entry: asks for an API key when the gateway wants one, starts the status strip and the panels.

import { clearKey, getKey, setKey } from "./api.js";
import { initForward } from "./forward.js";
import { initGenerate } from "./generate.js";
import { initJobs } from "./jobs.js";
import { initReverse } from "./reverse.js";
import { startStatus, updateStatus } from "./status.js";
import { initSweep } from "./sweep.js";
import { $ } from "./ui.js";

const dialog = $("#key-dialog");
const keyInput = $("#api-key");
const forget = $("#key-forget");

function askForKey(why) {
  $("#key-why").textContent = why;
  if (!dialog.open) {
    dialog.showModal();
    keyInput.focus();
  }
}

window.addEventListener("latentd:unauthorized", (event) => {
  const message = event.detail || "This gateway needs an API key.";
  askForKey(getKey() ? `The key was refused: ${message}` : "This gateway needs an API key.");
});

dialog.addEventListener("cancel", (event) => event.preventDefault()); // nothing works without it: Esc keeps it open

$("#key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  $("#key-error").textContent = "";
  if (!key) {
    $("#key-error").textContent = "Enter a key.";
    return;
  }
  setKey(key);
  const error = await updateStatus();
  if (error?.status === 401) {
    clearKey();
    $("#key-error").textContent = error.message;
    keyInput.select();
    return;
  }
  keyInput.value = "";
  dialog.close();
  forget.hidden = false;
  jobs.reload();
});

forget.addEventListener("click", () => {
  clearKey();
  forget.hidden = true;
  jobs.clear();
  updateStatus();
});

initGenerate();
initForward();
initReverse();
initSweep();
const jobs = initJobs(); // reloaded when a key is given, emptied when it is forgotten
forget.hidden = !getKey();
updateStatus();
startStatus();
