// Building elements without HTML strings: every value becomes a text node or an attribute set
// through the DOM, so nothing the API returns is ever parsed as markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = String(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

// A link inside the console: each part of the path is URL-encoded, so a name cannot leave the hash.
export function link(parts, text, query) {
  const path = parts.map((p) => encodeURIComponent(String(p))).join("/");
  const q = query ? "?" + new URLSearchParams(query).toString() : "";
  return h("a", { href: "#/" + path + q }, text);
}

export function badge(text, kind) {
  return h("span", { class: "badge " + (kind || String(text)) }, text);
}

export function table(headers, rows, emptyText) {
  if (!rows.length) return h("p", { class: "empty" }, emptyText || "None.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c))))));
}

export function notice(kind, ...text) {
  return h("div", { class: "notice " + kind, role: kind === "error" ? "alert" : "status" }, ...text);
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "";
  const s = Math.max(0, Math.round(Date.now() / 1000 - unixSeconds));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}
