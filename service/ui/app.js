// The page's logic: talks to this server's /v1 API only (same origin; see the page's CSP).
import { canvasIntensity, toMnist } from "/ui/mnist.js";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

let apiKey = null; // typed by the user when keys are on; lives in this variable only
let models = [];
let defaultModel = null; // the service's default_model setting, when it is served
let calib = null; // GET /v1/models/{name}/calibration of the selected model
let last = null; // the last prediction shown
let sliderTimer = null;

// --- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
  const resp = await fetch(path, { ...options, headers });
  const text = await resp.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = { error: text.trim() || resp.statusText || "no answer" };
  }
  if (!resp.ok) throw new ApiError(resp.status, body);
  return body;
}

function model() {
  return $("model").value;
}

// --- errors and the key ---------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  if (err instanceof ApiError && err.status === 401) {
    askKey(err.body.error);
  }
  let text;
  if (err instanceof ApiError) {
    const b = err.body;
    text = `${err.status}: ${b.error}` + (b.field ? ` (field: ${b.field})` : "") +
      (b.fix ? `. Fix: ${b.fix}` : "");
  } else {
    text = `The service could not be reached: ${err.message}`;
  }
  box.textContent = text;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function askKey(message) {
  $("key-message").textContent = `${message || "This server asks for an API key"}: type one.`;
  $("key-form").hidden = false;
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("key").value.trim() || null;
  $("key").value = "";
  $("key-form").hidden = true;
  loadModels();
});

// --- models and calibration -----------------------------------------------------------------

async function loadModels() {
  try {
    const listed = await api("/v1/models");
    models = listed.models.filter((m) => m.ready);
    defaultModel = listed.default_model;
  } catch (err) {
    showError(err);
    return;
  }
  clearError();
  const select = $("model");
  const wanted =
    new URLSearchParams(location.search).get("model") || select.value || defaultModel;
  select.replaceChildren(...models.map((m) => new Option(`${m.name} v${m.version}`, m.name)));
  if (models.some((m) => m.name === wanted)) select.value = wanted;
  await selectModel();
  loadGallery();
}

async function selectModel() {
  const m = models.find((x) => x.name === model());
  if (!m) return;
  $("model-info").textContent = `${m.objective.toUpperCase()}, served on ${m.score}`;
  last = null; // an answer of the previous model does not carry over
  showResult(null);
  let c;
  try {
    c = await api(`/v1/models/${m.name}/calibration`);
  } catch (err) {
    calib = null;
    showError(err);
    return;
  }
  if (model() !== m.name) return; // another model was picked meanwhile
  calib = c;
  const slider = $("slider");
  const q = calib.quantiles;
  const lo = calib.unit_range ? 0 : Math.min(q ? q[0] : calib.threshold, calib.threshold);
  const hi = calib.unit_range ? 1 : Math.max(q ? q[q.length - 1] : calib.threshold, calib.threshold);
  slider.min = lo;
  slider.max = hi;
  slider.step = "any"; // so that it can sit exactly on T
  slider.value = calib.threshold;
  $("threshold").textContent = fmt(calib.threshold);
  document.body.dataset.model = m.name; // the page is ready for this model
  updateWhatIf();
  pollLive();
}

$("model").addEventListener("change", () => {
  clearError();
  selectModel();
});

// --- asking -----------------------------------------------------------------------------------

async function predictFile(blob, filename) {
  const form = new FormData();
  form.append("files", blob, filename);
  const name = model();
  return api(`/v1/models/${name}/predict/files?resize=true&probabilities=true`, {
    method: "POST",
    body: form,
  });
}

async function predictPixels(pixels) {
  return api(`/v1/models/${model()}/predict`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ instances: [pixels], probabilities: true }),
  });
}

async function ask(send) {
  clearError();
  try {
    const answer = await send();
    last = { ...answer.predictions[0], threshold: answer.threshold, model: answer.model };
    showResult(last);
  } catch (err) {
    last = null;
    showResult(null);
    showError(err);
  }
  updateWhatIf();
  pollLive();
}

// The image as the browser sees it, shrunk to 28x28 (the service does its own resizing).
async function showBlob(blob) {
  try {
    const bitmap = await createImageBitmap(blob);
    $("sent").getContext("2d").drawImage(bitmap, 0, 0, 28, 28);
  } catch {
    showSent(null); // not an image the browser can read: the service will say why
  }
}

function sendFile(file) {
  if (!file) return;
  showBlob(file);
  ask(() => predictFile(file, file.name));
}

$("file").addEventListener("change", (ev) => sendFile(ev.target.files[0]));
document.addEventListener("dragover", (ev) => ev.preventDefault());
document.addEventListener("drop", (ev) => {
  ev.preventDefault();
  sendFile(ev.dataTransfer.files[0]);
});

// --- the canvas -----------------------------------------------------------------------------

const canvas = $("canvas");
const ctx = canvas.getContext("2d");

function clearCanvas() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function at(ev) {
  const r = canvas.getBoundingClientRect();
  return [(ev.clientX - r.left) * canvas.width / r.width,
    (ev.clientY - r.top) * canvas.height / r.height];
}

let drawing = false;
canvas.addEventListener("pointerdown", (ev) => {
  drawing = true;
  canvas.setPointerCapture(ev.pointerId);
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 20;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(...at(ev));
});
canvas.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  ctx.lineTo(...at(ev));
  ctx.stroke();
});
canvas.addEventListener("pointerup", () => {
  drawing = false;
});

function showSent(pixels) {
  const small = $("sent").getContext("2d");
  const img = small.createImageData(28, 28);
  for (let p = 0; p < 28 * 28; p++) {
    const v = pixels ? Math.round(255 * pixels[Math.floor(p / 28)][p % 28]) : 0;
    img.data.set([v, v, v, 255], 4 * p);
  }
  small.putImageData(img, 0, 0);
}

$("send-drawing").addEventListener("click", () => {
  const pixels = toMnist(canvasIntensity(canvas), canvas.width, canvas.height);
  if (pixels === null) {
    // Nothing drawn: no centre of mass to place, so nothing is sent.
    showError(new ApiError(422, {
      error: "the canvas is empty", field: "canvas", fix: "draw a digit, then press Ask",
    }));
    return;
  }
  showSent(pixels);
  ask(() => predictPixels(pixels));
});
$("clear").addEventListener("click", () => {
  clearCanvas();
  showSent(null);
});

// --- the answer -----------------------------------------------------------------------------

function fmt(x) {
  return x === null || x === undefined ? "–" : Number(x).toPrecision(4);
}

function svgEl(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// x position (0-300) of a score on the slider's scale.
function xOf(v) {
  const s = $("slider");
  const lo = Number(s.min), hi = Number(s.max);
  return 300 * Math.min(1, Math.max(0, (v - lo) / (hi - lo || 1)));
}

function showResult(p) {
  $("label").textContent = p ? (p.decision === "accepted" ? `${p.label}` : "NOT SURE") : "–";
  $("label").className = p ? p.decision : "";
  $("decision").textContent = p ? p.decision : "";
  $("score").textContent = p ? fmt(p.score) : "–";
  $("score-name").textContent = p ? p.score_name : calib ? calib.score : "";
  if (p && p.class_name !== null && p.class_name !== String(p.label)) {
    $("label").textContent += ` (${p.class_name})`;
  }
  drawScale();
  drawProbabilities(p);
  const cert = $("certificate");
  if (p && typeof p.certified === "boolean") {
    cert.textContent = p.certified
      ? `Certified: no perturbation of L-inf size ${p.certify_eps} changes this answer.`
      : `Not certified at eps ${p.certify_eps}.`;
    cert.className = p.certified ? "accepted" : "not_sure";
    cert.hidden = false;
  } else {
    cert.hidden = true;
  }
}

function drawScale() {
  const svg = $("scale");
  svg.replaceChildren(svgEl("rect", { x: 0, y: 14, width: 300, height: 12, class: "track" }));
  if (!calib) return;
  const t = xOf(calib.threshold);
  svg.append(svgEl("rect", { x: 0, y: 14, width: t, height: 12, class: "refuse-zone" }));
  svg.append(svgEl("line", { x1: t, x2: t, y1: 8, y2: 32, class: "t-line" }));
  svg.append(svgEl("text", { x: t + 3, y: 9, class: "small" }, "T"));
  if (last) {
    const x = xOf(last.score);
    svg.append(svgEl("circle", { cx: x, cy: 20, r: 6, class: `dot ${last.decision}` }));
  }
  const w = xOf(Number($("slider").value));
  svg.append(svgEl("line", { x1: w, x2: w, y1: 12, y2: 28, class: "whatif-line" }));
}

function drawProbabilities(p) {
  const svg = $("probs");
  svg.replaceChildren();
  if (!p || !p.probabilities) return;
  const n = p.probabilities.length, bw = 300 / n;
  p.probabilities.forEach((v, i) => {
    const h = 100 * v;
    svg.append(svgEl("rect", { x: i * bw + 2, y: 100 - h, width: bw - 4, height: h,
      class: i === p.probabilities.indexOf(Math.max(...p.probabilities)) ? "top" : "bar" }));
    svg.append(svgEl("text", { x: i * bw + bw / 2, y: 114, class: "small mid" }, String(i)));
  });
}

// --- another threshold ----------------------------------------------------------------------

function updateWhatIf() {
  const t = Number($("slider").value);
  $("slider-t").textContent = fmt(t);
  // The service's rule (service.scoring.decide): accepted iff score >= T.
  $("whatif").textContent = last ? (last.score >= t ? "accepted" : "not_sure") : "–";
  $("whatif").className = last ? (last.score >= t ? "accepted" : "not_sure") : "";
  drawScale();
  drawDistribution();
  clearTimeout(sliderTimer);
  sliderTimer = setTimeout(refuseRate, 80);
}

async function refuseRate() {
  if (!calib) return;
  const t = Number($("slider").value);
  if (calib.quantiles === null) {
    $("refuse").textContent = "–";
    $("refuse-note").textContent = "(this model's manifest keeps no held-out scores)";
    return;
  }
  try {
    const c = await api(`/v1/models/${model()}/calibration?threshold=${t}`);
    if (Number($("slider").value) !== t) return; // moved on since
    $("refuse").textContent = `${(100 * c.refuse_rate).toFixed(2)}%`;
    $("refuse-note").textContent = `(of ${c.n} held-out images; ` +
      `${(100 * calib.refuse_rate).toFixed(2)}% at the served T)`;
  } catch (err) {
    showError(err);
  }
}

function drawDistribution() {
  const svg = $("dist");
  svg.replaceChildren();
  if (!calib || !calib.quantiles) return;
  // The held-out clean scores' cumulative distribution, from the kept quantiles.
  const q = calib.quantiles, n = q.length - 1;
  const pts = q.map((v, i) => `${xOf(v)},${55 - 50 * i / n}`).join(" ");
  svg.append(svgEl("polyline", { points: pts, class: "cdf" }));
  const t = xOf(calib.threshold), w = xOf(Number($("slider").value));
  svg.append(svgEl("line", { x1: t, x2: t, y1: 0, y2: 60, class: "t-line" }));
  svg.append(svgEl("line", { x1: w, x2: w, y1: 0, y2: 60, class: "whatif-line" }));
  svg.append(svgEl("text", { x: 2, y: 10, class: "small" }, "share of clean scores below"));
}

$("slider").addEventListener("input", updateWhatIf);

// --- the live panel -------------------------------------------------------------------------

let liveTimer = null;

async function pollLive() {
  clearTimeout(liveTimer);
  const name = model();
  if (name) {
    try {
      drawLive(await api(`/v1/models/${name}/recent?seconds=60`));
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) showError(err);
    }
  }
  liveTimer = setTimeout(pollLive, 2000);
}

function drawLive(r) {
  const sum = (a) => a.reduce((s, v) => s + v, 0);
  // Rates over the last 10 seconds, so that they follow the traffic closely.
  const tail = (a) => sum(a.slice(-10)) / Math.min(10, a.length);
  $("rate-acc").textContent = tail(r.accepted_per_s).toFixed(1);
  $("rate-ns").textContent = tail(r.not_sure_per_s).toFixed(1);
  const per = $("per-second");
  per.replaceChildren();
  const top = Math.max(1, ...r.accepted_per_s.map((a, i) => a + r.not_sure_per_s[i]));
  const bw = 300 / r.seconds;
  r.accepted_per_s.forEach((a, i) => {
    const ns = r.not_sure_per_s[i];
    const ha = 55 * a / top, hn = 55 * ns / top;
    per.append(svgEl("rect", { x: i * bw, y: 58 - ha, width: bw - 1, height: ha, class: "acc" }));
    per.append(svgEl("rect", { x: i * bw, y: 58 - ha - hn, width: bw - 1, height: hn, class: "ns" }));
  });
  const hist = $("hist");
  hist.replaceChildren();
  const bins = r.hist_accepted.length, hb = 300 / bins;
  const hmax = Math.max(1, ...r.hist_accepted.map((a, i) => a + r.hist_not_sure[i]));
  r.hist_accepted.forEach((a, i) => {
    const ns = r.hist_not_sure[i];
    const ha = 50 * a / hmax, hn = 50 * ns / hmax;
    hist.append(svgEl("rect", { x: i * hb, y: 52 - ha, width: hb - 1, height: ha, class: "acc" }));
    hist.append(svgEl("rect", { x: i * hb, y: 52 - ha - hn, width: hb - 1, height: hn, class: "ns" }));
  });
  const lo = r.edges[0], hi = r.edges[r.edges.length - 1];
  const tx = 300 * (r.threshold - lo) / (hi - lo || 1);
  hist.append(svgEl("line", { x1: tx, x2: tx, y1: 0, y2: 54, class: "t-line" }));
  hist.append(svgEl("text", { x: 0, y: 66, class: "small" }, fmt(lo)));
  hist.append(svgEl("text", { x: 300, y: 66, class: "small end" }, fmt(hi)));
}

// --- the gallery ----------------------------------------------------------------------------

async function loadGallery() {
  const box = $("gallery-items");
  let index;
  try {
    index = await api("/ui/gallery/index.json");
  } catch {
    box.textContent = "No gallery is installed with this server.";
    return;
  }
  const served = new Set(models.map((m) => m.name));
  const shown = index.examples.filter((e) => served.has(e.model));
  if (!shown.length) {
    box.textContent = "None of the gallery's models is served here.";
    return;
  }
  box.replaceChildren(...shown.map((e) => {
    const b = document.createElement("button");
    b.className = "example";
    b.dataset.testid = "gallery-item";
    b.title = `${e.attack} on ${e.model}, eps ${e.eps}, MNIST test image ${e.mnist_test_index}`;
    const img = new Image(56, 56);
    img.src = `/ui/gallery/${e.file}`;
    img.alt = `adversarial ${e.true_label}`;
    const cap = document.createElement("span");
    cap.textContent = `${e.model} · eps ${e.eps} · true ${e.true_label} · audit: ` +
      (e.audit_won ? "fooled it" : "did not fool it");
    b.append(img, cap);
    b.addEventListener("click", () => sendExample(e));
    return b;
  }));
}

async function sendExample(e) {
  if (model() !== e.model) {
    $("model").value = e.model;
    await selectModel();
  }
  ask(async () => {
    const blob = await (await fetch(`/ui/gallery/${e.file}`)).blob();
    showBlob(blob);
    return predictFile(blob, e.file);
  });
}

// --- start ----------------------------------------------------------------------------------

clearCanvas();
showSent(null);
loadModels();
