// The page uses the service's public API only (GET /models, POST /classify, POST /classify_batch),
// so it doubles as an example of it, API keys included. No build step, no external requests.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "cifar10-api-key"; // where a key lives: this tab's sessionStorage, never anywhere else
let service = null; // the answer of GET /models
let items = []; // one per image shown: {file, node}

// fetch, with the API key when the service asked for one; a 401 shows the key form.
async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) askForKey(key ? "That key was refused; enter another." : "");
  return response;
}

function askForKey(problem) {
  $("key-form").hidden = false;
  $("key-problem").textContent = problem;
  $("key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("key-form").hidden = true;
  if (service === null) start();
  else classify(items);
});

async function start() {
  const response = await api("models");
  if (response.status === 401) return;
  service = await response.json();
  for (const name of Object.keys(service.models)) $("model").add(new Option(name, name));
  $("model").value = service.default;
  describeModel();
  $("model").addEventListener("change", () => { describeModel(); classify(items); });
  $("files").addEventListener("change", (event) => { add(event.target.files); event.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    add(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => add(event.clipboardData.files));
}

function describeModel() {
  const model = service.models[$("model").value];
  const facts = [`version ${model.version}`];
  if (model.precision) facts.push(model.precision);
  if (model.test_accuracy != null) facts.push(`test accuracy ${(model.test_accuracy * 100).toFixed(2)}%`);
  facts.push(`on ${model.provider.replace("ExecutionProvider", "")}`);
  if (!model.out_of_distribution.method) facts.push("no out-of-distribution check");
  $("model-info").textContent = facts.join(" · ");
}

function add(files) {
  const added = [...files].map((file) => {
    const node = $("result").content.firstElementChild.cloneNode(true);
    const preview = node.querySelector("img");
    preview.addEventListener("error", () => { preview.style.visibility = "hidden"; }); // not an image
    preview.src = URL.createObjectURL(file);
    preview.alt = `preview of ${file.name}`;
    node.querySelector(".name").textContent = file.name;
    $("results").prepend(node);
    return { file, node };
  });
  items = [...added, ...items];
  classify(added);
}

async function classify(chosen) {
  const model = $("model").value;
  const limit = service.limits.max_batch_images;
  for (let i = 0; i < chosen.length; i += limit) {
    const chunk = chosen.slice(i, i + limit);
    chunk.forEach((item) => show(item, { pending: true }));
    $("status").textContent = `Classifying ${chunk.length} image${chunk.length > 1 ? "s" : ""} with ${model}…`;
    const form = new FormData();
    for (const item of chunk) form.append(chunk.length > 1 ? "images" : "image", item.file, item.file.name);
    form.append("model", model);
    form.append("top_k", "5");
    const started = performance.now();
    try {
      const response = await api(chunk.length > 1 ? "classify_batch" : "classify", { method: "POST", body: form });
      const body = await response.json();
      const note = `${body.model || model} ${body.model_version || ""} · ${Math.round(performance.now() - started)} ms`;
      if (!response.ok) chunk.forEach((item) => show(item, { error: body.error }));
      else if (chunk.length === 1) show(chunk[0], { predictions: body.predictions, note });
      else body.results.forEach((result, j) => show(chunk[j], { ...result, note }));
    } catch (error) {
      chunk.forEach((item) => show(item, { error: `the service did not answer (${error.message})` }));
    }
  }
  $("status").textContent = "";
}

function show(item, result) {
  const bars = item.node.querySelector(".bars");
  bars.replaceChildren();
  item.node.querySelector(".error").textContent = result.error || "";
  // An image unlike the training images gets that verdict in place of a label; its labels stay one click away.
  const outside = result.in_distribution === false;
  const anyway = item.node.querySelector(".anyway");
  item.node.querySelector(".verdict").textContent = outside ? "This does not look like any of the ten classes." : "";
  anyway.hidden = !outside;
  if (outside) anyway.append(bars);
  else item.node.querySelector(".verdict").after(bars);
  item.node.setAttribute("aria-busy", result.pending ? "true" : "false");
  for (const prediction of result.predictions || []) {
    const percent = (prediction.probability * 100).toFixed(1);
    const bar = document.createElement("li");
    bar.innerHTML = '<span class="fill"></span><span class="label"></span><span class="pct"></span>';
    bar.querySelector(".fill").style.width = `${percent}%`;
    bar.querySelector(".label").textContent = prediction.label;
    bar.querySelector(".pct").textContent = `${percent}%`;
    bars.append(bar);
  }
  item.node.querySelector(".note").textContent = result.note || "";
}

start().catch((error) => { $("status").textContent = `Could not reach the service: ${error.message}`; });
