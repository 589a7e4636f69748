/* meterd usage widget (issue 22): <meterd-usage token="mpt_…"></meterd-usage>
 *
 * Renders one customer's usage bars from a portal token, in a shadow root.
 * Attributes: token (required), customer (default: the one the token names),
 * api (meterd's base URL; default: where this script was loaded from),
 * refresh (seconds, default 30; 0 = never).
 * Theme with CSS variables on the element: --meterd-font, --meterd-fg,
 * --meterd-muted, --meterd-bg, --meterd-track, --meterd-ok, --meterd-warn,
 * --meterd-high, --meterd-over, --meterd-radius, --meterd-focus.
 * Events: "meterd-usage" (detail: the usage answer), "meterd-error" (detail: {status, message}).
 */
(() => {
  "use strict";
  if (customElements.get("meterd-usage")) return;
  const script = document.currentScript;
  const defaultApi = script && script.src ? new URL(script.src).origin : location.origin;

  const CSS = `
:host { display: block; font: var(--meterd-font, 14px/1.4 system-ui, sans-serif); color: var(--meterd-fg, #1c2430);
  background: var(--meterd-bg, transparent); }
:host([hidden]) { display: none; }
.title { font-weight: 600; margin: 0 0 .5em; }
ul { list-style: none; margin: 0; padding: 0; }
li { margin: 0 0 .8em; }
.head { display: flex; justify-content: space-between; gap: 1em; flex-wrap: wrap; }
.name { font-weight: 600; }
.figs, .resets { color: var(--meterd-muted, #4f5b6b); font-variant-numeric: tabular-nums; }
.resets { font-size: .85em; }
.bar { height: 10px; border-radius: var(--meterd-radius, 5px); background: var(--meterd-track, #e3e7ec); overflow: hidden; margin: .25em 0; }
.bar:focus-visible { outline: 3px solid var(--meterd-focus, #1f5fa8); outline-offset: 2px; }
.fill { height: 100%; width: 0; background: var(--meterd-ok, #2e7d32); }
.warn .fill { background: var(--meterd-warn, #9a7400); }
.high .fill { background: var(--meterd-high, #c2560a); }
.over .fill { background: var(--meterd-over, #c62828); }
.error { color: var(--meterd-over, #c62828); }
.muted { color: var(--meterd-muted, #4f5b6b); }
`;

  let sheet = null;
  const styles = () => {
    if (sheet === null && "adoptedStyleSheets" in Document.prototype && "replaceSync" in CSSStyleSheet.prototype) {
      sheet = new CSSStyleSheet();
      sheet.replaceSync(CSS);
    }
    return sheet;
  };

  /** The customer a portal token names (its payload is hex JSON), or "". */
  function tokenCustomer(token) {
    const m = /^mpt_([0-9a-f]+)\./i.exec(token || "");
    if (!m || m[1].length % 2) return "";
    try {
      const bytes = new Uint8Array(m[1].match(/../g).map((b) => parseInt(b, 16)));
      const claims = JSON.parse(new TextDecoder().decode(bytes));
      return typeof claims.c === "string" ? claims.c : "";
    } catch (_) {
      return "";
    }
  }

  const num = (v) => (v === null || v === undefined ? "unlimited" : Number(v).toLocaleString(undefined, { maximumFractionDigits: 3 }));
  const level = (p) => (p >= 100 ? "over" : p >= 90 ? "high" : p >= 75 ? "warn" : "ok");
  const WINDOWS = { minute: "this minute", hour: "this hour", day: "today", month: "this month", billing_cycle: "this billing period", total: "in total", credits: "credits" };

  class MeterdUsage extends HTMLElement {
    static get observedAttributes() {
      return ["token", "customer", "api", "refresh"];
    }

    constructor() {
      super();
      this.root = this.attachShadow({ mode: "open" });
      const s = styles();
      if (s) this.root.adoptedStyleSheets = [s];
      else {
        const style = document.createElement("style");
        style.textContent = CSS;
        this.root.append(style);
      }
      this.body = document.createElement("div");
      this.body.setAttribute("part", "body");
      this.body.setAttribute("aria-live", "polite");
      this.root.append(this.body);
      this.timer = null;
      this.seq = 0;
    }

    connectedCallback() {
      this.load();
    }

    disconnectedCallback() {
      clearTimeout(this.timer);
    }

    attributeChangedCallback() {
      if (this.isConnected) this.load();
    }

    async load() {
      clearTimeout(this.timer);
      const seq = ++this.seq;
      const token = this.getAttribute("token") || "";
      const customer = this.getAttribute("customer") || tokenCustomer(token);
      if (!token || !customer) return this.fail(0, "No valid portal token.");
      const base = (this.getAttribute("api") || defaultApi).replace(/\/+$/, "");
      let status = 0;
      let body = null;
      try {
        const res = await fetch(`${base}/v1/customers/${encodeURIComponent(customer)}/usage`, {
          headers: { authorization: `Bearer ${token}` },
          cache: "no-store",
          credentials: "omit",
        });
        status = res.status;
        body = await res.json().catch(() => null);
      } catch (_) {
        body = null;
      }
      if (seq !== this.seq) return;
      if (status !== 200 || !body || !Array.isArray(body.meters)) {
        const reason = body && body.error && body.error.message;
        this.fail(status, status === 403 ? "This usage belongs to another customer." : reason || "Usage is unavailable right now.");
      } else {
        this.render(body);
        this.dispatchEvent(new CustomEvent("meterd-usage", { detail: body }));
      }
      const every = Number(this.getAttribute("refresh") ?? 30);
      if (every > 0) this.timer = setTimeout(() => this.load(), every * 1000);
    }

    fail(status, message) {
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = message;
      this.body.replaceChildren(p);
      this.setAttribute("data-state", "error");
      this.dispatchEvent(new CustomEvent("meterd-error", { detail: { status, message } }));
    }

    render(usage) {
      const el = (tag, cls, text) => {
        const e = document.createElement(tag);
        if (cls) e.className = cls;
        if (text !== undefined) e.textContent = text;
        return e;
      };
      const list = el("ul");
      list.setAttribute("part", "list");
      for (const row of usage.meters) {
        const limit = row.limit === null ? null : Number(row.limit);
        const used = Number(row.used) + Number(row.held || 0);
        const pct = limit === null ? 0 : limit === 0 ? (used > 0 ? 100 : 0) : (used / limit) * 100;
        const name = `${row.meter.replace(/_/g, " ")} ${WINDOWS[row.window] || row.window}`;
        const li = el("li", limit === null ? "ok" : level(pct));
        li.setAttribute("part", "meter");
        const head = el("div", "head");
        const label = el("span", "name", name);
        label.id = `m-${Math.random().toString(36).slice(2)}`;
        head.append(label, el("span", "figs", limit === null ? `${num(used)} used` : `${num(used)} of ${num(limit)}`));
        const bar = el("div", "bar");
        bar.setAttribute("role", "progressbar");
        bar.setAttribute("tabindex", "0");
        bar.setAttribute("aria-labelledby", label.id);
        bar.setAttribute("aria-valuemin", "0");
        if (limit !== null) {
          bar.setAttribute("aria-valuemax", String(limit));
          bar.setAttribute("aria-valuenow", String(Math.min(used, limit)));
        }
        bar.setAttribute("aria-valuetext", limit === null ? `${num(used)} used, unlimited` : `${num(used)} of ${num(limit)} used, ${num(row.remaining)} left`);
        const fill = el("div", "fill");
        fill.style.width = `${Math.min(100, pct)}%`;
        bar.append(fill);
        li.append(head, bar);
        const at = row.resets_at && new Date(row.resets_at);
        const short = row.window === "minute" || row.window === "hour";
        const date = at ? (short ? at.toLocaleTimeString(undefined, { timeStyle: "short" }) : at.toLocaleDateString(undefined, { dateStyle: "medium" })) : "";
        const left = limit === null ? "" : `${num(row.remaining)} left`;
        const resets = date ? `${row.window === "credits" ? "next expiry" : "resets"} ${date}` : "";
        if (left || resets) li.append(el("div", "resets", [left, resets].filter(Boolean).join(" · ")));
        list.append(li);
      }
      if (!usage.meters.length) list.append(el("li", "muted", "No metered usage on this plan."));
      this.body.replaceChildren(list);
      this.setAttribute("data-state", "ready");
    }
  }

  customElements.define("meterd-usage", MeterdUsage);
})();
