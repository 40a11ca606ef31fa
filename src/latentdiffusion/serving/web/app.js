// The web page of `ldm serve`: plain JavaScript over the server's /sdapi/v1 routes, no build step and
// nothing fetched from elsewhere, so it works offline. Generation is one POST (txt2img or img2img);
// while it runs, /sdapi/v1/progress?id_task=... is polled for the progress bar and the live preview.
// The ControlNet panel lists /controlnet/model_list and /controlnet/module_list and sends one unit in
// the request's alwayson_scripts.controlnet.args, as AUTOMATIC1111's ControlNet extension takes it.
// A PNG dropped on the page fills the form from its parameters (/sdapi/v1/png-info, or the PNG's text
// chunk read here when the server has no such route); with several models served, a picker switches
// among them through POST /sdapi/v1/options.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 400;
const SMALL_IMAGE_PX = 320; // images smaller than this are shown at a whole multiple of their size
const CANVAS_PX = 448; // the mask canvas is shown scaled up to about this many CSS pixels
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
    const error = new Error(`${response.status}: ${detail}`);
    error.status = response.status;
    throw error;
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
    loadModels($("model-picker").value);
  });
  const health = await readHealth(true);
  $("key-row").hidden = !health.auth;
  await loadSamplers(health.defaults.sampler);
  await loadControlNets();
  await loadModels(health.model);
}

async function readHealth(useDefaults) {
  // the model and its defaults; the form takes them at start and after a model switch
  const health = await api("health");
  const d = health.defaults;
  $("model").textContent = `model: ${health.model} (${health.family})`;
  state.multiple = d.size_multiple;
  state.maxSide = health.limits.max_side;
  for (const id of ["width", "height"]) $(id).step = d.size_multiple;
  if (useDefaults) {
    for (const id of ["width", "height"]) $(id).value = d.size;
    $("steps").value = d.steps;
    $("cfg").value = d.cfg_scale;
  }
  return health;
}

// ---- several models: a picker, shown only when /sdapi/v1/sd-models lists more than one

async function loadModels(current) {
  let models;
  try {
    models = await api("sdapi/v1/sd-models");
  } catch (error) {
    return; // listing models is optional; one model is served
  }
  if (models.length < 2) {
    $("model-row").hidden = true;
    return;
  }
  let selected = current;
  try {
    selected = (await api("sdapi/v1/options")).sd_model_checkpoint || current;
  } catch (error) { /* the health's model name will do */ }
  const picker = $("model-picker");
  picker.innerHTML = "";
  for (const m of models) {
    const chosen = [m.title, m.model_name].includes(selected);
    picker.add(new Option(m.model_name || m.title, m.title, chosen, chosen));
  }
  state.model = picker.value;
  $("model-row").hidden = false; // shown once it lists the models, never empty
}

async function switchModel() {
  const picker = $("model-picker");
  const title = picker.value;
  picker.disabled = true;
  $("generate").disabled = true;
  setStatus(`loading ${title}`);
  try {
    await api("sdapi/v1/options", { sd_model_checkpoint: title });
    state.model = title;
    await readHealth(true); // the new model's size, steps and CFG
    setStatus(`model: ${title}`);
  } catch (error) {
    picker.value = state.model || picker.value;
    setStatus(error.message, true);
  } finally {
    picker.disabled = false;
    $("generate").disabled = state.busy;
  }
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
  // shown at a whole multiple of the image's size (crisp pixels, comfortable to paint on), or scaled
  // down to fit; the canvases keep the image's own size, so painted pixels are the image's pixels
  const scale = Math.max(1, Math.floor(CANVAS_PX / Math.max(w, h)));
  $("canvas-box").style.width = `${w * scale}px`;
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
  // the brush size is in screen pixels, whatever the canvas's scale
  const box = context.canvas.getBoundingClientRect();
  context.lineWidth = Number($("brush").value) * context.canvas.width / (box.width || context.canvas.width);
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
    $("progress").value = 1; // the job is over (finished or interrupted): the bar ends full
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
  $("model-picker").disabled = busy; // a model switch waits for the queue anyway; avoid surprises
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
  // one request's images in seed order, ahead of earlier results
  const info = JSON.parse(result.info);
  const figures = document.createDocumentFragment();
  result.images.forEach((b64, i) => figures.append(galleryFigure(b64, info, i)));
  $("gallery").prepend(figures);
}

function galleryFigure(b64, info, i) {
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = "data:image/png;base64," + b64;
  img.alt = info.all_prompts[i] || "generated image";
  img.title = "click: use as the image-to-image input";
  img.addEventListener("load", () => scaleUpIfSmall(img));
  img.addEventListener("click", () => useAsInput(img.src));
  const text = info.infotexts[i] || describe(info, i);
  const caption = document.createElement("figcaption");
  const pre = document.createElement("pre");
  pre.textContent = text;
  caption.appendChild(pre);
  if (info.interrupted) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "interrupted";
    caption.prepend(badge);
  }
  const seed = (info.all_seeds || [])[i] ?? i;
  const buttons = document.createElement("div");
  buttons.className = "buttons";
  const download = document.createElement("a");
  download.className = "button download";
  download.href = img.src;
  download.download = `${info.job_timestamp || "image"}-${seed}.png`;
  download.textContent = "Download";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy";
  copy.textContent = "Copy parameters";
  copy.addEventListener("click", () => copyText(text));
  buttons.append(download, copy);
  caption.appendChild(buttons);
  figure.append(img, caption);
  return figure;
}

function describe(info, i) {
  // the web UI's parameters text from the info object, for images that came without one
  const settings = [
    ["Steps", info.steps], ["Sampler", info.sampler_name], ["CFG scale", info.cfg_scale],
    ["Seed", (info.all_seeds || [])[i] ?? info.seed], ["Size", `${info.width}x${info.height}`],
    ["Model", info.sd_model_name], ["Denoising strength", info.denoising_strength],
  ].filter(([, value]) => value !== undefined && value !== null);
  const lines = [(info.all_prompts || [])[i] ?? info.prompt ?? ""];
  const negative = (info.all_negative_prompts || [])[i] ?? info.negative_prompt;
  if (negative) lines.push("Negative prompt: " + negative);
  lines.push(settings.map(([key, value]) => `${key}: ${value}`).join(", "));
  return lines.join("\n");
}

function scaleUpIfSmall(img) {
  // a 64 px image is shown at 320 px with square pixels; large images are left to max-width
  const side = Math.max(img.naturalWidth, img.naturalHeight);
  const scale = Math.floor(SMALL_IMAGE_PX / side);
  if (scale < 2) return;
  img.style.width = `${img.naturalWidth * scale}px`;
  img.classList.add("pixelated");
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (error) { // no clipboard API (a page not served from localhost or https): the old way
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  setStatus("parameters copied");
}

function useAsInput(dataUrl) {
  const picture = new Image();
  picture.onload = () => { showInitImage(picture, dataUrl); $("img2img").open = true; };
  picture.src = dataUrl;
}

async function interrupt() {
  try { await api("sdapi/v1/interrupt", {}); } catch (error) { setStatus(error.message, true); }
}

// ---- PNG info: a dropped PNG's parameters back into the form

function setupDrop() {
  // files dropped on a file field go to that field, as browsers do; anywhere else they are read
  const onFileField = (event) => event.target instanceof HTMLInputElement && event.target.type === "file";
  const hasFiles = (event) => !onFileField(event) && Array.from(event.dataTransfer?.types || []).includes("Files");
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    const file = event.dataTransfer?.files?.[0];
    if (!file || onFileField(event)) return;
    event.preventDefault();
    readDroppedImage(file);
  });
}

async function readDroppedImage(file) {
  try {
    const text = await imageParameters(file);
    if (!text) { setStatus(`${file.name}: no generation parameters in this image`, true); return; }
    applyParameters(text);
    setStatus(`parameters read from ${file.name}`);
  } catch (error) {
    setStatus(`${file.name}: ${error.message}`, true);
  }
}

async function imageParameters(file) {
  // the server's /sdapi/v1/png-info reads PNG, JPEG and WebP; without that route, a PNG is read here
  const dataUrl = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("cannot read the file"));
    reader.readAsDataURL(file);
  });
  try {
    return (await api("sdapi/v1/png-info", { image: dataUrl })).info || "";
  } catch (error) {
    if (![404, 405].includes(error.status)) throw error;
  }
  const chunks = await pngTextChunks(new Uint8Array(await file.arrayBuffer()));
  return chunks.parameters || "";
}

async function pngTextChunks(bytes) {
  // PNG (ISO/IEC 15948) text chunks: tEXt (Latin-1), zTXt (deflated Latin-1), iTXt (UTF-8, maybe deflated)
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (!signature.every((b, i) => bytes[i] === b)) throw new Error("not a PNG file");
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder("utf-8");
  const texts = {};
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    at += 12 + length;
    if (type === "IEND") break;
    if (!["tEXt", "zTXt", "iTXt"].includes(type)) continue;
    const nul = data.indexOf(0);
    const keyword = latin1.decode(data.subarray(0, nul));
    if (type === "tEXt") texts[keyword] = latin1.decode(data.subarray(nul + 1));
    else if (type === "zTXt") texts[keyword] = latin1.decode(await inflate(data.subarray(nul + 2)));
    else {
      const compressed = data[nul + 1] === 1;
      const language = data.indexOf(0, nul + 3);
      const translated = data.indexOf(0, language + 1);
      const body = data.subarray(translated + 1);
      texts[keyword] = utf8.decode(compressed ? await inflate(body) : body);
    }
  }
  return texts;
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function parseParameters(text) {
  // the web UI's format: prompt lines, "Negative prompt: ..." lines, then "Key: value, ..." (values
  // holding commas or colons are JSON strings)
  const lines = text.replace(/\n+$/, "").split("\n");
  let settings = {};
  if (lines.length > 1 && lines[lines.length - 1].includes("Steps: ")) {
    const pattern = /\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)/g;
    for (const [, key, value] of lines.pop().matchAll(pattern)) {
      settings[key.trim()] = value.startsWith('"') ? JSON.parse(value) : value.trim();
    }
  }
  const negativeAt = lines.findIndex((line) => line.startsWith("Negative prompt: "));
  const prompt = (negativeAt < 0 ? lines : lines.slice(0, negativeAt)).join("\n");
  const negative = negativeAt < 0 ? "" : lines.slice(negativeAt).join("\n").slice("Negative prompt: ".length);
  return { prompt, negative, settings };
}

function applyParameters(text) {
  const { prompt, negative, settings } = parseParameters(text);
  $("prompt").value = prompt;
  $("negative").value = negative;
  const fields = { Steps: "steps", "CFG scale": "cfg", Seed: "seed", "Denoising strength": "strength",
    "Mask blur": "mask-blur" };
  for (const [key, id] of Object.entries(fields)) if (settings[key] !== undefined) $(id).value = settings[key];
  const size = /^(\d+)x(\d+)$/.exec(settings.Size || "");
  if (size) { $("width").value = size[1]; $("height").value = size[2]; }
  if (settings.Sampler) setSampler(settings.Sampler, settings["Schedule type"]);
}

function setSampler(name, scheduleType) {
  // "DPM++ 2M Karras" is the sampler "DPM++ 2M" with the Karras schedule
  const samplers = Array.from($("sampler").options, (o) => o.value);
  const schedules = Array.from($("scheduler").options, (o) => o.value);
  let schedule = (scheduleType || "automatic").toLowerCase();
  for (const suffix of [" Karras", " Exponential"]) {
    if (!samplers.includes(name) && name.endsWith(suffix)) {
      name = name.slice(0, -suffix.length);
      schedule = suffix.trim().toLowerCase();
    }
  }
  if (samplers.includes(name)) $("sampler").value = name;
  $("scheduler").value = schedules.includes(schedule) ? schedule : "automatic";
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
  $("model-picker").addEventListener("change", switchModel);
  setupMaskPainting();
  setupDrop();
  init().catch((error) => setStatus("cannot reach the server: " + error.message, true));
});
