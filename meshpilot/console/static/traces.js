// Traces: the newest traces the control plane keeps (/v1/traces, by service and time), and one trace
// as a waterfall (/v1/traces/{id}): a row per span in tree order, indented by its depth under its
// parent, with its service and name, a bar placed by its start and duration on the trace's time axis,
// and its tags, ids and endpoints when the row is clicked. Under the waterfall, the log lines the
// nodes shipped for the trace (/v1/logs?trace_id=), where the control plane keeps logs.

import { ApiError, Unauthorized, get } from "./api.js";
import { badge, h, link, notice, table } from "./dom.js";
import { s } from "./svg.js";
import { micros, when } from "./units.js";

const SINCE = ["5m", "15m", "1h", "6h", "1d"];

async function list(params) {
  const service = params.get("service") || "";
  const since = params.get("since") || "1h";
  const limit = params.get("limit") || "50";
  const q = new URLSearchParams({ limit });
  if (service) q.set("service", service);
  if (since !== "all") q.set("since", since);
  const [found, services] = await Promise.all([get("/v1/traces?" + q), get("/v1/services")]);
  const pickService = h("select", { id: "trace-service", name: "service" },
    h("option", { value: "" }, "every service"),
    [...new Set([service, ...services.map((x) => x.name)].filter(Boolean))].sort()
      .map((n) => h("option", { value: n, selected: n === service }, n)));
  const pickSince = h("select", { id: "trace-since", name: "since" },
    [...SINCE, "all"].map((w) => h("option", { value: w, selected: w === since }, w === "all" ? "any time" : "last " + w)));
  const go = () => {
    const next = new URLSearchParams({ since: pickSince.value });
    if (pickService.value) next.set("service", pickService.value);
    location.hash = "#/traces?" + next;
  };
  pickService.addEventListener("change", go);
  pickSince.addEventListener("change", go);
  const rows = found.traces.map((t) => [
    link(["traces", t.trace_id], h("code", { class: "trace-id" }, t.trace_id)),
    t.root ? [h("span", { class: "service-name" }, t.root.service || "?"), " ", t.root.name] : h("span", { class: "muted" }, "—"),
    t.services.join(", "),
    String(t.span_count),
    t.errors ? badge(t.errors + " failed", "bad") : badge("ok", "ok"),
    micros(t.duration_us),
    when(t.start / 1e6),
  ]);
  return h("div", { id: "traces-page" },
    h("h1", {}, "Traces"),
    h("div", { class: "toolbar" }, h("label", { for: "trace-service" }, "Service "), pickService,
      h("label", { for: "trace-since" }, "Started "), pickSince,
      h("span", { class: "muted" }, found.traces.length + " traces shown; the store keeps " + found.stored_spans + " of at most " +
        found.max_spans + " spans")),
    h("div", { id: "traces-table" }, table(["trace", "root span", "services", "spans", "errors", "duration", "started"], rows,
      "No trace" + (service ? " of " + service : "") + " in this time. Sampled requests through the sidecars show up here.")));
}

// spans in tree order (a parent, then its children by start), each once; tryit.js draws with it too
export function flatten(roots) {
  const out = [];
  const stack = [...roots].reverse();
  while (stack.length) {
    const span = stack.pop();
    out.push(span);
    for (const child of [...(span.children || [])].reverse()) stack.push(child);
  }
  return out;
}

function details(span) {
  const tags = Object.entries(span.tags || {}).sort(([a], [b]) => a.localeCompare(b));
  const endpoint = (e) => e ? [e.serviceName, e.ipv4 || e.ipv6, e.port].filter((x) => x !== undefined && x !== null && x !== "").join(" ") : "—";
  return h("div", { class: "span-details" },
    h("table", { class: "tags" }, h("tbody", {},
      h("tr", {}, h("th", {}, "span"), h("td", {}, h("code", {}, span.id), span.parentId ? [" parent ", h("code", {}, span.parentId)] : " (a root)")),
      h("tr", {}, h("th", {}, "kind"), h("td", {}, span.kind || "—")),
      h("tr", {}, h("th", {}, "start"), h("td", {}, when(span.timestamp / 1e6), " (+" + micros(span.offset_us) + ")")),
      h("tr", {}, h("th", {}, "duration"), h("td", {}, micros(span.duration || 0))),
      h("tr", {}, h("th", {}, "local"), h("td", {}, endpoint(span.localEndpoint))),
      span.remoteEndpoint ? h("tr", {}, h("th", {}, "remote"), h("td", {}, endpoint(span.remoteEndpoint))) : null,
      tags.map(([k, v]) => h("tr", { class: "tag", "data-tag": k }, h("th", {}, h("code", {}, k)), h("td", {}, String(v)))),
      (span.annotations || []).map((a) => h("tr", {}, h("th", {}, "+" + micros(a.timestamp - span.timestamp + span.offset_us)),
        h("td", {}, a.value))))));
}

function waterfall(trace) {
  const spans = flatten(trace.roots);
  const total = Math.max(1, trace.duration_us);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => h("span", { class: "tick" }, micros(Math.round(f * total))));
  const rows = spans.map((span) => {
    const left = (100 * span.offset_us) / total;
    const width = Math.max(0.3, (100 * (span.duration || 0)) / total);
    const open = h("div", { class: "span-open", hidden: true }, details(span));
    const row = h("div", { class: "span-row" + (span.error ? " failed" : ""), "data-span": span.id, "data-kind": span.kind || "",
      role: "button", tabindex: "0", "aria-expanded": "false" },
    h("div", { class: "span-label", "data-depth": span.depth },
      h("span", { class: "indent", "data-depth": Math.min(span.depth, 12) }),
      h("span", { class: "service-name" }, span.service || "?"), " ",
      h("span", { class: "span-name" }, span.name || "(unnamed)"),
      span.kind ? h("span", { class: "muted" }, " " + span.kind.toLowerCase()) : null),
    h("div", { class: "span-track" },
      s("svg", { class: "span-bar", width: "100%", height: 16, preserveAspectRatio: "none" },
        s("rect", { x: left + "%", y: 2, width: Math.min(width, 100 - left + 0.3) + "%", height: 12, rx: 2 })),
      h("span", { class: "span-duration" }, micros(span.duration || 0))));
    const toggle = () => {
      open.hidden = !open.hidden;
      row.setAttribute("aria-expanded", String(!open.hidden));
    };
    row.addEventListener("click", toggle);
    row.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); toggle(); } });
    return [row, open];
  });
  return h("div", { class: "card waterfall", id: "waterfall" },
    h("div", { class: "span-row axis" }, h("div", { class: "span-label muted" }, "service and span"), h("div", { class: "span-track ticks" }, ticks)),
    rows);
}

async function logsOf(traceId) {
  let found;
  try {
    found = await get("/v1/logs?" + new URLSearchParams({ trace_id: traceId, limit: "200" }));
  } catch (e) {
    if (e instanceof Unauthorized) throw e;
    return notice("error", "Could not read the trace's log lines: " + e.message);
  }
  const lines = [...found.records].sort((a, b) => a.time - b.time);
  return table(["time", "service", "instance", "source", "level", "line"], lines.map((r) => [
    when(r.time), r.service, r.instance || r.node, r.source, r.level ? badge(r.level, r.level === "error" ? "bad" : r.level === "warn" ? "warning" : "muted") : "",
    h("code", { class: "log-line" }, r.line),
  ]), "No log line names this trace.");
}

async function one(traceId, withLogs) {
  let trace;
  try {
    trace = await get("/v1/traces/" + encodeURIComponent(traceId));
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 404) throw e;
    return h("div", { id: "trace-page" }, h("p", {}, link(["traces"], "← all traces")), h("h1", {}, "Trace"),
      notice("error", "No such trace: " + e.message));
  }
  return h("div", { id: "trace-page" },
    h("p", {}, link(["traces"], "← all traces")),
    h("h1", {}, "Trace ", h("code", { id: "trace-id" }, trace.trace_id)),
    h("p", { class: "muted", id: "trace-summary" }, trace.span_count + " spans across " + trace.services.join(", ") + ", " +
      micros(trace.duration_us) + ", started " + when(trace.start / 1e6) + (trace.errors ? ", " + trace.errors + " failed" : "") +
      ". Click a span for its tags."),
    waterfall(trace),
    withLogs ? [h("h2", {}, "Log lines of this trace"), h("div", { id: "trace-logs" }, await logsOf(trace.trace_id))] : null);
}

export async function render(parts, params) {
  if (parts[0]) return one(parts[0], true);
  return list(params);
}
