// Logs: search the log records the nodes shipped (/v1/logs): by service, instance, trace id, level,
// source (Envoy's access log or the app's), text and time, newest first. The search is the page's
// address, so a search can be linked; a record naming a trace links to its waterfall. A search the
// API refuses shows its reason and the field it names next to the form.

import { ApiError, get } from "./api.js";
import { badge, h, link, notice, table } from "./dom.js";
import { when } from "./units.js";

const FIELDS = ["service", "instance", "trace_id", "q", "level", "source", "since", "until", "limit"];
const SINCE = ["5m", "15m", "1h", "6h", "1d"];
const LEVELS = ["", "debug", "info", "warn", "error"];

function input(name, label, value, placeholder) {
  return h("label", { class: "field" }, label, h("input", { id: "logs-" + name, name, value: value || "", placeholder: placeholder || "",
    spellcheck: "false", autocomplete: "off" }));
}

function select(name, label, value, options) {
  return h("label", { class: "field" }, label, h("select", { id: "logs-" + name, name },
    options.map(([v, text]) => h("option", { value: v, selected: v === value }, text))));
}

export async function render(parts, params) {
  const query = new URLSearchParams();
  for (const f of FIELDS) if (params.get(f)) query.set(f, params.get(f));
  if (!query.has("since")) query.set("since", "1h");
  const form = h("form", { id: "logs-form", class: "toolbar search" },
    input("service", "Service ", query.get("service"), "name or name.namespace"),
    input("instance", "Instance ", query.get("instance")),
    input("trace_id", "Trace id ", query.get("trace_id"), "hex"),
    input("q", "Text ", query.get("q"), "words in the line"),
    select("level", "Level ", query.get("level") || "", LEVELS.map((l) => [l, l ? l + " and above" : "any"])),
    select("source", "Source ", query.get("source") || "", [["", "any"], ["access", "access log"], ["app", "app log"]]),
    select("since", "Since ", query.get("since"), [...SINCE.map((w) => [w, "last " + w]), ["0", "any time"]]),
    h("button", { class: "primary", type: "submit" }, "Search"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const el of form.querySelectorAll("input, select")) if (el.value.trim()) next.set(el.name, el.value.trim());
    location.hash = "#/logs?" + next;
  });
  let found;
  try {
    found = await get("/v1/logs?" + query);
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    return h("div", { id: "logs-page" }, h("h1", {}, "Logs"), form,
      notice("error", "The search was refused: " + e.message),
      e.fields.length ? h("ul", { class: "field-errors", id: "field-errors" }, e.fields.map((f) =>
        h("li", { "data-field": f.field }, h("code", {}, f.field), ": ", f.reason))) : null);
  }
  const rows = found.records.map((r) => [
    h("span", { class: "log-time" }, when(r.time)),
    r.service,
    r.instance || h("span", { class: "muted" }, r.node),
    r.source,
    r.level ? badge(r.level, r.level === "error" ? "bad" : r.level === "warn" ? "warning" : "muted") : "",
    r.trace_id ? link(["traces", r.trace_id], h("code", { class: "trace-id" }, r.trace_id.slice(0, 12) + "…")) : "",
    h("code", { class: "log-line" }, r.line),
  ]);
  return h("div", { id: "logs-page" },
    h("h1", {}, "Logs"),
    form,
    h("p", { class: "muted", id: "logs-summary" }, found.records.length + " records, newest first; the control plane keeps " +
      found.stored_records + " of at most " + found.max_records),
    h("div", { id: "logs-table" }, table(["time", "service", "instance", "source", "level", "trace", "line"], rows,
      "No log record matches.")));
}
