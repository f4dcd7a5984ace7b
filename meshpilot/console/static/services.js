// Services: each service with its instances side by side by where they came from: SDK apps
// (registered through the Consul or Eureka API or the management API) and mesh instances
// (sidecars registered over HDS); health, zone, version label and checks of each; a namespace filter.

import { get } from "./api.js";
import { badge, h, link, table } from "./dom.js";

function health(inst) {
  if (inst.maintenance) return badge("maintenance");
  return badge(inst.health);
}

function address(inst) {
  const ports = Object.entries(inst.ports || {}).map(([name, port]) => name + " " + port);
  return [h("code", {}, inst.address), ports.length ? h("div", { class: "muted" }, ports.join(", ")) : null];
}

function checks(inst) {
  if (!(inst.checks || []).length) return h("span", { class: "muted" }, "none");
  return h("ul", { class: "checks" }, inst.checks.map((c) =>
    h("li", { class: "check" }, badge(c.status), " ", h("code", {}, c.id), " ", h("span", { class: "muted" }, "(" + c.owner + ")"),
      c.output ? h("div", { class: "muted" }, c.output) : null)));
}

function instances(list, title, emptyText) {
  return h("section", { class: "instances", "data-group": title },
    h("h3", {}, title + " (" + list.length + ")"),
    table(["instance", "source", "address", "health", "zone", "version", "checks"],
      list.map((i) => [
        [h("code", { class: "instance-id" }, i.id), i.node && i.node !== i.id ? h("div", { class: "muted" }, "node " + i.node) : null],
        i.source, address(i), [health(i), i.routable ? null : h("div", { class: "muted" }, "not routable")],
        i.zone || h("span", { class: "muted" }, "—"), (i.labels || {}).version || h("span", { class: "muted" }, "—"), checks(i),
      ]), emptyText));
}

export async function render(parts, params) {
  const [all, insts] = await Promise.all([get("/v1/services"), get("/v1/instances")]);
  const ns = params.get("namespace") || "";
  const namespaces = [...new Set(all.map((s) => s.namespace))].sort();
  const filter = h("select", { id: "namespace", name: "namespace" },
    h("option", { value: "" }, "all namespaces"),
    namespaces.map((n) => h("option", { value: n, selected: n === ns }, n)));
  filter.addEventListener("change", () => {
    location.hash = filter.value ? "#/services?" + new URLSearchParams({ namespace: filter.value }) : "#/services";
  });
  const shown = all.filter((s) => !ns || s.namespace === ns)
    .sort((a, b) => (a.namespace + "/" + a.name).localeCompare(b.namespace + "/" + b.name));
  const byService = new Map();
  for (const i of insts) {
    const key = i.namespace + "/" + i.service;
    if (!byService.has(key)) byService.set(key, []);
    byService.get(key).push(i);
  }
  const cards = shown.map((s) => {
    const mine = (byService.get(s.namespace + "/" + s.name) || []).sort((a, b) => a.id.localeCompare(b.id));
    const mesh = mine.filter((i) => i.source === "mesh");
    const sdk = mine.filter((i) => i.source !== "mesh");
    const passing = mine.filter((i) => i.health === "passing" && !i.maintenance).length;
    return h("article", { class: "card service", "data-service": s.name, "data-namespace": s.namespace },
      h("header", {},
        h("span", { class: "name" }, s.name),
        h("span", { class: "muted" }, "namespace " + s.namespace),
        s.vip ? h("span", { class: "kv" }, "VIP ", h("code", {}, s.vip)) : null,
        h("span", { class: "kv" }, "ports ", (s.ports || []).map((p) => p.name + " " + p.port + "/" + p.protocol).join(", ")),
        h("span", { class: "kv" }, badge(passing + "/" + mine.length + " passing", passing === mine.length && mine.length ? "ok" : "warning"))),
      Object.keys(s.labels || {}).length
        ? h("div", { class: "muted" }, Object.entries(s.labels).map(([k, v]) => h("span", { class: "kv" }, k + "=" + v))) : null,
      h("div", { class: "side" },
        instances(sdk, "SDK instances", "No SDK instance (Consul, Eureka or API registrations)."),
        instances(mesh, "Mesh instances", "No sidecar has registered an instance.")));
  });
  return h("div", { id: "services-page" },
    h("h1", {}, "Services"),
    h("div", { class: "toolbar" }, h("label", { for: "namespace" }, "Namespace "), filter,
      h("span", { class: "muted" }, shown.length + " services, " + insts.filter((i) => !ns || i.namespace === ns).length + " instances")),
    cards.length ? cards : h("p", { class: "empty" }, "No services" + (ns ? " in namespace " + ns : "") + "."));
}
