// meterd operator console (issue 22). Plain ES module, no dependencies: every
// figure comes from meterd's JSON API (and /metrics for the system page), with
// the key the operator pasted (kept in sessionStorage), or none when the
// server has no keys. Pages live behind the URL hash; the visible one refreshes
// every few seconds without reloading.

const REFRESH_MS = 3000;
const KEY = "meterd.key";
const main = document.getElementById("main");
const banner = document.getElementById("banner");
const live = document.getElementById("live");

// ---- small helpers -------------------------------------------------------

/** An element: h("td", {class: "num"}, "12", child…). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

const fmt = (n) => (n === null || n === undefined ? "∞" : Number(n).toLocaleString("en-US", { maximumFractionDigits: 3 }));
function when(t) {
  if (!t) return "never";
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? String(t) : d.toISOString().replace("T", " ").replace(/:\d\d(\.\d+)?Z$/, " UTC");
}
const enc = encodeURIComponent;

/** An API error: HTTP status, meterd's code, message and details. */
class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || "http";
    this.details = Array.isArray(e.details) ? e.details : [];
  }
}

/** Calls meterd: JSON (or text for /metrics) or an ApiError. */
async function api(path, { method = "GET", body, text = false } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.authorization = `Bearer ${key}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  if (text && res.ok) return res.text();
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

function showBanner(err) {
  if (!err) {
    banner.hidden = true;
    banner.textContent = "";
    return;
  }
  const needKey = err.status === 401 || err.status === 403;
  banner.textContent = needKey
    ? `meterd refused the request (${err.message}). Paste an admin key above.`
    : `Could not reach meterd: ${err.message}`;
  banner.hidden = false;
}

// ---- key form -----------------------------------------------------------

const keyInput = document.getElementById("key");
document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const k = keyInput.value.trim();
  if (k) sessionStorage.setItem(KEY, k);
  keyInput.value = "";
  keyInput.placeholder = k ? "key set for this tab" : keyInput.placeholder;
  route();
});
document.getElementById("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  keyInput.placeholder = "admin key (none on loopback without keys)";
  route();
});
if (sessionStorage.getItem(KEY)) keyInput.placeholder = "key set for this tab";

// ---- router and live refresh -----------------------------------------------

let current = null; // {refresh: async () => void}
let timer = null;
let generation = 0;

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, query = ""] = raw.split("?");
  const parts = path.split("/").map(decodeURIComponent);
  return { page: parts[0] || "customers", arg: parts.slice(1).join("/"), params: new URLSearchParams(query) };
}

async function route() {
  const gen = ++generation;
  clearTimeout(timer);
  const { page, arg, params } = parseHash();
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === (page === "customer" ? "customers" : page)) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  main.replaceChildren();
  const pages = { customers: customersPage, customer: customerPage, history: historyPage, system: systemPage };
  const make = pages[page] || customersPage;
  current = make(main, arg, params);
  await tick(gen);
}

/** Whether the server wants a key (asked once, so no call is made to earn a 401). */
let settings = null;

async function tick(gen) {
  if (gen !== generation || !current) return;
  if (!settings) settings = await fetch("settings.json", { cache: "no-store" }).then((r) => r.json()).catch(() => ({ keys_required: false }));
  if (settings.keys_required && !sessionStorage.getItem(KEY)) {
    banner.textContent = "This meterd needs an API key: paste an admin key above (it stays in this tab only).";
    banner.hidden = false;
    live.textContent = "waiting for a key";
    keyInput.focus();
    return;
  }
  try {
    await current.refresh();
    showBanner(null);
    live.textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
  } catch (err) {
    if (gen !== generation) return;
    showBanner(err);
    live.textContent = "not updated";
  }
  if (gen === generation) timer = setTimeout(() => tick(gen), REFRESH_MS);
}

window.addEventListener("hashchange", route);

// ---- customers -----------------------------------------------------------

function customersPage(root, _arg, params) {
  const prefix = h("input", { id: "prefix", type: "search", value: params.get("prefix") || "", placeholder: "customer id prefix" });
  const plan = h("select", { id: "plan-filter" }, h("option", { value: "" }, "any plan"));
  const stripe = h("input", { id: "stripe-filter", type: "search", placeholder: "cus_…" });
  const body = h("tbody");
  const more = h("button", { type: "button", class: "secondary", hidden: true }, "More");
  let rows = [];
  let next = null;
  let plansLoaded = false;

  const draw = () => {
    const p = plan.value;
    const sid = stripe.value.trim();
    const shown = rows.filter((r) => (!p || r.plan === p) && (!sid || (r.stripe_customer_id || "").includes(sid)));
    body.replaceChildren(
      ...shown.map((r) =>
        h("tr", {}, h("td", {}, h("a", { href: `#/customer/${enc(r.customer)}` }, r.customer)), h("td", {}, r.plan), h("td", {}, r.stripe_customer_id || "—")),
      ),
    );
    if (!shown.length) body.append(h("tr", {}, h("td", { colspan: 3, class: "empty" }, "No customer matches.")));
    more.hidden = !next;
  };
  const load = async (append) => {
    const q = new URLSearchParams({ limit: "100" });
    if (prefix.value) q.set("prefix", prefix.value);
    if (append && next) q.set("after", next);
    const page = await api(`/v1/customers?${q}`);
    rows = append ? rows.concat(page.customers) : page.customers;
    next = page.next;
    draw();
  };
  let loaded = 0; // how many pages are shown, so a refresh keeps "More" pages
  prefix.addEventListener("input", () => {
    loaded = 1;
    load(false).catch(showBanner);
  });
  plan.addEventListener("change", draw);
  stripe.addEventListener("input", draw);
  more.addEventListener("click", () => {
    loaded += 1;
    load(true).catch(showBanner);
  });

  root.append(
    h("h1", {}, "Customers"),
    h(
      "section",
      { class: "panel" },
      h(
        "div",
        { class: "filters", role: "search" },
        h("label", { for: "prefix" }, "Customer prefix", prefix),
        h("label", { for: "plan-filter" }, "Plan", plan),
        h("label", { for: "stripe-filter" }, "Stripe customer id", stripe),
      ),
      h("table", { id: "customers" }, h("thead", {}, h("tr", {}, h("th", {}, "Customer"), h("th", {}, "Plan"), h("th", {}, "Stripe customer"))), body),
      more,
    ),
  );
  return {
    async refresh() {
      if (!plansLoaded) {
        const { plans } = await api("/v1/plans");
        plan.append(...plans.map((p) => h("option", { value: p.name }, p.name)));
        plansLoaded = true;
      }
      if (loaded <= 1) await load(false);
      loaded = Math.max(loaded, 1);
    },
  };
}

// ---- one customer -----------------------------------------------------------

function level(pct) {
  if (pct >= 100) return "over";
  if (pct >= 90) return "high";
  if (pct >= 75) return "warn";
  return "ok";
}

/** One limit as a progress bar with its figures. */
function limitRow(row) {
  const limit = row.limit === null ? null : Number(row.limit);
  const used = Number(row.used);
  const held = Number(row.held || 0);
  const pct = limit === null ? 0 : limit === 0 ? (used + held > 0 ? 100 : 0) : ((used + held) / limit) * 100;
  const usedPct = limit ? Math.min(100, (used / limit) * 100) : limit === 0 && used > 0 ? 100 : 0;
  const heldPct = limit ? Math.min(100 - usedPct, (held / limit) * 100) : 0;
  const lvl = limit === null ? "ok" : level(pct);
  const label = `${row.meter} (${row.window})`;
  const usedBar = h("div", { class: "used" });
  usedBar.style.width = `${usedPct}%`;
  const heldBar = h("div", { class: "held" });
  heldBar.style.left = `${usedPct}%`;
  heldBar.style.width = `${heldPct}%`;
  const text = limit === null ? `${fmt(used)} used, unlimited` : `${fmt(used)} used and ${fmt(held)} held of ${fmt(limit)} (${Math.round(pct)}%)`;
  const bar = h(
    "div",
    {
      class: `bar level-${lvl}`,
      role: "progressbar",
      tabindex: 0,
      "aria-label": label,
      "aria-valuemin": 0,
      // Unlimited: no maximum, so no value either; the text says it.
      "aria-valuemax": limit === null ? null : limit,
      "aria-valuenow": limit === null ? null : Math.min(used + held, limit),
      "aria-valuetext": text,
      "data-level": lvl,
    },
    usedBar,
    heldBar,
  );
  return h(
    "div",
    { class: "limit", "data-meter": row.meter, "data-window": row.window },
    h(
      "div",
      { class: "limit-head" },
      h("strong", {}, label),
      h("span", {}, pct >= 100 && row.hard ? h("span", { class: "badge over" }, "at limit: denied") : null, !row.hard ? h("span", { class: "badge soft" }, "soft") : null),
    ),
    bar,
    h(
      "div",
      { class: "limit-nums" },
      h("span", {}, "used ", h("b", { "data-f": "used" }, fmt(used))),
      h("span", {}, "held ", h("b", { "data-f": "held" }, fmt(held))),
      h("span", {}, "limit ", h("b", { "data-f": "limit" }, fmt(row.limit))),
      h("span", {}, "remaining ", h("b", { "data-f": "remaining" }, fmt(row.remaining))),
      h("span", {}, row.window === "credits" ? "next expiry " : "resets ", h("b", { "data-f": "resets_at" }, row.resets_at ? when(row.resets_at) : "never")),
    ),
  );
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, headers.map(([t, num]) => h("th", { class: num ? "num" : null }, t)))),
    h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((c, i) => h("td", { class: headers[i][1] ? "num" : null }, c))))),
  );
}

function customerPage(root, customer) {
  const c = enc(customer);
  const title = h("h1", {}, "Customer ", h("code", {}, customer));
  const plan = h("p", { class: "muted", id: "plan-line" });
  const limits = h("div", { id: "limits" });
  const balances = h("div", { id: "balances" });
  const grants = h("div", { id: "grants" });
  const notes = h("div", { id: "notifications" });
  const editor = entitlementsEditor(customer, () => current && current.refresh());
  const reservations = reservationPanel();
  const portal = portalTokenPanel(customer);
  root.append(
    h("p", {}, h("a", { href: "#/customers" }, "← Customers"), " · ", h("a", { href: `#/history?customer=${c}` }, "History of this customer")),
    title,
    plan,
    h("div", { class: "grid" }, h("section", { class: "panel", "aria-labelledby": "h-limits" }, h("h2", { id: "h-limits" }, "Limits"), limits), editor.el),
    h(
      "div",
      { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "h-credits" }, h("h2", { id: "h-credits" }, "Credit balances"), balances, h("h2", {}, "Grants"), grants),
      h("section", { class: "panel", "aria-labelledby": "h-notes" }, h("h2", { id: "h-notes" }, "Recent notifications"), notes),
    ),
    h("div", { class: "grid" }, reservations.el, portal),
  );
  return {
    async refresh() {
      const [usage, bal, gr, nt, rs] = await Promise.all([
        api(`/v1/customers/${c}/usage`),
        api(`/v1/customers/${c}/balances`),
        api(`/v1/customers/${c}/grants`),
        api(`/v1/notifications?customer=${c}&limit=20`),
        api(`/v1/reservations?customer=${c}&status=held&limit=100`),
      ]);
      plan.textContent = `Plan ${usage.plan} · features: ${Object.entries(usage.features).map(([k, v]) => `${k} ${v ? "on" : "off"}`).join(", ") || "none"}`;
      limits.replaceChildren(...(usage.meters.length ? usage.meters.map(limitRow) : [h("p", { class: "empty" }, "This plan lists no meter.")]));
      balances.replaceChildren(
        table(
          [["Meter"], ["Balance", 1], ["Granted", 1], ["Used", 1], ["Next expiry"]],
          bal.balances.map((b) => [b.meter, fmt(b.balance), fmt(b.granted), fmt(b.used), b.next_expiry ? `${fmt(b.next_expiry.amount)} on ${when(b.next_expiry.expires_at)}` : "—"]),
          "No credit balance.",
        ),
      );
      grants.replaceChildren(
        table(
          [["Id"], ["Meter"], ["Amount", 1], ["Remaining", 1], ["Status"], ["Expires"]],
          gr.grants.map((g) => [g.id, g.meter, fmt(g.amount), fmt(g.remaining), g.status, g.expires_at ? when(g.expires_at) : "never"]),
          "No grant.",
        ),
      );
      notes.replaceChildren(
        table(
          [["Created"], ["Type"], ["Meter"], ["Detail"], ["Status"]],
          nt.notifications.map((n) => [
            when(n.created_at),
            n.type,
            (n.data && n.data.meter) || "—",
            n.data && n.data.threshold !== undefined ? `${n.data.threshold}% of ${fmt(n.data.limit)} (${n.data.window})` : n.data && n.data.balance !== undefined ? `balance ${fmt(n.data.balance)}` : "",
            `${n.status} → ${n.endpoint}`,
          ]),
          "No notification.",
        ),
      );
      reservations.show(rs.reservations);
      await editor.load();
    },
  };
}

/** The entitlements editor: plan, overrides, features, Stripe id, anchor. */
function entitlementsEditor(customer, changed) {
  const url = `/v1/customers/${enc(customer)}/entitlements`;
  const fields = {};
  const errors = {};
  const field = (name, label, control, hint) => {
    control.id = `ent-${name}`;
    const err = h("div", { class: "error", id: `ent-${name}-error`, role: "alert" });
    control.setAttribute("aria-describedby", `ent-${name}-error`);
    fields[name] = control;
    errors[name] = err;
    return h("div", { class: "field" }, h("label", { for: control.id }, label), h("div", {}, control, hint ? h("div", { class: "muted" }, hint) : null), err);
  };
  const planSel = h("select", {});
  const overrides = h("textarea", { spellcheck: "false" });
  const features = h("textarea", { spellcheck: "false" });
  const stripe = h("input", { type: "text", spellcheck: "false" });
  const anchor = h("input", { type: "text", spellcheck: "false", placeholder: "2026-11-15T00:00:00Z" });
  const status = h("span", { class: "form-status", role: "status" });
  const save = h("button", { type: "submit" }, "Save entitlements");
  const reload = h("button", { type: "button", class: "secondary" }, "Discard changes");
  const form = h(
    "form",
    { id: "entitlements", novalidate: true },
    field("plan", "Plan", planSel),
    field("overrides", "Overrides (JSON)", overrides, 'per meter: {"api_calls": {"limit": 10, "window": "day"}}'),
    field("features", "Features (JSON)", features, 'this customer\'s flags, laid over the plan\'s: {"flag": true}'),
    field("stripe_customer_id", "Stripe customer id", stripe),
    field("billing_anchor", "Billing anchor", anchor, "RFC 3339, empty for the 1st of the month"),
    h("div", {}, save, " ", reload, status),
  );
  const el = h("section", { class: "panel", "aria-labelledby": "h-ent" }, h("h2", { id: "h-ent" }, "Entitlements"), form);
  let dirty = false;
  let plansLoaded = false;
  form.addEventListener("input", () => (dirty = true));

  const clearErrors = () => {
    for (const [name, err] of Object.entries(errors)) {
      err.textContent = "";
      fields[name].removeAttribute("aria-invalid");
    }
  };
  const fieldError = (name, text) => {
    const key = name in errors ? name : "plan";
    errors[key].textContent = errors[key].textContent ? `${errors[key].textContent}; ${text}` : text;
    fields[key].setAttribute("aria-invalid", "true");
  };
  let planFeatures = {}; // plan name → its flags
  const fill = (view) => {
    if (!plansLoaded) return;
    planSel.value = view.plan;
    overrides.value = Object.keys(view.overrides || {}).length ? JSON.stringify(view.overrides, null, 2) : "";
    // The view's features are the plan's with the customer's laid over: show
    // (and so send back) only the customer's own, those the plan does not give.
    const plan = planFeatures[view.plan] || {};
    const own = Object.fromEntries(Object.entries(view.features || {}).filter(([k, v]) => plan[k] !== v));
    features.value = Object.keys(own).length ? JSON.stringify(own, null, 2) : "";
    stripe.value = view.stripe_customer_id || "";
    anchor.value = view.billing_anchor || "";
    dirty = false;
  };
  const json = (name, text) => {
    if (!text.trim()) return {};
    try {
      const v = JSON.parse(text);
      if (v && typeof v === "object" && !Array.isArray(v)) return v;
      fieldError(name, "must be a JSON object");
    } catch (e) {
      fieldError(name, `not valid JSON: ${e.message}`);
    }
    return undefined;
  };

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    status.textContent = "";
    status.className = "form-status";
    const doc = { plan: planSel.value, overrides: json("overrides", overrides.value), features: json("features", features.value) };
    if (doc.overrides === undefined || doc.features === undefined) {
      status.textContent = "Not saved: fix the marked fields.";
      status.classList.add("bad");
      return;
    }
    if (stripe.value.trim()) doc.stripe_customer_id = stripe.value.trim();
    if (anchor.value.trim()) doc.billing_anchor = anchor.value.trim();
    try {
      const view = await api(url, { method: "PUT", body: doc });
      dirty = false;
      fill(view);
      status.textContent = "Saved.";
      status.classList.add("ok");
      await changed();
    } catch (err) {
      if (!(err instanceof ApiError)) throw err;
      // meterd names each problem's field ("overrides.api_calls.limit"); the
      // message names it too when there are no details ("entitlements: …").
      if (err.details.length) for (const d of err.details) fieldError(String(d.field || "").split(/[.[]/)[0], `${d.field}: ${d.reason}`);
      else {
        const named = Object.keys(errors).find((f) => err.message.includes(f));
        fieldError(named || "plan", err.message);
      }
      status.textContent = `Not saved: ${err.message}`;
      status.classList.add("bad");
    }
  });
  reload.addEventListener("click", async () => {
    clearErrors();
    status.textContent = "";
    dirty = false;
    fill(await api(url));
  });

  return {
    el,
    async load() {
      if (!plansLoaded) {
        const { plans } = await api("/v1/plans");
        planSel.replaceChildren(...plans.map((p) => h("option", { value: p.name }, p.default ? `${p.name} (default)` : p.name)));
        planFeatures = Object.fromEntries(plans.map((p) => [p.name, p.features || {}]));
        plansLoaded = true;
      }
      // Never overwrite what the operator is typing.
      if (!dirty && !form.contains(document.activeElement)) fill(await api(url));
    },
  };
}

/** The customer's open (held) reservations, newest first (the newest 100),
 *  and any reservation looked up by id. */
function reservationPanel() {
  const open = h("div", { id: "reservations" });
  const id = h("input", { id: "reservation-id", type: "search", placeholder: "reservation id" });
  const out = h("div", { role: "status" });
  const form = h("form", { class: "filters" }, h("label", { for: "reservation-id" }, "Reservation id", id), h("button", { type: "submit" }, "Look up"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const { reservation: r } = await api(`/v1/reservations/${enc(id.value.trim())}`);
      out.replaceChildren(table([["Id"], ["Meter"], ["Quantity", 1], ["Status"], ["Expires"]], [[r.id, r.meter, fmt(r.quantity), r.status, r.expires_at ? when(r.expires_at) : "held until released"]], ""));
    } catch (err) {
      out.replaceChildren(h("p", { class: "empty" }, err.message));
    }
  });
  const el = h(
    "section",
    { class: "panel", "aria-labelledby": "h-res" },
    h("h2", { id: "h-res" }, "Open reservations"),
    h("p", { class: "muted" }, "Held now, newest first; their quantity is in the bars (striped). Finished ones: look up by id."),
    open,
    form,
    out,
  );
  return {
    el,
    show(list) {
      open.replaceChildren(
        table(
          [["Id"], ["Meter"], ["Quantity", 1], ["Expires"]],
          list.map((r) => [r.id, r.meter, fmt(r.quantity), r.expires_at ? when(r.expires_at) : "held until released"]),
          "No open reservation.",
        ),
      );
    },
  };
}

/** Makes a portal token and shows the widget snippet for this customer. */
function portalTokenPanel(customer) {
  const out = h("div", {});
  const button = h("button", { type: "button", class: "secondary" }, "Make a portal token (1 h)");
  button.addEventListener("click", async () => {
    try {
      const t = await api(`/v1/customers/${enc(customer)}/portal-tokens`, { method: "POST", body: { expires_in: "1h" } });
      const snippet = `<script src="${location.origin}/ui/widget.js"></script>\n<meterd-usage token="${t.token}"></meterd-usage>`;
      out.replaceChildren(h("p", { class: "muted" }, `Expires ${when(t.expires_at)}. Embed:`), h("pre", { class: "snippet" }, snippet));
    } catch (err) {
      out.replaceChildren(h("p", { class: "empty" }, err.message));
    }
  });
  return h("section", { class: "panel", "aria-labelledby": "h-portal" }, h("h2", { id: "h-portal" }, "Usage widget"), button, out);
}

// ---- history --------------------------------------------------------------

const SPANS = { minute: [60, 60e3], hour: [48, 3600e3], day: [30, 86400e3] };

/** An SVG line chart of `series` ([{name, points: [[t, v]]}]) over [from, to). */
function chart(title, series, from, to, step) {
  const W = 560, H = 220, L = 52, R = 12, T = 12, B = 28;
  const max = Math.max(1, ...series.flatMap((x) => x.points.map((p) => p[1])));
  const x = (t) => L + ((t - from) / Math.max(1, to - from - step)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${title}: ${series.length} series, peak ${fmt(max)}` });
  for (const f of [0, 0.5, 1]) {
    svg.append(s("line", { class: "gridline", x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
    svg.append(s("text", { x: L - 6, y: y(max * f) + 4, "text-anchor": "end" }, fmt(max * f)));
  }
  svg.append(s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }), s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const label = (t) => new Date(t).toISOString().slice(step >= 86400e3 ? 5 : 11, step >= 86400e3 ? 10 : 16);
  svg.append(s("text", { x: L, y: H - 8 }, label(from)), s("text", { x: W - R, y: H - 8, "text-anchor": "end" }, label(to - step)));
  series.forEach((ser, i) => {
    svg.append(s("polyline", { class: `s${i % 6}`, points: ser.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ") }, s("title", {}, ser.name)));
  });
  return svg;
}

function historyPage(root, _arg, params) {
  const customer = h("input", { id: "h-customer", type: "search", value: params.get("customer") || "", placeholder: "empty: top 5 customers" });
  const gran = h("select", { id: "h-gran" }, ...["minute", "hour", "day"].map((g) => h("option", { value: g, selected: g === (params.get("granularity") || "hour") }, g)));
  const charts = h("div", { id: "charts", class: "grid" });
  let meters = null;
  root.append(
    h("h1", {}, "Usage history"),
    h(
      "section",
      { class: "panel" },
      h("div", { class: "filters" }, h("label", { for: "h-customer" }, "Customer", customer), h("label", { for: "h-gran" }, "Granularity", gran)),
      h("p", { class: "muted" }, "Last 60 minutes, 48 hours or 30 days, one chart per meter."),
    ),
    charts,
  );
  const redraw = () => current && current.refresh().catch(showBanner);
  customer.addEventListener("change", redraw);
  gran.addEventListener("change", redraw);
  return {
    async refresh() {
      if (!meters) meters = (await api("/v1/meters")).meters;
      const g = gran.value;
      const [n, step] = SPANS[g];
      const to = Math.ceil(Date.now() / step) * step;
      const from = to - n * step;
      const who = customer.value.trim();
      const answers = await Promise.all(
        meters.map((m) => {
          const q = new URLSearchParams({ meter: m.name, granularity: g, from: String(from), to: String(to) });
          if (who) q.set("customer", who);
          return api(`/v1/usage?${q}`);
        }),
      );
      charts.replaceChildren(
        ...answers.map((a, i) => {
          const byCustomer = new Map();
          for (const d of a.data) {
            const m = byCustomer.get(d.customer) || new Map();
            const t = Date.parse(d.start);
            m.set(t, (m.get(t) || 0) + Number(d.value));
            byCustomer.set(d.customer, m);
          }
          const total = (m) => [...m.values()].reduce((x, y) => x + y, 0);
          const top = [...byCustomer.entries()].sort((p, q) => total(q[1]) - total(p[1])).slice(0, 5);
          const series = top.map(([name, m]) => ({ name, points: Array.from({ length: n }, (_, k) => [from + k * step, m.get(from + k * step) || 0]) }));
          const title = `${meters[i].name} per ${g}`;
          return h(
            "section",
            { class: "panel", "data-meter": meters[i].name },
            h("h2", {}, title),
            series.length ? chart(title, series, from, to, step) : h("p", { class: "empty" }, "No usage in this range."),
            h("div", { class: "legend" }, series.map((x, k) => h("span", { class: `s${k % 6}` }, `${x.name} (${fmt(total(top[k][1]))})`))),
            a.truncated ? h("p", { class: "muted" }, "meterd cut this answer at 10,000 points: a coarser granularity or one customer shows all.") : null,
          );
        }),
      );
    },
  };
}

// ---- system ---------------------------------------------------------------

/** Prometheus text → [{name, labels, value}]. */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (ms, name, pred = () => true) => ms.filter((m) => m.name === name && pred(m.labels)).reduce((a, m) => a + m.value, 0);
const has = (ms, name) => ms.some((m) => m.name === name);

/** A histogram's cumulative buckets ([[le, count]], by le) over the series `pred` picks. */
function buckets(ms, name, pred) {
  const by = new Map();
  for (const m of ms) if (m.name === `${name}_bucket` && pred(m.labels)) by.set(m.labels.le, (by.get(m.labels.le) || 0) + m.value);
  return [...by.entries()].map(([le, c]) => [le === "+Inf" ? Infinity : Number(le), c]).sort((a, b) => a[0] - b[0]);
}

/** `now` minus `before` bucket by bucket (the requests in between). */
const minus = (now, before) => now.map(([le, c], i) => [le, c - ((before && before[i] && before[i][0] === le && before[i][1]) || 0)]);

/** The q-quantile (seconds) of cumulative buckets, or null without requests. */
function quantile(sorted, q) {
  const total = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (!total) return null;
  let prevLe = 0, prevC = 0;
  for (const [le, c] of sorted) {
    if (c >= q * total) {
      if (le === Infinity) return prevLe;
      return prevLe + (le - prevLe) * ((q * total - prevC) / Math.max(1, c - prevC));
    }
    prevLe = le;
    prevC = c;
  }
  return null;
}

function systemPage(root) {
  const cards = h("div", { class: "cards", id: "system-cards" });
  const ready = h("p", { id: "readyz" });
  root.append(h("h1", {}, "System"), ready, cards, h("p", { class: "muted" }, "From meterd's own /metrics and /readyz, every few seconds; rates over the last interval."));
  let last = null;
  return {
    async refresh() {
      const [text, readyz] = await Promise.all([
        api("/metrics", { text: true }),
        fetch("/readyz", { cache: "no-store" }).then((r) => r.json()).catch(() => ({ status: "unreachable" })),
      ]);
      const ms = parseMetrics(text);
      const now = Date.now();
      const totals = {
        events: sum(ms, "meterd_events_total", (l) => !l.result || l.result === "accepted"),
        checks: sum(ms, "meterd_http_request_duration_seconds_count", (l) => l.route === "check"),
      };
      const rate = (k) => (last ? Math.max(0, (totals[k] - last.totals[k]) / ((now - last.at) / 1000)) : null);
      const ms1 = (v) => (v === null ? "—" : `${(v * 1000).toFixed(v < 0.01 ? 2 : 1)} ms`);
      // p99 over the last interval when there were requests, else since start.
      const hist = {};
      const p99 = (route) => {
        const all = (hist[route] = buckets(ms, "meterd_http_request_duration_seconds", (l) => l.route === route));
        const recent = last && quantile(minus(all, last.hist[route]), 0.99);
        if (recent !== null && recent !== undefined) return ms1(recent);
        const total = quantile(all, 0.99);
        return total === null ? "no requests" : `${ms1(total)} (since start)`;
      };
      const items = [
        ["Events ingested /s", rate("events") === null ? "…" : rate("events").toFixed(1)],
        ["Checks /s", rate("checks") === null ? "…" : rate("checks").toFixed(1)],
        ["Check p99", p99("check")],
        ["Events p99", p99("events")],
        ["WAL not yet stored", `${fmt(sum(ms, "meterd_wal_bytes") / 1024)} KiB`],
        ["Store flush lag", `${fmt(sum(ms, "meterd_flush_lag_seconds"))} s`, sum(ms, "meterd_flush_lag_seconds") > 10 ? "bad" : "good"],
        ["Store flush errors", fmt(sum(ms, "meterd_flush_errors_total")), sum(ms, "meterd_flush_errors_total") > 0 ? "warn" : "good"],
        ["Writes refused", sum(ms, "meterd_writes_refused") > 0 ? "yes" : "no", sum(ms, "meterd_writes_refused") > 0 ? "bad" : "good"],
        ["Redis", has(ms, "meterd_redis_up") ? (sum(ms, "meterd_redis_up") > 0 ? "up" : "down") : "not configured", has(ms, "meterd_redis_up") ? (sum(ms, "meterd_redis_up") > 0 ? "good" : "bad") : ""],
        ["ClickHouse export", has(ms, "meterd_raw_export_lag_seconds") ? `lag ${fmt(sum(ms, "meterd_raw_export_lag_seconds"))} s` : "no raw export"],
        ["Stripe reporter", has(ms, "meterd_stripe_lag_seconds") ? (sum(ms, "meterd_stripe_unauthorized") > 0 ? "key refused" : `lag ${fmt(sum(ms, "meterd_stripe_lag_seconds"))} s`) : "not configured", sum(ms, "meterd_stripe_unauthorized") > 0 ? "bad" : ""],
        ["Notifications pending", has(ms, "meterd_notifications_pending") ? fmt(sum(ms, "meterd_notifications_pending")) : "not configured", sum(ms, "meterd_notifications_oldest_pending_seconds") > 300 ? "warn" : ""],
        ["Tasks not running", String(ms.filter((m) => m.name === "meterd_task_running" && m.value === 0).map((m) => m.labels.task).join(", ") || "none")],
        ["Customers", fmt(sum(ms, "meterd_customers"))],
        ["Open connections", fmt(sum(ms, "meterd_http_connections_open"))],
      ];
      cards.replaceChildren(...items.map(([label, value, cls]) => h("div", { class: `card ${cls || ""}`, "data-metric": label }, h("div", { class: "label" }, label), h("div", { class: "value" }, value))));
      ready.textContent = `readyz: ${readyz.status || (readyz.error && readyz.error.message) || "?"}${readyz.reason ? ` (${readyz.reason})` : ""}`;
      last = { totals, hist, at: now };
    },
  };
}

route();
