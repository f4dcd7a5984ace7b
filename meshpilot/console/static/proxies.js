// Proxies: every Envoy (and proxyless client) with an open xDS stream: its node, service, the
// version it ACKed of each resource type, and its last NACK with Envoy's own error text.

import { get } from "./api.js";
import { ago, badge, h, table } from "./dom.js";

const typeName = (url) => String(url).split(".").pop();

function versions(p) {
  const acked = p.acked || {};
  const types = Object.keys({ ...acked, ...(p.sent || {}) }).sort();
  if (!types.length) return h("span", { class: "muted" }, "nothing sent yet");
  return h("table", { class: "versions" }, h("tbody", {}, types.map((t) => h("tr", {},
    h("td", {}, typeName(t)),
    h("td", {}, h("code", {}, acked[t] || "—")),
    (p.sent || {})[t] && acked[t] !== p.sent[t] && p.stream_type !== "DELTA_GRPC"
      ? h("td", { class: "muted" }, "sent " + p.sent[t]) : h("td", {})))));
}

function nack(p) {
  const n = p.last_nack;
  if (!n) return [badge("no NACK", "ok"), p.nacks ? h("div", { class: "muted" }, p.nacks + " before") : null];
  return h("div", { class: "nack" },
    badge(p.nacks + " NACK" + (p.nacks === 1 ? "" : "s"), "bad"), " ", typeName(n.type_url),
    n.version ? h("span", { class: "muted" }, " version " + n.version) : null,
    h("span", { class: "muted" }, " " + ago(n.at)),
    h("pre", { class: "nack-error" }, n.error));
}

export async function render() {
  const list = await get("/v1/proxies");
  const rows = list.map((p) => [
    [h("code", { class: "node" }, p.node_id || "stream " + p.stream), p.cluster ? h("div", { class: "muted" }, "cluster " + p.cluster) : null],
    p.service || h("span", { class: "muted" }, "—"),
    [p.stream_type, h("div", { class: "muted" }, p.peer), p.identity ? h("div", { class: "muted" }, p.identity) : null],
    ago(p.connected_at),
    versions(p),
    nack(p),
  ]);
  return h("div", { id: "proxies-page" },
    h("h1", {}, "Proxies"),
    h("p", { class: "muted" }, list.length + " connected xDS streams"),
    table(["node", "service", "stream", "connected", "ACKed versions", "last NACK"], rows, "No proxy is connected."));
}
