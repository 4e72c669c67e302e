// Small DOM helpers shared by the panels: form values, errors next to the field they name, number formats.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children);
  return node;
}

/** Enabled, named controls as API values: numbers for number and range inputs, "" as null. */
export function formValues(form) {
  const values = {};
  for (const control of form.elements) {
    if (!control.name || control.disabled || control.type === "file") continue;
    if (control.type === "checkbox") values[control.name] = control.checked;
    else if (control.type === "radio") {
      if (control.checked) values[control.name] = control.value;
    } else if (control.type === "number" || control.type === "range") {
      values[control.name] = control.value === "" ? null : Number(control.value);
    } else values[control.name] = control.value;
  }
  return values;
}

/** A picture (File or Blob) as a data: URL, as the API takes pictures. */
export const readFile = (blob) =>
  new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });

/**
 * Image to image fields of a form (file inputs named image and mask, a number named strength; any may be
 * absent) into a request body: strength when given, mask and image as data: URLs. The picture's size is the
 * size, so width and height go. Returns the picture's aspect ratio ("w / h"), or null without one. Strength or
 * a mask without a picture are sent as they are: the API's 422 names them.
 */
export async function addPicture(form, body) {
  const field = (name) => form.elements.namedItem(name);
  const strength = field("strength");
  if (strength && strength.value !== "") body.strength = Number(strength.value);
  const mask = field("mask")?.files[0];
  if (mask) body.mask = await readFile(mask);
  const picture = field("image")?.files[0];
  if (!picture) return null;
  body.image = await readFile(picture);
  delete body.width;
  delete body.height;
  const bitmap = await createImageBitmap(picture).catch(() => null); // not a picture: the API says so
  if (!bitmap) return null;
  const ratio = `${bitmap.width} / ${bitmap.height}`;
  bitmap.close(); // its width and height read 0 from here on
  return ratio;
}

/** A seed field as an exact integer (BigInt past 2**53), null when empty. */
export function seedValue(input) {
  const text = input.value.trim();
  if (text === "") return null;
  return /^\d+$/.test(text) ? BigInt(text) : Number(text);
}

function controlFor(form, param, aliases) {
  if (!param) return null;
  const names = [param, param.replace(/\.\d+$/, ""), aliases[param], aliases[param.replace(/\.\d+$/, "")]];
  for (const name of names) {
    if (!name) continue;
    const found = form.elements.namedItem(name);
    const control = found instanceof RadioNodeList ? found[0] : found;
    if (control && !control.disabled && !control.closest("[hidden]")) return control;
  }
  return null;
}

export function clearErrors(form) {
  for (const node of $$(".field-error", form)) node.remove();
  for (const control of $$("[aria-invalid]", form)) {
    control.removeAttribute("aria-invalid");
    const ids = (control.getAttribute("aria-describedby") || "").split(" ").filter((id) => !id.endsWith("-error"));
    if (ids.length) control.setAttribute("aria-describedby", ids.join(" "));
    else control.removeAttribute("aria-describedby");
  }
  const general = $(".form-error", form);
  if (general) general.textContent = "";
}

/**
 * Show an API error next to the control its `param` names (aliases map a param to another control's
 * name, e.g. width -> size), or under the form when it names none. Focuses the control.
 */
export function showError(form, error, aliases = {}) {
  const control = controlFor(form, error.param, aliases);
  const message = error.message || String(error);
  if (!control) {
    const general = $(".form-error", form);
    general.textContent = error.status ? `${message} (HTTP ${error.status})` : message;
    return null;
  }
  const id = `${control.id}-error`;
  const note = el("p", { class: "field-error", id, text: message });
  (control.closest(".field") || control.parentElement).append(note);
  control.setAttribute("aria-invalid", "true");
  const described = (control.getAttribute("aria-describedby") || "").split(" ").filter(Boolean);
  control.setAttribute("aria-describedby", [...described, id].join(" "));
  control.focus();
  return control;
}

export const fixed = (value, digits = 4) => (Number.isFinite(value) ? value.toFixed(digits) : "—");
export const seconds = (value) => (Number.isFinite(value) ? `${value < 10 ? value.toFixed(2) : value.toFixed(1)} s` : "—");

/** Object URLs a panel made, revoked together when it starts over. */
export class UrlBag {
  constructor() {
    this.urls = [];
  }
  add(blob) {
    const url = URL.createObjectURL(blob);
    this.urls.push(url);
    return url;
  }
  clear() {
    for (const url of this.urls) URL.revokeObjectURL(url);
    this.urls = [];
  }
}
