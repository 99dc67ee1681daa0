// A minimal ChatGPT-style client for llm-backend, written for the browser end-to-end test.
//
// Query string: ?base=<API base URL, e.g. http://127.0.0.1:8080>&key=<API key>[&model=<preferred model>]
// Like chatbot-ui and friends, every turn POSTs the WHOLE history to {base}/v1/chat/completions with
// stream: true, reads the SSE body with fetch + getReader(), and appends choices[0].delta.content as it
// arrives. The page's state is exposed for the driver on <body>: data-state (loading-models | ready |
// streaming | error), data-turns (completed assistant replies) and data-errors (errors shown in #errors).
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const base = (params.get("base") || "").replace(/\/+$/, "");
  const apiKey = params.get("key") || "";
  const preferredModel = params.get("model") || "";

  const $ = (id) => document.getElementById(id);
  const modelSelect = $("model");
  const input = $("input");
  const sendButton = $("send");
  const transcript = $("transcript");
  const errorList = $("errors");
  const statusLine = $("status");

  /** The conversation as the API sees it: [{role, content}, …]. */
  const history = [];
  let completedTurns = 0;

  function setState(state, status) {
    document.body.dataset.state = state;
    statusLine.textContent = status;
    sendButton.disabled = state !== "ready";
  }

  function showError(message) {
    const item = document.createElement("li");
    item.className = "error";
    item.textContent = message;
    errorList.appendChild(item);
    document.body.dataset.errors = String(errorList.children.length);
    console.error("[chat] " + message);
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (apiKey) h["Authorization"] = "Bearer " + apiKey;
    return h;
  }

  function addBubble(role, text) {
    const bubble = document.createElement("div");
    bubble.className = "msg " + role;
    bubble.dataset.role = role;
    const label = document.createElement("span");
    label.className = "role";
    label.textContent = role;
    const body = document.createElement("span");
    body.className = "content";
    body.textContent = text;
    bubble.append(label, body);
    transcript.appendChild(bubble);
    bubble.scrollIntoView({ block: "end" });
    return body;
  }

  async function errorMessageOf(response) {
    const text = await response.text();
    try {
      const parsed = JSON.parse(text);
      if (parsed && parsed.error && parsed.error.message) return parsed.error.message;
    } catch (_) {
      // not JSON: fall through to the raw text
    }
    return text || response.statusText;
  }

  async function loadModels() {
    if (!base) {
      setState("error", "no API base");
      showError("no ?base= in the page URL");
      return;
    }
    try {
      const response = await fetch(base + "/v1/models", { headers: headers() });
      if (!response.ok) {
        throw new Error("GET /v1/models: HTTP " + response.status + ": " + (await errorMessageOf(response)));
      }
      const list = await response.json();
      const ids = (list.data || []).map((m) => m.id).sort();
      if (ids.length === 0) throw new Error("GET /v1/models returned no models");
      for (const id of ids) {
        const option = document.createElement("option");
        option.value = option.textContent = id;
        modelSelect.appendChild(option);
      }
      if (ids.includes(preferredModel)) modelSelect.value = preferredModel;
      modelSelect.disabled = false;
      modelSelect.dataset.count = String(ids.length);
      setState("ready", ids.length + " model(s)");
    } catch (err) {
      setState("error", "could not load models");
      showError(String(err && err.message ? err.message : err));
    }
  }

  /** Handle one SSE event: [DONE] ends the reply; anything after it is an error. */
  function handleEvent(eventName, data, target, reply) {
    if (reply.done) {
      showError("data after [DONE]: " + data.slice(0, 200));
      return;
    }
    if (data === "[DONE]") {
      reply.done = true;
      return;
    }
    let chunk;
    try {
      chunk = JSON.parse(data);
    } catch (_) {
      showError("unparseable stream event: " + data.slice(0, 200));
      return;
    }
    if (eventName === "error" || (chunk && chunk.error)) {
      // the gateway passes an upstream's error event on (then [DONE]): show its message
      const err = chunk.error || chunk;
      showError("error event: " + (err.message || JSON.stringify(err)));
      reply.failed = true;
      return;
    }
    const choice = chunk && Array.isArray(chunk.choices) ? chunk.choices[0] : undefined;
    if (!choice) {
      // an OpenAI client indexes choices[0] blindly: such a chunk must never reach it
      showError("chunk without choices[0]: " + data.slice(0, 200));
      return;
    }
    const piece = choice.delta && typeof choice.delta.content === "string" ? choice.delta.content : "";
    if (piece) {
      reply.text += piece;
      reply.chunks += 1;
      target.textContent = reply.text;
    }
    if (choice.finish_reason) reply.finishReason = choice.finish_reason;
  }

  async function streamReply(model, target) {
    const reply = { text: "", chunks: 0, done: false, failed: false, finishReason: null };
    const response = await fetch(base + "/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: model, messages: history, stream: true }),
    });
    if (!response.ok) {
      throw new Error("HTTP " + response.status + ": " + (await errorMessageOf(response)));
    }
    // Read to the end of the body (the server closes it right after [DONE]); cancelling the reader at
    // [DONE] instead would race the end of the chunked body and abort the request in the browser.
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let eventName = "";
    let dataLines = [];
    const flush = () => {
      if (dataLines.length) handleEvent(eventName, dataLines.join("\n"), target, reply);
      eventName = "";
      dataLines = [];
    };
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          flush(); // a blank line ends the event
        } else if (line.startsWith("data:")) {
          dataLines.push(line.slice(5).replace(/^ /, ""));
        } else if (line.startsWith("event:")) {
          eventName = line.slice(6).trim();
        }
        // ids, retry fields and ":" comments are ignored
      }
      if (done) break;
    }
    if (buffer.startsWith("data:")) dataLines.push(buffer.slice(5).replace(/^ /, "").replace(/\r$/, ""));
    flush(); // an event the server did not terminate with a blank line
    if (!reply.done) showError("the stream ended without [DONE]");
    return reply;
  }

  async function send(event) {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || document.body.dataset.state !== "ready") return;
    input.value = "";
    const model = modelSelect.value;
    history.push({ role: "user", content: text });
    addBubble("user", text);
    const target = addBubble("assistant", "");
    const bubble = target.parentElement;
    bubble.classList.add("streaming");
    setState("streaming", "streaming from " + model + "…");
    try {
      const reply = await streamReply(model, target);
      bubble.dataset.chunks = String(reply.chunks);
      if (reply.done && !reply.failed) {
        history.push({ role: "assistant", content: reply.text });
        bubble.dataset.complete = "true";
        completedTurns += 1;
        document.body.dataset.turns = String(completedTurns);
      } else {
        bubble.dataset.complete = "false";
        history.pop(); // the turn failed: let the user retry it
      }
    } catch (err) {
      bubble.dataset.complete = "false";
      history.pop();
      showError(String(err && err.message ? err.message : err));
    } finally {
      bubble.classList.remove("streaming");
      setState("ready", completedTurns + " turn(s) · " + model);
      input.focus();
    }
  }

  document.getElementById("composer").addEventListener("submit", send);
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  loadModels();
})();
