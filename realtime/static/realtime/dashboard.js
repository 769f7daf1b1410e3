"use strict";
(function () {
  const config = JSON.parse(document.getElementById("kurs-config").textContent);
  const courses = new Map();  // pair -> course
  const charts = new Map();  // pair -> {points: [[ms, value]], td, svg, line, dot}
  const rowCells = new Map();  // pair -> {tr, meta, value, provider, age, flags}
  const providerStates = new Map();  // name -> {name, state, last_error, last_error_at}
  const rows = document.getElementById("courses");
  const providers = document.getElementById("providers");
  const log = document.getElementById("log");
  const statusBadge = document.getElementById("status");
  const SVG = "http://www.w3.org/2000/svg";
  const CHART_SPAN_MS = 3600 * 1000;  // the last hour: 1m candles, then every live update
  const CHART_MAX_POINTS = 600;
  let retry = 0;
  let snapshotSeen = false;
  let socketState = "connecting";  // then "open", or "closed" until it reconnects

  function staleAfter(provider) {
    const legs = provider.split(config.derived_separator);
    return Math.min(...legs.map((leg) => config.freshness[leg] ?? config.stale_after));
  }

  // Seconds since a source last confirmed the value (SPEC 4 checked_at).
  function ageSeconds(course) {
    return Math.max(0, (Date.now() - Date.parse(course.checked_at || course.source_time)) / 1000);
  }

  // The owner publishes every status change; between events the same rule as rates.policy
  // (stale once the serving provider's window has passed since checked_at) keeps a course
  // honest when no event can come (the fetcher is down).
  function statusOf(course) {
    if (course.status === "stale" || ageSeconds(course) > staleAfter(course.provider)) {
      return "stale";
    }
    return course.status || "live";
  }

  function formatAge(s) {
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return (s / 60).toFixed(0) + " min";
    if (s < 86400) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  // Values are read, not copied: grouped and rounded to the digits that matter at their size
  // (cents above 1,000; four significant digits below 1). The exact value stays in the cell's
  // title and data-exact; the API keeps every digit.
  const formats = new Map();
  function formatValue(text) {
    const v = Math.abs(Number(text));
    if (!Number.isFinite(v)) return String(text);
    const digits = v >= 1000 ? 2 : v >= 1 ? 4 : v === 0 ? 2 : Math.min(12, 3 - Math.floor(Math.log10(v)));
    if (!formats.has(digits)) {
      formats.set(digits, new Intl.NumberFormat("en", {
        minimumFractionDigits: digits, maximumFractionDigits: digits }));
    }
    // A decimal string is formatted exactly (no detour through a binary float).
    return formats.get(digits).format(String(text));
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  // --- charts: a hand-drawn SVG sparkline per pair (no library, no build step) ---------------
  function chartFor(pair) {
    let chart = charts.get(pair);
    if (!chart) {
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("class", "spark");
      svg.setAttribute("viewBox", "0 0 120 28");
      svg.setAttribute("preserveAspectRatio", "none");
      const line = document.createElementNS(SVG, "polyline");
      const dot = document.createElementNS(SVG, "circle");
      dot.setAttribute("r", "1.6");
      svg.append(line);
      const td = cell("", "chart");
      td.append(svg);
      chart = { points: [], td, svg, line, dot };
      charts.set(pair, chart);
      loadCandles(pair, chart);
    }
    return chart;
  }

  // The history before the page opened: each 1m candle's close, at the candle's end.
  function loadCandles(pair, chart) {
    const id = config.items[pair];
    if (id === undefined) return;  // added after the page was served: live points only
    const since = new Date(Date.now() - CHART_SPAN_MS).toISOString();
    const url = config.candles_url.replace("{id}", id) +
      "?interval=1m&since=" + encodeURIComponent(since);
    fetch(url).then((r) => (r.ok ? r.json() : [])).then((candles) => {
      const now = Date.now();
      const firstLive = chart.points.length ? chart.points[0][0] : Infinity;
      const history = candles
        .map((c) => [Math.min(now, Date.parse(c.t) + 60000), Number(c.close)])
        .filter((p) => p[0] < firstLive && Number.isFinite(p[1]));
      chart.points = history.concat(chart.points);
      drawChart(chart);
    }).catch(() => {});
  }

  function addPoint(pair, at, value) {
    const chart = chartFor(pair);
    const t = Math.min(Date.now(), Date.parse(at) || Date.now());
    const v = Number(value);
    if (!Number.isFinite(v)) return;
    const last = chart.points[chart.points.length - 1];
    if (last && t < last[0]) return;  // an older update than the one drawn
    chart.points.push([t, v]);
    drawChart(chart);
  }

  function drawChart(chart) {
    const now = Date.now();
    while (chart.points.length > CHART_MAX_POINTS ||
           (chart.points.length > 1 && chart.points[0][0] < now - CHART_SPAN_MS)) {
      chart.points.shift();
    }
    const points = chart.points;
    chart.svg.dataset.points = String(points.length);
    if (!points.length) {
      chart.line.setAttribute("points", "");
      chart.dot.remove();
      return;
    }
    const t0 = Math.min(points[0][0], now - 60000);
    const values = points.map((p) => p[1]);
    const low = Math.min(...values);
    const high = Math.max(...values);
    const x = (t) => (118 * (t - t0)) / Math.max(1, now - t0) + 1;
    const y = (v) => (high === low ? 14 : 25 - (22 * (v - low)) / (high - low));
    const coords = points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1));
    chart.line.setAttribute("points", coords.join(" "));
    const [lx, ly] = coords[coords.length - 1].split(",");
    chart.dot.setAttribute("cx", lx);
    chart.dot.setAttribute("cy", ly);
    chart.svg.append(chart.dot);
    const trend = values[values.length - 1] - values[0];
    chart.svg.setAttribute("class", "spark" + (trend > 0 ? " up" : trend < 0 ? " down" : ""));
  }

  // --- the courses table ----------------------------------------------------------------------
  // A row's cells are made once and then updated in place: the once-a-second redraw of ages
  // must not replace the elements under the reader's pointer (a value's exact tooltip).
  function rowFor(direction) {
    let row = rowCells.get(direction);
    if (!row) {
      const tr = document.createElement("tr");
      tr.dataset.pair = direction;
      const pair = cell(direction, "pair");
      const meta = document.createElement("span");
      meta.className = "meta";
      pair.append(meta);
      row = { tr, meta, value: cell("", "num value"), provider: cell("", "provider"),
              age: cell("", "num age"), flags: cell("", "flags"), sources: cell("", "sources") };
      row.value.dataset.field = "value";
      tr.append(pair, row.value, row.provider, row.age, row.flags, row.sources,
                chartFor(direction).td);
      const placeholder = rows.querySelector(".empty-row");
      if (placeholder) placeholder.remove();
      const after = [...rows.children].find((r) => r.dataset.pair > direction);
      rows.insertBefore(tr, after || null);
      rowCells.set(direction, row);
    }
    return row;
  }

  function setText(element, text) {
    if (element.textContent !== text) element.textContent = text;
  }

  function renderRow(course, previous) {
    const row = rowFor(course.direction);
    const age = formatAge(ageSeconds(course));
    const status = statusOf(course);
    setText(row.meta, course.provider + " · " + age);
    setText(row.value, formatValue(course.value));
    row.value.title = course.value;
    row.value.dataset.exact = course.value;
    setText(row.provider, course.provider);
    setText(row.age, age);
    const flags = status + (course.derived ? " derived" : "");
    if (row.flags.dataset.flags !== flags) {
      row.flags.dataset.flags = flags;
      row.flags.replaceChildren(...flags.split(" ").map(tag));
    }
    renderSources(row.sources, course);
    const tr = row.tr;
    tr.classList.toggle("stale", status === "stale");
    if (previous && previous.value !== course.value) {
      tr.classList.remove("up", "down", "flash");
      tr.classList.add(Number(course.value) >= Number(previous.value) ? "up" : "down", "flash");
      setTimeout(() => tr.classList.remove("flash"), 700);
    }
  }

  // Each source the owner considered (the socket asks for `expand=sources`), an excluded one
  // struck through with its reason, and the dispersion between the included ones.
  function renderSources(td, course) {
    const sources = course.sources || [];
    const key = JSON.stringify([sources.map((s) => [s.provider, s.value, s.excluded]),
                                course.dispersion_bps]);
    if (td.dataset.key === key) return;
    td.dataset.key = key;
    const parts = sources.map((s) => {
      const span = document.createElement("span");
      span.className = "source" + (s.excluded ? " excluded " + (s.reason || "") : "");
      span.textContent = s.provider + " " + formatValue(String(s.value));
      span.title = s.excluded ? "excluded: " + s.reason + " (" + s.value + ")" : String(s.value);
      return span;
    });
    if (course.dispersion_bps !== null && course.dispersion_bps !== undefined) {
      const spread = document.createElement("span");
      spread.className = "dispersion";
      spread.textContent = "±" + course.dispersion_bps + " bp";
      spread.title = "dispersion: half the interquartile range of the included sources";
      parts.push(spread);
    }
    td.replaceChildren(...parts);
  }

  function tag(name) {
    const span = document.createElement("span");
    span.className = "tag " + name;
    span.textContent = name;
    return span;
  }

  // Nothing quoted yet: say so, with what the providers report, instead of waiting forever.
  function renderEmpty() {
    if (!snapshotSeen || courses.size) return;
    let placeholder = rows.querySelector(".empty-row td");
    if (!placeholder) {
      const tr = document.createElement("tr");
      tr.className = "empty-row";
      placeholder = cell("", "empty");
      placeholder.colSpan = 6;
      tr.append(placeholder);
      rows.replaceChildren(tr);
    }
    const states = document.createElement("span");
    states.className = "states";
    states.textContent = [...providerStates.values()]
      .map((p) => p.name + ": " + p.state + (p.last_error ? " (" + errorText(p) + ")" : ""))
      .join(" · ");
    placeholder.replaceChildren("no rates yet — providers unreachable?", states);
  }

  // --- providers -----------------------------------------------------------------------------
  function errorText(p) {
    if (!p.last_error) return "";
    const at = Date.parse(p.last_error_at);
    const age = Number.isFinite(at) ? formatAge(Math.max(0, (Date.now() - at) / 1000)) + " ago" : "";
    return "last error " + age + ": " + p.last_error;
  }

  function renderProvider(p) {
    providerStates.set(p.name, p);
    let tr = providers.querySelector('tr[data-provider="' + p.name + '"]');
    if (!tr) {
      const placeholder = providers.querySelector(".empty");
      if (placeholder) placeholder.parentElement.remove();
      tr = document.createElement("tr");
      tr.dataset.provider = p.name;
      tr.append(cell(p.name), cell("", "state"), cell("", "error"));
      providers.append(tr);
    }
    // Updated in place, as the courses' rows are (the error's full text is its tooltip).
    const [, state, error] = tr.children;
    setText(state, p.state);
    state.className = "state state-" + p.state;
    setText(error, errorText(p));
    // An error beside a closed circuit is history (greyed); beside open/half_open, the fault.
    error.className = "error " + (p.state === "closed" ? "past" : "current");
    error.title = p.last_error || "";
    renderEmpty();
  }

  // A provider's state from an event is newer than any /providers answer asked for before it:
  // such an answer (slow to come back) must not put the old state back.
  let providerEvents = 0;
  const providerEventNo = new Map();  // name -> number of the last event about it

  function providerEvent(data, ts) {
    providerEventNo.set(data.name, ++providerEvents);
    const known = providerStates.get(data.name) || { name: data.name };
    const p = { ...known, state: data.state };
    if (data.reason && data.state !== "closed") {
      p.last_error = data.reason;
      p.last_error_at = ts || new Date().toISOString();
    }
    renderProvider(p);
  }

  function loadProviders() {
    const asked = providerEvents;
    fetch(config.providers_url).then((r) => (r.ok ? r.json() : [])).then((list) => {
      for (const p of Array.isArray(list) ? list : list.providers || []) {
        if ((providerEventNo.get(p.name) || 0) > asked) continue;
        renderProvider({ name: p.name, state: p.state, last_error: p.last_error,
                         last_error_at: p.last_error_at });
      }
    }).catch(() => {});
  }

  // --- the event log and the socket ----------------------------------------------------------
  function addLog(text) {
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.textContent = new Date().toLocaleTimeString();
    li.append(time, text);
    log.prepend(li);
    while (log.children.length > 50) log.lastChild.remove();
  }

  function summary(message) {
    const d = message.data || {};
    switch (message.type) {
      case "rate.updated": return d.direction + " " + formatValue(d.value) + " (" + d.provider + ")";
      case "provider.state": return d.name + " → " + d.state + (d.reason ? ": " + d.reason : "");
      case "fetch.completed": return "stored " + d.stored + " in " + d.duration_ms + " ms";
      case "nats.inbound": return d.subject + " " + JSON.stringify(d.payload).slice(0, 120);
      default: return d.code || JSON.stringify(d).slice(0, 120);
    }
  }

  function handle(message) {
    // The pair chart (chart.js) follows the same socket.
    document.dispatchEvent(new CustomEvent("kurs:message", { detail: message }));
    switch (message.type) {
      case "snapshot":
        snapshotSeen = true;
        for (const course of message.data.courses) {
          const previous = courses.get(course.direction);
          courses.set(course.direction, course);
          renderRow(course, previous);
          if (!previous || previous.value !== course.value) {
            addPoint(course.direction, course.checked_at || course.source_time, course.value);
          }
        }
        if (!courses.size) {
          renderEmpty();
          loadProviders();
        }
        break;
      case "rate.updated": {
        const d = message.data;
        // Every field the event carries (with `expand=sources`: the sources and dispersion the
        // table shows), as the snapshot gives them; the value as a string, as there.
        const course = { ...d, value: String(d.value) };
        const previous = courses.get(d.direction);
        courses.set(d.direction, course);
        renderRow(course, previous);
        addPoint(d.direction, d.checked_at || d.source_time, d.value);
        break;
      }
      case "provider.state":
        providerEvent(message.data, message.ts);
        break;
      case "item.deleted": {
        courses.delete(message.data.code);
        charts.delete(message.data.code);
        const row = rowCells.get(message.data.code);
        if (row) row.tr.remove();
        rowCells.delete(message.data.code);
        renderEmpty();
        break;
      }
    }
    if (message.type !== "tick" && message.type !== "pong" && message.type !== "snapshot") {
      addLog(message.type + " " + summary(message));
    }
    document.getElementById("updated").textContent = "last message " + new Date().toLocaleTimeString();
    renderBadge();
  }

  // The badge answers "can I trust these numbers?": how long ago the freshest rate was confirmed
  // and how many are stale, not only whether the socket is open.
  function renderBadge() {
    let text;
    let state;
    const known = [...courses.values()];
    const freshest = known.length ? Math.min(...known.map(ageSeconds)) : null;
    const stale = known.filter((c) => statusOf(c) === "stale").length;
    if (socketState !== "open") {
      text = socketState === "closed" ? "reconnecting…" : "connecting…";
      if (freshest !== null) text += " · rates " + formatAge(freshest) + " old";
      state = socketState === "closed" ? "closed" : "";
    } else if (!snapshotSeen) {
      text = "connected";
      state = "";
    } else if (freshest === null) {
      text = "no rates yet";
      state = "stale";
    } else if (stale === known.length) {
      text = "stale · " + formatAge(freshest) + " ago";
      state = "stale";
    } else {
      text = "live · " + formatAge(freshest) + " ago" + (stale ? " · " + stale + " stale" : "");
      state = stale ? "partial" : "open";
    }
    statusBadge.textContent = text;
    statusBadge.className = state;
    statusBadge.dataset.socket = socketState;
    statusBadge.title = freshest === null ? "" :
      "the freshest rate was confirmed " + formatAge(freshest) + " ago; " +
      stale + " of " + known.length + " are stale";
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const query = new URLSearchParams(location.search);
    query.set("expand", "sources");  // each pair's sources and their dispersion, in the table
    const socket = new WebSocket(scheme + location.host + config.ws_path + "?" + query);
    socket.onopen = () => {
      retry = 0;
      socketState = "open";
      renderBadge();
    };
    // Values stay exact: the raw JSON numbers are kept as text for display.
    socket.onmessage = (event) => handle(JSON.parse(
      event.data.replace(/(?<!\\)"value":(-?[0-9.eE+-]+)/g, '"value":"$1"')));
    socket.onclose = () => {
      socketState = "closed";
      // The next socket's snapshot is the truth again: until it comes, no "live" claim.
      snapshotSeen = false;
      renderBadge();
      const delay = Math.min(10000, 250 * 2 ** retry++) * (0.5 + Math.random() / 2);
      setTimeout(connect, delay);
    };
  }

  // Ages move on between events: redraw them (and the charts' time axis) every second.
  setInterval(() => {
    for (const course of courses.values()) renderRow(course);
    for (const chart of charts.values()) drawChart(chart);
    for (const p of providerStates.values()) renderProvider(p);
    renderBadge();
  }, 1000);
  setInterval(loadProviders, 30000);
  loadProviders();
  connect();
})();
