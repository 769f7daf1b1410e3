"use strict";
// The dashboard's pair chart (docs/operations.md#the-dashboard): TradingView's lightweight-charts, vendored
// (scripts/vendor_lightweight_charts.sh). One pair at a time, chosen in the list or by a click
// on its row; 1-minute candles from the candles endpoint, extended live by the socket's rate
// updates (dashboard.js re-dispatches every message as a "kurs:message" event). A click on a bar
// asks what was served at the end of that minute (GET /api/v1/items/{id}/rates/latest?at=).
(function () {
  const config = JSON.parse(document.getElementById("kurs-config").textContent);
  const panel = document.getElementById("chart-panel");
  const select = document.getElementById("chart-pair");
  const box = document.getElementById("chart");
  const answer = document.getElementById("chart-at");
  const LWC = window.LightweightCharts;
  const MINUTE = 60;
  let pair = null;
  let last = null;  // the newest bar drawn: {time, open, high, low, close}
  let loading = 0;  // the number of the latest load: an older answer is dropped
  let pending = [];  // live rates that came while the candles were loading

  if (!LWC || !panel) return;
  const chart = LWC.createChart(box, {
    autoSize: true,
    // The library's logo adds an inline <style> the Content-Security-Policy refuses: the page
    // credits TradingView with a static link under the chart instead.
    layout: { attributionLogo: false, background: { color: "#171d24" }, textColor: "#8592a0" },
    grid: { vertLines: { color: "#26303b" }, horzLines: { color: "#26303b" } },
    timeScale: { timeVisible: true, secondsVisible: false, borderColor: "#26303b" },
    rightPriceScale: { borderColor: "#26303b" },
  });
  const series = chart.addSeries(LWC.CandlestickSeries, {
    upColor: "#3fb950", downColor: "#f85149", borderVisible: false,
    wickUpColor: "#3fb950", wickDownColor: "#f85149",
  });

  function minuteOf(at) {
    const ms = Date.parse(at);
    const seconds = Number.isFinite(ms) ? Math.min(ms, Date.now()) / 1000 : Date.now() / 1000;
    return Math.floor(seconds / MINUTE) * MINUTE;
  }

  function setBars(bars) {
    series.setData(bars);
    last = bars.length ? { ...bars[bars.length - 1] } : null;
    box.dataset.bars = String(bars.length);
  }

  // A live rate moves the current minute's bar, or opens the next one; an older one is dropped.
  function extend(at, text) {
    const value = Number(text);
    const time = minuteOf(at);
    if (!Number.isFinite(value) || (last && time < last.time)) return;
    if (last && time === last.time) {
      last = { ...last, high: Math.max(last.high, value), low: Math.min(last.low, value),
               close: value };
    } else {
      last = { time, open: value, high: value, low: value, close: value };
      box.dataset.bars = String(Number(box.dataset.bars || 0) + 1);
    }
    series.update(last);
    box.dataset.close = String(value);
  }

  function show(code) {
    if (!code || code === pair) return;
    pair = code;
    select.value = code;
    panel.dataset.pair = code;
    answer.textContent = "click a bar: what was served at the end of that minute";
    answer.className = "hint";
    const number = ++loading;
    pending = [];
    setBars([]);
    const id = config.items[code];
    if (id === undefined) {  // added after the page was served: live bars only
      box.dataset.loaded = "live";
      return;
    }
    fetch(config.candles_url.replace("{id}", id) + "?interval=1m")
      .then((r) => (r.ok ? r.json() : []))
      .catch(() => [])
      .then((candles) => {
        if (number !== loading) return;
        setBars(candles.map((c) => ({
          time: Date.parse(c.t) / 1000, open: Number(c.open), high: Number(c.high),
          low: Number(c.low), close: Number(c.close),
        })));
        for (const [at, value] of pending) extend(at, value);
        pending = [];
        box.dataset.loaded = "candles";
        chart.timeScale().fitContent();
      });
  }

  function addOption(code) {
    if ([...select.options].some((o) => o.value === code)) return;
    const option = document.createElement("option");
    option.value = option.textContent = code;
    const after = [...select.options].find((o) => o.value > code);
    select.insertBefore(option, after || null);
  }

  function live(at, code, value) {
    addOption(code);
    if (pair === null) show(code);
    if (code !== pair) return;
    if (box.dataset.loaded) extend(at, value);
    else pending.push([at, value]);
  }

  document.addEventListener("kurs:message", (event) => {
    const message = event.detail;
    if (message.type === "snapshot") {
      for (const c of message.data.courses) live(c.checked_at || c.source_time, c.direction, c.value);
    } else if (message.type === "rate.updated") {
      const d = message.data;
      live(d.checked_at || d.source_time, d.direction, d.value);
    }
  });

  // --- the point in time: one click on a bar -------------------------------------------------
  function describe(code, at, rate) {
    const parts = [code + " at " + at.replace(".999Z", "Z") + ": " + rate.value,
                   rate.provider, rate.status];
    if (rate.valid_from) {
      parts.push("served from " + rate.valid_from + " until " + (rate.valid_until || "now"));
    }
    return parts.filter(Boolean).join(" · ");
  }

  chart.subscribeClick((param) => {
    if (param.time === undefined || pair === null) return;
    const code = pair;
    const id = config.items[code];
    const end = Math.min(Date.now(), (Number(param.time) + MINUTE) * 1000 - 1);
    const at = new Date(end).toISOString();
    answer.className = "hint";
    answer.textContent = "asking what was served at " + at + "…";
    if (id === undefined) {
      answer.className = "error";
      answer.textContent = code + " was added after this page loaded: reload to look it up";
      return;
    }
    const url = config.latest_url.replace("{id}", id) + "?at=" + encodeURIComponent(at);
    fetch(url).then((r) => r.json().catch(() => ({})).then((body) => [r.status, body]))
      .then(([status, body]) => {
        if (code !== pair) return;
        answer.dataset.at = at;
        answer.dataset.status = String(status);
        if (status >= 400) {
          answer.className = "error";
          const detail = typeof body.detail === "string" ? body.detail : "no detail";
          answer.textContent = "no answer for " + at + " (HTTP " + status + "): " + detail;
        } else if (!("valid_from" in body)) {
          // A server without the served log answers the current rate and ignores `at`.
          answer.className = "error";
          answer.textContent = "this server does not answer ?at= yet (point in time): " +
            "the current rate is " + body.value;
        } else {
          answer.className = "answer";
          answer.textContent = describe(code, at, body);
        }
      })
      .catch(() => {
        answer.className = "error";
        answer.textContent = "the point-in-time lookup failed: is the server up?";
      });
  });

  select.addEventListener("change", () => show(select.value));
  document.getElementById("courses").addEventListener("click", (event) => {
    const row = event.target.closest("tr[data-pair]");
    if (row) show(row.dataset.pair);
  });
  for (const code of Object.keys(config.items).sort()) addOption(code);
})();
