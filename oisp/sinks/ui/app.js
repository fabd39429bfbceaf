// The oisp dashboard. Plain DOM: every string from an event is set with textContent
// (never innerHTML), since prompts, responses and process names are attacker-controlled.
"use strict";

(function () {
  // The token came in the URL and is now an HttpOnly cookie: take it out of the address bar and history.
  if (location.search) history.replaceState(null, "", location.pathname);

  const ROW_H = 26;
  const OVERSCAN = 10;
  const PLOT_BUCKETS = 60;
  const PALETTE = ["#2457d6", "#16803c", "#b26a00", "#8e24aa", "#00838f", "#9e9e9e"];

  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  const fmtInt = (n) => (n === null || n === undefined ? "-" : n.toLocaleString("en-US"));
  const fmtUsd = (n) => (n === null || n === undefined ? "-" : "$" + (n >= 1 ? n.toFixed(2) : n >= 0.01 ? n.toFixed(4) : n.toFixed(6)));
  const fmtMs = (n) => (n === null || n === undefined ? "-" : n >= 10000 ? (n / 1000).toFixed(1) + " s" : Math.round(n) + " ms");
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : null);
  function parseTs(ts) {
    if (typeof ts !== "string") return 0;
    const m = /^(.{19})(\.\d{1,3})?\d*(Z|[+-]\d\d:\d\d)?$/.exec(ts);
    const t = Date.parse(m ? m[1] + (m[2] || "") + (m[3] || "Z") : ts);
    return isFinite(t) ? t : 0;
  }
  function fmtTime(t) {
    const d = new Date(t);
    const p = (n, w = 2) => String(n).padStart(w, "0");
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }
  const asText = (v) => (typeof v === "string" ? v : v === undefined || v === null ? "" : JSON.stringify(v, null, 2));

  // ---- the model: calls paired by request_id, in arrival order ----
  const calls = [];
  const byId = new Map();
  const flows = new Map(); // attrs.flow_id -> {connect, flow}: TLS and flow details for a call
  const seen = { process: new Set(), provider: new Set(), model: new Set() };
  let health = null;

  function callFor(rid) {
    let c = byId.get(rid);
    if (!c) {
      c = { rid, req: null, resp: null, t: 0, proc: "", pid: null, exe: "", user: "", provider: "", model: "",
            endpoint: "", streamed: false, status: "pending", code: null, tin: null, tcached: null, tout: null,
            treason: null, cost: null, latency: null, ttft: null, flowId: null, blob: null };
      byId.set(rid, c);
      calls.push(c);
      c.isNew = true;
    }
    return c;
  }

  function fillCommon(c, ev) {
    const p = ev.process || {};
    const d = ev.data || {};
    if (!c.proc && typeof p.name === "string") c.proc = p.name;
    if (c.pid === null && num(p.pid) !== null) c.pid = p.pid;
    if (!c.exe && typeof p.exe === "string") c.exe = p.exe;
    if (!c.user && typeof p.user === "string") c.user = p.user;
    const prov = d.provider || {};
    if (!c.provider) c.provider = String(prov.name || prov.id || "");
    if (!c.endpoint && typeof prov.endpoint === "string") c.endpoint = prov.endpoint;
    if (d.model && typeof d.model.id === "string" && (!c.model || ev.event_type === "ai.request")) c.model = d.model.id;
    if (!c.t) c.t = parseTs(ev.ts);
    if (!c.flowId && ev.attrs && ev.attrs.flow_id) c.flowId = String(ev.attrs.flow_id);
  }

  function applyResponse(c, ev) {
    const d = ev.data || {};
    const u = d.usage || {};
    c.resp = ev;
    c.code = num(d.status_code);
    c.status = d.success ? "ok" : "error";
    c.tin = num(u.prompt_tokens);
    c.tcached = num(u.cached_tokens);
    c.tout = num(u.completion_tokens);
    c.treason = num(u.reasoning_tokens);
    c.cost = u.cost && typeof u.cost === "object" ? num(u.cost.usd) : null;
    c.latency = num(d.latency_ms);
    c.ttft = num(d.time_to_first_token_ms);
    c.blob = null;
  }

  // Returns the call the event changed (or null).
  function ingest(ev) {
    if (!ev || typeof ev !== "object") return null;
    const kind = ev.event_type;
    if (kind === "network.connect" || kind === "network.flow") {
      const fid = ev.attrs && ev.attrs.flow_id;
      if (fid) {
        const f = flows.get(String(fid)) || {};
        if (kind === "network.connect") f.connect = ev; else f.flow = ev;
        flows.set(String(fid), f);
      }
      return null;
    }
    if (kind !== "ai.request" && kind !== "ai.response") return null;
    const d = ev.data || {};
    const rid = typeof d.request_id === "string" ? d.request_id : ev.event_id;
    const c = callFor(String(rid));
    if (kind === "ai.request") {
      c.req = ev;
      c.streamed = !!d.streaming;
      c.t = parseTs(ev.ts) || c.t;
    } else {
      applyResponse(c, ev);
    }
    fillCommon(c, ev);
    c.blob = null;
    for (const [key, value] of [["process", c.proc], ["provider", c.provider], ["model", c.model]]) {
      if (value && !seen[key].has(value)) { seen[key].add(value); optionsDirty = true; }
    }
    return c;
  }

  // ---- filters ----
  const F = { process: "", provider: "", model: "", status: "", range: "", from: 0, to: 0, text: "" };

  function searchBlob(c) {
    if (c.blob !== null) return c.blob;
    const parts = [c.proc, c.exe, c.user, c.provider, c.model, c.endpoint, String(c.pid ?? ""), String(c.code ?? "")];
    const rd = (c.req && c.req.data) || {};
    for (const m of rd.messages || []) parts.push(asText(m && m.content));
    for (const t of rd.tools || []) parts.push(asText(t));
    const sd = (c.resp && c.resp.data) || {};
    for (const ch of sd.choices || []) parts.push(asText(ch && ch.message && ch.message.content));
    for (const tc of sd.tool_calls || []) parts.push(asText(tc));
    if (sd.thinking) parts.push(asText(sd.thinking));
    if (sd.error) parts.push(asText(sd.error));
    c.blob = parts.join("\n").toLowerCase();
    return c.blob;
  }

  function timeBounds() {
    if (F.range === "custom") return [F.from || -Infinity, F.to || Infinity];
    if (F.range) return [Date.now() - Number(F.range) * 1000, Infinity];
    return [-Infinity, Infinity];
  }

  function makeMatcher() {
    const [lo, hi] = timeBounds();
    const text = F.text.trim().toLowerCase();
    return (c) =>
      (!F.process || c.proc === F.process) &&
      (!F.provider || c.provider === F.provider) &&
      (!F.model || c.model === F.model) &&
      (!F.status || c.status === F.status) &&
      c.t >= lo && c.t <= hi &&
      (!text || searchBlob(c).includes(text));
  }

  // ---- aggregates over the shown calls, kept incrementally ----
  function emptyAgg() { return { calls: 0, pending: 0, errors: 0, done: 0, tin: 0, tcached: 0, tout: 0, treason: 0, cost: 0, costed: 0 }; }
  function addTo(a, c, s) {
    a.calls += s;
    if (c.status === "pending") a.pending += s; else a.done += s;
    if (c.status === "error") a.errors += s;
    a.tin += s * (c.tin || 0); a.tcached += s * (c.tcached || 0); a.tout += s * (c.tout || 0); a.treason += s * (c.treason || 0);
    if (c.cost !== null) { a.cost += s * c.cost; a.costed += s; }
  }
  let view = [];
  let inView = new Set();
  let total = emptyAgg();
  let groups = { proc: new Map(), provider: new Map(), model: new Map() };
  let matcher = makeMatcher();

  function account(c, s) {
    addTo(total, c, s);
    for (const key of ["proc", "provider", "model"]) {
      const name = c[key] || "(unknown)";
      let a = groups[key].get(name);
      if (!a) groups[key].set(name, (a = emptyAgg()));
      addTo(a, c, s);
    }
  }

  function rebuildView() {
    matcher = makeMatcher();
    view = calls.filter(matcher);
    inView = new Set(view);
    total = emptyAgg();
    groups = { proc: new Map(), provider: new Map(), model: new Map() };
    for (const c of view) account(c, 1);
    viewDirty = false;
    dirty.rows = dirty.totals = dirty.summary = true;
  }

  // A batch of events from the server, applied to the view without a full rebuild where possible.
  let viewDirty = false;
  function onEvents(events) {
    let added = 0;
    for (const ev of events) {
      const before = ev && ev.data && byId.get(String(ev.data.request_id));
      const snapshot = before && inView.has(before) ? Object.assign({}, before) : null;
      const c = ingest(ev);
      if (!c) continue;
      if (c.isNew) {
        c.isNew = false;
        if (matcher(c)) { view.push(c); inView.add(c); account(c, 1); added++; }
      } else if (snapshot) {
        account(snapshot, -1);
        if (matcher(c)) account(c, 1); else viewDirty = true;
      } else if (!viewDirty && matcher(c)) {
        viewDirty = true; // a call outside the view now matches (its response changed its status or text)
      }
    }
    if (added && rowsEl.scrollTop > 0) rowsEl.scrollTop += added * ROW_H; // keep what is read in place
    dirty.rows = dirty.totals = dirty.summary = true;
    if (detailRid) dirty.detail = true;
    schedule();
  }

  // ---- rendering, at most once a frame ----
  const dirty = { rows: true, totals: true, summary: true, health: true, detail: false };
  let optionsDirty = false;
  let frame = 0;
  let lastRebuild = 0;
  function schedule() { if (!frame) frame = requestAnimationFrame(render); }

  function render() {
    frame = 0;
    const t0 = performance.now();
    if (viewDirty) {
      if (t0 - lastRebuild < 300) { setTimeout(schedule, 300); } else { lastRebuild = t0; rebuildView(); }
    }
    if (optionsDirty) renderOptions();
    if (dirty.totals) renderTotals();
    if (dirty.rows) renderRows();
    if (dirty.summary && activeTab === "summary") renderSummary();
    if (dirty.health) renderHealth();
    if (dirty.detail) renderDetail();
    stats.renderMs = performance.now() - t0;
    stats.calls = calls.length;
    stats.shown = view.length;
    stats.renders++;
  }
  const stats = { calls: 0, shown: 0, renders: 0, renderMs: 0, batches: 0 };
  window.oispStats = stats; // read by the benchmark; holds counts only

  function renderOptions() {
    optionsDirty = false;
    for (const [key, id] of [["process", "f-process"], ["provider", "f-provider"], ["model", "f-model"]]) {
      const sel = $(id);
      const have = new Set(Array.from(sel.options, (o) => o.value));
      const values = Array.from(seen[key]).sort();
      if (values.length > 2000) continue; // a select this long helps no one; the search box does
      for (const v of values) if (!have.has(v)) { const o = el("option", null, v); o.value = v; sel.appendChild(o); }
    }
  }

  function renderTotals() {
    dirty.totals = false;
    const put = (k, v) => { document.querySelector(`[data-total="${k}"]`).textContent = v; };
    put("calls", fmtInt(total.calls));
    put("pending", fmtInt(total.pending));
    put("errors", fmtInt(total.errors));
    put("input", fmtInt(total.tin));
    put("cached", fmtInt(total.tcached));
    put("output", fmtInt(total.tout));
    put("reasoning", fmtInt(total.treason));
    put("cost", total.costed ? fmtUsd(total.cost) : "-");
    $("shown").textContent = view.length === calls.length ? `${fmtInt(calls.length)} calls` : `${fmtInt(view.length)} of ${fmtInt(calls.length)} calls`;
  }

  // The calls table: only the rows in sight exist in the DOM.
  const COLS = [
    ["time", (c) => fmtTime(c.t)], ["process", (c) => c.proc || "-"], ["pid", (c) => c.pid ?? "-", "num"],
    ["user", (c) => c.user || "-"], ["provider", (c) => c.provider || "-"], ["model", (c) => c.model || "-"],
    ["endpoint", (c) => c.endpoint || "-"], ["stream", (c) => (c.streamed ? "yes" : "no")],
    ["status", (c) => (c.status === "pending" ? "…" : c.code ?? "-")],
    ["input", (c) => fmtInt(c.tin), "num"], ["cached", (c) => fmtInt(c.tcached), "num"], ["output", (c) => fmtInt(c.tout), "num"],
    ["reasoning", (c) => fmtInt(c.treason), "num"], ["cost", (c) => fmtUsd(c.cost), "num"],
    ["latency", (c) => (c.status === "pending" ? "…" : fmtMs(c.latency)), "num"], ["TTFT", (c) => fmtMs(c.ttft), "num"],
  ];
  const rowsEl = $("rows");
  const spacer = $("spacer");
  const pool = [];
  for (const [name, , cls] of COLS) $("thead").appendChild(el("span", cls, name));

  function renderRows() {
    dirty.rows = false;
    const n = view.length;
    spacer.style.height = n * ROW_H + "px";
    const first = Math.max(0, Math.floor(rowsEl.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(n, Math.ceil((rowsEl.scrollTop + rowsEl.clientHeight) / ROW_H) + OVERSCAN);
    const count = Math.max(0, last - first);
    while (pool.length < count) {
      const r = el("div", "row");
      for (const [, , cls] of COLS) r.appendChild(el("span", cls));
      r.addEventListener("click", () => openDetail(r.dataset.rid));
      rowsEl.appendChild(r);
      pool.push(r);
    }
    for (let i = 0; i < pool.length; i++) {
      const r = pool[i];
      if (i >= count) { r.hidden = true; continue; }
      const index = first + i;
      const c = view[n - 1 - index]; // newest first
      r.hidden = false;
      r.style.top = index * ROW_H + "px";
      r.dataset.rid = c.rid;
      r.className = "row" + (c.status === "pending" ? " pending" : "") + (c.rid === detailRid ? " selected" : "");
      const cells = r.children;
      for (let k = 0; k < COLS.length; k++) cells[k].textContent = String(COLS[k][1](c));
      cells[1].title = c.exe || c.proc;
      cells[6].title = c.endpoint;
      cells[8].className = "st-" + c.status;
    }
  }
  rowsEl.addEventListener("scroll", () => { dirty.rows = true; schedule(); }, { passive: true });
  window.addEventListener("resize", () => { dirty.rows = true; schedule(); });

  // ---- a call's detail ----
  let detailRid = null;
  function openDetail(rid) {
    detailRid = rid;
    dirty.detail = dirty.rows = true;
    schedule();
  }
  $("detail-close").addEventListener("click", () => { detailRid = null; $("detail").hidden = true; dirty.rows = true; schedule(); });

  function kv(pairs) {
    const dl = el("dl", "kv");
    for (const [k, v] of pairs) {
      if (v === undefined || v === null || v === "") continue;
      dl.appendChild(el("dt", null, k));
      dl.appendChild(el("dd", null, v));
    }
    return dl;
  }
  function block(title, ...children) {
    const s = el("section", "block");
    s.appendChild(el("h3", null, title));
    for (const c of children) s.appendChild(c);
    return s;
  }
  function message(role, content, cls, extra) {
    const m = el("div", "msg " + (cls || role || ""));
    m.appendChild(el("div", "role", role + (extra ? " · " + extra : "")));
    m.appendChild(el("div", "text", asText(content)));
    return m;
  }

  function renderDetail() {
    dirty.detail = false;
    const c = detailRid && byId.get(detailRid);
    const box = $("detail");
    if (!c) { box.hidden = true; return; }
    box.hidden = false;
    $("detail-title").textContent = `${c.provider || "?"} · ${c.model || "?"}`;
    const body = $("detail-body");
    const scroll = box.scrollTop;
    body.replaceChildren();
    const rd = (c.req && c.req.data) || {};
    const sd = (c.resp && c.resp.data) || {};
    const u = sd.usage || {};
    const p = (c.req || c.resp || {}).process || {};
    body.appendChild(kv([
      ["time", c.t ? new Date(c.t).toISOString() : ""], ["status", c.status === "pending" ? "in progress" : `${c.code ?? "-"} ${c.status}`],
      ["process", c.proc], ["pid", c.pid], ["executable", c.exe], ["user", c.user], ["command line", p.cmdline],
      ["provider", c.provider], ["endpoint", c.endpoint], ["model", c.model],
      ["request type", rd.request_type], ["streamed", c.streamed ? "yes" : "no"],
      ["latency", c.latency !== null ? fmtMs(c.latency) : ""], ["time to first token", c.ttft !== null ? fmtMs(c.ttft) : ""],
      ["finish reason", sd.finish_reason], ["provider request id", sd.provider_request_id],
      ["auth", rd.auth ? [rd.auth.type, rd.auth.key_prefix, rd.auth.key_hash].filter(Boolean).join(" ") : ""],
      ["parameters", rd.parameters ? JSON.stringify(rd.parameters) : ""],
    ]));
    if (sd.error) body.appendChild(block("Error", message("error", sd.error, "error")));
    const msgs = Array.isArray(rd.messages) ? rd.messages : [];
    const system = msgs.filter((m) => m && m.role === "system");
    if (system.length) body.appendChild(block("System prompt", ...system.map((m) => message("system", m.content))));
    const rest = msgs.filter((m) => !m || m.role !== "system");
    if (rest.length) body.appendChild(block("Messages", ...rest.map((m) => message(String((m && m.role) || "?"), m && m.content, null, m && (m.name || m.tool_call_id)))));
    if (Array.isArray(rd.tools) && rd.tools.length) {
      body.appendChild(block("Tools", ...rd.tools.map((t) => message(String((t && t.name) || "tool"), t && t.description ? t.description : t, "tool"))));
    }
    if (!c.resp) body.appendChild(block("Response", el("p", "muted", "in progress: no response yet")));
    const choices = Array.isArray(sd.choices) ? sd.choices : [];
    const texts = choices.filter((ch) => ch && ch.message && ch.message.content);
    if (texts.length) body.appendChild(block("Response", ...texts.map((ch) => message("assistant", ch.message.content, "assistant", ch.finish_reason))));
    if (sd.thinking) body.appendChild(block("Thinking", message("thinking", sd.thinking, "assistant")));
    if (Array.isArray(sd.tool_calls) && sd.tool_calls.length) {
      body.appendChild(block("Tool calls", ...sd.tool_calls.map((tc) => message(String((tc && tc.name) || "tool"), tc && tc.arguments, "assistant", tc && tc.id))));
    }
    if (c.resp) {
      const cost = u.cost && typeof u.cost === "object" ? u.cost : null;
      body.appendChild(block("Usage", kv([
        ["input tokens", fmtInt(c.tin)], ["cached input", fmtInt(c.tcached)], ["output tokens", fmtInt(c.tout)],
        ["reasoning", fmtInt(c.treason)], ["total", fmtInt(num(u.total_tokens))],
        ["cost", cost ? `${fmtUsd(num(cost.usd))}${cost.estimate ? " (estimate)" : ""}, prices of ${cost.prices_as_of || "?"} (${cost.source || "?"})` : "-"],
      ])));
    }
    const f = c.flowId ? flows.get(c.flowId) : null;
    const net = (f && (f.flow || f.connect)) || null;
    if (net) {
      const nd = net.data || {};
      const tls = nd.tls || {};
      const http = nd.http || {};
      body.appendChild(block("TLS and flow", kv([
        ["server", nd.dest ? `${nd.dest.domain || ""} ${nd.dest.ip || ""}:${nd.dest.port || ""}` : ""],
        ["client", nd.src ? `${nd.src.ip || ""}:${nd.src.port || ""}` : ""], ["TLS", tls.version], ["cipher", tls.cipher_suite],
        ["SNI", tls.sni], ["ALPN", tls.alpn], ["HTTP", http.version ? `${http.method || ""} ${http.path || ""} ${http.version}` : ""],
        ["bytes sent", nd.bytes_sent], ["bytes received", nd.bytes_received], ["flow", c.flowId],
      ])));
    }
    const raw = el("details");
    raw.appendChild(el("summary", null, "raw events (redacted)"));
    for (const ev of [c.req, c.resp, f && f.connect, f && f.flow]) if (ev) raw.appendChild(el("pre", null, JSON.stringify(ev, null, 2)));
    body.appendChild(block("Events", raw));
    box.scrollTop = scroll;
  }

  // ---- summaries ----
  function summaryTable(tableEl, map) {
    const head = el("tr");
    for (const h of ["name", "calls", "input", "output", "cost", "errors", "error rate"]) head.appendChild(el("th", null, h));
    const rows = [head];
    const entries = Array.from(map.entries()).filter(([, a]) => a.calls > 0).sort((x, y) => y[1].calls - x[1].calls).slice(0, 50);
    for (const [name, a] of entries) {
      const tr = el("tr");
      for (const v of [name, fmtInt(a.calls), fmtInt(a.tin), fmtInt(a.tout), a.costed ? fmtUsd(a.cost) : "-", fmtInt(a.errors),
                       a.done ? (100 * a.errors / a.done).toFixed(1) + " %" : "-"]) tr.appendChild(el("td", null, v));
      rows.push(tr);
    }
    tableEl.replaceChildren(...rows);
  }

  let lastPlot = 0;
  function renderSummary() {
    dirty.summary = false;
    summaryTable($("s-proc"), groups.proc);
    summaryTable($("s-provider"), groups.provider);
    summaryTable($("s-model"), groups.model);
    const now = performance.now();
    if (now - lastPlot < 1000) { setTimeout(() => { dirty.summary = true; schedule(); }, 1000); return; }
    lastPlot = now;
    plot();
  }

  function metricOf(c, metric) {
    if (metric === "tokens") return (c.tin || 0) + (c.tout || 0);
    if (metric === "cost") return c.cost || 0;
    if (metric === "errors") return c.status === "error" ? 1 : 0;
    return 1;
  }

  function plot() {
    const canvas = $("plot");
    const ctx = canvas.getContext("2d");
    const w = (canvas.width = canvas.clientWidth || 1200);
    const h = (canvas.height = canvas.clientHeight || 260);
    ctx.clearRect(0, 0, w, h);
    const metric = $("p-metric").value;
    const group = $("p-group").value;
    const legend = $("legend");
    legend.replaceChildren();
    if (!view.length) { $("plot-range").textContent = "no calls"; return; }
    let lo = Infinity, hi = -Infinity;
    for (const c of view) { if (c.t < lo) lo = c.t; if (c.t > hi) hi = c.t; }
    const span = Math.max(hi - lo, 1000);
    const size = span / PLOT_BUCKETS;
    const top = group ? Array.from(groups[group].entries()).sort((a, b) => b[1].calls - a[1].calls).slice(0, PALETTE.length - 1).map(([k]) => k) : ["all"];
    const series = new Map(top.map((k) => [k, new Float64Array(PLOT_BUCKETS)]));
    const other = new Float64Array(PLOT_BUCKETS);
    for (const c of view) {
      const b = Math.min(PLOT_BUCKETS - 1, Math.floor((c.t - lo) / size));
      const key = group ? c[group] || "(unknown)" : "all";
      (series.get(key) || other)[b] += metricOf(c, metric);
    }
    const all = [...series.entries()];
    if (group && other.some((v) => v)) all.push(["other", other]);
    let max = 0;
    for (let b = 0; b < PLOT_BUCKETS; b++) { let s = 0; for (const [, a] of all) s += a[b]; if (s > max) max = s; }
    const padL = 60, padB = 20, bw = (w - padL) / PLOT_BUCKETS;
    const style = getComputedStyle(document.body);
    ctx.fillStyle = style.color;
    ctx.font = "11px system-ui, sans-serif";
    const label = metric === "cost" ? fmtUsd(max) : fmtInt(Math.round(max));
    ctx.fillText(label, 4, 12);
    ctx.fillText("0", 4, h - padB);
    ctx.fillText(fmtTime(lo), padL, h - 4);
    ctx.textAlign = "right";
    ctx.fillText(fmtTime(hi), w - 4, h - 4);
    for (let b = 0; b < PLOT_BUCKETS; b++) {
      let y = h - padB;
      all.forEach(([, a], i) => {
        const bh = max ? (a[b] / max) * (h - padB - 16) : 0;
        ctx.fillStyle = PALETTE[i % PALETTE.length];
        ctx.fillRect(padL + b * bw + 1, y - bh, Math.max(1, bw - 2), bh);
        y -= bh;
      });
    }
    all.forEach(([name], i) => {
      const item = el("span");
      const sw = el("i");
      sw.style.background = PALETTE[i % PALETTE.length];
      item.appendChild(sw);
      item.appendChild(document.createTextNode(name));
      legend.appendChild(item);
    });
    $("plot-range").textContent = `${metric} per ${fmtMs(size)}, ${new Date(lo).toLocaleString()} – ${new Date(hi).toLocaleString()}`;
  }
  for (const id of ["p-metric", "p-group"]) $(id).addEventListener("change", () => { lastPlot = 0; dirty.summary = true; schedule(); });

  // ---- health ----
  function renderHealth() {
    dirty.health = false;
    const box = $("health");
    const ca = $("ca-box");
    const badge = $("health-badge");
    if (!health) { box.replaceChildren(el("p", "muted", "waiting for the server…")); return; }
    $("mode").textContent = health.mode === "file" ? `file ${health.file || ""}` : "live recording";
    const groupsOut = [];
    let warn = false;
    if (health.ca) {
      ca.hidden = false;
      ca.replaceChildren();
      const t = health.ca.trusted;
      ca.className = t === false ? "bad" : "";
      ca.appendChild(el("strong", null, t === true ? "The oisp CA is trusted system-wide." : t === false ? "The oisp CA is not in the system trust store." : "Could not tell whether the oisp CA is trusted."));
      if (t !== true) {
        warn = true;
        const p = el("p", null, "Trust it with: ");
        p.appendChild(el("code", null, health.ca.command || "sudo oisp ca install"));
        p.appendChild(document.createTextNode(" (or per shell: eval \"$(oisp ca env)\")"));
        ca.appendChild(p);
      }
      if (health.ca.path) ca.appendChild(el("div", "muted", health.ca.path));
    } else {
      ca.hidden = true;
    }
    const flat = (obj) => Object.entries(obj || {}).map(([k, v]) => [k.replace(/_/g, " "), typeof v === "object" && v !== null ? JSON.stringify(v) : String(v)]);
    if (health.mode === "record") {
      groupsOut.push(["flows", flat(health.flows)]);
      groupsOut.push(["capture", [["packet drops", String(health.drops ?? 0)], ["requests", String(health.requests ?? "-")], ["responses", String(health.responses ?? "-")]]]);
      groupsOut.push(["pinned hosts (clients that refused our certificate; passed through)", (health.pinned_hosts || []).map((hn) => [hn, ""])]);
      groupsOut.push(["refused or unknown (DNS answers nobody asked for, owners not shown to hold the socket, QUIC sent to TCP)", flat(health.defences)]);
      const sinkRows = Object.entries(health.sinks || {}).map(([name, s]) => [name, `emitted ${s.emitted}, lost ${s.lost}, errors ${s.errors}${s.last_error ? " (" + s.last_error + ")" : ""}`]);
      groupsOut.push(["sinks", sinkRows]);
      if ((health.drops || 0) > 0 || Object.values(health.sinks || {}).some((s) => s.lost > 0)) warn = true;
    } else if (health.mode === "file") {
      groupsOut.push(["file", [["path", health.file || ""], ...flat(health.read)]]);
      groupsOut.push(["events in the file", flat(health.events_by_type)]);
      if (health.read && health.read.bad_lines) warn = true;
    }
    if (health.error) groupsOut.push(["status source", [["error", health.error]]]);
    groupsOut.push(["dashboard", [...flat(health.ui), ["calls in this page", fmtInt(calls.length)]]]);
    box.replaceChildren(...groupsOut.map(([title, rows]) => {
      const g = el("div", "group");
      g.appendChild(el("h3", null, title));
      g.appendChild(rows.length ? kv(rows) : el("p", "muted", "none"));
      return g;
    }));
    badge.textContent = warn ? "●" : "";
    badge.className = warn ? "warn" : "";
  }

  // ---- controls ----
  let activeTab = "calls";
  for (const b of document.querySelectorAll("#tabs button")) {
    b.addEventListener("click", () => {
      activeTab = b.dataset.tab;
      for (const x of document.querySelectorAll("#tabs button")) x.classList.toggle("active", x === b);
      for (const s of document.querySelectorAll(".tab")) s.classList.toggle("active", s.id === "tab-" + activeTab);
      dirty.summary = dirty.rows = dirty.health = true;
      lastPlot = 0;
      schedule();
    });
  }
  function readFilters() {
    F.process = $("f-process").value;
    F.provider = $("f-provider").value;
    F.model = $("f-model").value;
    F.status = $("f-status").value;
    F.range = $("f-range").value;
    $("f-custom").hidden = F.range !== "custom";
    F.from = $("f-from").value ? new Date($("f-from").value).getTime() : 0;
    F.to = $("f-to").value ? new Date($("f-to").value).getTime() : 0;
    F.text = $("f-text").value;
    rebuildView();
    rowsEl.scrollTop = 0;
    lastPlot = 0;
    schedule();
  }
  let typing = 0;
  $("filters").addEventListener("change", readFilters);
  $("f-text").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(readFilters, 150); });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  // A relative range ("last 5 min") moves with the clock.
  setInterval(() => { if (F.range && F.range !== "custom") { viewDirty = true; schedule(); } }, 5000);

  // ---- the push channel: server-sent events, read with fetch ----
  // (Chromium's EventSource delivers megabyte-sized messages several times slower than a
  // streamed fetch body; the wire format is the same SSE either way.)
  const conn = $("conn");
  let lastId = 0;
  function onMessage(text) {
    let type = "message", data = "";
    for (const line of text.split("\n")) {
      if (line.startsWith("data: ")) data = line.slice(6);
      else if (line.startsWith("event: ")) type = line.slice(7);
      else if (line.startsWith("id: ")) lastId = Number(line.slice(4)) || lastId;
    }
    if (!data) return;
    let value;
    try { value = JSON.parse(data); } catch (err) { return; }
    if (type === "events" && Array.isArray(value)) { stats.batches++; onEvents(value); }
    else if (type === "health") { health = value; dirty.health = true; schedule(); }
  }
  async function stream() {
    for (;;) {
      try {
        const response = await fetch("/api/stream?since=" + lastId, { cache: "no-store", credentials: "same-origin" });
        if (!response.ok) throw new Error("HTTP " + response.status);
        conn.textContent = "live"; conn.className = "conn live";
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buf = "", from = 0;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += decoder.decode(value, { stream: true });
          let end;
          while ((end = buf.indexOf("\n\n", from)) >= 0) {
            onMessage(buf.slice(0, end));
            buf = buf.slice(end + 2);
            from = 0;
          }
          from = Math.max(0, buf.length - 1);
        }
      } catch (err) { /* reconnect below */ }
      conn.textContent = "reconnecting…"; conn.className = "conn down";
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
  stream();
  schedule();
})();
