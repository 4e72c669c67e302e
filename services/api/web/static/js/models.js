// The models a live worker serves (GET /v1/models), shared by every panel's model menu.

import { request } from "./api.js";
import { $, $$, el } from "./ui.js";

let models = [];
const listeners = new Set();

export const allModels = () => models;
export const modelNamed = (name) => models.find((m) => m.name === name) || models[0] || null;
/** A model's native aspect ratio as CSS wants it ("w / h"); "1 / 1" without a model. */
export const nativeRatio = (model) => (model ? `${model.native_width} / ${model.native_height}` : "1 / 1");

/**
 * Show in each field the model's default that the field falls back to when left empty, for the model the
 * select names, now and whenever it or the model list changes. fields: [[selector, (model) => text]].
 */
export function showDefaults(select, fields) {
  const show = () => {
    const model = modelNamed(select.value);
    for (const [selector, text] of fields) {
      const value = model ? text(model) : null;
      $(selector).placeholder = value != null ? `${value} (model default)` : "model default";
    }
  };
  select.addEventListener("change", show);
  onModels(show);
}

/** The strength a picture gets by default: the model's, and with a mask. */
export const strengthDefault = (m) =>
  m.default_strength == null ? null : `${m.default_strength}; masked ${m.default_inpaint_strength}`;

/** Call fn(models) now and whenever the list changes. */
export function onModels(fn) {
  listeners.add(fn);
  fn(models);
}

function fillSelect(select) {
  const current = select.value;
  const names = models.map((m) => m.name);
  if (names.join("\n") === [...select.options].map((o) => o.value).join("\n")) return;
  select.replaceChildren(
    ...(names.length
      ? models.map((m) => el("option", { value: m.name, text: `${m.name} (${m.native_width}×${m.native_height})` }))
      : [el("option", { value: "", text: "no model served" })]),
  );
  if (names.includes(current)) select.value = current;
  select.dispatchEvent(new Event("change"));
}

/** Reload the list; throws ApiError (401 without a key). */
export async function refreshModels() {
  const reply = await request("v1/models");
  const next = reply.data || reply.models || [];
  const changed = JSON.stringify(next) !== JSON.stringify(models);
  models = next;
  for (const select of $$("select.model-select")) fillSelect(select);
  if (changed) for (const fn of listeners) fn(models);
  return models;
}
