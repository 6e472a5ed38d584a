// The persllm chat page: plain JavaScript, no dependencies. Model output is only ever put into the
// page with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];          // entries of /v1/models
let history = [];         // {role, content} of this conversation
let apiKey = sessionStorage.getItem("persllm-key") || "";
let busy = null;          // AbortController of the answer in progress

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

function add(role, text, who) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const name = document.createElement("span");
  name.className = "who";
  name.textContent = who;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(name, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function note(text) {
  const div = document.createElement("div");
  div.className = "note";
  div.textContent = text;
  $("log").append(div);
}

function personas() {
  return [...new Set(models.map((m) => m.id.split("@")[0]))];
}

function current() {
  return models.find((m) => m.id === $("model").value + "@" + $("stage").value);
}

function fillStages() {
  const name = $("model").value;
  const stages = models.filter((m) => m.id.startsWith(name + "@"));
  const sel = $("stage");
  const keep = sel.value;
  sel.replaceChildren(...stages.map((m) => {
    const o = document.createElement("option");
    o.value = m.stage;
    o.textContent = m.stage_label ? m.stage + " - " + m.stage_label : m.stage;
    return o;
  }));
  if (stages.some((m) => m.stage === keep)) sel.value = keep;
  else if (stages.length) sel.value = stages[stages.length - 1].stage;
  const m = current();
  if (m) {
    $("persona").textContent = m.persona;
    $("description").textContent = m.description || "";
    document.title = m.persona + " - persllm";
  }
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("keybox").hidden = false;
    $("status").textContent = "This server needs an API key.";
    return;
  }
  const data = await r.json();
  models = data.data.filter((m) => m.id.includes("@"));
  $("model").replaceChildren(...personas().map((n) => {
    const o = document.createElement("option");
    o.value = n;
    o.textContent = n;
    return o;
  }));
  $("keybox").hidden = true;
  fillStages();
  $("status").textContent = "";
}

async function ask(text) {
  const m = current();
  if (!m) return;
  history.push({ role: "user", content: text });
  add("user", text, "you");
  const div = add("assistant streaming", "", m.persona + " (" + m.stage + ")");
  const out = div.querySelector(".text");
  busy = new AbortController();
  $("send").disabled = true;
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: busy.signal,
      body: JSON.stringify({ model: m.id, messages: history, stream: true }),
    });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const payload = line.slice(6);
          if (payload === "[DONE]") continue;
          const obj = JSON.parse(payload);
          if (obj.error) throw new Error(obj.error.message);
          const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
          if (delta && delta.content) {
            answer += delta.content;
            out.textContent = answer;     // text, never HTML
            div.scrollIntoView({ block: "end" });
          }
        }
      }
    }
    history.push({ role: "assistant", content: answer });
  } catch (e) {
    history.pop();
    div.className = "msg error";
    out.textContent = (answer ? answer + "\n" : "") + (e.name === "AbortError" ? "(stopped)" : "error: " + e.message);
  } finally {
    div.classList.remove("streaming");
    div.dataset.done = "1";
    busy = null;
    $("send").disabled = false;
  }
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  $("input").value = "";
  ask(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("ask").requestSubmit(); }
});
$("model").addEventListener("change", () => { history = []; $("log").replaceChildren(); fillStages(); });
$("stage").addEventListener("change", () => { fillStages(); note("(now at stage " + $("stage").value + ")"); });
$("reset").addEventListener("click", () => {
  if (busy) busy.abort();
  history = [];
  $("log").replaceChildren();
});
$("usekey").addEventListener("click", () => {
  apiKey = $("key").value;
  sessionStorage.setItem("persllm-key", apiKey);
  loadModels();
});
loadModels().catch((e) => { $("status").textContent = "cannot reach the server: " + e.message; });
