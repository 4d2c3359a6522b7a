// sidenet mesh map: polls /api/nodes (docs/web.md), draws the mesh with a small force layout
// in SVG, and lists the nodes with search and filters. No library, nothing loaded from
// anywhere but this controller.
'use strict';

const SVGNS = 'http://www.w3.org/2000/svg';
const POLL_MS = 2000;
const COLOURS = { good: '#2ca02c', degraded: '#ff7f0e', bad: '#d62728', unknown: '#9e9e9e' };
const HEALTH = { healthy: '#2ca02c', degraded: '#ff7f0e', failed: '#d62728', offline: '#616161', pending: '#1f77b4' };
const RANK = { unknown: 0, good: 1, degraded: 2, bad: 3 };
// Babel costs: up to twice a wired hop's 96 is good; anything finite more is degraded.
const COST_GOOD = 192;
const INFINITY = 65535;
const ROWS_MAX = 500;
const W = 1000, H = 700;

const $ = (id) => document.getElementById(id);
let token = null;
let snap = null;
const pos = new Map(); // node id -> {x, y, vx, vy}
let shape = '';         // node and pair ids of the last layout

function readToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    token = decodeURIComponent(m[1]);
    try { sessionStorage.setItem('sidenet-token', token); } catch (e) { /* private mode */ }
    history.replaceState(null, '', location.pathname + location.search);
  } else {
    try { token = sessionStorage.getItem('sidenet-token'); } catch (e) { token = null; }
  }
}

async function poll() {
  try {
    const headers = token ? { Authorization: 'Bearer ' + token } : {};
    const r = await fetch('/api/nodes', { headers, cache: 'no-store' });
    if (r.status === 401) {
      $('token-box').hidden = false;
      $('token-error').textContent = token ? 'refused: wrong token' : '';
      document.body.dataset.state = 'unauthorized';
    } else if (!r.ok) {
      $('updated').textContent = 'controller: ' + r.status + ' ' + (await r.text()).trim();
      document.body.dataset.state = 'error';
    } else {
      $('token-box').hidden = true;
      snap = await r.json();
      render();
      document.body.dataset.state = 'ready';
    }
  } catch (e) {
    $('updated').textContent = 'controller unreachable: ' + e;
    document.body.dataset.state = 'error';
  }
  setTimeout(poll, POLL_MS);
}

// Both directions of a link as one pair: the worse grade, the larger cost, rtt and loss.
function pairs(links) {
  const out = new Map();
  for (const l of links) {
    const [a, b] = l.source < l.target ? [l.source, l.target] : [l.target, l.source];
    const key = a + ' ' + b;
    const p = out.get(key) || { a, b, mesh: l.mesh, quality: 'unknown', cost: null, rtt: null, loss: null, up: false, ends: [] };
    if (RANK[l.quality] > RANK[p.quality]) p.quality = l.quality;
    const max = (x, y) => (y === null || y === undefined) ? x : (x === null ? y : Math.max(x, y));
    p.cost = max(p.cost, l.cost);
    p.rtt = max(p.rtt, l.rtt_ms);
    p.loss = max(p.loss, l.loss);
    p.up = p.up || l.up;
    p.ends.push(l);
    out.set(key, p);
  }
  return [...out.values()];
}

function costGrade(c) {
  if (c === null) return 'unknown';
  if (c >= INFINITY) return 'bad';
  return c <= COST_GOOD ? 'good' : 'degraded';
}

function linkColour(p) {
  const grade = $('colour-by').value === 'cost' ? costGrade(p.cost) : p.quality;
  return [grade, COLOURS[grade]];
}

// Force layout: springs along links, repulsion between nodes in nearby grid cells (O(n) a
// step), a pull to the centre. Positions persist across updates, so the map stays still.
function layout(nodes, prs) {
  const ids = nodes.map((n) => n.id);
  const key = ids.join(',') + '|' + prs.map((p) => p.a + ' ' + p.b).join(',');
  if (key === shape) return;
  shape = key;
  const n = nodes.length;
  nodes.forEach((node, i) => {
    if (!pos.has(node.id)) {
      const t = (i / Math.max(n, 1)) * 2 * Math.PI;
      const r = 40 + Math.min(W, H) * 0.35 * Math.sqrt((i + 1) / Math.max(n, 1));
      pos.set(node.id, { x: W / 2 + r * Math.cos(t), y: H / 2 + r * Math.sin(t), vx: 0, vy: 0 });
    }
  });
  const live = new Set(ids);
  for (const id of [...pos.keys()]) if (!live.has(id)) pos.delete(id);
  // Fruchterman-Reingold: repulsion k²/d (only within 2k, through a grid), attraction d²/k
  // along links, a pull to the centre, moves capped by a cooling temperature.
  const k = Math.max(10, 0.5 * Math.sqrt((W * H) / Math.max(n, 1)));
  const cell = 2 * k;
  const steps = n <= 500 ? 300 : n <= 5000 ? 80 : 20;
  const P = ids.map((id) => pos.get(id));
  const index = new Map(ids.map((id, i) => [id, i]));
  const springs = prs.map((p) => [index.get(p.a), index.get(p.b)]).filter(([a, b]) => a !== undefined && b !== undefined);
  for (let s = 0; s < steps; s++) {
    const temp = (W / 8) * (1 - s / steps) + 0.5;
    const grid = new Map();
    P.forEach((p, i) => {
      p.vx = 0; p.vy = 0;
      const key = Math.floor(p.x / cell) + ',' + Math.floor(p.y / cell);
      if (!grid.has(key)) grid.set(key, []);
      grid.get(key).push(i);
    });
    P.forEach((p, i) => {
      const cx = Math.floor(p.x / cell), cy = Math.floor(p.y / cell);
      for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
        for (const j of grid.get((cx + dx) + ',' + (cy + dy)) || []) {
          if (j === i) continue;
          const q = P[j];
          let ddx = p.x - q.x, ddy = p.y - q.y;
          let d = Math.sqrt(ddx * ddx + ddy * ddy);
          if (d < 0.01) { ddx = Math.random() - 0.5; ddy = Math.random() - 0.5; d = 0.7; }
          if (d > cell) continue;
          const f = (k * k) / d;
          p.vx += (ddx / d) * f; p.vy += (ddy / d) * f;
        }
      }
    });
    for (const [a, b] of springs) {
      const p = P[a], q = P[b];
      const dx = q.x - p.x, dy = q.y - p.y;
      const d = Math.sqrt(dx * dx + dy * dy) || 0.01;
      const f = (d * d) / k;
      p.vx += (dx / d) * f; p.vy += (dy / d) * f; q.vx -= (dx / d) * f; q.vy -= (dy / d) * f;
    }
    for (const p of P) {
      p.vx += (W / 2 - p.x) * 0.08 * (k / 40); p.vy += (H / 2 - p.y) * 0.08 * (k / 40);
      const v = Math.sqrt(p.vx * p.vx + p.vy * p.vy) || 1;
      const m = Math.min(v, temp);
      p.x = Math.min(W - 12, Math.max(12, p.x + (p.vx / v) * m));
      p.y = Math.min(H - 12, Math.max(12, p.y + (p.vy / v) * m));
    }
  }
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVGNS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function rev(n) {
  const a = n.applied ? n.applied.rev : null, d = n.desired ? n.desired.rev : null;
  if (a === null && d === null) return '–';
  if (a === d || d === null) return String(a);
  return (a === null ? '–' : a) + ' → ' + d;
}

function problem(n) {
  const parts = [];
  if (n.reason) parts.push(n.reason);
  if (n.failure) parts.push(n.failure);
  if (n.missing && n.missing.length) parts.push('missing: ' + n.missing.join(', '));
  return parts.join('; ');
}

function matches(n) {
  const q = $('search').value.trim().toLowerCase();
  if ($('phase').value && n.phase !== $('phase').value) return false;
  if ($('mesh').value && n.mesh !== $('mesh').value) return false;
  if ($('health').value && n.health !== $('health').value) return false;
  if (!q) return true;
  return [n.label, n.id, n.hostname, n.address, n.prefix, n.mesh].some((v) => v && v.toLowerCase().includes(q));
}

function fillSelect(sel, values) {
  const keep = sel.value;
  const have = [...sel.options].slice(1).map((o) => o.value);
  if (have.join('\n') === values.join('\n')) return;
  while (sel.options.length > 1) sel.remove(1);
  for (const v of values) sel.add(new Option(v, v));
  sel.value = values.includes(keep) ? keep : '';
}

function render() {
  if (!snap) return;
  const nodes = snap.nodes, prs = pairs(snap.links);
  const byPair = new Map();
  for (const p of prs) for (const id of [p.a, p.b]) {
    if (!byPair.has(id)) byPair.set(id, []);
    byPair.get(id).push(p);
  }
  // Summary.
  const phases = Object.entries(snap.phases).map(([k, v]) => v + ' ' + k).join(', ');
  const bad = prs.filter((p) => p.quality === 'bad').length;
  const degraded = prs.filter((p) => p.quality === 'degraded').length;
  $('summary').textContent = nodes.length + ' nodes' + (phases ? ' (' + phases + ')' : '') + ' · ' +
    prs.length + ' links (' + bad + ' bad, ' + degraded + ' degraded) · ' +
    snap.manifest_errors.length + ' manifest errors';
  $('updated').textContent = 'updated ' + new Date(snap.generated * 1000).toLocaleTimeString();
  document.body.dataset.nodes = nodes.length;
  document.body.dataset.links = prs.length;
  document.body.dataset.generated = snap.generated;
  // Manifest errors and rollouts.
  const list = (ul, items) => {
    ul.replaceChildren(...items.map((t) => { const li = document.createElement('li'); li.textContent = t; return li; }));
    ul.hidden = items.length === 0;
  };
  list($('errors'), snap.manifest_errors.map((e) => 'manifest: ' + e));
  list($('rollouts'), (snap.rollouts || []).map((r) => 'rollout in progress on ' + r.mesh + ': ' + r.summary));
  fillSelect($('phase'), Object.keys(snap.phases).sort());
  fillSelect($('mesh'), [...new Set(nodes.map((n) => n.mesh))].sort());
  // Legend.
  const legend = $('legend');
  const entries = $('colour-by').value === 'cost'
    ? [['good', 'cost ≤ ' + COST_GOOD], ['degraded', 'higher'], ['bad', 'unreachable'], ['unknown', 'no cost']]
    : [['good', 'loss ≤ ' + snap.thresholds.good_loss * 100 + '%, rtt ≤ ' + snap.thresholds.good_rtt_ms + ' ms'],
       ['degraded', 'worse'], ['bad', 'loss ≥ ' + snap.thresholds.bad_loss * 100 + '% or rtt ≥ ' + snap.thresholds.bad_rtt_ms + ' ms or down'],
       ['unknown', 'no data']];
  legend.replaceChildren(...entries.map(([g, t]) => {
    const s = document.createElement('span'), i = document.createElement('i');
    i.style.background = COLOURS[g];
    s.append(i, t);
    return s;
  }));
  // Map.
  layout(nodes, prs);
  const shown = new Set(nodes.filter(matches).map((n) => n.id));
  const gl = $('links'), gn = $('nodes');
  gl.replaceChildren(); gn.replaceChildren();
  for (const p of prs) {
    const a = pos.get(p.a), b = pos.get(p.b);
    if (!a || !b) continue;
    const [grade, colour] = linkColour(p);
    const line = el('line', {
      class: 'link q-' + grade + (shown.has(p.a) || shown.has(p.b) ? '' : ' dim'),
      x1: a.x.toFixed(1), y1: a.y.toFixed(1), x2: b.x.toFixed(1), y2: b.y.toFixed(1),
      stroke: colour, 'data-pair': p.a + ' ' + p.b, 'data-quality': p.quality,
    }, gl);
    const t = el('title', {}, line);
    t.textContent = p.ends.map((l) => l.source.slice(0, 8) + ' → ' + l.target.slice(0, 8) + ': cost ' +
      (l.cost ?? '–') + ', rtt ' + (l.rtt_ms === null ? '–' : l.rtt_ms.toFixed(1) + ' ms') + ', loss ' +
      (l.loss === null ? '–' : Math.round(l.loss * 100) + '%')).join('\n');
  }
  const label = nodes.length <= 150;
  for (const n of nodes) {
    const p = pos.get(n.id);
    const c = el('circle', {
      class: 'node' + (shown.has(n.id) ? '' : ' dim'), cx: p.x.toFixed(1), cy: p.y.toFixed(1),
      r: nodes.length > 1000 ? 3 : 7, fill: HEALTH[n.health] || '#999', 'data-id': n.id,
    }, gn);
    el('title', {}, c).textContent = n.label + ' (' + n.id + ')\n' + n.phase + ', revision ' + rev(n) +
      (n.prefix ? '\n' + n.prefix : '') + (problem(n) ? '\n' + problem(n) : '');
    c.addEventListener('click', () => { $('search').value = n.id; render(); });
    if (label) el('text', { x: (p.x + 9).toFixed(1), y: (p.y + 3).toFixed(1) }, gn).textContent = n.label;
  }
  // Table.
  const rows = nodes.filter(matches);
  const body = document.querySelector('#nodes-table tbody');
  body.replaceChildren(...rows.slice(0, ROWS_MAX).map((n) => {
    const tr = document.createElement('tr');
    tr.dataset.id = n.id;
    const links = byPair.get(n.id) || [];
    const worst = links.reduce((w, p) => (RANK[p.quality] > RANK[w] ? p.quality : w), 'unknown');
    const cells = [
      ['name', n.label], ['id', n.id.slice(0, 12)], ['mesh', n.mesh], ['phase', n.phase],
      ['health', n.health], ['revision', rev(n)], ['prefix', n.prefix || '–'],
      ['links', links.length ? links.length + ' (' + worst + ')' : '0'], ['handover', n.handover || '–'],
      ['seen', n.last_seen ? new Date(n.last_seen * 1000).toLocaleTimeString() : '–'], ['problem', problem(n)],
    ];
    for (const [cls, text] of cells) {
      const td = document.createElement('td');
      td.className = cls + (cls === 'health' ? ' h-' + n.health : '');
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
  $('shown').textContent = rows.length + ' of ' + nodes.length + ' shown' +
    (rows.length > ROWS_MAX ? ' (first ' + ROWS_MAX + ' listed: refine the search)' : '');
}

readToken();
$('token-box').addEventListener('submit', (e) => {
  e.preventDefault();
  token = $('token').value.trim();
  try { sessionStorage.setItem('sidenet-token', token); } catch (err) { /* private mode */ }
  $('token-box').hidden = true;
});
for (const id of ['search', 'phase', 'mesh', 'health', 'colour-by']) $(id).addEventListener('input', render);
poll();
