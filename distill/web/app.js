// The bundle's browser page: the student's ONNX files run by onnxruntime-web (wasm, SIMD, threads when
// the page is cross-origin isolated), preprocessing by preprocess.js (Pillow's pixels), tokens by
// tokenizer.js (tokenizer_np's ids). The page lives in BUNDLE/web/ and reads the bundle from "../".
//
// URL parameters: precision=auto|int8|fp32 (auto: int8 when the bundle has it, as distill.edge),
// threads=N (wasm threads; default onnxruntime-web's), bundle=URL (another bundle folder).
// window.clipDemo is the page's API for scripts and tests (tests/test_web_page.py, benchmarks/bench_web_runtime.py).

import { loadTokenizer } from "./tokenizer.js";
import { checkSpec, decodeImage, preprocessRgba } from "./preprocess.js";

const T0 = performance.now();
const params = new URLSearchParams(location.search);
const BUNDLE = new URL(params.get("bundle") ?? "../", location.href);
const DEFAULT_TEMPLATES = ["a photo of a {}."];
const IMAGE_EXT = /\.(png|jpe?g|gif|webp|bmp|avif|ico|tiff?)$/i;
const $ = (id) => document.getElementById(id);

const state = {
  meta: null, manifest: null, spec: null, labels: [], classEmb: null, templates: DEFAULT_TEMPLATES,
  ort: null, precision: null, imageSession: null, textSession: null, tokenizer: null,
  items: [], classifier: null, order: null, selected: null, timings: {}, bytes: {}, warnings: [], benchPixels: null,
};

// ------------------------------------------------------------------------------ messages

function message(text, kind = "info") {
  const div = document.createElement("div");
  div.className = `msg-${kind}`;
  div.textContent = text;
  $("messages").append(div);
  return div;
}

function clearMessages() { $("messages").replaceChildren(); }

function oneLine(err) {
  const s = `${err?.name && err.name !== "Error" ? err.name + ": " : ""}${err?.message ?? err}`;
  return s.split("\n")[0];
}

// ------------------------------------------------------------------------------ bundle files

async function sha256Hex(bytes) {
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** A bundle file's bytes, checked against bundle.json's sha256 when the bundle has a manifest. null on 404. */
async function fetchBundleFile(rel, { optional = false } = {}) {
  const t = performance.now();
  const res = await fetch(new URL(rel, BUNDLE));
  if (res.status === 404) {
    if (optional) return null;
    throw new Error(`${rel}: missing from the bundle; rebuild it or copy the whole folder again`);
  }
  if (!res.ok) throw new Error(`${rel}: HTTP ${res.status}`);
  const bytes = new Uint8Array(await res.arrayBuffer());
  state.bytes[rel] = bytes.byteLength;
  const want = state.manifest?.[rel];
  if (want && crypto.subtle) {  // crypto.subtle exists in secure contexts only (https, localhost)
    if ((await sha256Hex(bytes)) !== want) {
      throw new Error(`${rel}: sha256 does not match bundle.json (modified or partly copied); rebuild the bundle or copy it again`);
    }
  }
  state.timings[`fetch ${rel}`] = performance.now() - t;
  return bytes;
}

/** A .npy file (little-endian float32, C order) -> {data: Float32Array, shape}. */
function parseNpy(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") throw new Error("not a .npy file");
  const major = bytes[6];
  const headerLen = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLen));
  if (!/'descr':\s*'<f4'/.test(header) || /'fortran_order':\s*True/.test(header)) throw new Error(`unsupported .npy header ${header.trim()}`);
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  const offset = start + headerLen;
  const data = new Float32Array(bytes.slice(offset, offset + shape.reduce((a, b) => a * b, 1) * 4).buffer);
  return { data, shape };
}

function unit(v) {
  let n = 0;
  for (const x of v) n += x * x;
  n = Math.max(Math.sqrt(n), 1e-12);
  return Float32Array.from(v, (x) => x / n);
}

const dot = (a, b) => { let s = 0; for (let i = 0; i < a.length; i++) s += a[i] * b[i]; return s; };

// ------------------------------------------------------------------------------ models

async function loadOrt() {
  try {
    return await import("./ort/ort.wasm.min.mjs");
  } catch (e) {
    throw new Error("onnxruntime-web is missing from this bundle (web/ort/): run `npm ci` in distill/web "
      + `(or bash tools/setup.sh) and write the bundle again (${oneLine(e)})`);
  }
}

async function createSession(rel) {
  const bytes = await fetchBundleFile(rel);
  const t = performance.now();
  const session = await state.ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
  state.timings[`session ${rel}`] = performance.now() - t;
  return session;
}

async function ensureText() {
  if (state.textSession) return;
  if (state.manifest && !("text_encoder.onnx" in state.manifest)) throw new Error("this bundle has no text_encoder.onnx, so only its own labels can be used");
  status("loading the text encoder…");
  const t = performance.now();
  const reader = async (name) => fetchBundleFile(`tokenizer/${name}`, { optional: true });
  [state.tokenizer, state.textSession] = await Promise.all([loadTokenizer(reader), createSession("text_encoder.onnx")]);
  state.timings["text ready"] = performance.now() - t;
  status();
}

async function embedPixels(pixels) {
  const size = state.spec.size;
  const input = new state.ort.Tensor("float32", pixels, [1, 3, size, size]);
  const out = await state.imageSession.run({ [state.imageSession.inputNames[0]]: input });
  return unit(out[state.imageSession.outputNames[0]].data);
}

/** Texts -> L2-normalised embeddings (Float32Array each), in batches of 32. */
async function embedTexts(texts) {
  await ensureText();
  const rows = [];
  for (let i = 0; i < texts.length; i += 32) {
    const { data, dims } = state.tokenizer.tokenizeInt64(texts.slice(i, i + 32));
    const out = await state.textSession.run({ [state.textSession.inputNames[0]]: new state.ort.Tensor("int64", data, dims) });
    const emb = out[state.textSession.outputNames[0]];
    const d = emb.dims[1];
    for (let r = 0; r < dims[0]; r++) rows.push(unit(emb.data.subarray(r * d, (r + 1) * d)));
  }
  return rows;
}

// ------------------------------------------------------------------------------ classifier

const lines = (text) => text.split("\n").map((s) => s.trim()).filter(Boolean);
const fill = (template, name) => template.replace(/\{\{|\}\}|\{\}/g, (m) => (m === "{{" ? "{" : m === "}}" ? "}" : name));

/** The prompts' classifier, as distill.metrics.zero_shot_classifier: per prompt the mean of its normalised template embeddings. */
async function buildClassifier() {
  const prompts = lines($("prompts").value);
  if (!prompts.length) {
    state.classifier = null;
    $("classifier-note").textContent = "";
    throw Object.assign(new Error("No prompts: type at least one prompt, one per line, to classify the images."), { kind: "warn" });
  }
  let templates = lines($("templates").value);
  if (!templates.length) templates = ["{}"];
  const key = JSON.stringify([prompts, templates]);
  if (state.classifier?.key === key) return state.classifier;
  const sameAsBundle = state.classEmb && JSON.stringify(prompts) === JSON.stringify(state.labels)
    && JSON.stringify(templates) === JSON.stringify(state.templates);
  let rows;
  if (sameAsBundle) {  // the bundle's own classifier, the one distill.edge classify uses: no text encoder needed
    const [c, d] = state.classEmb.shape;
    rows = Array.from({ length: c }, (_, i) => unit(state.classEmb.data.subarray(i * d, (i + 1) * d)));
    $("classifier-note").textContent = "Prompts = the bundle's labels: using its class_embeddings.npy (as distill.edge).";
  } else {
    const t = performance.now();
    const emb = await embedTexts(prompts.flatMap((p) => templates.map((tpl) => fill(tpl, p))));
    rows = prompts.map((_, i) => {
      const mean = new Float32Array(emb[0].length);
      for (let j = 0; j < templates.length; j++) emb[i * templates.length + j].forEach((x, k) => { mean[k] += x / templates.length; });
      return unit(mean);
    });
    state.timings["classifier"] = performance.now() - t;
    $("classifier-note").textContent = `${prompts.length} prompts x ${templates.length} templates through the text encoder.`;
  }
  state.classifier = { key, prompts, rows, fromBundle: sameAsBundle };
  return state.classifier;
}

/** Softmax over logit_scale * cosine across all prompts, sorted (distill.edge's scores). */
function scores(emb, classifier) {
  const scale = Number(state.meta?.logit_scale ?? 100);
  const cos = classifier.rows.map((r) => dot(r, emb));
  const m = Math.max(...cos.map((c) => scale * c));
  const e = cos.map((c) => Math.exp(scale * c - m));
  const z = e.reduce((a, b) => a + b, 0);
  return cos.map((c, i) => ({ label: classifier.prompts[i], score: e[i] / z, cosine: c }))
    .sort((a, b) => b.score - a.score);
}

async function classifyAll() {
  let classifier;
  try {
    classifier = await buildClassifier();
  } catch (e) {
    for (const it of state.items) it.top = null;
    render();
    message(oneLine(e), e.kind ?? "error");
    return;
  }
  for (const it of state.items) if (it.emb) it.top = scores(it.emb, classifier);
  render();
}

// ------------------------------------------------------------------------------ images

let queue = Promise.resolve();
const enqueue = (fn) => (queue = queue.then(fn).catch((e) => { message(oneLine(e), "error"); }));

async function addFiles(files) {
  await ready;
  const added = [];
  for (const file of files) {
    const item = { name: file.webkitRelativePath || file.name, file, url: URL.createObjectURL(file), emb: null, error: null, top: null };
    state.items.push(item);
    added.push(item);
    try {
      const t = performance.now();
      const { rgba, width, height, info } = await decodeImage(file);
      const pixels = preprocessRgba(rgba, width, height, state.spec, info);
      state.benchPixels ??= pixels;  // one model input kept for bench(); the rest are dropped (600 KB each at 224 px)
      item.emb = await embedPixels(pixels);
      item.ms = performance.now() - t;
    } catch (e) {  // one bad file is named and skipped; the rest go on
      item.error = oneLine(e);
      message(`could not decode ${item.name}: ${item.error}`, "error");
    }
    render();
  }
  if (added.some((it) => it.emb)) await classifyAll();
  status();
}

async function filesFromDrop(dataTransfer) {
  const out = [];
  async function walk(entry) {
    if (entry.isFile) {
      const file = await new Promise((res, rej) => entry.file(res, rej));
      if (IMAGE_EXT.test(file.name) || file.type.startsWith("image/")) out.push(file);  // a folder's other files are skipped
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((res, rej) => reader.readEntries(res, rej));
        if (!batch.length) break;
        for (const e of batch) await walk(e);
      }
    }
  }
  const entries = [...dataTransfer.items].map((i) => i.webkitGetAsEntry?.()).filter(Boolean);
  if (!entries.length) return [...dataTransfer.files];
  for (const e of entries) {
    if (e.isFile) out.push(await new Promise((res, rej) => e.file(res, rej)));  // a dropped file is always tried
    else await walk(e);
  }
  return out;
}

// ------------------------------------------------------------------------------ search

async function searchText(query) {
  if (!query.trim()) { state.order = null; render(); return; }
  const [q] = await embedTexts([query]);
  state.selected = null;
  state.order = { by: `text "${query}"`, score: new Map(state.items.filter((it) => it.emb).map((it) => [it, dot(it.emb, q)])) };
  render();
}

function searchImage(item) {
  state.selected = item;
  state.order = { by: `image ${item.name}`, score: new Map(state.items.filter((it) => it.emb).map((it) => [it, dot(it.emb, item.emb)])) };
  render();
}

// ------------------------------------------------------------------------------ rendering

function status(extra) {
  const s = state;
  const parts = [];
  if (s.imageSession) {
    parts.push(`student ${s.precision} · ${s.spec.size}px · ${s.labels.length} bundle labels · wasm threads ${s.ort.env.wasm.numThreads}`
      + `${crossOriginIsolated ? "" : " (not cross-origin isolated: 1 thread)"} · onnxruntime-web ${s.ort.env.versions?.web ?? ""}`);
    parts.push(`manifest: ${s.manifest ? "sha256 checked for every file loaded" : "none (bundle.json missing): not checked"}`
      + ` · text encoder ${s.textSession ? "loaded" : "loads on first use"} · ${s.items.filter((i) => i.emb).length} images embedded`);
  }
  if (extra) parts.push(extra);
  $("status").textContent = parts.join("\n");
}

function bars(top, k = 3) {
  return top.slice(0, k).map((t, i) => {
    const row = document.createElement("div");
    row.className = `bar${i === 0 ? " top" : ""}`;
    row.innerHTML = `<span class="l"></span><span class="b"><i style="width:${(100 * t.score).toFixed(1)}%"></i></span><span class="p">${(100 * t.score).toFixed(1)}%</span>`;
    row.querySelector(".l").textContent = t.label;
    row.title = `cosine ${t.cosine.toFixed(4)}`;
    return row;
  });
}

function render() {
  let items = [...state.items];
  if (state.order) items = items.filter((it) => state.order.score.has(it)).sort((a, b) => state.order.score.get(b) - state.order.score.get(a));
  const cards = items.map((it) => {
    const card = document.createElement("div");
    card.className = `card${it.error ? " error" : ""}${state.selected === it ? " selected" : ""}`;
    card.dataset.name = it.name;
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = it.name;
    name.title = it.name;
    if (it.error) {
      const why = document.createElement("div");
      why.className = "why";
      why.textContent = `could not decode: ${it.error}`;
      card.append(name, why);
      return card;
    }
    const img = document.createElement("img");
    img.src = it.url;
    img.alt = it.name;
    card.append(img, name);
    if (state.order) {
      const s = document.createElement("div");
      s.className = "score";
      s.textContent = `cosine to ${state.order.by}: ${state.order.score.get(it).toFixed(3)}`;
      card.append(s);
    }
    if (it.top) card.append(...bars(it.top, state.selected === it ? 5 : 3));
    card.onclick = () => searchImage(it);
    return card;
  });
  $("grid").replaceChildren(...cards);
}

// ------------------------------------------------------------------------------ start

async function start() {
  const metaBytes = await fetchBundleFile("bundle.json", { optional: true });
  if (metaBytes) {
    state.meta = JSON.parse(new TextDecoder().decode(metaBytes));
    state.manifest = state.meta.files ?? null;
    if (!crypto.subtle) state.warnings.push("not a secure context (use localhost or https): sha256 manifest not checked");
  } else {
    state.warnings.push("this bundle has no bundle.json: no sha256 manifest to check the files against");
  }
  const has = (rel) => !state.manifest || rel in state.manifest;
  const exists = async (rel) => (state.manifest ? rel in state.manifest : (await fetch(new URL(rel, BUNDLE), { method: "HEAD" })).ok);
  state.templates = state.meta?.templates ?? state.meta?.extra?.templates ?? DEFAULT_TEMPLATES;
  state.spec = checkSpec(JSON.parse(new TextDecoder().decode(await fetchBundleFile("preprocess.json"))));
  state.labels = JSON.parse(new TextDecoder().decode(await fetchBundleFile("labels.json")));
  if (has("class_embeddings.npy")) state.classEmb = parseNpy(await fetchBundleFile("class_embeddings.npy"));
  $("prompts").value = state.labels.join("\n");
  $("templates").value = state.templates.join("\n");

  state.ort = await loadOrt();
  state.ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
  if (params.has("threads")) state.ort.env.wasm.numThreads = Number(params.get("threads"));
  const want = params.get("precision") ?? "auto";
  state.precision = want === "auto" ? ((await exists("image_encoder.int8.onnx")) ? "int8" : "fp32") : want;
  if (!["int8", "fp32"].includes(state.precision)) throw new Error(`unknown precision ${want}; use int8, fp32 or auto`);
  const imageFile = state.precision === "int8" ? "image_encoder.int8.onnx" : "image_encoder.onnx";
  if (!has(imageFile)) throw new Error(`this bundle has no ${imageFile}; open the page with ?precision=fp32`);
  state.imageSession = await createSession(imageFile);
  state.timings["ready"] = performance.now();  // from navigation start: page, bundle files, wasm, session
  state.timings["ready since module start"] = performance.now() - T0;
  for (const w of state.warnings) message(w, "warn");
  status();
}

const ready = start().catch((e) => {
  status();
  message(`The page cannot run this bundle: ${oneLine(e)}`, "error");
  throw e;
});

$("files").addEventListener("change", (e) => { const f = [...e.target.files]; e.target.value = ""; enqueue(() => addFiles(f)); });
$("folder").addEventListener("change", (e) => {
  const f = [...e.target.files].filter((x) => IMAGE_EXT.test(x.name) || x.type.startsWith("image/"));
  e.target.value = "";
  enqueue(() => addFiles(f));
});
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) document.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
document.addEventListener("dragleave", () => drop.classList.remove("over"));
document.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const files = filesFromDrop(e.dataTransfer);
  enqueue(async () => addFiles(await files));
});
$("classify").onclick = () => enqueue(async () => { clearMessages(); await classifyAll(); });
$("clear").onclick = () => enqueue(async () => {
  for (const it of state.items) URL.revokeObjectURL(it.url);
  Object.assign(state, { items: [], order: null, selected: null });
  clearMessages();
  render();
  status();
});
$("search").onclick = () => enqueue(() => searchText($("query").value));
$("query").addEventListener("keydown", (e) => { if (e.key === "Enter") enqueue(() => searchText($("query").value)); });
$("unsort").onclick = () => { state.order = null; state.selected = null; render(); };

// ------------------------------------------------------------------------------ API for scripts and tests

async function bench({ warmup = 3, repeats = 20, text = true } = {}) {
  await ready;
  const size = state.spec.size;
  const pixels = state.benchPixels ?? new Float32Array(3 * size * size).fill(0.1);
  const time = async (fn) => {
    for (let i = 0; i < warmup; i++) await fn();
    const ms = [];
    for (let i = 0; i < repeats; i++) { const t = performance.now(); await fn(); ms.push(performance.now() - t); }
    return ms;
  };
  const out = { image_ms: await time(() => embedPixels(pixels)), threads: state.ort.env.wasm.numThreads };
  if (text) {
    await ensureText();
    const { data, dims } = state.tokenizer.tokenizeInt64(["a photo of a dog."]);
    const feed = { [state.textSession.inputNames[0]]: new state.ort.Tensor("int64", data, dims) };
    out.text_ms = await time(() => state.textSession.run(feed));
  }
  return out;
}

window.clipDemo = {
  ready,
  idle: async () => { await ready; for (let q; q !== queue;) { q = queue; await q; } },
  addFiles: (files) => enqueue(() => addFiles(files)),
  setPrompts: (text) => { $("prompts").value = text; },
  classify: () => enqueue(async () => { clearMessages(); await classifyAll(); }),
  search: (query) => enqueue(() => searchText(query)),
  embedTexts: async (texts) => (await embedTexts(texts)).map((r) => Array.from(r)),
  bench,
  report: () => ({
    precision: state.precision, threads: state.ort?.env.wasm.numThreads, crossOriginIsolated, manifest: !!state.manifest,
    ort: state.ort?.env.versions ?? null, timings: state.timings, bytes: state.bytes,
    classifier: state.classifier && { prompts: state.classifier.prompts, fromBundle: state.classifier.fromBundle },
    messages: [...$("messages").children].map((d) => ({ kind: d.className, text: d.textContent })),
    images: state.items.map((it) => ({ name: it.name, error: it.error, embedding: it.emb && Array.from(it.emb), top: it.top, ms: it.ms })),
  }),
};
