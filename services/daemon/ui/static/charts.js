// The charts page: /ui/charts/data drawn with uPlot, redrawn every REFRESH_MS. Counts are per
// minute of the last hour; spend is USD per hour of the last 24 h, drawn as bars.
(function () {
  "use strict";

  const REFRESH_MS = 10000;
  const COLOURS = ["#e8590c", "#1971c2", "#2f9e44", "#9c36b5", "#f08c00", "#0c8599", "#c2255c", "#5c940d"];
  const charts = {};

  function draw(id, data, series, extra) {
    const el = document.getElementById(id);
    if (charts[id]) charts[id].destroy();
    const opts = Object.assign({
      width: Math.max(320, el.clientWidth), height: 200,
      series: [{}].concat(series),
      axes: [{}, {size: 50}],
      legend: {live: false},
    }, extra || {});
    charts[id] = new uPlot(opts, data, el);
  }

  function counts(id, x, list) {
    const series = list.map((s, i) => ({label: s.label, stroke: COLOURS[i % COLOURS.length], width: 2,
                                        fill: COLOURS[i % COLOURS.length] + "22", points: {show: false}}));
    draw(id, [x].concat(list.map((s) => s.values)), series);
  }

  function usd(value) {
    return value === null || value === undefined ? "-" : `$${value.toFixed(4)}`;
  }

  function spend(s) {
    const mid = s.x.map((start) => start + 1800);  // each bar spans its hour
    const spent = s.usd.some((v) => v > 0);
    draw("chart-spend", [mid, spent ? s.usd.map((v) => v || null) : s.usd],  // an hour with nothing spent: no bar
         [{label: "USD per hour", stroke: COLOURS[0], fill: COLOURS[0] + "55", width: 1,
           paths: uPlot.paths.bars({size: [0.8, 40]}), points: {show: false}, value: (u, v) => usd(v)}],
         {axes: [{}, {size: 70, values: (u, ticks) => ticks.map(usd)}],
          scales: {x: {time: true, range: [s.x[0], s.x[s.x.length - 1] + 3600]}}});
    const t = s.summary;
    document.getElementById("spend-summary").textContent =
      `last 24 h: ${usd(t.usd)} · ${t.tokens.toLocaleString("en-US")} tokens · ${t.calls} calls` +
      (t.partial ? " (only the latest calls read: the sums are low)" : "");
  }

  async function load() {
    const resp = await fetch("/ui/charts/data", {credentials: "same-origin"});
    if (!resp.ok) return;
    const d = await resp.json();
    counts("chart-detections", d.x, d.detections);
    counts("chart-restarts", d.x, d.restarts);
    draw("chart-recoveries", [d.recoveries.x, d.recoveries.y],
         [{label: "recovery (s)", stroke: COLOURS[1], paths: () => null, points: {show: true, size: 7}}],
         {scales: {x: {time: true, range: [d.x[0] - 60, d.x[d.x.length - 1] + 60]}}});
    spend(d.spend);
    const s = d.summary;
    const reasons = Object.entries(s.detections).map(([r, n]) => `${n} ${r}`).join(", ") || "none";
    const median = s.recovery_median === null ? "-" : `${s.recovery_median}s`;
    const worst = s.recovery_max === null ? "-" : `${s.recovery_max}s`;
    document.getElementById("chart-summary").textContent =
      `detections: ${reasons} · restarts: ${s.restarts.child_restart} by the ladder, ` +
      `${s.restarts.operator_restart} by operators · recoveries: ${s.recoveries} (median ${median}, worst ${worst})`;
  }

  load();
  setInterval(load, REFRESH_MS);
})();
