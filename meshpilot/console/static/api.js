// The management API as the console calls it: same origin, the user's token as a bearer header,
// JSON in and out. A 401 ends the session and sends the user to the sign-in page with the API's
// own message; any other refusal is an ApiError carrying the API's field errors.

const TOKEN = "meshpilot.console.token";
const MESSAGE = "meshpilot.console.signin-message";

export class Unauthorized extends Error {}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || "the API answered " + status);
    this.status = status;
    this.fields = (body && Array.isArray(body.fields)) ? body.fields : [];
  }
}

export function signedIn() {
  return sessionStorage.getItem(TOKEN) !== null;
}

export function signIn(token) {
  sessionStorage.setItem(TOKEN, token);
  sessionStorage.removeItem(MESSAGE);
}

export function signOut(message) {
  sessionStorage.removeItem(TOKEN);
  if (message) sessionStorage.setItem(MESSAGE, message);
  else sessionStorage.removeItem(MESSAGE);
  if (location.hash !== "#/signin") location.hash = "#/signin";
}

// The message the sign-in page shows once (why the user is there).
export function takeMessage() {
  const m = sessionStorage.getItem(MESSAGE);
  sessionStorage.removeItem(MESSAGE);
  return m;
}

export async function call(method, path, body, token) {
  const headers = { Accept: "application/json" };
  const t = token === undefined ? sessionStorage.getItem(TOKEN) : token;
  if (t) headers.Authorization = "Bearer " + t;
  const init = { method, headers, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { error: "the control plane did not answer (" + e.message + ")" });
  }
  let data = null;
  try {
    data = await resp.json();
  } catch (e) {
    data = null;
  }
  if (resp.status === 401) {
    const why = (data && data.error) || "the token was refused";
    if (token === undefined) signOut("Signed out: the API refused the token (" + why + "). Sign in again with a valid token.");
    throw new Unauthorized(why);
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export const get = (path) => call("GET", path);
