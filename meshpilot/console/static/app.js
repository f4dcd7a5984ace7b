// The console's shell: sign-in, the navigation and a hash router (#/services, #/proxies,
// #/policies/..., #/topology, #/traces/..., #/logs, #/catalog/...). Each page is a module whose render(parts, params) returns its element; the
// shell shows it only if the user has not moved on meanwhile.

import { call, signedIn, signIn, signOut, takeMessage, Unauthorized } from "./api.js";
import { h, notice } from "./dom.js";
import * as services from "./services.js";
import * as proxies from "./proxies.js";
import * as policies from "./policies.js";
import * as topology from "./topology.js";
import * as traces from "./traces.js";
import * as catalog from "./catalog.js";
import * as logs from "./logs.js";

const PAGES = { services, proxies, policies, topology, traces, logs, catalog };
let generation = 0;

function where() {
  const raw = location.hash.replace(/^#\/?/, "");
  const q = raw.indexOf("?");
  const path = q < 0 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q < 0 ? "" : raw.slice(q + 1));
  const parts = path.split("/").filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch (e) { return p; }
  });
  return { parts, params };
}

function chrome(page) {
  const nav = document.getElementById("nav");
  const out = document.getElementById("signout");
  nav.hidden = out.hidden = page === "signin";
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("current", a.dataset.page === page);
}

function signinPage() {
  const message = takeMessage();
  const input = h("input", { id: "token", name: "token", type: "password", autocomplete: "off", spellcheck: "false",
    placeholder: "mpa.… or the bootstrap token" });
  const status = h("div", { id: "signin-status" }, message ? notice("error", message) : null);
  const form = h("form", { class: "card signin", id: "signin" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "The console shows what the management API shows you: sign in with an API token ",
      "(scope read to look, write to change policies). It is kept in this tab only."),
    h("label", { for: "token" }, "API token"),
    input,
    h("button", { class: "primary", type: "submit" }, "Sign in"),
    status);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = input.value.trim();
    status.replaceChildren(h("p", { class: "muted" }, "Checking the token…"));
    try {
      await call("GET", "/v1/services", undefined, token);
    } catch (e) {
      const why = e instanceof Unauthorized ? "The API refused this token: " + e.message : "Could not sign in: " + e.message;
      status.replaceChildren(notice("error", why));
      return;
    }
    signIn(token);
    location.hash = "#/services";
  });
  setTimeout(() => input.focus(), 0);
  return form;
}

async function route() {
  const mine = ++generation;
  const main = document.getElementById("main");
  const { parts, params } = where();
  if (!signedIn() || parts[0] === "signin") {
    if (signedIn() && parts[0] === "signin") signOut();
    chrome("signin");
    main.replaceChildren(signinPage());
    return;
  }
  const name = PAGES[parts[0]] ? parts[0] : "services";
  chrome(name);
  main.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  let el;
  try {
    el = await PAGES[name].render(parts.slice(1), params);
  } catch (e) {
    if (e instanceof Unauthorized) return; // signOut has sent the user to the sign-in page
    el = notice("error", "Could not load this page: " + e.message);
  }
  if (mine === generation) main.replaceChildren(el);
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("signout").addEventListener("click", () => signOut());
  // the current page's link shows it again with fresh data
  for (const a of document.querySelectorAll("#nav a")) {
    a.addEventListener("click", () => { if (location.hash === a.getAttribute("href")) route(); });
  }
  window.addEventListener("hashchange", route);
  route();
});
