// API catalog: the services with a catalog (/v1/catalog); per service its current operations
// (method, path, operationId, summary), its versions, and what changed between two of them
// (/v1/catalog/{ns}/{name}/diff): operations added, removed, and changed field by field; and on the
// current version, "Try it": one request to an operation sent through the mesh, with its trace.
// The page's address holds the version shown and the pair compared, so each view can be linked.

import { ApiError, Unauthorized, call, get } from "./api.js";
import { badge, h, link, notice, table } from "./dom.js";
import { traceView } from "./tryit.js";
import { when } from "./units.js";

// "orders.shop" → ["shop", "orders"]: names and namespaces are DNS labels, so the first dot splits them
function split(key) {
  const i = key.indexOf(".");
  return i < 0 ? ["default", key] : [key.slice(i + 1), key.slice(0, i)];
}

function source(src) {
  if (!src) return "—";
  if (src.kind === "import") return ["imported from ", h("code", {}, src.instance || "?"), src.url ? h("div", { class: "muted" }, src.url) : null];
  return src.kind || "—";
}

async function list() {
  const all = await get("/v1/catalog");
  const rows = [...all].sort((a, b) => a.service.localeCompare(b.service)).map((c) => {
    const [ns, name] = split(c.service);
    return [link(["catalog", ns, name], name), ns, "v" + c.current.number, c.current.title || "—", c.current.api_version || "—",
      String(c.current.operations), when(Date.parse(c.current.created) / 1000)];
  });
  return h("div", { id: "catalog-page" },
    h("h1", {}, "API catalog"),
    h("p", { class: "muted" }, "Each service's operations as its OpenAPI document declares them, versioned when they change ",
      "(upload a document with PUT /v1/catalog/{namespace}/{name}, or import it from an instance)."),
    h("div", { id: "catalog-table" }, table(["service", "namespace", "version", "title", "API version", "operations", "recorded"], rows,
      "No service has an API catalog yet.")));
}

function operations(version, onTry) {
  const ops = [...version.operations].sort((a, b) => (a.path + " " + a.method).localeCompare(b.path + " " + b.method));
  return table(["method", "path", "operationId", "summary", "tags", "responses", ""], ops.map((o) => [
    h("span", { class: "method" }, o.method),
    [h("code", { class: "op-path" }, o.path), o.deprecated ? [" ", badge("deprecated", "warning")] : null],
    o.operation_id ? h("code", { class: "op-id" }, o.operation_id) : h("span", { class: "muted" }, "—"),
    h("span", { class: "op-summary" }, o.summary || ""),
    (o.tags || []).join(", "),
    (o.responses || []).join(", "),
    onTry ? h("button", { type: "button", class: "try-button", "data-operation": o.operation_id || o.method + " " + o.path,
      onclick: () => onTry(o) }, "Try it") : null,
  ]), "This version has no operations.");
}

// The try-it form of one operation: a field per parameter (the path template's and the declared
// ones), a body when the operation takes one; "Send" asks the control plane to send the request
// through its own sidecar (POST .../try, scope write) and shows the answer and a link to its trace.
function tryPanel(base, op) {
  const params = [];
  const seen = new Set();
  for (const m of op.path.matchAll(/\{([^}]+)\}/g)) {
    params.push({ in: "path", name: m[1], required: true });
    seen.add("path " + m[1]);
  }
  for (const p of op.parameters || []) if (!seen.has(p.in + " " + p.name)) params.push(p);
  const inputs = params.map((p) => ({ p, el: h("input", { name: p.in + "." + p.name, "data-in": p.in, "data-name": p.name,
    placeholder: p.type || "", spellcheck: "false", autocomplete: "off" }) }));
  const body = op.request_body ? h("textarea", { id: "try-body", name: "body", rows: 5, spellcheck: "false",
    placeholder: "JSON (sent as application/json), or text sent as it is" }) : null;
  const result = h("div", { id: "try-result" });
  const opName = op.operation_id || op.method + " " + op.path;
  async function send() {
    const req = { operation: opName, path: {}, query: {}, headers: {}, cookies: {} };
    for (const { p, el } of inputs) {
      if (el.value === "" && p.in !== "path") continue;
      const into = { path: req.path, query: req.query, header: req.headers, cookie: req.cookies }[p.in];
      if (into) into[p.name] = el.value;
    }
    if (body && body.value.trim()) {
      try { req.body = JSON.parse(body.value); } catch (e) { req.body = body.value; }
    }
    result.replaceChildren(h("p", { class: "muted" }, "Sending…"));
    let out;
    try {
      out = await call("POST", base + "/try", req);
    } catch (e) {
      if (e instanceof Unauthorized) return; // signOut has sent the user to the sign-in page
      const fields = e instanceof ApiError ? e.fields : [];
      // replaceChildren writes a null as the text "null": only elements go in
      result.replaceChildren(notice("error", "Refused: " + e.message), ...(fields.length ? [h("ul", { class: "field-errors", id: "field-errors" },
        fields.map((f) => h("li", { "data-field": f.field }, h("code", {}, f.field), ": ", f.reason)))] : []));
      return;
    }
    result.replaceChildren(
      h("p", { id: "try-status" }, badge(String(out.status), out.status < 400 ? "ok" : out.status < 500 ? "warning" : "bad"), " ",
        h("code", {}, out.request.method + " " + out.request.target), h("span", { class: "muted" }, " to " + out.request.host + " in " +
          out.duration_ms + " ms · "), link(["traces", out.trace_id], "its trace " + out.trace_id.slice(0, 12) + "…")),
      h("table", { class: "versions", id: "try-headers" }, h("tbody", {}, out.headers.map((x) =>
        h("tr", {}, h("th", {}, h("code", {}, x.name)), h("td", {}, x.value))))),
      h("pre", { class: "diff", id: "try-response" }, out.body),
      h("div", { id: "try-trace" }, h("h3", {}, "Its trace"), traceView(out.trace_id, out.service)),
      ...(out.body_truncated ? [h("p", { class: "muted" }, "The body was cut at " + out.body_bytes + " bytes.")] : []));
  }
  return h("div", { class: "card", id: "try-panel", "data-operation": opName },
    h("h3", {}, "Try ", h("span", { class: "method" }, op.method), " ", h("code", {}, op.path), op.summary ? h("span", { class: "muted" }, " " + op.summary) : null),
    h("p", { class: "muted" }, "Sent by the control plane through its own sidecar to the service's mesh name, traced; needs a token of scope write."),
    inputs.length ? h("table", { class: "try-params" }, h("tbody", {}, inputs.map(({ p, el }) => h("tr", {},
      h("th", {}, h("code", {}, p.name), h("span", { class: "muted" }, " " + p.in + (p.required ? ", required" : ""))), h("td", {}, el))))) : null,
    body,
    h("div", { class: "toolbar" }, h("button", { type: "button", class: "primary", id: "try-send", onclick: send }, "Send")),
    result);
}

function value(v) {
  if (v === null || v === undefined || v === "") return h("span", { class: "muted" }, "none");
  return h("code", {}, typeof v === "string" ? v : JSON.stringify(v));
}

function opLine(o) {
  return [h("span", { class: "method" }, o.method), " ", h("code", {}, o.path),
    o.operation_id ? [" ", h("code", { class: "op-id" }, o.operation_id)] : null,
    o.summary ? h("span", { class: "muted" }, " " + o.summary) : null];
}

function change(name, c) {
  if (name === "parameters") {
    return h("li", { "data-field": name }, h("strong", {}, "parameters"), h("ul", {},
      (c.added || []).map((p) => h("li", { class: "add" }, "+ " + p.in + " " + p.name + (p.required ? " (required)" : ""))),
      (c.removed || []).map((p) => h("li", { class: "del" }, "− " + p.in + " " + p.name)),
      (c.changed || []).map((p) => h("li", {}, p.in + " " + p.name + ": ", value(p.from), " → ", value(p.to)))));
  }
  return h("li", { "data-field": name }, h("strong", {}, name), ": ", h("span", { class: "del" }, value(c.from)), " → ",
    h("span", { class: "add" }, value(c.to)));
}

function diffView(d) {
  const nothing = !d.added.length && !d.removed.length && !d.changed.length;
  return h("div", { id: "catalog-diff", class: "card" },
    h("h3", {}, "From v" + d.from + " to v" + d.to),
    nothing ? h("p", { class: "empty" }, "The two versions have the same operations.") : null,
    d.added.length ? h("section", { "data-diff": "added" }, h("h3", {}, "Added (" + d.added.length + ")"),
      h("ul", { class: "ops add" }, d.added.map((o) => h("li", {}, "+ ", opLine(o))))) : null,
    d.removed.length ? h("section", { "data-diff": "removed" }, h("h3", {}, "Removed (" + d.removed.length + ")"),
      h("ul", { class: "ops del" }, d.removed.map((o) => h("li", {}, "− ", opLine(o))))) : null,
    d.changed.length ? h("section", { "data-diff": "changed" }, h("h3", {}, "Changed (" + d.changed.length + ")"),
      h("ul", { class: "ops" }, d.changed.map((c) => h("li", { "data-key": c.key }, opLine(c),
        h("ul", { class: "changes" }, Object.entries(c.changes).map(([name, ch]) => change(name, ch))))))) : null);
}

async function service(ns, name, params) {
  const base = "/v1/catalog/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name);
  const wanted = params.get("version");
  let versions;
  try {
    versions = await get(base + "/versions");
  } catch (e) {
    if (!(e instanceof ApiError) || e.status !== 404) throw e;
    return h("div", { id: "catalog-service-page" }, h("p", {}, link(["catalog"], "← API catalog")), h("h1", {}, name),
      notice("error", e.message));
  }
  const shown = await get(base + (wanted ? "/versions/" + encodeURIComponent(wanted) : ""));
  const newest = versions[versions.length - 1].number;
  const here = (query) => link(["catalog", ns, name], query.text, query.q);
  const from = h("select", { id: "diff-from", name: "from" }, versions.map((v) => h("option", { value: v.number,
    selected: String(v.number) === (params.get("from") || String(versions.length > 1 ? versions[versions.length - 2].number : newest)) }, "v" + v.number)));
  const to = h("select", { id: "diff-to", name: "to" }, versions.map((v) => h("option", { value: v.number,
    selected: String(v.number) === (params.get("to") || String(newest)) }, "v" + v.number)));
  const compare = h("button", { type: "button", id: "diff-button", onclick: () => {
    const q = new URLSearchParams(wanted ? { version: wanted } : {});
    q.set("from", from.value);
    q.set("to", to.value);
    location.hash = "#/catalog/" + encodeURIComponent(ns) + "/" + encodeURIComponent(name) + "?" + q;
  } }, "Compare");
  let diff = null;
  if (params.get("from") && params.get("to")) {
    try {
      diff = diffView(await get(base + "/diff?" + new URLSearchParams({ from: params.get("from"), to: params.get("to") })));
    } catch (e) {
      if (!(e instanceof ApiError)) throw e;
      diff = notice("error", "Could not compare: " + e.message);
    }
  }
  const tryHere = h("div", { id: "try-here" });
  const versionRows = [...versions].reverse().map((v) => [
    String(v.number) === String(shown.number) ? h("strong", {}, "v" + v.number) : here({ text: "v" + v.number, q: { version: v.number } }),
    v.title || "—", v.api_version || "—", String(v.operations), source(v.source), when(Date.parse(v.created) / 1000),
    h("code", { class: "muted" }, String(v.sha256).slice(0, 12)),
  ]);
  return h("div", { id: "catalog-service-page", "data-service": ns + "/" + name },
    h("p", {}, link(["catalog"], "← API catalog")),
    h("h1", {}, name, h("span", { class: "muted" }, " namespace " + ns)),
    h("h2", { id: "operations-title" }, "Operations of v" + shown.number + (shown.number === newest ? " (current)" : ""),
      shown.title ? h("span", { class: "muted" }, " · " + shown.title + " " + (shown.api_version || "")) : null),
    h("div", { id: "operations" }, operations(shown, shown.number === newest ? (op) => tryHere.replaceChildren(tryPanel(base, op)) : null)),
    tryHere,
    h("h2", {}, "Versions"),
    h("div", { id: "versions" }, table(["version", "title", "API version", "operations", "source", "recorded", "sha256"], versionRows)),
    h("h2", {}, "Compare versions"),
    h("div", { class: "toolbar" }, h("label", { for: "diff-from" }, "From "), from, h("label", { for: "diff-to" }, " to "), to, compare),
    diff);
}

export async function render(parts, params) {
  if (parts.length >= 2) return service(parts[0], parts[1], params);
  return list();
}
