// "Try it" for the API catalog: pick one of a service's operations, fill in its parameters, and the
// control plane sends the request through the mesh from its own sidecar
// (POST /v1/catalog/{ns}/{name}/try, write scope). The answer shows the status, the headers and the
// body as text, and the request's trace: a link to the traces page and a waterfall drawn here once
// /v1/traces/{id} has the spans (the sidecars ship them within seconds; the panel asks again for a
// minute). Every value from the API or the user goes into the page as text.

import { ApiError, Unauthorized, call, get } from "./api.js";
import { badge, h, link, notice, table } from "./dom.js";
import { s } from "./svg.js";
import { micros } from "./units.js";

const POLL_MS = 1000;
const POLL_TIMES = 60;

// what the API takes as the operation's name: its operationId, or "METHOD /path/template"
function opName(o) {
  return o.operation_id || o.method + " " + o.path;
}

// the path template's parameters, with what the document says of them (a template parameter the
// document forgot is still asked for: the API needs every one)
function parameters(o) {
  const declared = (o.parameters || []).map((p) => ({ ...p }));
  for (const m of o.path.matchAll(/\{([^{}/]*)\}/g)) {
    if (!declared.some((p) => p.in === "path" && p.name === m[1])) declared.push({ in: "path", name: m[1], required: true, type: "" });
  }
  const order = { path: 0, query: 1, header: 2, cookie: 3 };
  return declared.sort((a, b) => order[a.in] - order[b.in]);
}

function fieldErrors(e) {
  return [notice("error", "Not sent: " + e.message),
    e.fields.length ? h("ul", { class: "field-errors" }, e.fields.map((f) => h("li", {}, h("code", {}, f.field), ": " + f.reason))) : null];
}

// "Name: value" lines → {Name: value}; a line without a colon is an error naming its number
function headerLines(text) {
  const out = {};
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i].trim();
    if (!line) continue;
    const colon = line.indexOf(":");
    if (colon <= 0) throw new Error("other headers, line " + (i + 1) + ": expected Name: value");
    out[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
  }
  return out;
}

function flatten(roots) {
  const out = [];
  const stack = [...roots].reverse();
  while (stack.length) {
    const span = stack.pop();
    out.push(span);
    for (const child of [...(span.children || [])].reverse()) stack.push(child);
  }
  return out;
}

function waterfall(trace) {
  const total = Math.max(1, trace.duration_us);
  const rows = flatten(trace.roots).map((span) => {
    const left = (100 * span.offset_us) / total;
    const width = Math.max(0.3, (100 * (span.duration || 0)) / total);
    return h("div", { class: "span-row" + (span.error ? " failed" : ""), "data-service": span.service || "", "data-kind": span.kind || "" },
      h("div", { class: "span-label" },
        h("span", { class: "indent", "data-depth": Math.min(span.depth || 0, 12) }),
        h("span", { class: "service-name" }, span.service || "?"), " ",
        h("span", { class: "span-name" }, span.name || "(unnamed)"),
        span.kind ? h("span", { class: "muted" }, " " + span.kind.toLowerCase()) : null),
      h("div", { class: "span-track" },
        s("svg", { class: "span-bar", width: "100%", height: 16, preserveAspectRatio: "none" },
          s("rect", { x: left + "%", y: 2, width: Math.min(width, 100 - left + 0.3) + "%", height: 12, rx: 2 })),
        h("span", { class: "span-duration" }, micros(span.duration || 0))));
  });
  return h("div", { class: "card waterfall", id: "tryit-waterfall" },
    h("div", { class: "span-row axis" }, h("div", { class: "span-label muted" }, trace.span_count + " spans, " + micros(trace.duration_us)),
      h("div", { class: "span-track ticks" }, [0, 0.5, 1].map((f) => h("span", { class: "tick" }, micros(Math.round(f * total)))))),
    rows);
}

// ask for the trace until the callee's sidecar's span is in it (or a minute passed, or the panel left the page)
async function followTrace(box, traceId, service) {
  let shown = -1;
  for (let i = 0; i < POLL_TIMES; i++) {
    if (i) await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (i && !box.isConnected) return;
    let trace = null;
    try {
      trace = await get("/v1/traces/" + encodeURIComponent(traceId));
    } catch (e) {
      if (e instanceof Unauthorized) return;
      if (!(e instanceof ApiError) || e.status !== 404) {
        box.replaceChildren(notice("error", "Could not read the trace: " + e.message));
        return;
      }
    }
    if (!trace) continue;
    const spans = flatten(trace.roots);
    const whole = spans.some((x) => x.service === service && x.kind === "SERVER");
    if (trace.span_count !== shown) {
      shown = trace.span_count;
      box.replaceChildren(waterfall(trace), whole ? null : h("p", { class: "muted" }, "More spans may still come…"));
    }
    if (whole) {
      box.dataset.complete = "true";
      return;
    }
  }
  if (shown < 0) box.replaceChildren(h("p", { class: "empty" }, "No span of this trace arrived within a minute; see the traces page later."));
}

function result(out, service) {
  const ok = out.status < 400;
  let text = out.body;
  try {
    text = JSON.stringify(JSON.parse(out.body), null, 2);
  } catch (e) {
    text = out.body;
  }
  const traceBox = traceView(out.trace_id, service);
  const el = h("div", { class: "card", id: "tryit-result", "data-status": out.status },
    h("p", {},
      badge(String(out.status), ok ? "ok" : "bad"), " ",
      h("span", { class: "method" }, out.request.method), h("code", { id: "tryit-target" }, out.request.target),
      h("span", { class: "muted" }, " to " + out.request.host + " in " + out.duration_ms + " ms")),
    h("p", {}, "Trace ", link(["traces", out.trace_id], h("code", { id: "tryit-trace-id" }, out.trace_id))),
    h("h3", {}, "Response headers"),
    table(["name", "value"], out.headers.map((x) => [h("code", {}, x.name), x.value]), "No headers."),
    h("h3", {}, "Body (" + out.body_bytes + " bytes)"),
    out.body_truncated ? notice("error", "Only the first " + out.body_bytes + " bytes are shown.") : null,
    h("pre", { id: "tryit-response-body", class: "diff" }, text || ""),
    h("h3", {}, "Trace"),
    traceBox);
  return el;
}

// The trace of a try, drawn as a waterfall once /v1/traces/{id} has it and redrawn as more spans
// arrive, until the service's own sidecar's span is in it (data-complete="true") or a minute passed.
export function traceView(traceId, service) {
  const box = h("div", { class: "tryit-trace", "data-trace": traceId },
    h("p", { class: "muted" }, "Waiting for the sidecars to ship the trace's spans…"));
  followTrace(box, traceId, service);
  return box;
}

// The form of one operation (a field per parameter, a body when it takes one, other headers) and,
// once sent, the answer with its trace.
export function tryOperation(ns, name, o) {
  const params = parameters(o);
  const inputs = params.map((p) => h("input", { type: "text", name: p.in + "." + p.name, "data-in": p.in, "data-name": p.name,
    required: p.required, placeholder: p.type || "", autocomplete: "off", spellcheck: "false" }));
  const body = o.request_body ? h("textarea", { id: "tryit-body", name: "body", rows: 6, spellcheck: "false",
    placeholder: (o.request_body.content || []).join(", ") }) : null;
  const extra = h("textarea", { id: "tryit-headers", name: "headers", rows: 2, spellcheck: "false", placeholder: "Name: value" });
  const out = h("div", { id: "tryit-output" });
  const send = h("button", { class: "primary", type: "submit", id: "tryit-send" }, "Send");
  const el = h("form", { class: "card", id: "tryit-form", "data-operation": opName(o) },
    h("p", {}, h("span", { class: "method" }, o.method), h("code", {}, o.path), o.summary ? h("span", { class: "muted" }, " " + o.summary) : null),
    table(["parameter", "in", "value"], params.map((p, i) => [
      h("label", {}, h("code", {}, p.name), p.required ? " *" : ""), p.in, inputs[i]]), "No parameters."),
    body ? [h("h3", {}, "Body" + (o.request_body.required ? " *" : "")), body] : null,
    h("h3", {}, "Other headers"), extra,
    h("p", {}, send, h("span", { class: "muted" }, " sent through the mesh from the control plane's own sidecar")),
    out);
  el.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const payload = { operation: opName(o), path: {}, query: {}, headers: {}, cookies: {} };
    try {
      Object.assign(payload.headers, headerLines(extra.value));
    } catch (e) {
      out.replaceChildren(notice("error", e.message));
      return;
    }
    inputs.forEach((input, i) => {
      const p = params[i];
      if (input.value === "" && p.in !== "path") return;
      const into = { path: "path", query: "query", header: "headers", cookie: "cookies" }[p.in];
      payload[into][p.name] = input.value;
    });
    if (body && body.value !== "") payload.body = body.value;
    send.disabled = true;
    out.replaceChildren(h("p", { class: "muted" }, "Sending…"));
    try {
      const answer = await call("POST", "/v1/catalog/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name) + "/try", payload);
      out.replaceChildren(result(answer, name));
    } catch (e) {
      if (e instanceof Unauthorized) return;
      out.replaceChildren(...(e instanceof ApiError ? fieldErrors(e) : [notice("error", "Not sent: " + e.message)]));
    } finally {
      send.disabled = false;
    }
  });
  return el;
}

// The panel for a service's operations (the catalog's current version): a menu of operations and
// the form of the one chosen.
export function tryPanel(ns, name, operations) {
  const ops = [...operations].sort((a, b) => (a.path + " " + a.method).localeCompare(b.path + " " + b.method));
  if (!ops.length) return h("p", { class: "empty" }, "No operation to try.");
  const pick = h("select", { id: "tryit-operation", name: "operation" },
    ops.map((o, i) => h("option", { value: String(i) }, o.method + " " + o.path + (o.operation_id ? " (" + o.operation_id + ")" : ""))));
  const holder = h("div", {}, tryOperation(ns, name, ops[0]));
  pick.addEventListener("change", () => holder.replaceChildren(tryOperation(ns, name, ops[Number(pick.value)])));
  return h("div", { id: "tryit" },
    h("div", { class: "toolbar" }, h("label", { for: "tryit-operation" }, "Operation "), pick),
    holder);
}
