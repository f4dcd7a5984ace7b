// The trace of an API catalog try, inside the try's answer (catalog.js's try-it panel): the control
// plane sent the request through its own sidecar with a sampled traceparent
// (POST /v1/catalog/{ns}/{name}/try), and the sidecars ship their spans within seconds. traceView asks
// the trace list for the callee's traces of the last minutes (/v1/traces?service=, a 200 even
// before the spans come) every second for a minute; once the try's trace is listed for the callee,
// the trace (/v1/traces/{id}) is drawn as a waterfall (a row per span in tree order, indented by
// depth, a bar placed by start and duration) and drawn again as spans arrive, until the callee's
// sidecar's span sits under its caller's. Every value goes in as text.

import { ApiError, Unauthorized, get } from "./api.js";
import { h, link, notice } from "./dom.js";
import { s } from "./svg.js";
import { flatten } from "./traces.js";
import { micros } from "./units.js";

const POLL_MS = 1000;
const POLL_TIMES = 60;

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
  return h("div", { class: "card waterfall tryit-waterfall" },
    h("div", { class: "span-row axis" }, h("div", { class: "span-label muted" }, trace.span_count + " spans, " + micros(trace.duration_us)),
      h("div", { class: "span-track ticks" }, [0, 0.5, 1].map((f) => h("span", { class: "tick" }, micros(Math.round(f * total)))))),
    rows);
}

// the callee's sidecar's span, under its caller's (the control plane's sidecar's) span
function whole(trace, service) {
  return flatten(trace.roots).some((x) => x.kind === "SERVER" && (x.tags || {})["mesh.service"] === service && x.depth > 0);
}

async function follow(box, traceId, service) {
  const listed = "/v1/traces?" + new URLSearchParams({ service, since: "5m", limit: "1000" });
  let seen = false;
  let shown = -1;
  for (let i = 0; i < POLL_TIMES; i++) {
    if (i) await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    if (i && !box.isConnected) return; // the user moved on
    try {
      seen = seen || (await get(listed)).traces.some((t) => t.trace_id === traceId);
      if (!seen) continue;
      const trace = await get("/v1/traces/" + encodeURIComponent(traceId));
      const done = whole(trace, service);
      if (trace.span_count !== shown || done) {
        shown = trace.span_count;
        box.replaceChildren(waterfall(trace), ...(done ? [] : [h("p", { class: "muted" }, "More spans may still come…")]));
      }
      if (done) {
        box.dataset.complete = "true";
        return;
      }
    } catch (e) {
      if (e instanceof Unauthorized) return;
      box.replaceChildren(notice("error", "Could not read the trace: " + (e instanceof ApiError ? e.message : String(e))));
      return;
    }
  }
  if (shown < 0) {
    box.replaceChildren(h("p", { class: "empty" }, "No span of the service's sidecar arrived within a minute; ",
      link(["traces", traceId], "its trace"), " may still come."));
  }
}

// The element showing the try's trace: "waiting" until the callee's (``service``: its key, name.namespace)
// sidecar's span is in the control plane's trace store, then the waterfall; data-complete="true" once
// that span has its caller's span above it.
export function traceView(traceId, service) {
  const box = h("div", { class: "tryit-trace", "data-trace": traceId },
    h("p", { class: "muted" }, "Waiting for the sidecars to ship the trace's spans…"));
  follow(box, traceId, service);
  return box;
}
