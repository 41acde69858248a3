// The search page of `vgskit serve`: record or upload a spoken query, POST it to /search, show the images.
//
// Recording captures PCM with an AudioWorklet (a ScriptProcessor where worklets are missing), mixed down to mono
// at the AudioContext's rate, and encodes it here as a 16-bit PCM WAV: the service decodes WAV, FLAC and Ogg,
// not the WebM that MediaRecorder makes. Every URL is relative to the page, so a path prefix works.

const MAX_SECONDS = 30; // the service's default max_audio_seconds; a longer recording is cut there

const els = Object.fromEntries([
  "query-form", "index", "index-info", "k", "record", "level", "elapsed", "file", "playback", "query-audio",
  "search", "status", "error", "results-title", "timing", "results",
].map((id) => [id.replace(/-(\w)/g, (_, c) => c.toUpperCase()), document.getElementById(id)]));

let indices = [];
let query = null; // {blob, name, label}
let recording = null; // the recording in progress
let searching = false;
let searchAgain = false; // a newer query or setting arrived while a search was running

function showError(message) {
  els.error.textContent = message || "";
  els.error.hidden = !message;
}

function setStatus(message) {
  els.status.textContent = message || "";
}

// The JSON `detail` of an error answer: a string from the service, or FastAPI's list of validation problems.
async function errorMessage(response) {
  let detail = null;
  try {
    detail = (await response.json()).detail;
  } catch {
    // not JSON (a proxy's error page): the status line says enough
  }
  if (Array.isArray(detail)) {
    detail = detail.map((problem) => {
      const where = (problem.loc || []).filter((part) => part !== "query" && part !== "body").join(".");
      return where ? `${where}: ${problem.msg}` : problem.msg;
    }).join("; ");
  } else if (detail != null && typeof detail !== "string") {
    detail = JSON.stringify(detail);
  }
  const status = `Error ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
  return detail ? `${status}: ${detail}` : status;
}

// -- indices ------------------------------------------------------------------------------------------------
async function loadIndices() {
  try {
    const response = await fetch("indices", { headers: { Accept: "application/json" } });
    if (!response.ok) {
      throw new Error(await errorMessage(response));
    }
    const body = await response.json();
    indices = body.indices;
    els.index.replaceChildren(...indices.map((entry) => {
      const option = new Option(`${entry.name} (${entry.count} images)`, entry.name);
      option.selected = entry.name === body.default;
      return option;
    }));
    els.index.disabled = false;
    describeIndex();
  } catch (err) {
    els.index.replaceChildren(new Option("unavailable", ""));
    showError(`Cannot list the indices: ${err.message}`);
  }
}

function describeIndex() {
  const entry = indices.find((item) => item.name === els.index.value);
  els.indexInfo.textContent = entry ? `model ${entry.model.name}, ${entry.embed_dim}-dimensional, `
    + `${entry.index_kind} index${entry.captions ? `, ${entry.captions} spoken captions` : ""}` : "";
}

// -- recording ----------------------------------------------------------------------------------------------
function microphoneError(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was refused: allow it for this page, or upload a recording instead.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found: connect one, or upload a recording instead.";
    case "NotReadableError":
      return "The microphone cannot be read (is another application using it?).";
    default:
      return `Cannot record: ${err && err.message ? err.message : err}`;
  }
}

async function startRecording() {
  showError("");
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("Recording needs a secure page (HTTPS, or the service opened as localhost) in a browser with "
      + "microphone access; upload a recording instead.");
    return;
  }
  els.record.disabled = true;
  let stream = null;
  let context = null;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    context = new AudioContext();
    const state = { stream, context, chunks: [], frames: 0, rate: context.sampleRate, finish: null };
    const source = context.createMediaStreamSource(stream);
    let node;
    if (context.audioWorklet && typeof AudioWorkletNode === "function") {
      await context.audioWorklet.addModule("static/recorder-worklet.js");
      node = new AudioWorkletNode(context, "pcm-capture", { numberOfInputs: 1, numberOfOutputs: 1 });
      let finished;
      const done = new Promise((resolve) => { finished = resolve; });
      node.port.onmessage = (event) => {
        if (event.data.samples) {
          addSamples(state, event.data.samples);
        }
        if (event.data.done) {
          finished();
        }
      };
      state.finish = () => {
        node.port.postMessage("stop");
        return done;
      };
    } else {
      node = context.createScriptProcessor(4096, 1, 1);
      node.addEventListener("audioprocess", (event) => {
        addSamples(state, new Float32Array(event.inputBuffer.getChannelData(0)));
      });
      state.finish = async () => {};
    }
    source.connect(node);
    node.connect(context.destination); // a processing node must be pulled; it outputs silence
    await context.resume();
    state.nodes = [source, node];
    recording = state;
    els.record.textContent = "Stop";
    els.record.setAttribute("aria-pressed", "true");
    els.record.classList.add("recording");
    els.file.disabled = true;
    els.search.disabled = true;
    setStatus("Recording… press Stop when you are done.");
  } catch (err) {
    if (stream) {
      stream.getTracks().forEach((track) => track.stop());
    }
    if (context) {
      context.close();
    }
    showError(microphoneError(err));
  } finally {
    els.record.disabled = false;
  }
}

function addSamples(state, samples) {
  state.chunks.push(samples);
  state.frames += samples.length;
  let peak = 0;
  for (let i = 0; i < samples.length; i++) {
    peak = Math.max(peak, Math.abs(samples[i]));
  }
  els.level.value = Math.min(1, peak);
  els.elapsed.textContent = `${(state.frames / state.rate).toFixed(1)} s`;
  if (state === recording && state.frames >= MAX_SECONDS * state.rate) {
    stopRecording();
  }
}

async function stopRecording() {
  const state = recording;
  if (!state) {
    return;
  }
  recording = null;
  els.record.disabled = true;
  try {
    await state.finish();
  } finally {
    state.nodes.forEach((node) => node.disconnect());
    state.stream.getTracks().forEach((track) => track.stop());
    state.context.close();
    els.record.textContent = "Record";
    els.record.setAttribute("aria-pressed", "false");
    els.record.classList.remove("recording");
    els.record.disabled = false;
    els.file.disabled = false;
    els.search.disabled = false;
    els.level.value = 0;
  }
  const frames = Math.min(state.frames, Math.floor(MAX_SECONDS * state.rate));
  const seconds = frames / state.rate;
  els.elapsed.textContent = `${seconds.toFixed(1)} s`;
  if (frames === 0) {
    showError("Nothing was recorded: the microphone sent no sound.");
    setStatus("");
    return;
  }
  els.file.value = "";
  useQuery(encodeWav(state.chunks, frames, state.rate), "recording.wav",
    `your ${seconds.toFixed(1)} s recording`);
}

// 16-bit PCM mono WAV of the first `frames` samples of `chunks` (Float32Arrays in [-1, 1]).
function encodeWav(chunks, frames, rate) {
  const buffer = new ArrayBuffer(44 + frames * 2);
  const view = new DataView(buffer);
  const ascii = (offset, text) => {
    for (let i = 0; i < text.length; i++) {
      view.setUint8(offset + i, text.charCodeAt(i));
    }
  };
  ascii(0, "RIFF");
  view.setUint32(4, 36 + frames * 2, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  view.setUint32(16, 16, true); // fmt chunk size
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, rate, true);
  view.setUint32(28, rate * 2, true); // bytes per second
  view.setUint16(32, 2, true); // bytes per frame
  view.setUint16(34, 16, true); // bits per sample
  ascii(36, "data");
  view.setUint32(40, frames * 2, true);
  let offset = 44;
  let left = frames;
  for (const chunk of chunks) {
    const n = Math.min(chunk.length, left);
    for (let i = 0; i < n; i++) {
      const s = Math.max(-1, Math.min(1, chunk[i]));
      view.setInt16(offset, s < 0 ? s * 0x8000 : s * 0x7fff, true);
      offset += 2;
    }
    left -= n;
    if (left === 0) {
      break;
    }
  }
  return new Blob([buffer], { type: "audio/wav" });
}

// -- searching ----------------------------------------------------------------------------------------------
function useQuery(blob, name, label) {
  if (els.queryAudio.src) {
    URL.revokeObjectURL(els.queryAudio.src);
  }
  query = { blob, name, label };
  els.queryAudio.src = URL.createObjectURL(blob);
  els.playback.hidden = false;
  search();
}

async function search() {
  if (!query) {
    showError("Record or upload a spoken query first.");
    return;
  }
  if (recording) {
    return;
  }
  if (searching) {
    searchAgain = true;
    return;
  }
  const params = new URLSearchParams();
  const k = els.k.value.trim();
  if (k) {
    params.set("k", k);
  }
  if (els.index.value) {
    params.set("index", els.index.value);
  }
  const form = new FormData();
  form.append("audio", query.blob, query.name);
  searching = true;
  els.search.disabled = true;
  showError("");
  setStatus(`Searching with ${query.label}…`);
  const started = performance.now();
  try {
    const response = await fetch(`search?${params}`, {
      method: "POST", body: form, headers: { Accept: "application/json" },
    });
    if (!response.ok) {
      showResults(null);
      setStatus("");
      showError(await errorMessage(response));
      return;
    }
    showResults(await response.json(), performance.now() - started);
  } catch (err) {
    showResults(null);
    setStatus("");
    showError(`The search service cannot be reached: ${err.message}`);
  } finally {
    searching = false;
    els.search.disabled = false;
    if (searchAgain) {
      searchAgain = false;
      search();
    }
  }
}

function showResults(body, roundTripMs) {
  if (!body) {
    els.results.replaceChildren();
    els.resultsTitle.textContent = "Results";
    els.timing.textContent = "";
    return;
  }
  els.results.replaceChildren(...body.hits.map((hit) => {
    const item = document.createElement("li");
    item.className = "hit";
    item.dataset.rank = hit.rank;
    item.dataset.id = hit.id;
    item.dataset.score = hit.score;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.alt = `Image ${hit.id}, rank ${hit.rank}`;
    img.decoding = "async";
    img.addEventListener("error", () => {
      figure.classList.add("missing");
      img.alt = `The image of ${hit.id} could not be loaded`;
    }, { once: true });
    img.src = hit.image_url;
    const caption = document.createElement("figcaption");
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const id = document.createElement("span");
    id.className = "id";
    id.textContent = hit.id;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `score ${hit.score.toFixed(4)}`;
    caption.append(rank, " ", id, " ", score);
    figure.append(img, caption);
    item.append(figure);
    const entry = indices.find((candidate) => candidate.name === body.index);
    if (entry && entry.captions > 0) {
      item.append(captionsButton(body.index, hit.id));
    }
    return item;
  }));
  const n = body.hits.length;
  els.resultsTitle.textContent = `Results: ${n} image${n === 1 ? "" : "s"} from ${body.index}`;
  const t = body.timing_ms;
  els.timing.textContent = `Server: decode ${t.decode} ms, resample ${t.resample} ms, encode ${t.encode} ms, `
    + `search ${t.search} ms; round trip ${Math.round(roundTripMs)} ms.`;
  setStatus(`Found ${n} image${n === 1 ? "" : "s"} for ${query.label}.`);
}

// -- image -> spoken captions ---------------------------------------------------------------------------------
// For an index that holds captions: a button under each image lists its nearest spoken captions, with players.
function captionsButton(index, imageId) {
  const box = document.createElement("div");
  box.className = "captions";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "captions-button";
  button.textContent = "Spoken captions";
  const list = document.createElement("ol");
  list.className = "caption-list";
  list.setAttribute("aria-label", `Spoken captions nearest to image ${imageId}`);
  button.addEventListener("click", () => showCaptions(index, imageId, list, button));
  box.append(button, list);
  return box;
}

async function showCaptions(index, imageId, list, button) {
  button.disabled = true;
  showError("");
  try {
    const k = Math.max(1, Math.min(5, Number(els.k.value) || 5));
    const response = await fetch(`search/image?${new URLSearchParams({ index, k })}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ id: imageId }),
    });
    if (!response.ok) {
      throw new Error(await errorMessage(response));
    }
    const body = await response.json();
    list.replaceChildren(...body.hits.map((hit) => {
      const item = document.createElement("li");
      item.className = "caption-hit";
      item.dataset.id = hit.id;
      item.dataset.score = hit.score;
      const label = document.createElement("span");
      label.textContent = `${hit.id} (score ${hit.score.toFixed(3)})`;
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.preload = "none";
      audio.src = hit.audio_url;
      item.append(label, audio);
      return item;
    }));
  } catch (err) {
    showError(`Cannot find spoken captions for ${imageId}: ${err.message}`);
  } finally {
    button.disabled = false;
  }
}

// -- wiring -------------------------------------------------------------------------------------------------
els.record.addEventListener("click", () => (recording ? stopRecording() : startRecording()));
els.file.addEventListener("change", () => {
  const file = els.file.files[0];
  if (file) {
    showError("");
    useQuery(file, file.name, `“${file.name}”`);
  }
});
els.queryForm.addEventListener("submit", (event) => {
  event.preventDefault();
  search();
});
els.index.addEventListener("change", () => {
  describeIndex();
  if (query) {
    search();
  }
});
loadIndices();
