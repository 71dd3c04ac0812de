// The service's web page: speak, download, voices. Plain browser JavaScript, no build step, no
// third-party code; it talks only to the origin that served it.
"use strict";

const PCM_RATE = 24000; // what response_format "pcm" is: 24 kHz, 16-bit little-endian, mono
const LEAD_S = 0.05; // how far ahead of "now" the first piece is scheduled
const KEY_NAME = "tts-api-key";
const EXTENSIONS = { mp3: "mp3", opus: "opus", flac: "flac", wav: "wav", pcm: "pcm" };
const MAX_RECORD_S = 30;

const $ = (id) => document.getElementById(id);
const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
const maxChars = Number(meta("tts-max-text-chars"));
const keysRequired = meta("tts-api-keys") === "required";
const page = { model: "tts-1", caps: null, abort: null, player: null, ctx: null, resultUrl: null };

class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

// ---- API key: sessionStorage, or localStorage when remembered; only ever sent as a header.

function storedKey() {
  return localStorage.getItem(KEY_NAME) ?? sessionStorage.getItem(KEY_NAME) ?? "";
}

function showKeySection() {
  $("key-section").hidden = false;
}

function saveKey() {
  const key = $("api-key").value.trim();
  localStorage.removeItem(KEY_NAME);
  sessionStorage.removeItem(KEY_NAME);
  if (key) ($("remember-key").checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
}

function authHeaders(extra = {}) {
  const headers = new Headers(extra);
  const key = $("api-key").value.trim();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

// ---- Requests and errors: every failure ends in the error box with the API's code.

async function errorOf(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "The request failed.";
  try {
    const body = await response.json();
    if (body && body.error && body.error.code) {
      code = String(body.error.code);
      message = String(body.error.message ?? message);
    }
  } catch {
    // Not JSON (a proxy's own page): keep the status.
  }
  if (response.status === 401) showKeySection();
  return new ApiError(response.status, code, message, response.headers.get("Retry-After"));
}

async function api(path, init = {}) {
  let response;
  try {
    // The default cache mode: "no-store" would make the browser send Cache-Control: no-cache,
    // which the service reads as a request to bypass its audio cache.
    response = await fetch(path, { ...init, headers: authHeaders(init.headers) });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", `The service could not be reached (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

function showError(error) {
  const code = error.code ?? "client_error";
  let message = error.message || "Something went wrong.";
  if (error.retryAfter) message += ` Retry after ${error.retryAfter} s.`;
  $("error-code").textContent = code;
  $("error-message").textContent = message;
  $("error").dataset.code = code;
  $("error").hidden = false;
  setStatus(`Failed: ${code}.`);
}

function clearError() {
  $("error").hidden = true;
  $("error").dataset.code = "";
  $("error-code").textContent = "";
  $("error-message").textContent = "";
}

function setStatus(text) {
  $("status").textContent = text;
}

// ---- Models and voices

async function loadModels() {
  const body = await (await api("/v1/models")).json();
  const models = body.data ?? [];
  if (!models.length) throw new ApiError(0, "no_models", "The service lists no models.");
  const chosen = models.find((m) => m.id === "tts-1") ?? models[0];
  page.model = chosen.id;
  page.caps = chosen.capabilities;
  const caps = page.caps;
  $("engine").textContent =
    `Engine ${caps.engine}, model ${caps.model} (${caps.model_version}), ` +
    `${caps.sample_rate} Hz, languages: ${caps.languages.join(", ")}.`;
  const [low, high] = caps.speed_range;
  $("speed").min = String(low);
  $("speed").max = String(high);
  $("instructions-row").hidden = !caps.supports_instructions;
  $("instructions").disabled = !caps.supports_instructions;
  $("instructions-note").hidden = caps.supports_instructions;
  $("instructions-note").textContent =
    `The ${caps.engine} engine takes no instructions; the text is read as it is.`;
  $("register-fields").disabled = !caps.supports_cloning;
  $("clone-note").hidden = caps.supports_cloning;
  $("clone-note").textContent = caps.supports_cloning
    ? ""
    : `The ${caps.engine} engine cannot clone voices, so recordings cannot be registered here; ` +
      "use one of its built-in voices (an engine such as cosyvoice can clone).";
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

const VOICE_PAGES = 50;

async function loadVoices() {
  // The listing is paged: follow `last_id` while `has_more` (bounded, for a huge registry).
  const body = await (await api("/v1/voices?limit=100")).json();
  const voices = [...(body.data ?? [])];
  let page = body;
  for (let n = 1; page.has_more && page.last_id && n < VOICE_PAGES; n++) {
    page = await (await api(`/v1/voices?limit=100&after=${encodeURIComponent(page.last_id)}`)).json();
    voices.push(...(page.data ?? []));
  }
  const select = $("voice");
  const previous = select.value;
  const groups = {
    builtin: Object.assign(document.createElement("optgroup"), { label: "Engine voices" }),
    openai: Object.assign(document.createElement("optgroup"), { label: "OpenAI voice names" }),
    registered: Object.assign(document.createElement("optgroup"), { label: "Registered voices" }),
  };
  let fallback = "";
  for (const voice of voices) {
    if (voice.type === "registered") {
      groups.registered.append(option(voice.id, `${voice.name} (${voice.id})`));
    } else {
      const label = `${voice.name} (${voice.id}, ${voice.language})${voice.default ? ", default" : ""}`;
      groups.builtin.append(option(voice.id, label));
      if (voice.default || !fallback) fallback = voice.id;
    }
  }
  for (const [name, target] of Object.entries(body.openai_aliases ?? {})) {
    groups.openai.append(option(name, `${name} → ${target}`));
  }
  select.replaceChildren(...Object.values(groups).filter((g) => g.children.length));
  const values = [...select.options].map((o) => o.value);
  select.value = values.includes(previous) ? previous : fallback || values[0] || "";
  renderRegistered(voices.filter((v) => v.type === "registered"));
}

function renderRegistered(voices) {
  const rows = voices.map((voice) => {
    const row = document.createElement("tr");
    const created = new Date(voice.created_at * 1000).toLocaleString();
    for (const text of [voice.id, voice.name, created]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    const cell = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Delete";
    button.setAttribute("aria-label", `Delete voice ${voice.id}`);
    button.addEventListener("click", () => deleteVoice(voice.id));
    cell.append(button);
    row.append(cell);
    return row;
  });
  $("registered").replaceChildren(...rows);
  $("registered-empty").hidden = rows.length > 0;
}

async function deleteVoice(id) {
  clearError();
  try {
    await api(`/v1/voices/${encodeURIComponent(id)}`, { method: "DELETE" });
    setStatus(`Deleted voice ${id}.`);
    await loadVoices();
  } catch (error) {
    showError(error);
  }
}

// ---- Text counter

function normalizedLength() {
  return [...$("text").value.normalize("NFC").trim()].length;
}

function updateCount() {
  const count = normalizedLength();
  const over = count > maxChars;
  $("text-count").textContent = over
    ? `${count} / ${maxChars} characters: too long, the service will refuse it`
    : `${count} / ${maxChars} characters`;
  $("text-count").classList.toggle("over", over);
}

// ---- Playback: PCM pieces scheduled back to back on Web Audio as they arrive

class PcmPlayer {
  constructor(context, rate) {
    this.context = context;
    this.rate = rate;
    this.carry = null; // an odd byte left from the previous piece
    this.next = 0; // context time at which the next piece starts
    this.sources = new Set();
    this.parts = [];
    this.samples = 0;
    this.played = 0; // seconds of audio whose playback ended
    this.gaps = 0; // pieces that arrived after the previous one had finished playing
    this.finished = false;
    this.ended = new Promise((resolve) => (this.resolveEnded = resolve));
  }

  /** Schedule one piece of the stream; returns the seconds until it starts, or null. */
  push(bytes) {
    let data = bytes;
    if (this.carry) {
      data = new Uint8Array(this.carry.length + bytes.length);
      data.set(this.carry);
      data.set(bytes, this.carry.length);
      this.carry = null;
    }
    const usable = data.length - (data.length % 2);
    if (usable < data.length) this.carry = data.slice(usable);
    if (usable === 0) return null;
    const piece = data.slice(0, usable);
    const view = new DataView(piece.buffer);
    const count = usable / 2;
    const buffer = this.context.createBuffer(1, count, this.rate);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < count; i += 1) channel[i] = view.getInt16(2 * i, true) / 32768;
    this.parts.push(piece);
    this.samples += count;
    const now = this.context.currentTime;
    if (this.next > 0 && this.next < now) this.gaps += 1;
    const start = Math.max(this.next, now + LEAD_S);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    source.onended = () => {
      this.played += buffer.duration;
      this.sources.delete(source);
      this.settle();
    };
    this.sources.add(source);
    source.start(start);
    this.next = start + buffer.duration;
    return start - now;
  }

  get duration() {
    return this.samples / this.rate;
  }

  finish() {
    this.finished = true;
    this.settle();
  }

  stop() {
    for (const source of this.sources) {
      source.onended = null;
      try {
        source.stop();
      } catch {
        // never started
      }
    }
    this.sources.clear();
    this.finish();
  }

  settle() {
    if (this.finished && this.sources.size === 0) this.resolveEnded();
  }

  wav() {
    return wavBlob(this.parts, this.samples, this.rate);
  }
}

function wavBlob(parts, samples, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (offset, value) => [...value].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  text(0, "RIFF");
  header.setUint32(4, 36 + samples * 2, true);
  text(8, "WAVE");
  text(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  text(36, "data");
  header.setUint32(40, samples * 2, true);
  return new Blob([header.buffer, ...parts], { type: "audio/wav" });
}

function audioContext() {
  page.ctx ??= new AudioContext({ latencyHint: "interactive" });
  return page.ctx;
}

// ---- Speak and download

function speechHeaders() {
  const headers = { "Content-Type": "application/json" };
  if ($("bypass-cache").checked) headers["Cache-Control"] = "no-store";
  return headers;
}

function requestBody(format) {
  const body = {
    model: page.model,
    input: $("text").value,
    response_format: format,
    speed: Number($("speed").value),
  };
  if ($("voice").value) body.voice = $("voice").value;
  const instructions = $("instructions").value.trim();
  if (page.caps && page.caps.supports_instructions && instructions) body.instructions = instructions;
  return body;
}

function setFigure(id, text) {
  $(id).textContent = text;
}

function setBusy(busy) {
  $("speak").disabled = busy;
  $("stop").disabled = !busy;
}

function showResult(player) {
  const audio = $("audio");
  if (page.resultUrl) URL.revokeObjectURL(page.resultUrl);
  page.resultUrl = URL.createObjectURL(player.wav());
  audio.src = page.resultUrl;
}

async function speak() {
  clearError();
  stop();
  const audio = $("audio");
  const context = audioContext();
  const abort = new AbortController();
  page.abort = abort;
  const current = () => page.abort === abort; // false once stopped or superseded
  setBusy(true);
  for (const id of ["ttfa", "duration", "cache", "request-id"]) setFigure(id, "…");
  audio.dataset.state = "requesting";
  for (const name of ["playedS", "durationS", "firstAudioMs", "completeMs", "cache"]) delete audio.dataset[name];
  setStatus("Requesting speech…");
  const started = performance.now();
  let player = null;
  try {
    await context.resume();
    const response = await api("/v1/audio/speech", {
      method: "POST",
      headers: speechHeaders(),
      body: JSON.stringify(requestBody("pcm")),
      signal: abort.signal,
    });
    const cache = response.headers.get("X-Cache") ?? "none";
    audio.dataset.cache = cache;
    setFigure("cache", cache);
    setFigure("request-id", response.headers.get("X-Request-ID") ?? "–");
    player = new PcmPlayer(context, Number(response.headers.get("X-Sample-Rate")) || PCM_RATE);
    page.player = player;
    audio.dataset.state = "streaming";
    setStatus("Playing while the audio streams in…");
    const reader = response.body.getReader();
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (error) {
        if (error.name === "AbortError") throw error;
        throw new ApiError(0, "stream_aborted",
          "The audio stream ended before it was complete (the service aborted it); nothing was cached.");
      }
      if (chunk.done) break;
      const lead = player.push(chunk.value);
      if (lead !== null && audio.dataset.firstAudioMs === undefined) {
        const ttfa = performance.now() - started + lead * 1000;
        audio.dataset.firstAudioMs = ttfa.toFixed(0);
        setFigure("ttfa", `${ttfa.toFixed(0)} ms`);
      }
      setFigure("duration", `${player.duration.toFixed(2)} s`);
    }
    const complete = performance.now() - started;
    audio.dataset.completeMs = complete.toFixed(0);
    audio.dataset.durationS = player.duration.toFixed(3);
    if (player.samples === 0) throw new ApiError(0, "empty_audio", "The service sent no audio.");
    player.finish();
    audio.dataset.state = "playing";
    showResult(player);
    await player.ended;
    if (!current()) return;
    audio.dataset.playedS = player.played.toFixed(3);
    audio.dataset.state = "done";
    const gaps = player.gaps ? `, ${player.gaps} gap(s) while waiting for audio` : "";
    setStatus(
      `Played ${player.played.toFixed(2)} s of audio; first audio after ` +
        `${audio.dataset.firstAudioMs} ms, whole response in ${complete.toFixed(0)} ms; ` +
        `X-Cache ${cache}${gaps}.`,
    );
  } catch (error) {
    if (!current()) return; // stop() has said so already
    if (player) player.stop();
    audio.dataset.state = "error";
    showError(error);
  } finally {
    if (current()) {
      page.abort = null;
      page.player = null;
      setBusy(false);
    }
  }
}

/** Stop the request and playback in progress, if any. */
function stop() {
  if (!page.abort) return;
  page.abort.abort();
  page.abort = null;
  if (page.player) page.player.stop();
  page.player = null;
  $("audio").dataset.state = "stopped";
  setStatus("Stopped.");
  setBusy(false);
}

async function download() {
  clearError();
  const format = $("format").value;
  setStatus(`Preparing the ${format} download…`);
  try {
    const response = await api("/v1/audio/speech", {
      method: "POST",
      headers: speechHeaders(),
      body: JSON.stringify(requestBody(format)),
    });
    let blob;
    try {
      blob = await response.blob();
    } catch {
      throw new ApiError(0, "stream_aborted", "The audio stream ended before it was complete.");
    }
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = `speech.${EXTENSIONS[format] ?? format}`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    const cache = response.headers.get("X-Cache") ?? "none";
    setStatus(`Downloaded ${link.download} (${(blob.size / 1024).toFixed(1)} KiB, X-Cache ${cache}).`);
  } catch (error) {
    showError(error);
  }
}

// ---- Voice registration: an uploaded file, or a microphone recording encoded as WAV here

const recording = { recorder: null, blob: null, timer: null, url: null };

function setPrompt(blob) {
  recording.blob = blob;
  if (recording.url) URL.revokeObjectURL(recording.url);
  recording.url = blob ? URL.createObjectURL(blob) : null;
  if (recording.url) $("prompt-preview").src = recording.url;
  else $("prompt-preview").removeAttribute("src");
}

async function toWav(blob) {
  const decoded = await audioContext().decodeAudioData(await blob.arrayBuffer());
  const rate = PCM_RATE;
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * rate), rate);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const rendered = (await offline.startRendering()).getChannelData(0);
  const pcm = new DataView(new ArrayBuffer(rendered.length * 2));
  rendered.forEach((value, i) => pcm.setInt16(2 * i, Math.max(-1, Math.min(1, value)) * 32767, true));
  return wavBlob([pcm.buffer], rendered.length, rate);
}

async function toggleRecording() {
  clearError();
  if (recording.recorder) {
    recording.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    showError(new ApiError(0, "microphone_unavailable",
      "This browser gives no microphone to this page (it needs HTTPS or localhost); upload a file instead."));
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (error) {
    showError(new ApiError(0, "microphone_denied", `The microphone could not be opened (${error.message}).`));
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const begun = performance.now();
  recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
  recorder.addEventListener("stop", async () => {
    clearInterval(recording.timer);
    stream.getTracks().forEach((track) => track.stop());
    recording.recorder = null;
    $("record").textContent = "Record from the microphone";
    try {
      setPrompt(await toWav(new Blob(chunks, { type: recorder.mimeType })));
      $("prompt-file").value = "";
      $("record-state").textContent = `Recorded ${((performance.now() - begun) / 1000).toFixed(1)} s.`;
    } catch (error) {
      showError(new ApiError(0, "recording_failed", `The recording could not be read (${error.message}).`));
    }
  });
  recording.recorder = recorder;
  recorder.start();
  $("record").textContent = "Stop recording";
  recording.timer = setInterval(() => {
    const seconds = (performance.now() - begun) / 1000;
    $("record-state").textContent = `Recording… ${seconds.toFixed(0)} s`;
    if (seconds >= MAX_RECORD_S) recorder.stop();
  }, 250);
}

async function register(event) {
  event.preventDefault();
  clearError();
  const file = $("prompt-file").files[0];
  const prompt = file ?? recording.blob;
  if (!prompt) {
    showError(new ApiError(0, "prompt_missing", "Choose a recording or record one first."));
    return;
  }
  const form = new FormData();
  form.append("prompt_audio", prompt, file ? file.name : "recording.wav");
  for (const [field, id] of [["prompt_text", "prompt-text"], ["name", "voice-name"], ["id", "voice-id"]]) {
    const value = $(id).value.trim();
    if (value) form.append(field, value);
  }
  setStatus("Registering the voice…");
  try {
    const voice = await (await api("/v1/voices", { method: "POST", body: form })).json();
    await loadVoices();
    $("voice").value = voice.id;
    setStatus(`Registered voice ${voice.id}; it is selected.`);
  } catch (error) {
    showError(error);
  }
}

// ---- Start

async function load(attempt = 0) {
  document.body.dataset.ready = "false";
  clearError();
  setStatus("Loading the engine and its voices…");
  try {
    await loadModels();
    await loadVoices();
    setStatus("Ready.");
  } catch (error) {
    showError(error);
    // No worker ready yet, or no gateway: ask again, as the answer's Retry-After says.
    if ([502, 503].includes(error.status) && attempt < 10) {
      const seconds = Number(error.retryAfter) || 2;
      setStatus(`Failed: ${error.code}; asking again in ${seconds} s.`);
      setTimeout(() => load(attempt + 1), seconds * 1000);
    }
  } finally {
    document.body.dataset.ready = "true";
  }
}

function init() {
  const key = storedKey();
  if (key) {
    $("api-key").value = key;
    $("remember-key").checked = localStorage.getItem(KEY_NAME) !== null;
  }
  if (key || keysRequired) showKeySection();
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveKey();
    load();
  });
  $("remember-key").addEventListener("change", saveKey);
  $("forget-key").addEventListener("click", () => {
    $("api-key").value = "";
    saveKey();
    setStatus("The API key is forgotten by this browser.");
  });
  $("speak-form").addEventListener("submit", (event) => {
    event.preventDefault();
    speak();
  });
  $("text").addEventListener("input", updateCount);
  $("text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (!$("speak").disabled) speak();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && page.abort) stop();
  });
  $("stop").addEventListener("click", stop);
  $("download").addEventListener("click", download);
  $("record").addEventListener("click", toggleRecording);
  $("prompt-file").addEventListener("change", () => setPrompt($("prompt-file").files[0] ?? null));
  $("register-form").addEventListener("submit", register);
  updateCount();
  if (keysRequired && !key) {
    setStatus("This service requires an API key: enter it above.");
    document.body.dataset.ready = "true";
    $("api-key").focus();
  } else {
    load();
  }
}

init();
