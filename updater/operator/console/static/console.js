// inferd console: renders /api/state and follows /api/stream (server-sent events).
// Everything from the broker is put in the page with textContent, never as HTML.
"use strict";

(function () {
  const $ = (sel) => document.querySelector(sel);

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined) return "-";
    if (typeof v === "number") return v.toFixed(digits === undefined ? 1 : digits);
    return String(v);
  }

  function pct(bp) {
    if (bp === null || bp === undefined) return "-";
    return (bp / 100).toString() + " %";
  }

  function sharesText(shares) {
    if (shares === null) return "every device (not staged)";
    if (shares === "unknown") return "unknown";
    const parts = Object.entries(shares).map(([g, bp]) => (g === "*" ? "" : g + " ") + pct(bp));
    return parts.join(", ");
  }

  // -- login page --------------------------------------------------------------------------

  const form = $("#login");
  if (form) {
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const r = await fetch("/api/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ token: $("#token").value }),
        credentials: "same-origin",
      });
      if (r.ok) location.reload();
      else $("#login-error").textContent = "wrong token";
    });
    return;
  }

  // -- tables --------------------------------------------------------------------------------

  function renderDevices(devices) {
    const body = $("#devices tbody");
    const rows = [];
    for (const d of devices) {
      const models = Object.entries(d.models);
      if (models.length === 0) models.push(["-", {}]);
      models.forEach(([name, m], i) => {
        const lu = m.last_update;
        const last = lu ? `${lu.outcome} ${lu.version}` : "-";
        rows.push(
          el("tr", { class: d.online ? "" : "offline", "data-device": d.device },
            el("td", {}, i === 0 ? d.device : ""),
            el("td", {}, i === 0 ? el("span", { class: "pill " + (d.online ? "ok" : "off") }, d.online ? "online" : "offline") : ""),
            el("td", {}, i === 0 ? (d.groups || []).join(", ") : ""),
            el("td", {}, name),
            el("td", { class: "version" }, fmt(m.version)),
            el("td", {}, fmt(m.update_state)),
            el("td", { class: lu && lu.outcome !== "committed" ? "bad" : "", title: lu ? lu.reason : "" }, last),
            el("td", { class: "num" }, fmt(m.p50_ms, 2)),
            el("td", { class: "num" }, fmt(m.p99_ms, 2)),
            el("td", { class: "num" }, fmt(m.rps)),
            el("td", { class: "num" }, i === 0 ? fmt(d.cpu_percent) : ""),
            el("td", { class: "num" }, i === 0 ? fmt(d.temperature_c) : ""),
          ),
        );
      });
    }
    body.replaceChildren(...rows);
  }

  function renderGroups(groups) {
    const rows = [];
    for (const [g, models] of Object.entries(groups)) {
      for (const [name, versions] of Object.entries(models)) {
        const text = Object.entries(versions).map(([v, n]) => `${v} (${n})`).join(", ");
        rows.push(el("tr", {}, el("td", {}, g), el("td", {}, name), el("td", {}, text)));
      }
    }
    $("#groups tbody").replaceChildren(...rows);
  }

  function renderQuality(quality) {
    const rows = quality.map((q) =>
      el("tr", {},
        el("td", {}, q.device),
        el("td", {}, q.model),
        el("td", {}, q.version),
        el("td", { class: "num" }, q.samples),
        el("td", { class: "num" }, q.accuracy === undefined ? "-" : `${fmt(q.accuracy, 3)} / ${fmt(q.f1, 3)}`),
        el("td", { class: "num" }, q.mae === undefined ? "-" : `${fmt(q.mae, 3)} / ${fmt(q.rmse, 3)}`),
        el("td", { class: "num " + (q.drifted ? "bad" : "") },
          q.psi_max === undefined ? "-" : `${fmt(q.psi_max, 3)}${q.drifted ? " drifted" : ""}`),
      ),
    );
    $("#quality tbody").replaceChildren(...rows);
  }

  function renderEvents(events) {
    const items = events.map((e) =>
      el("li", { class: "level-" + e.level },
        el("time", {}, e.ts.replace("T", " ").slice(0, 19)), " ",
        el("b", {}, e.device), " ", el("span", { class: "kind" }, e.kind), " ",
        e.model ? `${e.model} ${e.version || ""}: ` : "", e.message),
    );
    $("#events").replaceChildren(...items);
  }

  // -- rollouts --------------------------------------------------------------------------------

  async function act(slot, action, button) {
    button.disabled = true;
    const r = await fetch(`/api/rollouts/${encodeURIComponent(slot)}/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: "{}",
      credentials: "same-origin",
    });
    const body = await r.json();
    const out = document.querySelector(`[data-slot="${CSS.escape(slot)}"] .result`);
    if (out) out.textContent = r.ok ? body.message : body.error;
  }

  function bar(r) {
    const total = Math.max(r.joined, 1);
    const busy = r.attempted - r.succeeded - r.failed;
    const waiting = r.joined - r.attempted;
    const part = (cls, n, label) =>
      n > 0 ? el("span", { class: "seg " + cls, style: null, title: `${label}: ${n}`, "data-w": (100 * n) / total }) : null;
    const b = el("div", { class: "bar" },
      part("succeeded", r.succeeded, "succeeded"),
      part("failed", r.failed, "failed"),
      part("busy", busy, "in progress"),
      part("waiting", waiting, "waiting"));
    for (const s of b.children) s.style.width = s.getAttribute("data-w") + "%";
    return b;
  }

  function renderRollouts(rollouts) {
    if (rollouts.length === 0) return;
    const cards = rollouts.map((r) => {
      const halted = r.state === "halted";
      const next = r.next_step !== null && r.soak_left_s !== null
        ? `next: ${pct(r.next_step)} in ${Math.ceil(r.soak_left_s)} s if healthy` : "";
      return el("div", { class: "card rollout state-" + r.state.replace(" ", "-"), "data-slot": r.slot, "data-state": r.state },
        el("h3", {}, `${r.slot} ${r.version || "-"}`, el("small", {}, r.seq === null ? "" : ` seq ${r.seq}`),
          " ", el("span", { class: "pill state" }, r.state)),
        el("p", {}, "share: ", el("b", { class: "shares" }, sharesText(r.shares)), next ? " · " + next : "",
          halted && r.halted_at !== null ? ` · halted at ${pct(r.halted_at)}` : ""),
        bar(r),
        el("p", { class: "counts" },
          `${r.joined} in the rollout · ${r.attempted} attempted · ${r.succeeded} succeeded · ` +
          `${r.failed} failed (${(100 * r.failure_ratio).toFixed(1)} %) · ${r.serving} serving ${r.version || ""}`),
        halted ? el("p", { class: "halted" }, "HALTED: ", r.halted) : null,
        r.failures.length ? el("ul", { class: "failures" },
          ...r.failures.slice(0, 5).map((f) => el("li", {}, el("b", {}, f.device), ": ", f.reason))) : null,
        r.decisions.length ? el("ol", { class: "decisions" },
          ...r.decisions.map((d) => el("li", { "data-action": d.action },
            el("time", {}, new Date(d.ts * 1000).toLocaleTimeString()), " ", el("b", {}, d.action), ": ", d.reason))) : null,
        el("div", { class: "actions" },
          el("button", { class: "halt", disabled: !r.staged || halted, onclick: (ev) => act(r.slot, "halt", ev.target) }, "Halt"),
          el("button", { class: "resume", disabled: !halted, onclick: (ev) => act(r.slot, "resume", ev.target) }, "Resume"),
          el("span", { class: "result" })),
      );
    });
    $("#rollouts").replaceChildren(...cards);
  }

  // -- charts --------------------------------------------------------------------------------

  const charts = new Map();
  const CHART_HEIGHT = 220;

  // each chart is as wide as the box that holds the charts, and follows it when the window
  // (or anything else) resizes it
  function chartWidth() {
    return Math.max(280, $("#charts").clientWidth);
  }
  const resized = new ResizeObserver(() => {
    const width = chartWidth();
    for (const chart of charts.values()) {
      if (chart.width !== width) chart.setSize({ width: width, height: CHART_HEIGHT });
    }
  });
  resized.observe($("#charts"));

  function xRange(u) {
    const t = u.data[0];
    const hi = t.length ? t[t.length - 1] : Date.now() / 1000;
    const lo = t.length ? t[0] : hi;
    return [Math.min(lo, hi - 60), hi + 2];
  }

  function renderCharts(series) {
    const box = $("#charts");
    const names = Object.keys(series).filter((n) => series[n].t.length > 0);
    if (names.length === 0) return;
    if (charts.size === 0) box.replaceChildren();
    for (const name of names) {
      const s = series[name];
      const data = [s.t, s.p50, s.p99, s.rps];
      let chart = charts.get(name);
      if (!chart) {
        const holder = el("div", { class: "chart", "data-model": name });
        box.append(holder);
        chart = new uPlot({
          title: name,
          width: chartWidth(),
          height: CHART_HEIGHT,
          // at least the last minute: one point alone would make uPlot span years
          scales: { x: { time: true, range: xRange }, rps: { auto: true } },
          series: [
            {},
            { label: "p50 ms", stroke: "#2f7ed8", width: 2, spanGaps: true },
            { label: "p99 ms", stroke: "#d83a2f", width: 2, spanGaps: true },
            { label: "req/s", stroke: "#3aa655", width: 1, scale: "rps", spanGaps: true },
          ],
          axes: [{}, { label: "ms" }, { side: 1, scale: "rps", label: "req/s", grid: { show: false } }],
        }, data, holder);
        charts.set(name, chart);
      } else {
        chart.setData(data);
      }
    }
  }

  // -- the whole state -------------------------------------------------------------------------

  function render(state) {
    const c = state.console;
    const online = state.devices.filter((d) => d.online).length;
    $("#summary").textContent =
      `${state.devices.length} devices, ${online} online · broker ${c.broker} · repo ${c.repo}` +
      (c.policy.drive ? ` · autopilot: soak ${c.policy.soak_s} s, halt above ${(100 * c.policy.halt_ratio).toFixed(1)} %` : " · autopilot off") +
      (c.repo_error ? ` · REPOSITORY: ${c.repo_error}` : "");
    const conn = $("#conn");
    conn.textContent = c.connected ? "broker connected" : "broker disconnected";
    conn.className = "pill " + (c.connected ? "ok" : "off");
    renderRollouts(state.rollouts);
    renderDevices(state.devices);
    renderCharts(state.series);
    renderGroups(state.groups);
    renderQuality(state.quality);
    renderEvents(state.events);
    document.body.setAttribute("data-generation", state.generation);
  }

  async function start() {
    const r = await fetch("/api/state", { credentials: "same-origin" });
    if (r.ok) render(await r.json());
    const es = new EventSource("/api/stream");
    es.addEventListener("state", (ev) => render(JSON.parse(ev.data)));
    es.addEventListener("error", () => {
      const conn = $("#conn");
      conn.textContent = "console unreachable";
      conn.className = "pill off";
    });
  }

  start();
})();
