// The public API with the pasted key: JSON calls, face images as object URLs, job event streams.
const KEY = "magtune.console.key";

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set key(value) { value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.type = (this.problem.type || "").split("/").pop();
  }
}

function headers(json) {
  const h = { Authorization: `Bearer ${session.key}` };
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function failure(response) {
  let problem = null;
  try { problem = await response.json(); } catch { /* not JSON */ }
  return new ApiError(response.status, problem);
}

export async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

// Face images need the key, so an <img src> cannot load them: fetched as blobs, shown as object URLs.
const images = new Map();

export function faceImage(faceId) {
  if (!images.has(faceId)) {
    const url = fetch(`/v1/faces/${faceId}/image`, { headers: headers(false) }).then(async (response) => {
      if (!response.ok) throw await failure(response);
      return URL.createObjectURL(await response.blob());
    });
    url.catch(() => images.delete(faceId));
    images.set(faceId, url);
  }
  return images.get(faceId);
}

export function forgetImage(faceId) {
  const url = images.get(faceId);
  images.delete(faceId);
  url?.then((u) => URL.revokeObjectURL(u), () => {});
}

// A job's server-sent events. EventSource cannot send the Authorization header, so this reads the stream
// with fetch(); it resumes with Last-Event-ID when the server closes the stream before the job's end.
export async function followJob(jobId, onEvent, signal) {
  let lastId = null;
  for (;;) {
    const h = headers(false);
    if (lastId !== null) h["Last-Event-ID"] = lastId;
    const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: h, signal });
    if (!response.ok) throw await failure(response);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const event = {};
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue;
          const at = line.indexOf(": ");
          if (at > 0) event[line.slice(0, at)] = line.slice(at + 2);
        }
        if (!event.event) continue;
        if (event.id) lastId = event.id;
        const data = JSON.parse(event.data);
        onEvent(event.event, data);
        if (event.event === "end" || event.event === "gone") return data;
      }
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
