// The search page of `clipcli serve`: plain JavaScript over the server's own JSON API (/docs).
"use strict";

const PAGE_SIZE = Math.min(200, Math.max(1, Number(new URLSearchParams(location.search).get("page_size")) || 24));
const $ = (id) => document.getElementById(id);

// What the results show: a text query, an uploaded picture, or "more like" a result.
const state = { q: "", upload: null, uploadName: "", similar: null, page: 1 };
const dupes = { threshold: 0.9, page: 1 };

function filterParams() {
  const params = new URLSearchParams();
  const cutoff = $("cutoff").value;
  if (cutoff !== "none") params.set("cutoff", cutoff);
  const fields = { "min-score": "min_score", after: "after", before: "before", where: "where" };
  for (const [id, name] of Object.entries(fields)) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    let detail = body && body.detail ? body.detail : response.statusText;
    if (Array.isArray(detail)) detail = detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return body;
}

function say(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

function describe() {
  if (state.similar) return `more like ${state.similar}`;
  if (state.upload) return `like ${state.uploadName || "the picture dropped"}`;
  return state.q;
}

async function runSearch() {
  if (!state.q && !state.upload && !state.similar) return;
  const params = filterParams();
  params.set("page", state.page);
  params.set("page_size", PAGE_SIZE);
  let url;
  if (state.similar) {
    params.set("path", state.similar);
    url = "/api/similar?" + params;
  } else {
    if (state.q) params.set("q", state.q);
    if (state.upload) params.set("upload", state.upload);
    url = "/api/search?" + params;
  }
  say("Searching…");
  document.body.setAttribute("aria-busy", "true");
  try {
    const data = await getJSON(url);
    showResults(data);
  } catch (e) {
    $("results").replaceChildren();
    setPager("", false, false);
    say(e.message, true);
  } finally {
    document.body.removeAttribute("aria-busy");
  }
}

function resultItem(result) {
  const item = document.createElement("li");
  item.className = "result";
  const figure = document.createElement("figure");
  const img = document.createElement("img");
  img.src = result.thumb;
  img.alt = result.path;
  img.loading = "lazy";
  img.decoding = "async";
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = result.score.toFixed(3);
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = result.path.split("/").pop();  // the file's name; the whole path on hover and as alt
  path.title = result.path;
  caption.append(score, path);
  figure.append(img, caption);
  const more = document.createElement("button");
  more.type = "button";
  more.className = "more";
  more.textContent = "More like this";
  more.setAttribute("aria-label", `More like ${result.path}`);
  more.addEventListener("click", () => {
    Object.assign(state, { similar: result.row || result.path, upload: null, page: 1 });
    runSearch();
  });
  item.append(figure, more);
  return item;
}

function showResults(data) {
  const list = $("results");
  list.replaceChildren(...data.results.map(resultItem));
  const cutoff = data.cutoff === null ? "" : ` scoring at least ${data.cutoff.toFixed(3)}`;
  if (!data.results.length) {
    say(data.page > 1 ? "No more results." : `Nothing matches ${describe()}${cutoff}.`);
  } else {
    const first = (data.page - 1) * data.page_size + 1;
    say(`Results ${first}–${first + data.results.length - 1} for ${describe()}${cutoff}` +
        (data.notes.length ? ` (${data.notes.join("; ")})` : ""));
  }
  setPager(`Page ${data.page}`, data.page > 1, data.more);
}

function setPager(label, prev, next) {
  $("page-label").textContent = label;
  $("prev").disabled = !prev;
  $("next").disabled = !next;
}

async function uploadFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") {
    say(`${file.name}: not an image`, true);
    return;
  }
  showView("search");
  say(`Reading ${file.name}…`);
  try {
    const info = await getJSON("/api/upload", { method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" } });
    Object.assign(state, { upload: info.id, uploadName: file.name, similar: null, q: "", page: 1 });
    $("q").value = "";
    runSearch();
  } catch (e) {
    say(`${file.name}: ${e.message}`, true);
  }
}

// --- the duplicates view -------------------------------------------------------------------------

async function runDupes() {
  const status = $("dupes-status");
  status.textContent = "Looking for near-duplicates…";
  status.classList.remove("error");
  const params = new URLSearchParams({ threshold: dupes.threshold, page: dupes.page, page_size: PAGE_SIZE });
  try {
    const data = await getJSON("/api/dedup?" + params);
    $("groups").replaceChildren(...data.groups.map(groupItem));
    status.textContent = data.total
      ? `${data.total} group${data.total === 1 ? "" : "s"} of near-duplicates at similarity ≥ ${data.threshold}`
      : `No near-duplicates at similarity ≥ ${data.threshold}.`;
    $("dupes-page-label").textContent = data.total ? `Page ${data.page}` : "";
    $("dupes-prev").disabled = data.page <= 1;
    $("dupes-next").disabled = !data.more;
  } catch (e) {
    status.textContent = e.message;
    status.classList.add("error");
  }
}

function groupItem(group) {
  const item = document.createElement("li");
  item.className = "group";
  const title = document.createElement("h2");
  title.textContent = `Group ${group.group}: ${group.members.length} images`;
  const grid = document.createElement("ol");
  grid.className = "grid";
  for (const member of group.members) {
    const result = resultItem({ path: member.path, score: member.similarity, thumb: member.thumb });
    result.querySelector(".more").addEventListener("click", () => showView("search"));
    result.querySelector(".score").textContent = member === group.members[0] ? "kept" : member.similarity.toFixed(3);
    grid.append(result);
  }
  item.append(title, grid);
  return item;
}

function showView(name) {
  const dupesShown = name === "dupes";
  $("search-view").hidden = dupesShown;
  $("dupes-view").hidden = !dupesShown;
  $("tab-search").setAttribute("aria-pressed", String(!dupesShown));
  $("tab-dupes").setAttribute("aria-pressed", String(dupesShown));
}

// --- wiring ------------------------------------------------------------------------------------

function init() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const q = $("q").value.trim();
    if (!q) return;
    Object.assign(state, { q, similar: null, upload: null, page: 1 });
    showView("search");
    runSearch();
  });
  $("file").addEventListener("change", () => uploadFile($("file").files[0]));
  const pick = () => $("file").click();
  for (const id of ["pick-label", "drop-zone"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); pick(); }
    });
  }
  $("drop-zone").addEventListener("click", pick);
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) uploadFile(file);
  });
  $("apply-filters").addEventListener("click", () => { state.page = 1; runSearch(); });
  $("clear-filters").addEventListener("click", () => {
    for (const id of ["min-score", "after", "before", "where"]) $(id).value = "";
    $("cutoff").value = "none";
    state.page = 1;
    runSearch();
  });
  for (const id of ["min-score", "after", "before", "where"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter") { event.preventDefault(); state.page = 1; runSearch(); }
    });
  }
  $("cutoff").addEventListener("change", () => { state.page = 1; runSearch(); });
  $("prev").addEventListener("click", () => { state.page -= 1; runSearch(); });
  $("next").addEventListener("click", () => { state.page += 1; runSearch(); });
  $("tab-search").addEventListener("click", () => showView("search"));
  $("tab-dupes").addEventListener("click", () => { showView("dupes"); dupes.page = 1; runDupes(); });
  $("dupes-form").addEventListener("submit", (event) => {
    event.preventDefault();
    dupes.threshold = Number($("threshold").value) || 0.9;
    dupes.page = 1;
    runDupes();
  });
  $("dupes-prev").addEventListener("click", () => { dupes.page -= 1; runDupes(); });
  $("dupes-next").addEventListener("click", () => { dupes.page += 1; runDupes(); });
  document.addEventListener("keydown", (event) => {
    const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (event.key === "/" && !typing) { event.preventDefault(); $("q").focus(); }
  });
  // A link can carry a search: /?q=a+red+circle&where=...&after=2024-06-01&cutoff=auto&page_size=50
  const given = new URLSearchParams(location.search);
  const fields = { "min-score": "min_score", after: "after", before: "before", where: "where", cutoff: "cutoff" };
  for (const [id, name] of Object.entries(fields)) if (given.get(name)) $(id).value = given.get(name);
  if (given.get("q")) {
    $("q").value = given.get("q");
    Object.assign(state, { q: given.get("q") });
    runSearch();
  } else $("q").focus();
}

document.addEventListener("DOMContentLoaded", init);
