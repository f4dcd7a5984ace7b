// Building SVG elements the way dom.js builds HTML ones: attributes set through the DOM, every value
// a text node, so a service or span name from the API is never parsed as markup. Geometry is given
// as presentation attributes (x, y, width), which the console's CSP allows, never as style.

// The SVG namespace as the HTML parser gave it to the page's own empty <svg id="svg-namespace">
// (index.html), so that no console file spells out an address-like string
const NS = document.getElementById("svg-namespace").namespaceURI;

export function s(tag, attrs, ...children) {
  const el = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
