// Topology: the mesh as a graph from /v1/topology (what Prometheus scraped off the sidecars): services
// in columns by call depth, caller → callee arrows labelled with rate, 5xx share and p99, and the same
// numbers as tables. The layout is ours and small: a column is the longest call chain that reaches a
// service (cycles stop growing at the service count), rows in a column by name; an arrow that goes
// back or stays in its column bends below the boxes. Without Prometheus the API says why, and so do we.

import { ApiError, get } from "./api.js";
import { ago, h, notice, table } from "./dom.js";
import { s } from "./svg.js";
import { ms, percent } from "./units.js";

const WINDOWS = ["1m", "5m", "15m", "1h", "6h", "24h"];
const COL = 440, ROW = 96, BOX_W = 180, BOX_H = 52, PAD = 30;

// {id: column} by the longest caller chain that reaches each service
export function columns(nodes, edges) {
  const depth = new Map(nodes.map((n) => [n.id, 0]));
  for (let round = 0; round < nodes.length; round++) {
    let changed = false;
    for (const e of edges) {
      if (e.source === e.destination || !depth.has(e.source) || !depth.has(e.destination)) continue;
      const d = depth.get(e.source) + 1;
      if (d > depth.get(e.destination) && d < nodes.length) {
        depth.set(e.destination, d);
        changed = true;
      }
    }
    if (!changed) break;
  }
  return depth;
}

function edgeLabel(e) {
  return e.rps + " rps · " + percent(e.error_rate) + " 5xx · p99 " + ms(e.p99_ms);
}

function graph(topo) {
  const nodes = topo.nodes, edges = topo.edges;
  const depth = columns(nodes, edges);
  const connected = new Set(edges.flatMap((e) => [e.source, e.destination]));
  const byColumn = new Map();
  for (const n of [...nodes].sort((a, b) => (connected.has(b.id) - connected.has(a.id)) || a.id.localeCompare(b.id))) {
    const c = depth.get(n.id);
    if (!byColumn.has(c)) byColumn.set(c, []);
    byColumn.get(c).push(n);
  }
  const at = new Map();
  let rows = 0;
  for (const [c, list] of byColumn) {
    list.forEach((n, r) => at.set(n.id, { x: PAD + c * COL, y: PAD + r * ROW }));
    rows = Math.max(rows, list.length);
  }
  const width = PAD * 2 + (Math.max(0, ...byColumn.keys()) * COL) + BOX_W + 60;
  // an arrow that goes back or stays in its column bends below the boxes: room for it
  const bends = edges.some((e) => depth.get(e.destination) <= depth.get(e.source));
  const height = PAD * 2 + rows * ROW + (bends ? ROW / 2 : 0);
  const arrows = edges.map((e) => {
    const a = at.get(e.source), b = at.get(e.destination);
    if (!a || !b) return null;
    let d, lx, ly;
    if (e.source === e.destination) {
      const x = a.x + BOX_W, y = a.y + BOX_H / 2;
      d = `M${x},${y - 10} C${x + 50},${y - 40} ${x + 50},${y + 40} ${x},${y + 10}`;
      lx = x + 40; ly = y - 30;
    } else if (b.x > a.x) {
      const x1 = a.x + BOX_W, y1 = a.y + BOX_H / 2, x2 = b.x, y2 = b.y + BOX_H / 2;
      d = `M${x1},${y1} C${(x1 + x2) / 2},${y1} ${(x1 + x2) / 2},${y2} ${x2 - 2},${y2}`;
      lx = (x1 + x2) / 2; ly = (y1 + y2) / 2 - 6;
    } else {
      const x1 = a.x + BOX_W / 2, y1 = a.y + BOX_H, x2 = b.x + BOX_W / 2, y2 = b.y + BOX_H;
      const low = Math.max(y1, y2) + ROW / 2;
      d = `M${x1},${y1} C${x1},${low} ${x2},${low} ${x2},${y2 + 2}`;
      lx = (x1 + x2) / 2; ly = low - 8;
    }
    return s("g", { class: "edge" + (e.errors > 0 ? " failing" : ""), "data-source": e.source, "data-destination": e.destination,
      "data-lx": lx, "data-ly": ly },
      s("title", {}, e.source + " → " + e.destination + ": " + e.requests + " requests, " + e.errors + " 5xx, p50 " + ms(e.p50_ms) +
        ", p99 " + ms(e.p99_ms) + " (reported by the " + e.reporter + ")"),
      s("path", { d, "marker-end": "url(#arrow)" }));
  });
  // the labels go over the boxes, so a box never hides an arrow's numbers
  const labels = edges.map((e, i) => arrows[i] && s("text", { x: arrows[i].dataset.lx, y: arrows[i].dataset.ly, "text-anchor": "middle",
    class: "edge-label", "data-source": e.source, "data-destination": e.destination }, edgeLabel(e)));
  const boxes = nodes.map((n) => {
    const p = at.get(n.id);
    return s("g", { class: "node" + (n.registered ? "" : " unregistered") + (n.errors_in > 0 ? " failing" : ""), "data-id": n.id },
      s("title", {}, n.id + ": " + n.instances + " instances" + (n.sources.length ? " (" + n.sources.join(", ") + ")" : "") +
        (n.registered ? "" : ", not registered")),
      s("rect", { x: p.x, y: p.y, width: BOX_W, height: BOX_H, rx: 6 }),
      s("text", { x: p.x + 10, y: p.y + 20, class: "node-name" }, n.name),
      s("text", { x: p.x + 10, y: p.y + 40, class: "node-stats" },
        n.namespace ? n.namespace + " · " : "", n.requests_in ? n.rps_in + " rps in" : "no calls in"));
  });
  return s("svg", { id: "topology-graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "services and their calls" },
  s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7,
    orient: "auto-start-reverse" }, s("path", { d: "M0,0 L10,5 L0,10 z" }))),
  arrows, boxes, labels);
}

function tables(topo) {
  const edgeRows = topo.edges.map((e) => [
    h("code", {}, e.source), h("code", {}, e.destination), String(e.requests), String(e.rps), String(e.errors),
    percent(e.error_rate), ms(e.p50_ms), ms(e.p99_ms), e.reporter,
  ]);
  const nodeRows = topo.nodes.map((n) => [
    h("code", {}, n.id), n.registered ? (n.sources.join(", ") || "no instance") : h("span", { class: "muted" }, "not registered"),
    String(n.instances), String(n.requests_in), String(n.rps_in), percent(n.error_rate_in), ms(n.p50_ms_in), ms(n.p99_ms_in),
    String(n.requests_out),
  ]);
  return [
    h("h2", {}, "Calls"),
    h("div", { id: "edges-table" }, table(["caller", "callee", "requests", "rps", "5xx", "5xx %", "p50", "p99", "reported by"], edgeRows,
      "No calls in this window.")),
    h("h2", {}, "Services"),
    h("div", { id: "nodes-table" }, table(["service", "registered by", "instances", "requests in", "rps in", "5xx % in", "p50 in",
      "p99 in", "requests out"], nodeRows, "No services.")),
  ];
}

export async function render(parts, params) {
  const win = params.get("window") || "";
  const pick = h("select", { id: "window", name: "window" },
    h("option", { value: "" }, "the default window"),
    WINDOWS.map((w) => h("option", { value: w, selected: w === win }, "last " + w)));
  pick.addEventListener("change", () => {
    location.hash = pick.value ? "#/topology?" + new URLSearchParams({ window: pick.value }) : "#/topology";
  });
  const head = [h("h1", {}, "Topology"), h("div", { class: "toolbar" }, h("label", { for: "window" }, "Window "), pick)];
  let topo;
  try {
    topo = await get("/v1/topology" + (win ? "?" + new URLSearchParams({ window: win }) : ""));
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    const why = e.status === 503 ? "Prometheus is not configured, so there is no topology to show. "
      : e.status === 502 ? "Prometheus did not answer, so there is no topology to show. " : "The topology could not be read. ";
    return h("div", { id: "topology-page" }, head, notice("error", why + "The API says: " + e.message));
  }
  const calls = topo.edges.reduce((n, e) => n + e.requests, 0);
  return h("div", { id: "topology-page" }, head,
    h("p", { class: "muted", id: "topology-summary" }, topo.nodes.length + " services, " + topo.edges.length + " caller → callee edges, " +
      calls + " requests over the last " + topo.window_s + " s (computed " + ago(topo.time) + " from Prometheus)"),
    h("div", { class: "card graph" }, graph(topo)),
    tables(topo));
}
