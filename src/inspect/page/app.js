// fly inspector: the list of updates, kept live over Server-Sent Events, and
// the detail of one, with Replay and the copy buttons.
//
// Everything the server sends is data from the internet (bodies, handler
// output), so the DOM is built with createElement and textContent only, never
// innerHTML; the server's CSP forbids inline script and style besides.
'use strict';

// The page keeps at most this many rows: the server forgets old entries
// (--inspect-keep) and a page left open for days must stay responsive.
const MAX_ROWS = 1000;
// The server applies the filters (its text filter searches bodies, which the
// summaries do not carry), so typing reloads the list after a short pause.
const FILTER_DELAY_MS = 200;

const $ = (id) => document.getElementById(id);

const state = {
  selected: null, // id of the entry in the detail panel
  detail: null, // the Detail shown, for the copy buttons
  detailSeq: 0, // so a slow answer for an earlier click is not shown
  listSeq: 0, // likewise for the list
  loading: false, // a list request is under way: events wait in `pending`
  pending: [],
  awaitingReplay: null, // id of a replay started here: selected when it arrives
  announced: new Set(), // ids the stream announced lately: a replay may end before its 202
  streamWasDown: false,
  reloadTimer: null,
};

// ---- DOM helpers ----------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function rowFor(id) {
  return $('updates').querySelector(`tr[data-id="${CSS.escape(String(id))}"]`);
}

function say(message) {
  $('action-message').textContent = message;
}

function showStatus(text, kind) {
  $('status').textContent = text;
  $('status').dataset.state = kind;
}

function formatTime(ms) {
  const date = new Date(ms);
  return `${date.toTimeString().slice(0, 8)}.${String(date.getMilliseconds()).padStart(3, '0')}`;
}

const orDash = (value) => (value === null || value === undefined || value === '' ? '—' : value);

// ---- the list -------------------------------------------------------------

function filters() {
  return {
    q: $('filter-text').value.trim(),
    chat: $('filter-chat').value.trim(),
    outcome: $('filter-outcome').value,
  };
}

function filtering() {
  return Object.values(filters()).some(Boolean);
}

async function getJson(url) {
  const response = await fetch(url, { headers: { Accept: 'application/json' } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function loadList() {
  const seq = ++state.listSeq;
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(filters())) if (value) params.set(name, value);
  const query = params.toString();
  state.loading = true;
  try {
    const answer = await getJson(`/api/updates${query ? `?${query}` : ''}`);
    if (seq !== state.listSeq) return;
    renderList(answer.updates);
  } catch (error) {
    if (seq === state.listSeq) showStatus(`list failed: ${error.message}`, 'down');
  } finally {
    if (seq === state.listSeq) {
      state.loading = false;
      // Events that came while the list was on its way are newer than it or
      // the same: applied now, none is lost under the fresh list.
      state.pending.splice(0).forEach(onSummary);
    }
  }
}

function renderList(updates) {
  $('updates').replaceChildren(...updates.slice(0, MAX_ROWS).map(row));
  afterListChange();
}

function row(summary) {
  const tr = el('tr', 'update');
  tr.dataset.id = summary.id;
  tr.tabIndex = 0; // rows open with the keyboard too
  const time = el('td', 'time', formatTime(summary.time_ms));
  time.title = new Date(summary.time_ms).toISOString();
  if (summary.replay_of !== null && summary.replay_of !== undefined) {
    const link = el('span', 'replay-of', ` ↻ #${summary.replay_of}`);
    link.dataset.replayOf = summary.replay_of;
    link.title = `Replay of #${summary.replay_of}: click to open it`;
    time.append(link);
  }
  const signature = el('td', 'signature', orDash(summary.signature));
  // Colours come from attributes in app.css: no style attributes under the CSP.
  if (summary.signature) signature.dataset.verdict = summary.signature;
  const outcome = el('td', 'outcome', summary.outcome);
  outcome.dataset.outcome = summary.outcome;
  if (summary.attempts > 1) outcome.title = `${summary.attempts} attempts`;
  tr.append(
    time,
    el('td', 'update-id', orDash(summary.update_id)),
    el('td', 'chat', orDash(summary.chat)),
    el('td', 'type', orDash([summary.kind, summary.msg_type].filter(Boolean).join('/'))),
    signature,
    outcome,
    el('td', 'latency', summary.latency_ms === null || summary.latency_ms === undefined ? '—' : `${summary.latency_ms} ms`),
  );
  return tr;
}

// Newest first by id: a replay gets its id when it starts but arrives when it ends.
function insertRow(tr, id) {
  const tbody = $('updates');
  let before = tbody.firstElementChild;
  while (before && Number(before.dataset.id) > id) before = before.nextElementSibling;
  tbody.insertBefore(tr, before);
  while (tbody.rows.length > MAX_ROWS) tbody.lastElementChild.remove();
}

function afterListChange() {
  $('empty').hidden = $('updates').rows.length > 0;
  for (const tr of $('updates').rows) {
    const selected = Number(tr.dataset.id) === state.selected;
    tr.classList.toggle('selected', selected);
    tr.setAttribute('aria-selected', String(selected));
  }
}

// One summary from the event stream: a new entry or a new attempt of one.
function onSummary(summary) {
  if (state.loading) {
    state.pending.push(summary);
    return;
  }
  state.announced.add(summary.id);
  if (state.announced.size > 100) state.announced.delete(state.announced.values().next().value);
  if (filtering()) {
    // Only the server knows whether it matches the text filter.
    scheduleReload();
  } else {
    const existing = rowFor(summary.id);
    if (existing) existing.replaceWith(row(summary));
    else insertRow(row(summary), summary.id);
    afterListChange();
  }
  if (summary.id === state.awaitingReplay) {
    state.awaitingReplay = null;
    select(summary.id).then(() => say(`Replay of #${summary.replay_of}.`));
  } else if (summary.id === state.selected) {
    showDetail(summary.id);
  }
}

// At most one reload per pause however many events come.
function scheduleReload() {
  if (state.reloadTimer === null) {
    state.reloadTimer = setTimeout(() => {
      state.reloadTimer = null;
      loadList();
    }, FILTER_DELAY_MS);
  }
}

// Typing waits for a pause in the typing before the list is read again.
function onFilterInput() {
  clearTimeout(state.reloadTimer);
  state.reloadTimer = null;
  scheduleReload();
}

function connect() {
  const events = new EventSource('/api/events');
  events.addEventListener('open', () => {
    showStatus('live', 'live');
    // Entries may have come while the stream was down: the list is read again.
    if (state.streamWasDown) loadList();
    state.streamWasDown = false;
  });
  events.addEventListener('error', () => {
    state.streamWasDown = true;
    // EventSource reconnects by itself unless the server refused the stream.
    const closed = events.readyState === EventSource.CLOSED;
    showStatus(closed ? 'disconnected (reload the page)' : 'reconnecting…', 'down');
  });
  events.addEventListener('update', (event) => onSummary(JSON.parse(event.data)));
  // Too many changes to send one by one, or some missed: read the list again.
  events.addEventListener('reload', scheduleReload);
  events.addEventListener('lagged', scheduleReload);
}

// ---- the detail -------------------------------------------------------------

async function select(id) {
  if (id !== state.selected) say('');
  state.selected = id;
  afterListChange();
  await showDetail(id);
}

async function showDetail(id) {
  const seq = ++state.detailSeq;
  let detail;
  try {
    detail = await getJson(`/api/updates/${encodeURIComponent(id)}`);
  } catch (error) {
    if (seq !== state.detailSeq) return;
    state.detail = null;
    $('detail').hidden = false;
    $('detail-sections').hidden = true; // not the previous entry's under this title
    $('detail-title').textContent =
      error.message === 'NOT_FOUND' ? `#${id} is no longer kept (the oldest go first)` : `#${id}: ${error.message}`;
    return;
  }
  if (seq === state.detailSeq) renderDetail(detail);
}

function renderDetail(detail) {
  state.detail = detail;
  $('detail').hidden = false;
  $('detail-sections').hidden = false;
  const replay = detail.replay_of === null || detail.replay_of === undefined ? '' : ` · replay of #${detail.replay_of}`;
  $('detail-title').textContent = `#${detail.id} · ${detail.source} · update_id ${orDash(detail.update_id)}${replay}`;
  $('detail-body-raw').textContent = detail.body ?? '';
  $('detail-body-pretty').textContent = prettyJson(detail.body ?? '');
  renderHeaders(detail.headers || []);
  $('detail-explain').textContent = detail.explain ?? 'No signature check for this entry.';
  renderHandler(detail.handler);
  renderReply(detail.reply);
  renderAttempts(detail.attempts || []);
  $('copy-curl').disabled = !detail.curl;
  $('copy-verify').disabled = !detail.verify_sig;
}

// Indents JSON text without turning it into JavaScript values: JSON.parse
// rounds integers past 2^53 and rewrites escapes, and the pretty body must
// show the very numbers and strings that were received. Text that is not
// JSON is shown as it is.
function prettyJson(text) {
  try {
    JSON.parse(text);
  } catch {
    return text;
  }
  let out = '';
  let depth = 0;
  let inString = false;
  let escaped = false;
  const newline = () => `\n${'  '.repeat(depth)}`;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      out += c;
      if (escaped) escaped = false;
      else if (c === '\\') escaped = true;
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
      out += c;
    } else if (c === '{' || c === '[') {
      const close = c === '{' ? '}' : ']';
      let next = i + 1;
      while (/\s/.test(text[next])) next++;
      if (text[next] === close) {
        out += c + close; // {} and [] stay on one line
        i = next;
      } else {
        depth++;
        out += c + newline();
      }
    } else if (c === '}' || c === ']') {
      depth--;
      out += newline() + c;
    } else if (c === ',') {
      out += `,${newline()}`;
    } else if (c === ':') {
      out += ': ';
    } else if (!/\s/.test(c)) {
      out += c;
    }
  }
  return out;
}

function renderHeaders(headers) {
  $('detail-headers').replaceChildren(
    ...headers.map(([name, value]) => {
      const tr = el('tr');
      tr.append(el('th', null, name), el('td', null, value));
      return tr;
    }),
  );
}

// One labelled block per stream; an empty one says so rather than vanishing.
function block(label, text) {
  const empty = text === null || text === undefined || text === '';
  return [el('h4', null, label), el('pre', empty ? 'empty' : null, empty ? '(empty)' : text)];
}

function renderHandler(handler) {
  const box = $('detail-handler');
  if (!handler) {
    box.replaceChildren(el('p', 'note', 'No handler ran for this entry.'));
    return;
  }
  box.replaceChildren(
    ...(handler.command ? [el('p', 'command', handler.command)] : []),
    ...block('stdin', handler.stdin),
    ...block('stdout', handler.stdout),
    ...block('stderr', handler.stderr),
  );
}

function renderReply(reply) {
  const box = $('detail-reply');
  if (!reply) {
    box.replaceChildren(el('p', 'note', 'No reply was sent.'));
    return;
  }
  const answer = typeof reply.answer === 'string' ? reply.answer : JSON.stringify(reply.answer, null, 2);
  box.replaceChildren(
    ...block('request', JSON.stringify(reply.request, null, 2)),
    ...block('platform answer', answer),
  );
}

// "verify_us": 12 reads "verify 12 µs": the unit is in the key's suffix.
function formatSteps(steps) {
  return Object.entries(steps || {})
    .map(([key, value]) => {
      const unit = key.endsWith('_us') ? 'µs' : 'ms';
      return `${key.replace(/_(us|ms)$/, '')} ${value} ${unit}`;
    })
    .join(' · ');
}

function renderAttempts(attempts) {
  const head = el('tr');
  for (const label of ['#', 'Time', 'Outcome', 'Error', 'Steps']) head.append(el('th', null, label));
  const rows = attempts.map((attempt) => {
    const tr = el('tr');
    tr.append(
      el('td', null, attempt.attempt),
      el('td', null, formatTime(attempt.time_ms)),
      el('td', 'outcome', attempt.outcome),
      el('td', 'error', orDash(attempt.error)),
      el('td', null, formatSteps(attempt.steps)),
    );
    return tr;
  });
  $('detail-attempts').replaceChildren(head, ...rows);
}

// ---- actions ----------------------------------------------------------------

async function replay() {
  const id = state.selected;
  if (id === null) return;
  say('Replaying…');
  try {
    const response = await fetch(`/api/updates/${encodeURIComponent(id)}/replay`, {
      method: 'POST',
      headers: { 'X-Fly-Inspector': '1' }, // the server refuses state changes without it (CSRF)
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      say(`Replay refused: ${body.error || `HTTP ${response.status}`}`);
      return;
    }
    say(`Replay started as #${body.id}; it opens here when it ends.`);
    // The entry is announced on the event stream when the replay ends.
    if (rowFor(body.id) || state.announced.has(body.id)) select(body.id);
    else state.awaitingReplay = body.id;
  } catch (error) {
    say(`Replay failed: ${error.message}`);
  }
}

async function copy(text, what) {
  const fallback = $('copy-fallback');
  try {
    await navigator.clipboard.writeText(text);
    fallback.hidden = true;
    say(`Copied ${what}.`);
  } catch {
    // No clipboard here (permission refused, page not focused): the text is
    // shown selected, so Ctrl+C copies it.
    fallback.value = text;
    fallback.hidden = false;
    fallback.focus();
    fallback.select();
    say(`Press Ctrl+C to copy ${what}.`);
  }
}

// ---- start --------------------------------------------------------------------

function openRowOf(event) {
  const link = event.target.closest('.replay-of');
  const tr = event.target.closest('tr.update');
  if (link) select(Number(link.dataset.replayOf));
  else if (tr) select(Number(tr.dataset.id));
}

// The script is loaded with `defer`: the DOM is there when it runs.
$('updates').addEventListener('click', openRowOf);
$('updates').addEventListener('keydown', (event) => {
  if (event.key === 'Enter') openRowOf(event);
});
$('filter-text').addEventListener('input', onFilterInput);
$('filter-chat').addEventListener('input', onFilterInput);
$('filter-outcome').addEventListener('change', () => loadList());
$('replay').addEventListener('click', replay);
$('copy-curl').addEventListener('click', () => state.detail && copy(state.detail.curl, 'the curl command'));
$('copy-verify').addEventListener('click', () => state.detail && copy(state.detail.verify_sig, 'the fly verify-sig command'));
loadList();
connect();
