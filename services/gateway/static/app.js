// The web chat: streams answers over SSE from /v1/chat/completions, renders them as
// markdown (marked, then DOMPurify, both vendored under /static/vendor/), sends thumbs and
// comparisons to /v1/feedback, and keeps conversations in this browser's localStorage.
// No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const STORE_KEY = "rlhf-chat-history";
const MAX_CONVERSATIONS = 50; // the oldest beyond this are dropped from the browser

// A conversation: {id, title, updated, conversationId (the gateway's), entries}; an entry is
// {role: "user", content} or {role: "assistant", answers: [answer], picked, settled} with
// answer = {text, id (response_id), version, rating (1 | -1 | null), stopped}.
const state = {
  conv: null,
  busy: false,
  controller: null, // AbortController of the request in flight (the stop button)
};

// --- markdown -------------------------------------------------------------------------

const PURIFY = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "option"],
  FORBID_ATTR: ["style"],
};
const MARKDOWN = Boolean(window.marked && window.DOMPurify);
if (MARKDOWN) {
  marked.use({ gfm: true, breaks: true });
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });
}

// Model output is untrusted: marked turns it into HTML (raw HTML passes through), DOMPurify
// removes scripts, event handlers and javascript: links before it reaches the page.
function renderMarkdown(el, text) {
  if (MARKDOWN) el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY);
  else el.textContent = text; // vendored files missing: plain text, still safe
}

// --- storage --------------------------------------------------------------------------

function uuid() {
  if (crypto.randomUUID) return crypto.randomUUID(); // only in secure contexts (https, localhost)
  const b = crypto.getRandomValues(new Uint8Array(16));
  return [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
}

function loadStore() {
  try {
    const s = JSON.parse(localStorage.getItem(STORE_KEY));
    if (s && typeof s.conversations === "object" && s.conversations) return s;
  } catch {
    // unreadable: start afresh
  }
  return { current: null, conversations: {} };
}

function writeStore(store) {
  const ids = Object.values(store.conversations).sort((a, b) => b.updated - a.updated).map((c) => c.id);
  for (const id of ids.slice(MAX_CONVERSATIONS)) delete store.conversations[id];
  for (;;) {
    try {
      localStorage.setItem(STORE_KEY, JSON.stringify(store));
      return;
    } catch {
      // storage full: drop the oldest other conversation and try again
      const oldest = Object.values(store.conversations)
        .filter((c) => c.id !== store.current)
        .sort((a, b) => a.updated - b.updated)[0];
      if (!oldest) {
        setStatus("History not saved: this browser's storage is full.", true);
        return;
      }
      delete store.conversations[oldest.id];
    }
  }
}

// Re-read before writing: another tab may have saved its own conversations meanwhile.
function saveConv(conv) {
  const store = loadStore();
  if (conv.entries.length) {
    conv.updated = Date.now();
    store.conversations[conv.id] = conv;
  } else {
    delete store.conversations[conv.id];
  }
  writeStore(store);
  refreshHistory(store);
}

function newConv() {
  return { id: uuid(), title: "", updated: Date.now(), conversationId: null, entries: [] };
}

function openConversation(id) {
  const store = loadStore();
  state.conv = (id && store.conversations[id]) || newConv();
  store.current = state.conv.id;
  writeStore(store);
  renderConversation();
  refreshHistory(store);
  setStatus("");
}

function refreshHistory(store = loadStore()) {
  const sel = $("#history");
  const convs = Object.values(store.conversations).sort((a, b) => b.updated - a.updated);
  const options = convs.map((c) => new Option(c.title || "Untitled", c.id));
  if (!store.conversations[state.conv.id]) options.unshift(new Option("New conversation", state.conv.id));
  sel.replaceChildren(...options);
  sel.value = state.conv.id;
}

// The conversation as the API wants it: each answer turn continues with the picked answer
// (answer A when none was picked); an answer stopped before its first token is left out.
function apiMessages(entries) {
  const out = [];
  for (const e of entries) {
    if (e.role === "user") out.push({ role: "user", content: e.content });
    else {
      const text = e.answers[e.picked ?? 0]?.text;
      if (text) out.push({ role: "assistant", content: text });
    }
  }
  return out;
}

// --- network --------------------------------------------------------------------------

function apiKey() {
  return localStorage.getItem("rlhf-api-key") || "";
}

async function api(path, body, signal) {
  const headers = { "content-type": "application/json" };
  if (apiKey()) headers.authorization = "Bearer " + apiKey();
  const init = body === undefined ? { headers, signal } : { method: "POST", headers, body: JSON.stringify(body), signal };
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    const key = prompt("This gateway needs an API key:");
    if (key) {
      localStorage.setItem("rlhf-api-key", key.trim());
      return api(path, body, signal);
    }
  }
  return resp;
}

async function errorText(resp) {
  try {
    return (await resp.json()).error.message;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

// Parse an SSE byte stream into the JSON payloads of its `data:` lines.
async function* sse(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function postFeedback(body) {
  const resp = await api("/v1/feedback", { ...body, source: "web", event_id: uuid() });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

// --- page -----------------------------------------------------------------------------

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function setPolicy(version) {
  if (version !== undefined && version !== null) $("#policy").textContent = `policy v${version}`;
}

function scrollDown() {
  window.scrollTo({ top: document.body.scrollHeight });
}

// Follow a streaming answer only while the reader is at the bottom, not after they scrolled up.
function nearBottom() {
  return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
}

function setBusy(busy) {
  state.busy = busy;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  $("#send").disabled = busy;
  for (const id of ["#history", "#new-chat", "#delete-chat"]) $(id).disabled = busy;
  updateRegen();
}

function addUser(text) {
  $("#empty")?.remove();
  const node = $("#tpl-user").content.firstElementChild.cloneNode(true);
  node.querySelector(".bubble").textContent = text; // what people type is shown as typed
  $("#log").append(node);
}

function turnNode(entry) {
  const n = entry.answers.length;
  const turn = document.createElement("div");
  turn.className = "turn" + (n > 1 ? " compare" : "");
  for (let i = 0; i < n; i++) {
    const node = $("#tpl-answer").content.firstElementChild.cloneNode(true);
    node.querySelector(".tag").textContent = n > 1 ? `Answer ${"AB"[i] ?? i + 1}` : "";
    turn.append(node);
  }
  return turn;
}

// An answer turn once its text is final: text, version, and the feedback it still takes.
function finishTurn(conv, entry, turn) {
  const nodes = [...turn.querySelectorAll(".answer")];
  entry.answers.forEach((a, i) => {
    const node = nodes[i];
    node.classList.remove("streaming");
    node.classList.add("done");
    if (a.id) node.dataset.responseId = a.id;
    node.querySelector(".version").textContent = a.version !== null ? `v${a.version}` : "";
    const textEl = node.querySelector(".text");
    if (a.text) renderMarkdown(textEl, a.text);
    else textEl.textContent = a.stopped ? "(stopped before the first word)" : "(empty answer)";
    // a stopped answer was never stored by the gateway, so it cannot be rated
    node.querySelector(".note").textContent = a.stopped ? "Stopped — not rated" : "";
    const copy = node.querySelector(".copy");
    copy.hidden = !a.text || !navigator.clipboard;
    copy.addEventListener("click", () =>
      navigator.clipboard.writeText(a.text).then(
        () => setStatus("Copied."),
        () => setStatus("Copy failed.", true),
      ),
    );
  });
  const comment = $("#tpl-comment").content.firstElementChild.cloneNode(true);
  turn.append(comment);
  const resend = entry.answers.length === 1 ? wireThumbs(conv, entry.answers[0], nodes[0], comment) : wirePicks(conv, entry, nodes, turn, comment);
  wireComment(entry, comment, resend);
}

// The comment box of a turn: its text goes with the next judgement of the turn; once the
// turn is judged, "Send comment" sends that judgement again with it (the gateway's later
// event from the same rater supersedes the earlier one).
function commentText(box) {
  return box.querySelector(".comment").value.trim();
}

function wireComment(entry, box, resend) {
  const btn = box.querySelector(".send-comment");
  const field = box.querySelector(".comment");
  field.value = entry.comment ?? "";
  btn.addEventListener("click", async () => {
    if (!commentText(box)) return;
    if (!(await resend())) setStatus("Rate or pick an answer: the comment is sent with it.");
  });
}

// Thumbs are toggle buttons (aria-pressed); pressing the other thumb changes the rating: a new
// event that supersedes the old one (the reward model retracts it).
function wireThumbs(conv, a, node, box) {
  const up = node.querySelector(".thumb-up");
  const down = node.querySelector(".thumb-down");
  const show = () => {
    up.setAttribute("aria-pressed", String(a.rating === 1));
    down.setAttribute("aria-pressed", String(a.rating === -1));
    up.classList.toggle("chosen", a.rating === 1);
    down.classList.toggle("chosen", a.rating === -1);
    up.disabled = down.disabled = !a.id || a.stopped;
  };
  const rate = async (value, again = false) => {
    if (a.rating === value && !again) return false;
    up.disabled = down.disabled = true;
    const changing = a.rating !== null && a.rating !== value;
    try {
      await postFeedback({ kind: "rating", response_id: a.id, value, comment: commentText(box) });
    } catch (err) {
      show();
      setStatus("Feedback not saved: " + err.message, true);
      return false;
    }
    a.rating = value;
    show();
    saveConv(conv);
    const what = value > 0 ? "a good answer" : "a bad answer";
    setStatus(again ? "Thanks — comment sent." : changing ? `Changed — now marked as ${what}.` : `Thanks — marked as ${what}.`);
    return true;
  };
  up.addEventListener("click", () => rate(1));
  down.addEventListener("click", () => rate(-1));
  show();
  return () => (a.rating === null ? Promise.resolve(false) : rate(a.rating, true));
}

// A pair: prefer A or B, or call it a tie, or both bad. The judgement is final (the comment
// box can send it again, with a comment).
function wirePicks(conv, entry, nodes, turn, box) {
  const pair = $("#tpl-pair").content.firstElementChild.cloneNode(true);
  turn.insertBefore(pair, box);
  const tie = pair.querySelector(".tie");
  const bothBad = pair.querySelector(".both-bad");
  const open = () => entry.picked === null && !entry.settled && entry.answers.every((a) => a.id && !a.stopped);
  const show = (busy = false) => {
    nodes.forEach((node, i) => {
      const btn = node.querySelector(".pick");
      btn.disabled = busy || !open();
      btn.textContent = entry.picked === i ? "Preferred" : "Prefer this";
      btn.setAttribute("aria-pressed", String(entry.picked === i));
      node.classList.toggle("picked", entry.picked === i || entry.picked === "tie");
      node.classList.toggle("not-picked", entry.picked === "both_bad" || (typeof entry.picked === "number" && entry.picked !== i));
    });
    for (const [btn, value] of [[tie, "tie"], [bothBad, "both_bad"]]) {
      btn.disabled = busy || !open();
      btn.setAttribute("aria-pressed", String(entry.picked === value));
      btn.classList.toggle("chosen", entry.picked === value);
    }
  };
  const judge = async (choice, again = false) => {
    if (!open() && !again) return false;
    show(true);
    const first = typeof choice === "number" ? choice : 0;
    const body = {
      kind: "comparison",
      chosen_id: entry.answers[first].id,
      rejected_id: entry.answers[1 - first].id,
      outcome: typeof choice === "number" ? "chosen" : choice,
      comment: commentText(box),
    };
    try {
      await postFeedback(body);
    } catch (err) {
      show();
      setStatus("Feedback not saved: " + err.message, true);
      return false;
    }
    entry.picked = choice;
    show();
    saveConv(conv);
    const said = { tie: "a tie", both_bad: "both bad" }[choice] ?? `answer ${"AB"[choice]} preferred`;
    setStatus(again ? "Thanks — comment sent." : `Thanks — ${said}.`);
    return true;
  };
  nodes.forEach((node, i) => node.querySelector(".pick").addEventListener("click", () => judge(i)));
  tie.addEventListener("click", () => judge("tie"));
  bothBad.addEventListener("click", () => judge("both_bad"));
  show();
  if (open()) setStatus("Pick the better answer (or a tie, or both bad); it continues the conversation.");
  return () => (entry.picked === null ? Promise.resolve(false) : judge(entry.picked, true));
}

function renderConversation() {
  const log = $("#log");
  log.replaceChildren();
  if (!state.conv.entries.length) log.append($("#tpl-empty").content.firstElementChild.cloneNode(true));
  for (const entry of state.conv.entries) {
    if (entry.role === "user") addUser(entry.content);
    else {
      const turn = turnNode(entry);
      log.append(turn);
      finishTurn(state.conv, entry, turn);
    }
  }
  updateRegen();
  scrollDown();
}

// One "Regenerate" button, under the last answer, while nothing is streaming.
function updateRegen() {
  $("#log .regen-row")?.remove();
  const last = state.conv?.entries.at(-1);
  if (state.busy || last?.role !== "assistant") return;
  const row = $("#tpl-regen").content.firstElementChild.cloneNode(true);
  row.querySelector(".regen").addEventListener("click", regenerate);
  $("#log").append(row);
}

// Sending again without picking continues with answer A, and records no preference.
function settlePendingPick(conv) {
  const last = conv.entries.at(-1);
  if (last?.role === "assistant" && last.answers.length > 1 && last.picked === null) last.settled = true;
  for (const b of document.querySelectorAll(".pick")) b.disabled = true;
}

async function send(text) {
  const conv = state.conv;
  settlePendingPick(conv);
  conv.entries.push({ role: "user", content: text });
  conv.title ||= text.slice(0, 60);
  addUser(text);
  saveConv(conv); // the question survives a reload even if no answer comes
  await generate(conv, $("#compare").checked ? 2 : 1, null);
}

// A new answer to the same conversation; the old one is replaced (and kept if this fails).
async function regenerate() {
  const conv = state.conv;
  const last = conv.entries.at(-1);
  if (state.busy || last?.role !== "assistant") return;
  conv.entries.pop();
  $("#log .regen-row")?.remove();
  $("#log").lastElementChild?.remove(); // the replaced turn
  await generate(conv, last.answers.length, last);
}

async function generate(conv, n, replaced) {
  setBusy(true);
  setStatus("");
  const entry = {
    role: "assistant",
    answers: Array.from({ length: n }, () => ({ text: "", id: null, version: null, rating: null, stopped: false })),
    picked: null,
    settled: false,
  };
  const turn = turnNode(entry);
  const nodes = [...turn.querySelectorAll(".answer")];
  for (const node of nodes) node.classList.add("streaming");
  $("#log").append(turn);
  scrollDown();

  // re-render the whole text at most once a frame: markdown is only right as a whole
  let painting = false;
  const paint = () => {
    painting = false;
    const follow = nearBottom();
    entry.answers.forEach((a, i) => renderMarkdown(nodes[i].querySelector(".text"), a.text));
    if (follow) scrollDown();
  };
  const controller = new AbortController();
  state.controller = controller;
  let failure = null;
  try {
    const resp = await api(
      "/v1/chat/completions",
      {
        model: "default",
        messages: apiMessages(conv.entries),
        n,
        stream: true,
        conversation_id: conv.conversationId ?? undefined,
      },
      controller.signal,
    );
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sse(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      conv.conversationId = chunk.conversation_id;
      setPolicy(chunk.policy_version);
      for (const choice of chunk.choices) {
        const a = entry.answers[choice.index];
        a.id = choice.response_id;
        a.version = chunk.policy_version;
        const piece = choice.delta?.content;
        if (piece) {
          a.text += piece;
          if (!painting) {
            painting = true;
            requestAnimationFrame(paint);
          }
        }
      }
    }
  } catch (err) {
    if (controller.signal.aborted) for (const a of entry.answers) a.stopped = true;
    else failure = err;
  } finally {
    state.controller = null;
  }

  if (failure) {
    for (const node of nodes) {
      node.classList.remove("streaming");
      node.classList.add("done");
    }
    if (replaced) {
      conv.entries.push(replaced); // keep the answer it was to replace
      if (state.conv === conv) renderConversation();
    } else {
      conv.entries.pop(); // the question goes unanswered: leave it out of the conversation
      entry.answers.forEach((a, i) => {
        const textEl = nodes[i].querySelector(".text");
        textEl.classList.add("error-text");
        if (!a.text) textEl.textContent = "No answer: " + failure.message;
      });
    }
    saveConv(conv);
    setStatus(failure.message, true);
  } else {
    conv.entries.push(entry);
    saveConv(conv);
    finishTurn(conv, entry, turn);
    if (entry.answers[0].stopped) setStatus("Stopped.");
  }
  setBusy(false);
  $("#prompt").focus();
}

function stop() {
  state.controller?.abort();
}

function newChat() {
  if (state.busy) return;
  openConversation(null);
  $("#prompt").focus();
}

function deleteChat() {
  if (state.busy || !confirm("Delete this conversation from this browser?")) return;
  const store = loadStore();
  delete store.conversations[state.conv.id];
  const next = Object.values(store.conversations).sort((a, b) => b.updated - a.updated)[0];
  writeStore(store);
  openConversation(next?.id ?? null);
}

function autosize() {
  const t = $("#prompt");
  t.style.height = "auto";
  t.style.height = Math.min(t.scrollHeight, 180) + "px";
}

$("#form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("#prompt").value.trim();
  if (!text || state.busy) return;
  $("#prompt").value = "";
  autosize();
  send(text);
});
$("#prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("#form").requestSubmit();
  }
});
$("#prompt").addEventListener("input", autosize);
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.busy) stop();
});
// another tab saved a conversation: list it here too
window.addEventListener("storage", (e) => {
  if (e.key === STORE_KEY) refreshHistory();
});
$("#stop").addEventListener("click", stop);
$("#new-chat").addEventListener("click", newChat);
$("#delete-chat").addEventListener("click", deleteChat);
$("#history").addEventListener("change", (e) => openConversation(e.target.value));

openConversation(loadStore().current);
api("/v1/models")
  .then(async (resp) => {
    if (resp.ok) setPolicy((await resp.json()).data[0]?.policy_version);
  })
  .catch(() => setStatus("Gateway unreachable.", true));
