// Name a flower from a photo: the exported model in the browser (onnxruntime-web, wasm).
// model.json carries what the ONNX file cannot tell onnxruntime-web: names, preprocessing,
// the unsure and known thresholds. The model's first output is already calibrated
// probabilities; its second, where the model has a known verdict, the photo's novelty.
import * as ort from "./ort/ort.wasm.min.mjs";
import { preprocess } from "./preprocess.js";

const TOP_K = 5;
const $ = (id) => document.getElementById(id);
const status = $("status");
let session, meta, warm;

// The wasm runtime lives beside its loader in ./ort/, served by this app, never a CDN.
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
// Threads need a cross-origin isolated page (COOP/COEP headers); else one thread. Half the
// cores (onnxruntime-web's own default), at most 4: the page keeps a core, and on a 2-core
// machine that is busy with other work one thread ran twice as fast as two (measured).
ort.env.wasm.numThreads = self.crossOriginIsolated
  ? Math.min(4, Math.ceil((navigator.hardwareConcurrency || 1) / 2)) : 1;

function setStatus(text, unsure = false) {
  status.textContent = text;
  status.classList.toggle("unsure", unsure);
}

async function load() {
  const start = performance.now();
  // Both files at once; the model comes already optimised for one photo at a time (static
  // shapes, constants folded), so the session is made in tens of ms, not seconds.
  const [json, bytes] = await Promise.all([
    fetch("model.json").then((r) => r.json()),
    fetch("model.onnx").then((r) => r.arrayBuffer())]);
  meta = json;
  session = await ort.InferenceSession.create(new Uint8Array(bytes), {
    executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  window.__timings = { load_ms: performance.now() - start, threads: ort.env.wasm.numThreads };
  // One run on a blank image while the user picks a photo: the wasm code's first pass is
  // slow, and the first photo would pay for it.
  const size = meta.input_size, warmStart = performance.now();
  warm = session.run({ [session.inputNames[0]]: new ort.Tensor(
    "float32", new Float32Array(3 * size * size), [1, 3, size, size]) })
    .then(() => { window.__timings.warmup_ms = performance.now() - warmStart; })
    .catch(() => {});
  $("about").textContent = `${meta.class_names.length} kinds of flowers, ${meta.precision} ` +
    `model, ${ort.env.wasm.numThreads} thread(s). Works offline once loaded.`;
  setStatus("Ready: take a photo of a flower, or choose one.");
  document.body.dataset.ready = "true";
}

// Decoded, upright RGBA pixels at full size (EXIF orientation applied, no colour management,
// as PIL reads them); transparent parts over white, as helpers.images.to_rgb does.
async function decode(file) {
  const bitmap = await createImageBitmap(file, {
    imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, bitmap.width, bitmap.height);
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  return ctx.getImageData(0, 0, canvas.width, canvas.height);
}

function show(probs, novelty) {
  const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a]).slice(0, TOP_K);
  const list = $("predictions");
  list.replaceChildren(...order.map((i) => {
    const li = document.createElement("li");
    li.dataset.name = meta.class_names[i];
    li.dataset.classId = meta.class_ids[i];
    li.dataset.probability = String(probs[i]);
    const pct = (100 * probs[i]).toFixed(probs[i] < 0.1 ? 1 : 0);
    li.innerHTML = '<span class="name"></span><span class="pct"></span>' +
      '<span class="track"><span class="bar"></span></span>';
    li.querySelector(".name").textContent = meta.class_names[i];
    li.querySelector(".pct").textContent = `${pct} %`;
    li.querySelector(".bar").style.width = `${Math.max(0.5, 100 * probs[i])}%`;
    return li;
  }));
  const top = probs[order[0]];
  const known = novelty === undefined || meta.novel_above === null ||
    novelty <= meta.novel_above;
  list.dataset.known = String(known);
  list.dataset.novelty = novelty === undefined ? "" : String(novelty);
  if (!known) {
    setStatus(`Not a flower I know (closest: ${meta.class_names[order[0]]}). Point the ` +
              "camera at one flower, close up.", true);
  } else if (top < meta.unsure_below) {
    setStatus(`Not sure: the best guess has only ${(100 * top).toFixed(0)} % (unsure below ` +
              `${(100 * meta.unsure_below).toFixed(0)} %). Try a closer, sharper photo.`, true);
  } else {
    setStatus(`Most likely: ${meta.class_names[order[0]]}.`);
  }
}

async function classify(file) {
  const preview = $("preview");
  URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  $("figure").hidden = false;
  setStatus("Looking…");
  const start = performance.now();
  const image = await decode(file);
  const decoded = performance.now();
  const input = preprocess(image.data, image.width, image.height, 4, meta);
  const size = meta.input_size;
  const feeds = { [session.inputNames[0]]: new ort.Tensor("float32", input, [1, 3, size, size]) };
  const prepared = performance.now();
  await warm; // one run at a time
  const before = performance.now();
  const output = await session.run(feeds);
  const end = performance.now();
  const probs = output[session.outputNames[0]].data;
  show(probs, session.outputNames.length > 1 ? output[session.outputNames[1]].data[0] : undefined);
  // For tests and measurements: what the model saw and how long each step took.
  window.__lastInput = input;
  window.__lastTimings = { decode_ms: decoded - start, preprocess_ms: prepared - start,
                           inference_ms: end - before,
                           total_ms: end - start, width: image.width, height: image.height };
  window.__done = (window.__done || 0) + 1;
}

$("photo").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    await classify(file);
  } catch (err) {
    setStatus(`Could not read this photo (${err.message || err}); try a JPEG or PNG.`);
    window.__done = (window.__done || 0) + 1;
  }
});

if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("sw.js").catch(() => {}); // offline is a bonus, not a need
}

load().catch((err) => setStatus(`The model did not load (${err.message || err}).`));
