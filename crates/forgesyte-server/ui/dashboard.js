// The ForgeSyte dashboard. Reads the public JSON routes and the event
// stream of this server only; every text from the server is set with
// textContent, never parsed as HTML.
'use strict';

const STATES = ['INITIALIZED', 'RUNNING', 'LOADED', 'FAILED', 'UNAVAILABLE'];
const WINDOW_MS = 5 * 60 * 1000;
const POLL_MS = 2000;
const COLORS = ['#0969da', '#cf222e', '#1a7f37', '#8250df', '#bc4c00', '#0a7ea4', '#bf3989', '#6e7781'];

const plugins = new Map();   // name -> status (+ runtime, isolation, journal when known)
const rows = new Map();      // name -> {tr, details, cells}
const series = new Map();    // name -> [{t, ms}]
const lastCalls = new Map(); // name -> success + error count at the last sample
const open = new Set();
let filter = '';
const openedAt = Date.now();
let search = '';

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// The SVG namespace name: an identifier, never fetched.
const svgNS = 'http://www.w3.org/2000/svg';
function svg(tag, attrs) {
  const node = document.createElementNS(svgNS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

// The charts' time span: since the page opened, at least a minute, at
// most the five minutes kept.
const span = () => Math.min(WINDOW_MS, Math.max(60 * 1000, Date.now() - openedAt));

const pluginPath = (name) => '/v1/plugins/' + encodeURIComponent(name);

async function getJSON(url) {
  const response = await fetch(url, { cache: 'no-store' });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const detail = body && (body.detail || body.error);
    throw new Error(response.status + (detail ? ': ' + detail : ''));
  }
  return body;
}

// ---------------------------------------------------------------- data

function merge(status) {
  const known = plugins.get(status.name) || {};
  plugins.set(status.name, Object.assign(known, status));
}

function sample(list) {
  const now = Date.now();
  for (const p of list) {
    const calls = (p.success_count || 0) + (p.error_count || 0);
    const before = lastCalls.get(p.name);
    lastCalls.set(p.name, calls);
    const points = series.get(p.name) || [];
    // A point when calls happened since the last sample (the mean moved).
    if (before !== undefined && calls > before && p.avg_execution_time_ms !== null) {
      points.push({ t: now, ms: p.avg_execution_time_ms });
    }
    while (points.length && now - points[0].t > WINDOW_MS) points.shift();
    series.set(p.name, points);
  }
}

async function refreshList() {
  const list = await getJSON('/v1/plugins');
  const names = new Set(list.map((p) => p.name));
  for (const name of [...plugins.keys()]) {
    if (!names.has(name)) {
      plugins.delete(name);
      // A plugin that comes back under the name starts a fresh history.
      series.delete(name);
      lastCalls.delete(name);
      const row = rows.get(name);
      if (row) { row.tr.remove(); row.details.remove(); rows.delete(name); }
    }
  }
  list.forEach(merge);
  sample(list);
  render();
  return list;
}

let renderQueued = false;
function renderSoon() {
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => { renderQueued = false; render(); }, 50);
}

async function refreshHealth(name) {
  try {
    const health = await getJSON(pluginPath(name) + '/health');
    merge(health);
    renderSoon();
  } catch (e) {
    // Gone meanwhile: the next list refresh removes it.
  }
}

async function refreshAll() {
  const list = await refreshList();
  // Each plugin's health (journal, runtime, isolation), eight at a time.
  const names = list.map((p) => p.name);
  const worker = async () => {
    while (names.length) await refreshHealth(names.shift());
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  for (const name of open) loadTools(name);
}

// ------------------------------------------------------------- rendering

function badge(state) {
  return el('span', { class: 'badge badge-' + state, 'data-state': state, text: state });
}

function sparkline(points) {
  const width = 120, height = 24;
  const chart = svg('svg', { class: 'spark', viewBox: `0 0 ${width} ${height}` });
  if (points.length === 0) return chart;
  const max = Math.max(...points.map((p) => p.ms), 0.001);
  const now = Date.now();
  const coords = points.map((p) => {
    const x = width - ((now - p.t) / span()) * width;
    const y = height - 2 - (p.ms / max) * (height - 4);
    return x.toFixed(1) + ',' + y.toFixed(1);
  });
  if (coords.length === 1) coords.push((width).toFixed(1) + ',' + coords[0].split(',')[1]);
  chart.append(svg('polyline', { points: coords.join(' '), fill: 'none', stroke: '#0969da', 'stroke-width': '1.5' }));
  return chart;
}

function rowFor(name) {
  let row = rows.get(name);
  if (row) return row;
  const cells = {
    name: el('td', { class: 'name' }),
    state: el('td', { class: 'state' }),
    reason: el('td', { class: 'reason' }),
    runtime: el('td', { class: 'runtime' }),
    isolation: el('td', { class: 'isolation' }),
    calls: el('td', { class: 'calls' }),
    latency: el('td', { class: 'latency' }),
    restarts: el('td', { class: 'restarts' }),
  };
  const button = el('button', { class: 'open', type: 'button', 'aria-expanded': 'false', onclick: () => toggle(name) }, '▸ ' + name);
  cells.name.append(button);
  const tr = el('tr', { class: 'plugin', 'data-plugin': name }, ...Object.values(cells));
  const details = el('tr', { class: 'details', 'data-details': name, hidden: '' }, el('td', { colspan: '8' }));
  row = { tr, details, cells, button, lastState: null };
  rows.set(name, row);
  return row;
}

function fill(row, p) {
  const c = row.cells;
  if (row.lastState !== p.state) {
    c.state.replaceChildren(badge(p.state));
    if (row.lastState !== null) {
      row.tr.classList.remove('flash');
      void row.tr.offsetWidth; // restart the animation
      row.tr.classList.add('flash');
    }
    row.lastState = p.state;
  }
  row.tr.dataset.state = p.state;
  c.reason.textContent = p.reason || '';
  c.runtime.textContent = p.runtime || '';
  c.isolation.textContent = p.isolation || '';
  c.calls.textContent = (p.success_count || 0) + ' / ' + (p.error_count || 0) + (p.in_flight ? ` (${p.in_flight} in flight)` : '');
  const avg = p.avg_execution_time_ms;
  c.latency.replaceChildren(
    el('span', { text: avg === null || avg === undefined ? '–' : avg.toFixed(2) + ' ms ' }),
    sparkline(series.get(p.name) || []),
  );
  const restarts = p.restart_count || 0;
  c.restarts.textContent = restarts + (p.last_exit_reason ? ' (' + p.last_exit_reason + ')' : '') +
    (p.next_retry_at ? ', next ' + p.next_retry_at : '');
}

function visible(p) {
  return (!filter || p.state === filter) && (!search || p.name.toLowerCase().includes(search));
}

function render() {
  const body = $('rows');
  const names = [...plugins.keys()].sort();
  let shown = 0;
  for (const name of names) {
    const p = plugins.get(name);
    const row = rowFor(name);
    fill(row, p);
    const show = visible(p);
    row.tr.hidden = !show;
    row.details.hidden = !show || !open.has(name);
    if (show) shown += 1;
    body.append(row.tr, row.details); // keeps sorted order, moves in place
  }
  $('empty').hidden = shown > 0 || names.length === 0;
  renderCounts();
  renderJournal();
  renderChart();
}

function renderCounts() {
  const counts = { total: plugins.size };
  for (const state of STATES) counts[state] = 0;
  for (const p of plugins.values()) counts[p.state] = (counts[p.state] || 0) + 1;
  const chips = [['', 'total', counts.total]].concat(STATES.map((s) => [s, s, counts[s]]));
  $('counts').replaceChildren(...chips.map(([value, label, n]) => el('button', {
    class: 'count' + (filter === value ? ' active' : ''), type: 'button', 'data-count': label,
    onclick: () => { filter = value; $('filter').value = value; render(); },
  }, el('b', { text: String(n) }), label)));
}

function renderJournal() {
  const entries = [];
  for (const p of plugins.values()) {
    for (const entry of p.journal || []) entries.push(Object.assign({ plugin: p.name }, entry));
  }
  entries.sort((a, b) => (a.at < b.at ? 1 : a.at > b.at ? -1 : 0));
  $('journal-rows').replaceChildren(...entries.slice(0, 100).map((e) => {
    const exit = [e.exit_signal, e.exit_code !== null && e.exit_code !== undefined ? 'code ' + e.exit_code : null]
      .filter(Boolean).join(', ');
    const reason = el('td', { class: 'reason' }, e.reason || '');
    if (e.stderr_tail && e.stderr_tail.length) reason.append(el('pre', { text: e.stderr_tail.join('\n') }));
    return el('tr', {}, el('td', { text: e.at }), el('td', { text: e.plugin }), el('td', {}, badge(e.state)), reason, el('td', { text: exit }));
  }));
}

function renderChart() {
  const chart = $('latency');
  const width = 600, height = 120, now = Date.now();
  const shown = [...series.entries()].filter(([name, points]) => points.length && plugins.has(name));
  const drawn = shown.slice(0, COLORS.length);
  const max = Math.max(0.001, ...drawn.flatMap(([, points]) => points.map((p) => p.ms)));
  const parts = [svg('line', { x1: 0, y1: height - 1, x2: width, y2: height - 1, stroke: '#d0d7de' })];
  const hidden = shown.length - drawn.length;
  const legend = [el('span', { class: 'muted', text: `top ${max.toFixed(2)} ms · last ${Math.round(span() / 1000)} s${hidden > 0 ? ` · ${hidden} more plugin(s) not drawn` : ''}` })];
  drawn.forEach(([name, points], i) => {
    const color = COLORS[i];
    const coords = points.map((p) => {
      const x = width - ((now - p.t) / span()) * width;
      const y = height - 4 - (p.ms / max) * (height - 20);
      return x.toFixed(1) + ',' + y.toFixed(1);
    });
    if (coords.length === 1) coords.push(width + ',' + coords[0].split(',')[1]);
    const line = svg('polyline', { points: coords.join(' '), fill: 'none', stroke: color, 'stroke-width': 2 });
    const title = svg('title');
    title.textContent = name;
    line.append(title);
    line.setAttribute('vector-effect', 'non-scaling-stroke');
    parts.push(line);
    legend.push(el('span', {}, el('i', { style: 'background:' + color }), name));
  });
  chart.replaceChildren(...parts);
  if (drawn.length === 0) legend.push(el('span', { class: 'muted', text: 'no calls yet' }));
  $('latency-legend').replaceChildren(...legend);
}

// ------------------------------------------------------- details, try it

function toggle(name) {
  const row = rows.get(name);
  if (!row) return;
  if (open.has(name)) {
    open.delete(name);
    row.details.hidden = true;
    row.button.textContent = '▸ ' + name;
    row.button.setAttribute('aria-expanded', 'false');
  } else {
    open.add(name);
    row.details.hidden = false;
    row.button.textContent = '▾ ' + name;
    row.button.setAttribute('aria-expanded', 'true');
    loadTools(name);
  }
}

function binaryArgs(schema) {
  const props = (schema && schema.properties) || {};
  return Object.keys(props).filter((key) => {
    const p = props[key] || {};
    return p.format === 'binary' || p.contentEncoding === 'base64';
  });
}

function exampleArgs(schema) {
  const props = (schema && schema.properties) || {};
  const binary = new Set(binaryArgs(schema));
  const out = {};
  for (const key of (schema && schema.required) || []) {
    if (binary.has(key)) continue;
    const type = (props[key] || {}).type;
    out[key] = type === 'number' || type === 'integer' ? 0 : type === 'boolean' ? false
      : type === 'array' ? [] : type === 'object' ? {} : '';
  }
  return JSON.stringify(out, null, 2);
}

function toolCard(name, tool) {
  const args = el('textarea', { class: 'args', 'aria-label': 'JSON arguments', spellcheck: 'false' });
  args.value = exampleArgs(tool.input_schema);
  const binary = binaryArgs(tool.input_schema);
  const file = el('input', { type: 'file', class: 'file' });
  const field = el('input', { type: 'text', class: 'field', value: binary[0] || 'file', size: '12', 'aria-label': 'Argument name of the file' });
  const result = el('pre', { class: 'result', hidden: '' });
  const run = el('button', { type: 'button', class: 'run' }, 'Run');
  run.addEventListener('click', async () => {
    result.hidden = false;
    result.textContent = 'running…';
    let parsed;
    try {
      parsed = args.value.trim() ? JSON.parse(args.value) : {};
    } catch (e) {
      result.textContent = 'The arguments are not JSON: ' + e.message;
      return;
    }
    const url = pluginPath(name) + '/tools/' + encodeURIComponent(tool.id) + '/run';
    const init = { method: 'POST' };
    if (file.files && file.files.length) {
      const form = new FormData();
      form.append(field.value || 'file', file.files[0]);
      form.append('args', JSON.stringify(parsed));
      init.body = form;
    } else {
      init.headers = { 'Content-Type': 'application/json' };
      init.body = JSON.stringify({ args: parsed });
    }
    try {
      const response = await fetch(url, init);
      const text = await response.text();
      let shown = text;
      try { shown = JSON.stringify(JSON.parse(text), null, 2); } catch (e) { /* not JSON */ }
      result.textContent = response.status + ' ' + response.statusText + '\n' + shown;
    } catch (e) {
      result.textContent = 'Request failed: ' + e.message;
    }
  });
  return el('div', { class: 'tool', 'data-tool': tool.id, 'data-spec': JSON.stringify(tool) },
    el('h3', {}, el('code', { text: tool.id }), tool.title && tool.title !== tool.id ? ' ' + tool.title : null),
    tool.description ? el('p', { text: tool.description }) : null,
    el('details', {}, el('summary', { text: 'Input schema' }), el('pre', { text: JSON.stringify(tool.input_schema, null, 2) })),
    el('details', {}, el('summary', { text: 'Output schema' }), el('pre', { text: JSON.stringify(tool.output_schema, null, 2) })),
    el('div', { class: 'tryit' },
      el('label', {}, 'Arguments (JSON)', args),
      el('div', { class: 'row' },
        el('label', {}, 'or a file ', file),
        el('label', {}, 'as argument ', field),
        binary.length ? el('span', { class: 'muted', text: 'binary: ' + binary.join(', ') }) : null,
        run),
      result));
}

async function loadTools(name) {
  const row = rows.get(name);
  if (!row) return;
  const cell = row.details.firstChild;
  const p = plugins.get(name) || {};
  const meta = el('p', { class: 'muted', text: [p.description, p.version && 'version ' + p.version].filter(Boolean).join(' · ') });
  try {
    const tools = await getJSON(pluginPath(name) + '/tools');
    // A card whose tool is unchanged is kept as it is (moved, not rebuilt):
    // its typed arguments stay, and a run from it still in flight (the
    // call that made the plugin fail, whose event comes before its answer)
    // writes its answer where it can be seen.
    const kept = new Map();
    for (const card of cell.querySelectorAll(':scope > .tool')) kept.set(card.dataset.spec, card);
    const card = (t) => kept.get(JSON.stringify(t)) || toolCard(name, t);
    cell.replaceChildren(meta, ...(tools.length ? tools.map(card) : [el('p', { text: 'No tools.' })]));
  } catch (e) {
    cell.replaceChildren(meta, el('p', { class: 'muted', text: 'No tools to show: ' + e.message }));
  }
}

// ---------------------------------------------------------- live events

function logEvent(kind, text) {
  const list = $('events');
  const time = new Date().toLocaleTimeString();
  list.prepend(el('li', { 'data-kind': kind }, time + '  ' + kind + '  ' + text));
  while (list.children.length > 200) list.lastChild.remove();
}

const healthTimers = new Map();
function healthSoon(name) {
  clearTimeout(healthTimers.get(name));
  healthTimers.set(name, setTimeout(() => { healthTimers.delete(name); refreshHealth(name); }, 150));
}

function onPluginEvent(kind, data) {
  const known = plugins.get(data.plugin);
  if (!known) {
    // New plugin: the list has its whole status.
    refreshList().catch(() => {});
  } else {
    known.state = data.to;
    known.reason = data.reason;
    known.restart_count = data.restart_count;
    if (data.exit) known.last_exit_reason = data.exit;
    render();
  }
  healthSoon(data.plugin);
  logEvent(kind, data.plugin + ': ' + (data.from || '–') + ' → ' + data.to + (data.reason ? ' (' + data.reason + ')' : ''));
  if (open.has(data.plugin) && (data.to === 'INITIALIZED' || data.to === 'FAILED')) loadTools(data.plugin);
}

function connect() {
  const conn = $('conn');
  const source = new EventSource('/v1/events');
  const up = () => { conn.textContent = 'live'; conn.className = 'conn conn-up'; };
  source.addEventListener('open', up);
  source.addEventListener('error', () => { conn.textContent = 'reconnecting'; conn.className = 'conn conn-down'; });
  for (const kind of ['hello', 'reset']) {
    source.addEventListener(kind, () => {
      up();
      if (kind === 'reset') logEvent('reset', 'missed events: fetching the full state');
      refreshAll().catch((e) => logEvent('error', e.message));
    });
  }
  for (const kind of ['state', 'crash', 'restart']) {
    source.addEventListener(kind, (event) => onPluginEvent(kind, JSON.parse(event.data)));
  }
  source.addEventListener('load', (event) => {
    const d = JSON.parse(event.data);
    // A pass that failed part-way has no counts (null).
    const counts = d.loaded == null
      ? 'failed part-way (see the server log); a rescan runs it again'
      : `${d.loaded} loaded, ${d.failed} failed, ${d.unavailable} unavailable (${Number(d.elapsed_ms || 0).toFixed(0)} ms)`;
    $('load').textContent = d.phase === 'finished'
      ? `Load pass finished: ${counts}`
      : `Loading: ${d.settled} of ${d.registered} plugins settled`;
    if (d.phase !== 'progress') logEvent('load', d.phase);
  });
  source.addEventListener('reload', (event) => {
    const d = JSON.parse(event.data);
    logEvent('reload', `${d.trigger}: ${d.plugins.length} plugin(s), ${d.loaded} loaded, ${d.failed} failed, ${d.unavailable} unavailable`);
    refreshList().catch(() => {});
  });
}

// ------------------------------------------------------------------ start

$('filter').addEventListener('change', (e) => { filter = e.target.value; render(); });
$('search').addEventListener('input', (e) => { search = e.target.value.trim().toLowerCase(); render(); });
setInterval(() => { refreshList().catch(() => {}); }, POLL_MS);
connect();
