// The web page of `ldm serve`: plain JavaScript over the server's /sdapi/v1 routes, no build step and
// nothing fetched from elsewhere, so it works offline. Generation is one POST (txt2img or img2img);
// while it runs, /sdapi/v1/progress?id_task=... is polled for the progress bar and the live preview.
// The ControlNet panel lists /controlnet/model_list and /controlnet/module_list and sends one unit in
// the request's alwayson_scripts.controlnet.args, as AUTOMATIC1111's ControlNet extension takes it.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
const state = { hasImage: false, painted: false, busy: false, multiple: 8, maxSide: 1024 };

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const options = body === undefined ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || data);
    throw new Error(`${response.status}: ${detail}`);
  }
  return data;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

// ---- start-up: model defaults, samplers, the API key field

async function init() {
  $("api-key").value = localStorage.getItem("ldm-api-key") || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("ldm-api-key", $("api-key").value.trim());
    loadSamplers();
    loadControlNets();
  });
  const health = await api("health");
  const d = health.defaults;
  $("model").textContent = `model: ${health.model} (${health.family})`;
  $("key-row").hidden = !health.auth;
  for (const id of ["width", "height"]) { $(id).value = d.size; $(id).step = d.size_multiple; }
  $("steps").value = d.steps;
  $("cfg").value = d.cfg_scale;
  state.multiple = d.size_multiple;
  state.maxSide = health.limits.max_side;
  await loadSamplers(d.sampler);
  await loadControlNets();
}

// ---- ControlNet: the server's models and preprocessors, a hint image, one unit per request

async function loadControlNets() {
  try {
    const [models, modules] = await Promise.all([api("controlnet/model_list"), api("controlnet/module_list")]);
    fillSelect($("cn-model"), ["", ...models.model_list], (name) => name || "None");
    fillSelect($("cn-module"), modules.module_list, (name) => name);
    $("cn-note").dataset.models = String(models.model_list.length);
  } catch (error) {
    setStatus("cannot list ControlNets: " + error.message, true);
  }
}

function fillSelect(select, values, label) {
  const current = select.value;
  select.innerHTML = "";
  for (const value of values) select.add(new Option(label(value), value, false, value === current));
}

function loadHintImage(file) {
  const reader = new FileReader();
  reader.onload = () => { state.hintImage = reader.result; $("cn-hint").hidden = true; };
  reader.readAsDataURL(file);
}

function removeHintImage() {
  state.hintImage = null;
  $("cn-image").value = "";
  $("cn-hint").hidden = true;
}

function controlUnit() {
  // the extension's unit; without a hint image img2img uses its input image (the server's rule)
  if (!$("cn-model").value) return null;
  if (!state.hintImage && !state.hasImage) throw new Error("ControlNet: choose a hint image");
  const unit = {
    enabled: true,
    model: $("cn-model").value,
    module: $("cn-module").value,
    weight: Number($("cn-weight").value),
    guidance_start: Number($("cn-start").value),
    guidance_end: Number($("cn-end").value),
    control_mode: $("cn-mode").value,
    resize_mode: $("cn-resize").value,
  };
  if (state.hintImage) unit.image = state.hintImage;
  return unit;
}

async function previewHint() {
  const image = state.hintImage || state.initImage;
  if (!image) { setStatus("ControlNet: choose a hint image", true); return; }
  try {
    const result = await api("controlnet/detect", {
      controlnet_module: $("cn-module").value,
      controlnet_input_images: [image],
      controlnet_masks: state.painted ? [maskDataUrl()] : [],
    });
    $("cn-hint").src = "data:image/png;base64," + result.images[0];
    $("cn-hint").hidden = false;
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function loadSamplers(preferred) {
  try {
    const samplers = await api("sdapi/v1/samplers");
    const select = $("sampler");
    const current = select.value;
    select.innerHTML = "";
    for (const s of samplers) {
      const option = new Option(s.name, s.name);
      option.selected = s.aliases.includes(preferred) || s.name === current;
      select.add(option);
    }
  } catch (error) {
    setStatus("cannot list samplers: " + error.message, true);
  }
}

// ---- image to image: the picture and a mask painted over it

function loadInitImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const picture = new Image();
    picture.onload = () => showInitImage(picture, reader.result);
    picture.onerror = () => setStatus("that file is not an image this browser can read", true);
    picture.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function showInitImage(picture, dataUrl) {
  const [w, h] = fittedSize(picture.naturalWidth, picture.naturalHeight);
  for (const canvas of [$("image-canvas"), $("mask-canvas")]) { canvas.width = w; canvas.height = h; }
  $("image-canvas").getContext("2d").drawImage(picture, 0, 0, w, h);
  $("width").value = w;
  $("height").value = h;
  state.hasImage = true;
  state.painted = false;
  state.initImage = $("image-canvas").toDataURL("image/png");
  $("canvas-box").hidden = false;
}

function fittedSize(width, height) {
  // the image as the server will use it: at most max_side, sides multiples of the model's factor
  const scale = Math.min(1, state.maxSide / Math.max(width, height));
  const round = (side) => Math.max(state.multiple, Math.floor(side * scale / state.multiple) * state.multiple);
  return [round(width), round(height)];
}

function setupMaskPainting() {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(context, last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (last === null) return;
    const next = point(event);
    stroke(context, last, next);
    last = next;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

function stroke(context, from, to) {
  context.strokeStyle = "#fff";
  context.lineCap = "round";
  context.lineWidth = Number($("brush").value);
  context.beginPath();
  context.moveTo(from[0], from[1]);
  context.lineTo(to[0], to[1]);
  context.stroke();
  state.painted = true;
}

function maskDataUrl() {
  // white strokes on black: the server repaints the white part
  const source = $("mask-canvas");
  const mask = document.createElement("canvas");
  mask.width = source.width;
  mask.height = source.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
  context.drawImage(source, 0, 0);
  return mask.toDataURL("image/png");
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.painted = false;
}

function removeImage() {
  clearMask();
  state.hasImage = false;
  state.initImage = null;
  $("init-image").value = "";
  $("canvas-box").hidden = true;
}

// ---- generation, progress and the gallery

function requestBody(taskId) {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: Number($("width").value),
    height: Number($("height").value),
    steps: Number($("steps").value),
    cfg_scale: Number($("cfg").value),
    sampler_name: $("sampler").value,
    scheduler: $("scheduler").value,
    seed: Number($("seed").value),
    batch_size: Number($("batch").value),
    force_task_id: taskId,
  };
  const unit = controlUnit();
  if (unit) body.alwayson_scripts = { controlnet: { args: [unit] } };
  if (!state.hasImage) return ["sdapi/v1/txt2img", body];
  body.init_images = [state.initImage];
  body.denoising_strength = Number($("strength").value);
  if (state.painted) {
    Object.assign(body, { mask: maskDataUrl(), mask_blur: Number($("mask-blur").value), inpaint_full_res: false });
  }
  return ["sdapi/v1/img2img", body];
}

async function generate(event) {
  event.preventDefault();
  if (state.busy) return;
  const taskId = "page-" + Date.now() + "-" + Math.random().toString(36).slice(2);
  let path, body;
  try {
    [path, body] = requestBody(taskId);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  setBusy(true);
  setStatus("queued");
  const poller = setInterval(() => pollProgress(taskId), POLL_MS);
  try {
    const result = await api(path, body);
    addToGallery(result);
    const info = JSON.parse(result.info);
    setStatus(info.interrupted ? "interrupted" : `done: ${result.images.length} image(s)`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    clearInterval(poller);
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("interrupt").disabled = !busy;
  $("progress").value = busy ? 0 : $("progress").value;
  if (!busy) $("preview").hidden = true;
}

async function pollProgress(taskId) {
  try {
    const p = await api("sdapi/v1/progress?id_task=" + encodeURIComponent(taskId));
    if (!state.busy) return;
    $("progress").value = p.progress;
    if (p.textinfo) setStatus(p.textinfo + (p.eta_relative > 0 ? `, about ${p.eta_relative.toFixed(1)} s left` : ""));
    if (p.current_image) {
      $("preview").src = "data:image/png;base64," + p.current_image;
      $("preview").hidden = false;
    }
  } catch (error) {
    // progress is best effort; the generation request reports real errors
  }
}

function addToGallery(result) {
  const info = JSON.parse(result.info);
  result.images.forEach((b64, i) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + b64;
    img.alt = info.all_prompts[i] || "generated image";
    img.title = "click: use as the image-to-image input";
    img.addEventListener("click", () => useAsInput(img.src));
    const caption = document.createElement("figcaption");
    const pre = document.createElement("pre");
    pre.textContent = info.infotexts[i] || "";
    caption.appendChild(pre);
    figure.append(img, caption);
    $("gallery").prepend(figure);
  });
}

function useAsInput(dataUrl) {
  const picture = new Image();
  picture.onload = () => { showInitImage(picture, dataUrl); $("img2img").open = true; };
  picture.src = dataUrl;
}

async function interrupt() {
  try { await api("sdapi/v1/interrupt", {}); } catch (error) { setStatus(error.message, true); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("init-image").addEventListener("change", (e) => { if (e.target.files[0]) loadInitImage(e.target.files[0]); });
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-image").addEventListener("click", removeImage);
  $("cn-image").addEventListener("change", (e) => { if (e.target.files[0]) loadHintImage(e.target.files[0]); });
  $("cn-remove").addEventListener("click", removeHintImage);
  $("cn-detect").addEventListener("click", previewHint);
  setupMaskPainting();
  init().catch((error) => setStatus("cannot reach the server: " + error.message, true));
});
