"""The chat page served at `/`: one HTML file with its script, no build step. It keeps the
conversation, streams each reply from /v1/chat/completions (server-sent events read with
fetch), and shows the reply's tokens per second."""

CHAT_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>llmstack chat</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 46rem; margin: 1rem auto; padding: 0 1rem; color: #222; }
  header { display: flex; justify-content: space-between; align-items: baseline; }
  #messages { border: 1px solid #ccc; border-radius: 6px; padding: .5rem; height: 60vh; overflow-y: auto; }
  .msg { margin: .4rem 0; white-space: pre-wrap; }
  .user { color: #0645ad; } .user::before { content: "you: "; font-weight: bold; }
  .assistant::before { content: "model: "; font-weight: bold; }
  .error { color: #b00; }
  form { display: flex; gap: .5rem; margin-top: .5rem; }
  #input { flex: 1; padding: .4rem; }
  #settings { margin-top: .5rem; font-size: .9rem; display: flex; gap: 1rem; align-items: center; }
  #settings input { width: 5rem; }
  #stats { font-size: .9rem; color: #555; }
</style>
</head>
<body>
<header><h2>llmstack chat</h2><span id="model">{{MODEL}}</span></header>
<div id="messages"></div>
<form id="form">
  <input id="input" autocomplete="off" placeholder="Type a message" autofocus>
  <button id="send" type="submit">Send</button>
</form>
<div id="settings">
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" step="1" value="128"></label>
  <label>API key <input id="api-key" type="password" placeholder="(none)"></label>
  <button id="clear" type="button">Clear</button>
  <span id="stats"></span>
</div>
<script>
const conversation = [];
const messages = document.getElementById("messages");
const form = document.getElementById("form");
const input = document.getElementById("input");
const send = document.getElementById("send");
const stats = document.getElementById("stats");

function show(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  messages.appendChild(div);
  messages.scrollTop = messages.scrollHeight;
  return div;
}

document.getElementById("clear").onclick = () => { conversation.length = 0; messages.textContent = ""; stats.textContent = ""; };

form.onsubmit = async (event) => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  conversation.push({role: "user", content: text});
  show("user", text);
  const reply = show("assistant", "");
  reply.id = "reply-" + conversation.length;
  send.disabled = true;
  const headers = {"Content-Type": "application/json"};
  const key = document.getElementById("api-key").value;
  if (key) headers["Authorization"] = "Bearer " + key;
  const started = performance.now();
  let first = null, tokens = 0, answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify({
      messages: conversation, stream: true, stream_options: {include_usage: true},
      temperature: parseFloat(document.getElementById("temperature").value),
      max_tokens: parseInt(document.getElementById("max-tokens").value, 10),
    })});
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || response.statusText);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "", done = false;
    while (!done) {
      const part = await reader.read();
      if (part.done) break;
      buffer += decoder.decode(part.value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, end).trim();
        buffer = buffer.slice(end + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { done = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) { tokens = chunk.usage.completion_tokens; continue; }
        for (const choice of chunk.choices) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            if (first === null) first = performance.now();
            tokens += 1;
            answer += piece;
            reply.textContent = answer;
          }
        }
        const seconds = (performance.now() - (first || started)) / 1000;
        stats.textContent = tokens + " tokens, " + (seconds > 0 ? (tokens / seconds).toFixed(1) : "-") + " tokens/s";
      }
    }
    conversation.push({role: "assistant", content: answer});
    const total = (performance.now() - started) / 1000;
    stats.textContent = tokens + " tokens in " + total.toFixed(2) + " s, " + (tokens / total).toFixed(1) +
      " tokens/s, first token after " + (((first || performance.now()) - started) / 1000).toFixed(2) + " s";
    reply.dataset.done = "1";
  } catch (err) {
    reply.className = "msg error";
    reply.textContent = "error: " + err.message;
    reply.dataset.done = "1";
    conversation.pop();
  } finally {
    send.disabled = false;
    input.focus();
  }
};
</script>
</body>
</html>
"""
