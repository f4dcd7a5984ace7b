// Policies: the stored policies by kind; one policy's text as YAML or JSON to edit; "Preview"
// shows what applying would change against the stored one; "Apply" sends it to the policy API,
// whose validation is the only one, and shows the fields it refused next to the form.

import { ApiError, Unauthorized, call, get } from "./api.js";
import { lineDiff } from "./diff.js";
import { h, link, notice, table } from "./dom.js";

const FORMAT = "meshpilot.console.policy-format";

// Every kind the control plane knows: name, summary and a template for a new policy.
async function kinds() {
  return get("/ui/api/kinds");
}

function target(doc) {
  if (doc.service) return doc.service + (doc.port ? ":" + doc.port : "");
  return "namespace " + doc.namespace;
}

async function list() {
  const [all, known] = await Promise.all([get("/v1/policies"), kinds()]);
  const summaries = new Map(known.map((k) => [k.name, k.summary]));
  const byKind = new Map(known.map((k) => [k.name, []]));
  for (const p of all) {
    if (!byKind.has(p.kind)) byKind.set(p.kind, []);
    byKind.get(p.kind).push(p);
  }
  const sections = [...byKind.entries()].map(([kind, items]) => h("section", { class: "card kind", "data-kind": kind },
    h("header", {}, h("span", { class: "name" }, kind), h("span", { class: "muted" }, items.length + " stored"),
      link(["policies", "new", kind], "New " + kind)),
    summaries.get(kind) ? h("p", { class: "muted" }, summaries.get(kind)) : null,
    table(["name", "namespace", "applies to", "description"],
      items.sort((a, b) => (a.namespace + "/" + a.name).localeCompare(b.namespace + "/" + b.name))
        .map((p) => [link(["policies", kind, p.namespace, p.name], p.name), p.namespace, target(p), p.description || ""]),
      "No " + kind + " stored.")));
  return h("div", { id: "policies-page" }, h("h1", {}, "Policies"), sections);
}

function fieldErrors(fields) {
  return h("ul", { class: "field-errors", id: "field-errors" }, fields.map((f) =>
    h("li", { "data-field": f.field }, h("code", {}, f.field), ": ", f.reason)));
}

// The policy text read as YAML or JSON and rendered as `to`; text that cannot be read throws
// an ApiError naming the field, as a refused policy does.
async function convert(text, format, to, sortKeys) {
  const out = await call("POST", "/ui/api/convert", { text, format, to, sort_keys: !!sortKeys });
  if (out.error) throw new ApiError(400, out);
  return out;
}

async function editor(kind, namespace, name) {
  const isNew = namespace === undefined;
  const stored = isNew ? null : await get("/v1/policies/" + [kind, namespace, name].map(encodeURIComponent).join("/"));
  let format = sessionStorage.getItem(FORMAT) === "json" ? "json" : "yaml";
  let current = stored;
  const text = h("textarea", { id: "policy-text", name: "policy", spellcheck: "false", "aria-label": "policy text" });
  const errors = h("div", { id: "errors" });
  const preview = h("div", { id: "preview" }, h("p", { class: "muted" }, "Preview shows what Apply would change."));
  const formats = h("select", { id: "format", name: "format" },
    h("option", { value: "yaml", selected: format === "yaml" }, "YAML"),
    h("option", { value: "json", selected: format === "json" }, "JSON"));

  const known = isNew ? (await kinds()).find((k) => k.name === kind) : null;
  if (isNew && !known) return notice("error", "No policy kind " + kind + ".");
  const template = known ? known.template : null;
  // the policy's identity first, then its fields as stored
  function ordered(doc) {
    if (!doc || typeof doc !== "object" || Array.isArray(doc)) return doc;
    const out = {};
    for (const k of ["kind", "name", "namespace", "description", "service", "port"]) if (k in doc) out[k] = doc[k];
    return Object.assign(out, doc);
  }

  // the editor grows with its text, so the whole policy is in view
  function fit() {
    text.rows = Math.min(200, Math.max(20, text.value.split("\n").length + 1));
  }
  text.addEventListener("input", fit);

  async function show(doc) {
    text.value = (await convert(JSON.stringify(ordered(doc)), "json", format)).text;
    fit();
  }

  function showError(e) {
    if (e instanceof Unauthorized) throw e;
    const fields = e instanceof ApiError ? e.fields : [];
    text.classList.toggle("invalid", fields.length > 0);
    errors.replaceChildren(notice("error", "Refused: " + e.message), fields.length ? fieldErrors(fields) : null);
  }

  async function edited() {
    return (await convert(text.value, format, format)).document;
  }

  async function onPreview() {
    errors.replaceChildren();
    text.classList.remove("invalid");
    try {
      const doc = await edited();
      const after = (await convert(JSON.stringify(doc), "json", format, true)).text;
      const before = current ? (await convert(JSON.stringify(current), "json", format, true)).text : "";
      const lines = lineDiff(before, after);
      const changed = lines.some((l) => l.op !== "same");
      preview.replaceChildren(
        h("h3", {}, changed ? "Changes against the stored policy" : "No change against the stored policy"),
        h("pre", { class: "diff", id: "diff" }, lines.map((l) =>
          h("span", { class: l.op }, (l.op === "add" ? "+ " : l.op === "del" ? "- " : "  ") + l.line))));
    } catch (e) {
      showError(e);
    }
  }

  async function onApply() {
    errors.replaceChildren();
    text.classList.remove("invalid");
    try {
      const doc = await edited();
      let saved;
      if (isNew) {
        saved = await call("POST", "/v1/policies/" + encodeURIComponent(kind), doc);
      } else {
        saved = await call("PUT", "/v1/policies/" + [kind, namespace, name].map(encodeURIComponent).join("/"), doc);
      }
      current = saved;
      if (isNew) {
        location.hash = "#/policies/" + [saved.kind, saved.namespace, saved.name].map(encodeURIComponent).join("/");
        return;
      }
      await show(saved);
      errors.replaceChildren(notice("ok", "Applied: " + saved.kind + " " + saved.namespace + "/" + saved.name +
        " is stored; the control plane pushes it to the proxies it governs."));
      preview.replaceChildren(h("p", { class: "muted" }, "Preview shows what Apply would change."));
    } catch (e) {
      showError(e);
    }
  }

  formats.addEventListener("change", async () => {
    const to = formats.value;
    try {
      const out = await convert(text.value, format, to);
      text.value = out.text;
      fit();
      format = to;
      sessionStorage.setItem(FORMAT, to);
      errors.replaceChildren();
    } catch (e) {
      formats.value = format;
      showError(e);
    }
  });

  await show(stored || template);
  const title = isNew ? "New " + kind : kind + " " + namespace + "/" + name;
  return h("div", { id: "policy-page" },
    h("p", {}, link(["policies"], "← all policies")),
    h("h1", {}, title),
    h("div", { class: "toolbar" },
      h("label", { for: "format" }, "Edit as "), formats,
      h("button", { type: "button", id: "preview-button", onclick: onPreview }, "Preview"),
      h("button", { type: "button", id: "apply-button", class: "primary", onclick: onApply }, "Apply"),
      isNew ? null : h("button", { type: "button", id: "reset-button", onclick: async () => {
        errors.replaceChildren();
        text.classList.remove("invalid");
        await show(current);
      } }, "Reset")),
    h("div", { class: "editor" }, h("div", {}, text, errors), preview));
}

export async function render(parts) {
  if (parts[0] === "new" && parts[1]) return editor(parts[1]);
  if (parts.length >= 3) return editor(parts[0], parts[1], parts[2]);
  return list();
}
