// comfy_xdit_patch: a sidebar tab showing the worker group (GET /xdit/status, live through the
// "xdit.status" websocket event the plugin sends at every transition).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STYLE = `
.xdit-panel { padding: 10px; font-size: 13px; line-height: 1.45; overflow-y: auto; height: 100%; }
.xdit-panel h3 { margin: 10px 0 6px 0; font-size: 15px; }
.xdit-panel table { border-collapse: collapse; width: 100%; margin: 4px 0 10px 0; }
.xdit-panel th, .xdit-panel td { text-align: left; padding: 2px 6px 2px 0; border-bottom: 1px solid #8884; }
.xdit-panel .xdit-muted { opacity: 0.7; }
.xdit-panel .xdit-rank { margin: 6px 0; padding: 4px 6px; border: 1px solid #8885; border-radius: 4px; }
.xdit-panel > div { margin: 2px 0; }
.xdit-panel .xdit-state { display: inline-block; padding: 0 6px; border-radius: 4px; font-weight: 600; }
.xdit-state-ready { background: #2e7d32; color: #fff; }
.xdit-state-off, .xdit-state-idle { background: #616161; color: #fff; }
.xdit-state-starting, .xdit-state-loading, .xdit-state-compiling { background: #f9a825; color: #000; }
.xdit-state-broken { background: #c62828; color: #fff; }
`;

const MiB = (b) => (b == null ? "–" : `${(b / 2 ** 20).toFixed(0)} MiB`);
const ago = (t) => (t == null ? "–" : `${Math.max(0, Math.round(Date.now() / 1000 - t))} s ago`);
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);

const PROGRESS = ["starting", "loading", "compiling"];
let last = null;
let root = null;
let refresh = null;

function render() {
  if (!root) return;
  const s = last;
  if (!s) {
    root.innerHTML = `<div class="xdit-muted">asking the server…</div>`;
    return;
  }
  const on = s.enabled ? "on" : "off";
  const why = s.reason ? ` — <span data-xdit="reason">${esc(s.reason)}</span>` : "";
  const rows = (s.ranks || []).map((r) => `
    <div class="xdit-rank" data-xdit-rank="${r.rank}">
      <div><b>rank ${r.rank}</b> <span class="xdit-state xdit-state-${esc(r.state)}" data-xdit="rank-state">${esc(r.state)}</span>
        <span class="xdit-muted">pid ${esc(r.pid)} on ${esc(r.host)}</span></div>
      <div>${esc(r.gpu || r.device)} · ${MiB(r.memory)} (peak ${MiB(r.memory_peak)})</div>
      ${r.weights && r.weights.block_bytes ? `<div data-xdit="weights">blocks: ${r.weights.sharded
        ? `${MiB(r.weights.resident_bytes)} of ${MiB(r.weights.block_bytes)} held (1/${r.weights.world} each)`
        : `${MiB(r.weights.block_bytes)}, a full copy`}</div>` : ""}
      <div>${r.calls ?? "–"} calls · last ${ago(r.last_call)}</div>
    </div>`).join("");
  const run = s.run ? `<div>running now: <b>${s.run.routed}</b> routed, ${s.run.local} local</div>` : "";
  const lr = s.last_run;
  const lastRun = lr ? `
    <table data-xdit="last-run">
      <tr><th>routed calls</th><td data-xdit="routed">${lr.routed}</td></tr>
      <tr><th>local calls</th><td data-xdit="local">${lr.local}</td></tr>
      <tr><th>layout</th><td>${esc(lr.layout || "–")}</td></tr>
      <tr><th>size, steps</th><td>${esc(lr.size || "–")}, ${lr.steps}</td></tr>
      <tr><th>s/step</th><td data-xdit="s-per-step">${lr.s_per_step.toFixed(3)}</td></tr>
      <tr><th>run (with preparing)</th><td>${lr.seconds.toFixed(1)} s</td></tr>
    </table>` : `<div class="xdit-muted">no FLUX run yet</div>`;
  const fb = s.last_fallback ? `<div data-xdit="last-fallback">last: ${esc(s.last_fallback.where)}: ${esc(s.last_fallback.error)}</div>` : "";
  const v = s.versions || {};
  root.innerHTML = `
    <h3>xDiT worker group: <span data-xdit="enabled">${on}</span>${why}</h3>
    <div>state: <span class="xdit-state xdit-state-${esc(s.state)}" data-xdit="state">${esc(s.state)}</span>
      <span data-xdit="detail">${esc(s.detail || "")}</span></div>
    ${s.next_try ? `<div data-xdit="next-try">next try: ${new Date(s.next_try * 1000).toLocaleTimeString()}</div>` : ""}
    ${s.workers ? `<div>${s.workers} ${esc(s.device)} ranks, ${esc(s.attention || "–")} attention</div>` : ""}
    ${run}
    ${rows}
    <h3>last sampling run</h3>${lastRun}
    <div>fallbacks: <span data-xdit="fallbacks">${s.fallbacks}</span>, restarts: ${s.restarts}</div>${fb}
    <div class="xdit-muted">plugin ${esc(v.plugin)}, ComfyUI ${esc(v.comfyui)}, torch ${esc(v.torch)}, ray ${esc(v.ray)}</div>`;
}

async function fetchStatus() {
  try {
    const res = await api.fetchApi("/xdit/status");
    if (res.ok) last = await res.json();
  } catch (e) {
    console.warn("xdit status:", e);
  }
  render();
}

app.registerExtension({
  name: "comfy_xdit_patch.status",
  async setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
    api.addEventListener("xdit.status", ({ detail }) => {
      // the wait before a first run's first step (group start, weights, compile) is said where the user looks
      if (PROGRESS.includes(detail.state) && detail.detail !== last?.detail) {
        app.extensionManager?.toast?.add({ severity: "info", summary: "xDiT", detail: detail.detail, life: 4000 });
      }
      last = detail;
      render();
      // events carry the ranks as last asked; between runs ask them again (calls, memory)
      if (detail.state === "ready" && !detail.run) {
        clearTimeout(refresh);
        refresh = setTimeout(fetchStatus, 300);
      }
    });
    const tab = {
      id: "xdit-status",
      icon: "pi pi-server",
      title: "xDiT",
      label: "xDiT",
      tooltip: "xDiT worker group",
      type: "custom",
      render: (el) => {
        root = document.createElement("div");
        root.className = "xdit-panel";
        el.appendChild(root);
        render();
        fetchStatus();
      },
      destroy: () => { root = null; },
    };
    if (app.extensionManager?.registerSidebarTab) {
      app.extensionManager.registerSidebarTab(tab);
    } else {  // an older frontend: a panel in the corner
      const el = document.createElement("div");
      el.style.cssText = "position:fixed;right:8px;bottom:8px;width:420px;max-height:60vh;z-index:1000;background:#222d;color:#eee;border-radius:6px";
      document.body.appendChild(el);
      tab.render(el);
    }
  },
});
