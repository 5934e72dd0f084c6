// The web chat: streams answers over SSE from /v1/chat/completions, sends thumbs and
// comparisons to /v1/feedback. No framework, no build step.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  messages: [],          // the conversation sent with each request
  conversationId: null,  // assigned by the gateway on the first answer
  busy: false,
  pendingPick: null,     // a comparison turn not yet decided: {texts, ids, nodes}
};

function apiKey() { return localStorage.getItem("rlhf-api-key") || ""; }

async function api(path, body) {
  const headers = { "content-type": "application/json" };
  if (apiKey()) headers.authorization = "Bearer " + apiKey();
  const resp = await fetch(path, body === undefined ? { headers } : { method: "POST", headers, body: JSON.stringify(body) });
  if (resp.status === 401) {
    const key = prompt("This gateway needs an API key:");
    if (key) { localStorage.setItem("rlhf-api-key", key.trim()); return api(path, body); }
  }
  return resp;
}

async function errorText(resp) {
  try { return (await resp.json()).error.message; } catch { return `HTTP ${resp.status}`; }
}

function setStatus(text, isError = false) {
  const el = $("#status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function setPolicy(version) {
  if (version !== undefined && version !== null) $("#policy").textContent = `policy v${version}`;
}

function scrollDown() { window.scrollTo({ top: document.body.scrollHeight }); }

function addUser(text) {
  $("#empty")?.remove();
  const node = $("#tpl-user").content.firstElementChild.cloneNode(true);
  node.querySelector(".bubble").textContent = text;
  $("#log").append(node);
}

function addTurn(n) {
  const turn = document.createElement("div");
  turn.className = "turn" + (n > 1 ? " compare" : "");
  const answers = [];
  for (let i = 0; i < n; i++) {
    const node = $("#tpl-answer").content.firstElementChild.cloneNode(true);
    node.querySelector(".tag").textContent = n > 1 ? `Answer ${"AB"[i] ?? i + 1}` : "";
    const text = node.querySelector(".text");
    answers.push({ node, text: "", textEl: text, cursor: text.querySelector(".cursor"), id: null });
    turn.append(node);
  }
  $("#log").append(turn);
  return answers;
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

async function send(text) {
  settlePendingPick();
  state.busy = true;
  $("#send").disabled = true;
  setStatus("");
  addUser(text);
  state.messages.push({ role: "user", content: text });
  const n = $("#compare").checked ? 2 : 1;
  const answers = addTurn(n);
  scrollDown();
  let version = null;
  try {
    const resp = await api("/v1/chat/completions", {
      model: "default", messages: state.messages, n, stream: true,
      conversation_id: state.conversationId ?? undefined,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const chunk of sse(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      state.conversationId = chunk.conversation_id;
      version = chunk.policy_version;
      setPolicy(version);
      for (const choice of chunk.choices) {
        const a = answers[choice.index];
        a.id = choice.response_id;
        const piece = choice.delta?.content;
        if (piece) {
          a.text += piece;
          a.cursor.before(piece);
          scrollDown();
        }
      }
    }
    finishTurn(answers, version);
  } catch (err) {
    state.messages.pop();
    for (const a of answers) {
      a.node.classList.add("done");
      a.textEl.classList.add("error-text");
      if (!a.text) a.textEl.textContent = "No answer: " + err.message;
    }
    setStatus(err.message, true);
  } finally {
    state.busy = false;
    $("#send").disabled = false;
    $("#prompt").focus();
  }
}

function finishTurn(answers, version) {
  for (const a of answers) {
    a.node.classList.add("done");
    a.node.dataset.responseId = a.id;
    a.node.querySelector(".version").textContent = `v${version}`;
    if (!a.text) a.textEl.textContent = "(empty answer)";
  }
  if (answers.length === 1) {
    const a = answers[0];
    state.messages.push({ role: "assistant", content: a.text });
    for (const [cls, value] of [[".thumb-up", 1], [".thumb-down", -1]]) {
      const btn = a.node.querySelector(cls);
      btn.disabled = false;
      btn.addEventListener("click", () => rate(a, value, btn));
    }
    return;
  }
  state.pendingPick = { answers };
  setStatus("Pick the better answer; it continues the conversation.");
  answers.forEach((a, i) => {
    const btn = a.node.querySelector(".pick");
    btn.disabled = false;
    btn.addEventListener("click", () => pick(answers, i));
  });
}

async function postFeedback(body) {
  const resp = await api("/v1/feedback", { ...body, source: "web", event_id: crypto.randomUUID() });
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

async function rate(a, value, btn) {
  for (const b of a.node.querySelectorAll(".icon")) b.disabled = true;
  try {
    await postFeedback({ kind: "rating", response_id: a.id, value });
    btn.classList.add("chosen");
    setStatus(value > 0 ? "Thanks — marked as a good answer." : "Thanks — marked as a bad answer.");
  } catch (err) {
    for (const b of a.node.querySelectorAll(".icon")) b.disabled = false;
    setStatus("Feedback not saved: " + err.message, true);
  }
}

async function pick(answers, chosen) {
  for (const a of answers) a.node.querySelector(".pick").disabled = true;
  const rejected = chosen === 0 ? 1 : 0;
  try {
    await postFeedback({ kind: "comparison", chosen_id: answers[chosen].id, rejected_id: answers[rejected].id });
  } catch (err) {
    for (const a of answers) a.node.querySelector(".pick").disabled = false;
    setStatus("Feedback not saved: " + err.message, true);
    return;
  }
  answers[chosen].node.classList.add("picked");
  answers[chosen].node.querySelector(".pick").textContent = "Preferred";
  answers[rejected].node.classList.add("not-picked");
  state.pendingPick = null;
  state.messages.push({ role: "assistant", content: answers[chosen].text });
  setStatus(`Thanks — answer ${"AB"[chosen]} preferred.`);
}

// Sending again without picking continues with answer A, and records no preference.
function settlePendingPick() {
  if (!state.pendingPick) return;
  const { answers } = state.pendingPick;
  for (const a of answers) a.node.querySelector(".pick").disabled = true;
  state.messages.push({ role: "assistant", content: answers[0].text });
  state.pendingPick = null;
}

function newChat() {
  state.messages = [];
  state.conversationId = null;
  state.pendingPick = null;
  $("#log").replaceChildren();
  setStatus("");
  $("#prompt").focus();
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
$("#new-chat").addEventListener("click", newChat);

api("/v1/models").then(async (resp) => {
  if (resp.ok) setPolicy((await resp.json()).data[0]?.policy_version);
}).catch(() => setStatus("Gateway unreachable.", true));
