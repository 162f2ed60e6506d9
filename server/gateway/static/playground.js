// The dsv2-serve playground: a chat page over this server's own /v1 API. No dependencies, no build step.
// Model output is only ever put into the page as text nodes (renderMarkdown builds elements, never HTML
// strings), and the server sends a Content-Security-Policy that allows no inline script: a reply cannot
// inject markup or run code.
"use strict";

const KEY_STORAGE = "dsv2-playground-api-key"; // sessionStorage: gone when the tab closes
const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };

// --- Markdown -> DOM (fenced code, inline code, bold, lists, paragraphs) ------------------------------------

function renderMarkdown(text, into) {
  const nodes = [];
  const parts = text.split(/^```/m);
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const lang = newline >= 0 ? part.slice(0, newline).trim() : "";
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      code.textContent = newline >= 0 ? part.slice(newline + 1).replace(/\n$/, "") : "";
      if (lang) code.dataset.lang = lang;
      pre.append(code);
      nodes.push(pre);
    } else {
      for (const block of part.split(/\n{2,}/)) {
        if (block.trim()) nodes.push(renderBlock(block));
      }
    }
  });
  into.replaceChildren(...nodes);
}

function renderBlock(block) {
  const lines = block.split("\n").filter((l) => l.length);
  if (lines.length && lines.every((l) => /^\s*[-*] /.test(l))) {
    const ul = document.createElement("ul");
    for (const line of lines) {
      const li = document.createElement("li");
      li.append(...renderInline(line.replace(/^\s*[-*] /, "")));
      ul.append(li);
    }
    return ul;
  }
  const p = document.createElement("p");
  lines.forEach((line, i) => {
    if (i) p.append(document.createElement("br"));
    p.append(...renderInline(line));
  });
  return p;
}

function renderInline(line) {
  const out = [];
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*)/g;
  let last = 0;
  for (const m of line.matchAll(pattern)) {
    if (m.index > last) out.push(document.createTextNode(line.slice(last, m.index)));
    const token = m[0];
    const el = document.createElement(token.startsWith("`") ? "code" : "strong");
    el.textContent = token.startsWith("`") ? token.slice(1, -1) : token.slice(2, -2);
    out.push(el);
    last = m.index + token.length;
  }
  if (last < line.length) out.push(document.createTextNode(line.slice(last)));
  return out;
}

// --- the page ------------------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function status(text) {
  $("status").textContent = text;
}

async function loadModels() {
  let r;
  try {
    r = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    status("server unreachable");
    return;
  }
  if (r.status === 401) {
    status("this server needs an API key: enter it under Settings");
    $("settings").open = true;
    return;
  }
  const body = await r.json();
  const select = $("model");
  select.replaceChildren(
    ...body.data.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.max_model_len ? `${m.id} (${m.max_model_len} ctx)` : m.id;
      return option;
    }),
  );
  status("ready");
}

function bubble(role) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const body = document.createElement("div");
  body.className = "body";
  const stats = document.createElement("div");
  stats.className = "stats";
  div.append(who, body, stats);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return { div, body, stats };
}

function number(id) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : undefined;
}

async function send(text) {
  const user = bubble("user");
  user.body.textContent = text;
  state.history.push({ role: "user", content: text });
  const reply = bubble("assistant");
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.history] : [...state.history];
  const request = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature"),
    top_p: number("top_p"),
    max_tokens: Math.round(number("max_tokens") || 256),
  };
  const controller = new AbortController();
  state.controller = controller;
  busy(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let usage = null;
  let text_ = "";
  let finish = null;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({ error: { message: r.statusText } }));
      throw new Error(err.error ? err.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            const now = performance.now();
            if (first === null) first = now;
            last = now;
            text_ += choice.delta.content;
            renderMarkdown(text_, reply.body);
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
    }
    state.history.push({ role: "assistant", content: text_ });
  } catch (err) {
    if (err.name === "AbortError") {
      finish = "stopped";
      if (text_) state.history.push({ role: "assistant", content: text_ });
    } else {
      reply.div.classList.add("error");
      reply.body.textContent = text_ ? text_ + "\n\n" + err.message : err.message;
      state.history.pop();
    }
  } finally {
    busy(false);
    state.controller = null;
  }
  reply.stats.textContent = stats(started, first, last, usage, finish);
  reply.div.dataset.finish = finish || "";
  reply.div.scrollIntoView({ block: "end" });
}

function stats(started, first, last, usage, finish) {
  const parts = [];
  if (first !== null) parts.push(`TTFT ${Math.round(first - started)} ms`);
  if (usage) {
    const seconds = (last - first) / 1000;
    if (first !== null && seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
    parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`);
  }
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  status(on ? "generating…" : "ready");
}

function init() {
  $("key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  $("key").addEventListener("change", () => {
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    loadModels();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("log").replaceChildren();
  });
  loadModels();
}

window.dsv2Playground = { renderMarkdown }; // for tests of the renderer
document.addEventListener("DOMContentLoaded", init);
