/*
 * Atelier web front-end.
 *
 * One script for both pages:
 *   - the status list at "/"                   (<body data-page="list">)
 *   - the progress view at "/commissions/{id}" (<body data-page="commission">)
 *   - the account-switch question a sign-in link may lead to (<body data-page="switch">)
 *
 * Plain ES2020, no modules, no dependencies. All server-provided text goes
 * into the DOM through textContent / setAttribute, never innerHTML.
 */
'use strict';

(function () {
  // ---------------------------------------------------------------------
  // Constants
  // ---------------------------------------------------------------------

  const TERMINAL_STATES = new Set(['completed', 'failed', 'cancelled']);
  const TERMINAL_EVENTS = new Set(['completed', 'failed', 'cancelled', 'job_finished']);

  const STAGE_ORDER = ['generating_ideas', 'creating_images', 'uploading', 'creating_products'];
  const STAGE_LABELS = {
    generating_ideas: 'Generating ideas',
    creating_images: 'Creating images',
    uploading: 'Uploading',
    creating_products: 'Creating products',
  };
  const STATE_LABELS = {
    created: 'created',
    processing: 'processing',
    generating_ideas: 'generating ideas',
    creating_images: 'creating images',
    uploading: 'uploading',
    creating_products: 'creating products',
    completed: 'completed',
    failed: 'failed',
    retrying: 'retrying',
    cancelled: 'cancelled',
  };

  // The server sends named SSE events; onmessage would not see them.
  const EVENT_TYPES = [
    'created', 'job_started', 'stage_entered', 'progress', 'artifact',
    'attempt_failed', 'retry_due', 'completed', 'failed', 'cancel_requested',
    'cancelled', 'retry_requested', 'job_finished',
  ];

  // Events after which the per-commission snapshot is re-read so the stage
  // bars, error and result match the server exactly.
  const RESYNC_EVENTS = new Set([
    'job_started', 'attempt_failed', 'retry_due', 'retry_requested',
    'completed', 'failed', 'cancelled', 'job_finished',
  ]);

  const PAGE_SIZE = 20;

  const CONNECTION_TEXT = {
    connecting: 'connecting…',
    live: 'live',
    reconnecting: 'reconnecting…',
    ended: 'ended',
    offline: 'offline',
  };

  // ---------------------------------------------------------------------
  // Small helpers
  // ---------------------------------------------------------------------

  function $(selector, root) {
    return (root || document).querySelector(selector);
  }

  /** Create an element. props: text, className, dataset, or any attribute. */
  function h(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === undefined || value === null || value === false) continue;
        if (key === 'text') node.textContent = String(value);
        else if (key === 'className') node.className = String(value);
        else if (key === 'dataset') Object.assign(node.dataset, value);
        else node.setAttribute(key, value === true ? '' : String(value));
      }
    }
    if (children !== undefined && children !== null) {
      for (const child of [].concat(children)) {
        if (child === undefined || child === null || child === false) continue;
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  /** Assign textContent only when it changes (keeps aria-live regions quiet). */
  function setText(node, text) {
    if (!node) return;
    const value = text === undefined || text === null ? '' : String(text);
    if (node.textContent !== value) node.textContent = value;
  }

  function setHidden(node, hidden) {
    if (node && node.hidden !== Boolean(hidden)) node.hidden = Boolean(hidden);
  }

  function humanize(value) {
    return String(value).replace(/_/g, ' ');
  }

  function capitalize(value) {
    const s = String(value);
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function stateLabel(state) {
    if (!state) return 'unknown';
    return STATE_LABELS[state] || humanize(state);
  }

  function stageLabel(stage) {
    if (!stage) return '';
    return STAGE_LABELS[stage] || capitalize(humanize(stage));
  }

  function isTerminal(state) {
    return TERMINAL_STATES.has(state);
  }

  function clampPercent(value) {
    const n = Number(value);
    if (!Number.isFinite(n)) return 0;
    return Math.max(0, Math.min(100, Math.round(n)));
  }

  /** A finite number from a seq / last_event_id field, or null. */
  function toSeq(value) {
    if (value === null || value === undefined || value === '') return null;
    const n = Number(value);
    return Number.isFinite(n) ? n : null;
  }

  function toDate(value) {
    if (value === null || value === undefined || value === '') return null;
    let d;
    if (typeof value === 'number' || /^\d+$/.test(String(value))) {
      const n = Number(value);
      d = new Date(n < 1e12 ? n * 1000 : n); // seconds or milliseconds
    } else {
      d = new Date(String(value));
    }
    return Number.isNaN(d.getTime()) ? null : d;
  }

  function timeValue(value) {
    const d = toDate(value);
    return d ? d.getTime() : null;
  }

  function formatDate(date) {
    try {
      return date.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
    } catch (_) {
      return date.toISOString();
    }
  }

  /** Only http(s) URLs (absolute or relative to this origin) are allowed. */
  function safeUrl(value) {
    if (typeof value !== 'string' || !value.trim()) return null;
    try {
      const url = new URL(value.trim(), window.location.href);
      if (url.protocol === 'http:' || url.protocol === 'https:') return url.href;
    } catch (_) {
      /* invalid URL */
    }
    return null;
  }

  function isExternal(href) {
    try {
      return new URL(href).origin !== window.location.origin;
    } catch (_) {
      return false;
    }
  }

  function formatPrice(cents, currency) {
    const n = Number(cents);
    if (cents === null || cents === undefined || cents === '' || !Number.isFinite(n)) return '';
    const code = typeof currency === 'string' && /^[A-Za-z]{3}$/.test(currency) ? currency.toUpperCase() : 'USD';
    try {
      return new Intl.NumberFormat(undefined, { style: 'currency', currency: code }).format(n / 100);
    } catch (_) {
      return (n / 100).toFixed(2);
    }
  }

  function errorText(err) {
    if (err === null || err === undefined || err === '') return '';
    if (typeof err === 'string') return err;
    if (typeof err === 'object') {
      if (typeof err.message === 'string' && err.message) return err.message;
      if (typeof err.code === 'string' && err.code) return err.code;
      try {
        return JSON.stringify(err);
      } catch (_) {
        return String(err);
      }
    }
    return String(err);
  }

  function commissionHref(taskId) {
    return '/commissions/' + encodeURIComponent(taskId);
  }

  function shortId(taskId) {
    const s = String(taskId || '');
    return s.length > 10 ? s.slice(0, 8) + '…' : s;
  }

  function isObject(value) {
    return value !== null && typeof value === 'object' && !Array.isArray(value);
  }

  // ---------------------------------------------------------------------
  // Remembered titles (the snapshot contract has no title field; we keep the
  // titles of commissions started from this browser so rows are readable).
  // ---------------------------------------------------------------------

  const TITLE_KEY = 'atelier.titles';
  const MAX_TITLES = 200;

  function loadTitles() {
    try {
      const raw = window.localStorage.getItem(TITLE_KEY);
      const parsed = raw ? JSON.parse(raw) : null;
      return isObject(parsed) ? parsed : {};
    } catch (_) {
      return {};
    }
  }

  const titles = loadTitles();
  const titleListeners = [];

  // Another tab may start a commission; pick up the title it remembered.
  window.addEventListener('storage', (event) => {
    if (event.key !== TITLE_KEY) return;
    const fresh = loadTitles();
    for (const key of Object.keys(fresh)) titles[key] = fresh[key];
    for (const listener of titleListeners) listener();
  });

  function rememberTitle(taskId, title) {
    if (taskId === null || taskId === undefined || !title) return;
    titles[String(taskId)] = String(title);
    try {
      const keys = Object.keys(titles);
      for (const key of keys.slice(0, Math.max(0, keys.length - MAX_TITLES))) delete titles[key];
      window.localStorage.setItem(TITLE_KEY, JSON.stringify(titles));
    } catch (_) {
      /* storage unavailable: keep in memory only */
    }
  }

  function extractProduct(result) {
    if (!isObject(result)) return null;
    if (isObject(result.product)) return result.product;
    if (Array.isArray(result.products) && isObject(result.products[0])) return result.products[0];
    return null;
  }

  function firstString() {
    for (const value of arguments) {
      if (typeof value === 'string' && value.trim()) return value.trim();
    }
    return null;
  }

  function commissionTitle(snap) {
    if (!snap) return 'Commission';
    const ctx = isObject(snap.context) ? snap.context : null;
    const product = extractProduct(snap.result);
    return (
      firstString(
        ctx && ctx.title,
        snap.title,
        titles[String(snap.task_id)],
        product && product.title
      ) || 'Commission ' + shortId(snap.task_id)
    );
  }

  /** Merge one stream event's fields into a snapshot-like object. */
  function mergeEvent(target, ev) {
    if (typeof ev.state === 'string' && ev.state) target.state = ev.state;
    if (Object.prototype.hasOwnProperty.call(ev, 'stage')) target.stage = ev.stage;
    if (ev.progress_percent !== null && ev.progress_percent !== undefined &&
        Number.isFinite(Number(ev.progress_percent))) {
      target.progress_percent = Number(ev.progress_percent);
    }
    if (typeof ev.message === 'string' && ev.message) target.message = ev.message;
    if (ev.attempt !== null && ev.attempt !== undefined) target.attempt = ev.attempt;
    if (ev.max_attempts !== null && ev.max_attempts !== undefined) target.max_attempts = ev.max_attempts;
    if (ev.error !== null && ev.error !== undefined && ev.error !== '') target.error = ev.error;
    if (isObject(ev.result)) target.result = ev.result;
    if (ev.at) target.updated_at = ev.at;
    const seq = toSeq(ev.seq);
    if (seq !== null) target.last_event_id = seq;
  }

  // ---------------------------------------------------------------------
  // Product preview (shared by list rows and the result panel)
  // ---------------------------------------------------------------------

  function ideaText(idea) {
    if (typeof idea === 'string') return idea;
    if (typeof idea === 'number') return String(idea);
    if (isObject(idea)) {
      const main = firstString(idea.title, idea.name, idea.text, idea.idea, idea.description);
      if (main) {
        const extra = firstString(idea.description, idea.text);
        return extra && extra !== main ? main + ' — ' + extra : main;
      }
      try {
        return JSON.stringify(idea);
      } catch (_) {
        return '';
      }
    }
    return '';
  }

  /**
   * Build a product preview element, or null when the result has no product.
   * options.full adds the description; options.taskId is the fallback link.
   */
  function buildPreview(result, options) {
    const opts = options || {};
    const product = extractProduct(result);
    if (!product) return null;

    const title = firstString(product.title, product.name) || 'Product';
    const imageUrl = safeUrl(product.image_url) || safeUrl(product.image) || safeUrl(product.thumbnail_url);
    const productUrl = safeUrl(product.url) || safeUrl(product.product_url);
    const price = formatPrice(product.price_cents, product.currency);

    const preview = h('div', { className: 'preview' + (opts.full ? ' preview-full' : '') });

    if (imageUrl) {
      const img = h('img', {
        src: imageUrl,
        alt: 'Product image: ' + title,
        loading: 'lazy',
        decoding: 'async',
      });
      img.addEventListener('error', () => {
        img.classList.add('broken');
      }, { once: true });
      preview.append(h('div', { className: 'preview-media' }, img));
    }

    const body = h('div', { className: 'preview-body' });
    let titleNode;
    if (productUrl) {
      const external = isExternal(productUrl);
      titleNode = h('a', {
        className: 'preview-title',
        href: productUrl,
        target: external ? '_blank' : null,
        rel: external ? 'noopener noreferrer' : null,
      }, [title, external ? h('span', { className: 'sr-only', text: ' (opens in a new tab)' }) : null]);
    } else if (opts.taskId !== undefined && !opts.full) {
      titleNode = h('a', { className: 'preview-title', href: commissionHref(opts.taskId) }, title);
    } else {
      titleNode = h('span', { className: 'preview-title' }, title);
    }
    body.append(titleNode);
    if (price) body.append(h('span', { className: 'price', text: price }));
    if (opts.full) {
      const description = firstString(product.description);
      if (description) body.append(h('p', { className: 'description', text: description }));
      if (productUrl) {
        body.append(h('p', { className: 'product-link' },
          h('a', {
            href: productUrl,
            target: isExternal(productUrl) ? '_blank' : null,
            rel: isExternal(productUrl) ? 'noopener noreferrer' : null,
          }, ['View product', isExternal(productUrl) ? h('span', { className: 'sr-only', text: ' (opens in a new tab)' }) : null])));
      }
    }
    preview.append(body);
    return preview;
  }

  // ---------------------------------------------------------------------
  // Progress bars
  // ---------------------------------------------------------------------

  function createBar(label, extraClass) {
    return h('div', {
      className: 'bar' + (extraClass ? ' ' + extraClass : ''),
      role: 'progressbar',
      'aria-label': label,
      'aria-valuemin': '0',
      'aria-valuemax': '100',
      'aria-valuenow': '0',
    }, h('div', { className: 'bar-fill' }));
  }

  function setBar(bar, percent, state, valueText) {
    if (!bar) return;
    const p = clampPercent(percent);
    if (bar.getAttribute('aria-valuenow') !== String(p)) bar.setAttribute('aria-valuenow', String(p));
    const text = valueText || p + '%';
    if (bar.getAttribute('aria-valuetext') !== text) bar.setAttribute('aria-valuetext', text);
    if (state && bar.dataset.state !== state) bar.dataset.state = state;
    const fill = bar.querySelector('.bar-fill');
    if (fill) fill.style.width = p + '%';
  }

  // ---------------------------------------------------------------------
  // Notices (visible API errors and confirmations)
  // ---------------------------------------------------------------------

  const notice = {
    timer: null,
    show(message, kind) {
      const box = $('#notice');
      if (!box) return;
      const type = kind || 'error';
      clearTimeout(this.timer);
      box.dataset.kind = type;
      box.setAttribute('role', type === 'error' ? 'alert' : 'status');
      setText($('.notice-text', box), message);
      box.hidden = false;
      if (type !== 'error') {
        this.timer = setTimeout(() => this.clear(), 6000);
      }
    },
    info(message) {
      this.show(message, 'info');
    },
    clear() {
      const box = $('#notice');
      if (!box) return;
      clearTimeout(this.timer);
      box.hidden = true;
      setText($('.notice-text', box), '');
    },
  };

  function initNotice() {
    const close = $('#notice .notice-close');
    if (close) close.addEventListener('click', () => notice.clear());
  }

  // ---------------------------------------------------------------------
  // API
  // ---------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const options = {
      method,
      credentials: 'same-origin',
      // The server takes a change signed in by the cookie only with this header, which a
      // page of another origin cannot send without a preflight the server never grants.
      headers: { Accept: 'application/json', 'X-Atelier-Request': '1' },
      cache: 'no-store',
    };
    if (body !== undefined) {
      options.headers['Content-Type'] = 'application/json';
      options.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, options);
    } catch (_) {
      throw new ApiError(0, 'network', 'Could not reach the server. Check that atelier is running and try again.');
    }
    let data = null;
    if (response.status !== 204) {
      let text = '';
      try {
        text = await response.text();
      } catch (_) {
        text = '';
      }
      if (text) {
        try {
          data = JSON.parse(text);
        } catch (_) {
          data = null;
        }
      }
    }
    if (!response.ok) {
      const err = data && isObject(data.error) ? data.error : null;
      const message = (err && typeof err.message === 'string' && err.message) ||
        'Request failed (' + response.status + (response.statusText ? ' ' + response.statusText : '') + ').';
      const code = (err && typeof err.code === 'string' && err.code) || 'http_' + response.status;
      throw new ApiError(response.status, code, message);
    }
    return data;
  }

  function taskPath(taskId) {
    return '/api/commissions/' + encodeURIComponent(taskId);
  }

  // ---------------------------------------------------------------------
  // Connection status
  // ---------------------------------------------------------------------

  function setConnection(status) {
    const node = $('#connection-status');
    if (!node) return;
    if (node.dataset.status !== status) node.dataset.status = status;
    setText(node, CONNECTION_TEXT[status] || status);
  }

  // ---------------------------------------------------------------------
  // Live stream: EventSource with dedupe, status and self-managed reopen
  // ---------------------------------------------------------------------

  /**
   * options:
   *   url           stream URL without the last_event_id parameter
   *   startAfter    highest event id already reflected on the page
   *   onEvent(data) called once per new event, in order, never for id <= seen
   *   shouldReopen()  whether to re-open after the browser gave up (CLOSED)
   *   beforeReopen()  async hook before re-opening; resolve false to stop
   */
  class LiveStream {
    constructor(options) {
      this.url = options.url;
      this.lastId = Math.max(0, toSeq(options.startAfter) || 0);
      this.onEvent = options.onEvent;
      this.shouldReopen = options.shouldReopen || (() => true);
      this.beforeReopen = options.beforeReopen || null;
      this.es = null;
      this.timer = null;
      this.stopped = true;
      this.everOpened = false;
      this.retryDelay = 1000;
    }

    /** Record that everything up to `id` is already on the page. */
    bump(id) {
      const n = toSeq(id);
      if (n !== null && n > this.lastId) this.lastId = n;
    }

    get running() {
      return !this.stopped;
    }

    get connected() {
      return Boolean(this.es) && this.es.readyState !== EventSource.CLOSED;
    }

    start(afterId) {
      this.bump(afterId);
      this.stopped = false;
      this.retryDelay = 1000;
      this.open();
    }

    stop(status) {
      this.stopped = true;
      clearTimeout(this.timer);
      this.timer = null;
      this.closeSource();
      setConnection(status || 'ended');
    }

    /** Close the connection without changing the stopped flag (page hide). */
    suspend() {
      clearTimeout(this.timer);
      this.timer = null;
      this.closeSource();
    }

    /** Reconnect now (e.g. back online / page shown again) if still wanted. */
    resume() {
      if (this.stopped || this.connected) return;
      this.retryDelay = 1000;
      this.open();
    }

    closeSource() {
      if (this.es) {
        const es = this.es;
        this.es = null;
        es.close();
      }
    }

    open() {
      clearTimeout(this.timer);
      this.timer = null;
      this.closeSource();
      if (this.stopped) return;
      if (typeof window.EventSource !== 'function') {
        notice.show('This browser does not support live updates (EventSource). Reload the page to see progress.');
        setConnection('offline');
        return;
      }
      const sep = this.url.indexOf('?') === -1 ? '?' : '&';
      const url = this.url + sep + 'last_event_id=' + encodeURIComponent(String(this.lastId));
      let es;
      try {
        es = new EventSource(url); // same-origin: the cookie is sent
      } catch (_) {
        this.scheduleReopen();
        return;
      }
      this.es = es;
      setConnection(this.everOpened ? 'reconnecting' : 'connecting');

      es.addEventListener('open', () => {
        if (this.es !== es) return;
        this.everOpened = true;
        this.retryDelay = 1000;
        setConnection('live');
      });

      es.addEventListener('error', () => {
        if (this.es !== es) return;
        if (es.readyState === EventSource.CLOSED) {
          // The browser gave up (HTTP error, 204 "nothing more", server gone).
          this.es = null;
          es.close();
          this.scheduleReopen();
        } else {
          // CONNECTING: the browser retries by itself and sends Last-Event-ID.
          setConnection('reconnecting');
        }
      });

      const handler = (message) => this.handle(es, message);
      for (const type of EVENT_TYPES) es.addEventListener(type, handler);
      es.addEventListener('message', handler); // unnamed events, just in case
    }

    handle(es, message) {
      if (this.es !== es || this.stopped) return;
      let data;
      try {
        data = JSON.parse(message.data);
      } catch (_) {
        return;
      }
      if (!isObject(data)) return;
      let id = typeof data.seq === 'number' ? data.seq : toSeq(message.lastEventId);
      if (id === null) id = toSeq(data.seq);
      if (id === null) return; // cannot be deduplicated safely
      if (id <= this.lastId) return; // already applied on this stream
      this.lastId = id;
      if (toSeq(data.seq) === null) data.seq = id;
      if (!data.type) data.type = message.type;
      if (this.es === es) setConnection('live');
      try {
        this.onEvent(data);
      } catch (err) {
        notice.show('Could not apply a live update: ' + (err && err.message ? err.message : String(err)));
      }
    }

    scheduleReopen() {
      if (this.stopped) return;
      if (!this.shouldReopen()) {
        this.stop('ended');
        return;
      }
      setConnection('reconnecting');
      const delay = this.retryDelay + Math.floor(Math.random() * 300);
      this.retryDelay = Math.min(this.retryDelay * 2, 30000);
      clearTimeout(this.timer);
      this.timer = setTimeout(async () => {
        this.timer = null;
        if (this.stopped) return;
        if (this.beforeReopen) {
          let keepGoing = true;
          try {
            keepGoing = await this.beforeReopen();
          } catch (_) {
            keepGoing = true;
          }
          if (this.stopped) return;
          if (keepGoing === false) {
            this.stop('ended');
            return;
          }
        }
        if (this.connected) return;
        this.open();
      }, delay);
    }
  }

  // ---------------------------------------------------------------------
  // Sign-in
  // ---------------------------------------------------------------------

  /** Remove ?token=... from the address bar (the server already set the cookie). */
  function stripTokenFromUrl() {
    try {
      const url = new URL(window.location.href);
      if (!url.searchParams.has('token')) return;
      url.searchParams.delete('token');
      const query = url.searchParams.toString();
      window.history.replaceState(null, '', url.pathname + (query ? '?' + query : '') + url.hash);
    } catch (_) {
      /* ignore */
    }
  }

  function tokenFromInput(value) {
    const raw = String(value || '').trim();
    if (!raw) return '';
    if (/[?&]token=/.test(raw)) {
      try {
        const parsed = new URL(raw, window.location.href);
        const token = parsed.searchParams.get('token');
        if (token) return token.trim();
      } catch (_) {
        /* fall through */
      }
    }
    return raw;
  }

  function initTokenForm() {
    const form = $('#token-form');
    if (!form) return;
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      const input = $('#token-input');
      const token = tokenFromInput(input ? input.value : '');
      if (!token) {
        notice.show('Paste your access token first.');
        if (input) input.focus();
        return;
      }
      // Signs in on this very page: the server sets the cookie and loads it again.
      window.location.assign(window.location.pathname + '?token=' + encodeURIComponent(token));
    });
  }

  function showSignin() {
    setHidden($('#signin-prompt'), false);
    setHidden($('#app'), true);
    setHidden($('#loading'), true);
    setHidden($('.user-label'), true);
    setText($('#signed-in-user'), 'not signed in');
    setHidden($('#signed-in-role'), true);
    setConnection('offline');
  }

  function showUser(me) {
    setHidden($('.user-label'), false);
    setText($('#signed-in-user'), me.user_id);
    const role = $('#signed-in-role');
    if (role) {
      setText(role, me.role === 'admin' ? 'admin' : '');
      setHidden(role, me.role !== 'admin');
    }
    setHidden($('#signin-prompt'), true);
  }

  /** Returns the signed-in user, or null (prompt or notice already shown). */
  async function loadMe() {
    try {
      const me = await api('GET', '/api/me');
      if (!me || me.user_id === undefined || me.user_id === null || me.user_id === '') {
        throw new ApiError(500, 'bad_response', 'The server returned an unexpected answer for /api/me.');
      }
      me.user_id = String(me.user_id);
      showUser(me);
      return me;
    } catch (err) {
      if (err.status === 401) {
        showSignin();
      } else {
        setHidden($('#loading'), true);
        setText($('#signed-in-user'), 'unknown');
        setConnection('offline');
        notice.show('Could not check who is signed in: ' + err.message);
      }
      return null;
    }
  }

  /** For beforeReopen hooks: false when the session is gone. */
  async function stillSignedIn() {
    try {
      await api('GET', '/api/me');
      return true;
    } catch (err) {
      return err.status !== 401;
    }
  }

  function sessionExpired() {
    showSignin();
    notice.show('Your session has expired or you are not signed in. Please sign in again.');
  }

  // ---------------------------------------------------------------------
  // Page: commission list ("/")
  // ---------------------------------------------------------------------

  function initListPage() {
    const listEl = $('#commissions');
    const loadMoreBtn = $('#load-more');
    const emptyEl = $('#empty-state');
    const form = $('#new-commission-form');
    const titleInput = $('#post-title');
    const textInput = $('#post-text');
    const createBtn = $('#create-button');

    const rows = new Map(); // task_id -> row
    const pending = new Map(); // task_id -> events buffered while its snapshot loads
    const refreshTimers = new Map();
    let userId = null;
    let nextCursor = null;
    let stream = null;
    let signedOut = false;
    let loadingMore = false;
    let creating = false;

    function signOut() {
      signedOut = true;
      if (stream) stream.stop('offline');
      sessionExpired();
    }

    function handleError(err, context) {
      if (err.status === 401) {
        signOut();
        return;
      }
      notice.show(context + ': ' + err.message);
    }

    function updateEmpty() {
      setHidden(emptyEl, rows.size > 0 || nextCursor !== null);
    }

    function createRow(taskId) {
      const link = h('a', { className: 'row-title', href: commissionHref(taskId) });
      const badge = h('span', { className: 'state badge' });
      const stage = h('span', { className: 'stage' });
      const time = h('time', { className: 'created' });
      const bar = createBar('Progress');
      const percent = h('span', { className: 'percent', 'aria-hidden': 'true' });
      const message = h('p', { className: 'row-message', hidden: true });
      const error = h('p', { className: 'row-error', hidden: true });
      const previewSlot = h('div', { className: 'preview-slot', hidden: true });
      const li = h('li', { className: 'commission', dataset: { taskId: taskId } }, [
        h('div', { className: 'row-top' }, [link, badge]),
        h('div', { className: 'row-meta' }, [
          h('span', { className: 'stage-wrap' }, [h('span', { className: 'meta-label', text: 'Stage: ' }), stage]),
          time,
        ]),
        h('div', { className: 'row-progress' }, [bar, percent]),
        message,
        error,
        previewSlot,
      ]);
      return {
        id: taskId, li, link, badge, stage, time, bar, percent, message, error, previewSlot,
        data: {}, seq: -1, createdAt: null, previewKey: null,
      };
    }

    function currentStageText(d) {
      if (d.stage) return stageLabel(d.stage);
      if (d.state === 'created') return 'Queued';
      if (d.state === 'completed') return 'Done';
      if (STAGE_LABELS[d.state]) return STAGE_LABELS[d.state];
      return '—';
    }

    function renderRow(row) {
      const d = row.data;
      const state = d.state || 'created';
      if (row.li.dataset.state !== state) row.li.dataset.state = state;

      const title = commissionTitle(d);
      setText(row.link, title);
      setText(row.badge, stateLabel(state));
      if (row.badge.dataset.state !== state) row.badge.dataset.state = state;
      setText(row.stage, currentStageText(d));

      const created = toDate(d.created_at);
      if (created) {
        row.time.setAttribute('datetime', created.toISOString());
        setText(row.time, formatDate(created));
      }

      const pct = clampPercent(d.progress_percent);
      row.bar.setAttribute('aria-label', 'Progress of ' + title);
      setBar(row.bar, pct, state, pct + '%, ' + stateLabel(state));
      setText(row.percent, pct + '%');

      const msg = typeof d.message === 'string' ? d.message : '';
      setText(row.message, msg);
      setHidden(row.message, !msg || state === 'completed');

      const failed = state === 'failed';
      setText(row.error, failed ? (errorText(d.error) || 'The commission failed.') : '');
      setHidden(row.error, !failed);

      // Product preview once completed; rebuild only when the result changes.
      let key = null;
      if (state === 'completed' && d.result !== undefined && d.result !== null) {
        try {
          key = JSON.stringify(d.result);
        } catch (_) {
          key = null;
        }
      }
      if (key !== row.previewKey) {
        row.previewKey = key;
        row.previewSlot.replaceChildren();
        const preview = key ? buildPreview(d.result, { taskId: row.id }) : null;
        if (preview) row.previewSlot.append(preview);
        setHidden(row.previewSlot, !preview);
      }
    }

    /** Apply a snapshot unless the row already reflects newer events. */
    function applySnapshot(row, snap) {
      const seq = toSeq(snap.last_event_id);
      if (seq !== null && seq < row.seq) return false;
      row.data = Object.assign({}, snap);
      if (seq !== null) row.seq = seq;
      row.createdAt = timeValue(snap.created_at);
      renderRow(row);
      return true;
    }

    function place(row, position) {
      const li = row.li;
      if (position === 'bottom') {
        listEl.append(li);
        return;
      }
      if (position === 'top' || row.createdAt === null) {
        listEl.prepend(li);
        return;
      }
      // 'sorted': newest first by created_at.
      for (const other of Array.from(listEl.children)) {
        const otherRow = rows.get(other.dataset.taskId);
        if (otherRow && otherRow.createdAt !== null && otherRow.createdAt < row.createdAt) {
          listEl.insertBefore(li, other);
          return;
        }
      }
      listEl.append(li);
    }

    /** Insert or update a row from a snapshot. position: top | bottom | sorted. */
    function upsert(snap, position) {
      if (!isObject(snap) || snap.task_id === undefined || snap.task_id === null) return null;
      const id = String(snap.task_id);
      let row = rows.get(id);
      if (row) {
        applySnapshot(row, snap);
        return row;
      }
      row = createRow(id);
      rows.set(id, row);
      applySnapshot(row, snap);
      place(row, position);
      updateEmpty();
      return row;
    }

    function applyEventToRow(row, ev) {
      const seq = toSeq(ev.seq);
      if (seq !== null && seq <= row.seq) return;
      if (seq !== null) row.seq = seq;
      mergeEvent(row.data, ev);
      renderRow(row);
      if (isTerminal(row.data.state) || TERMINAL_EVENTS.has(ev.type)) {
        scheduleRefresh(row.id, 150); // pick up result / error
      }
    }

    function scheduleRefresh(taskId, delay) {
      if (refreshTimers.has(taskId)) return;
      refreshTimers.set(taskId, setTimeout(async () => {
        refreshTimers.delete(taskId);
        if (signedOut) return;
        try {
          const snap = await api('GET', taskPath(taskId));
          const row = rows.get(taskId);
          if (row && isObject(snap)) applySnapshot(row, snap);
        } catch (err) {
          if (err.status === 404) return;
          handleError(err, 'Could not refresh a commission');
        }
      }, delay));
    }

    /** Older commissions outside the loaded pages arrive through "Load more". */
    function belongsInLoadedRange(snap) {
      if (nextCursor === null) return true;
      const t = timeValue(snap.created_at);
      if (t === null) return true;
      let oldest = null;
      for (const row of rows.values()) {
        if (row.createdAt !== null && (oldest === null || row.createdAt < oldest)) oldest = row.createdAt;
      }
      return oldest === null || t >= oldest;
    }

    function handleUnknown(taskId, ev) {
      const buffered = pending.get(taskId);
      if (buffered) {
        buffered.push(ev);
        return;
      }
      pending.set(taskId, [ev]);
      api('GET', taskPath(taskId)).then((snap) => {
        const events = pending.get(taskId) || [];
        pending.delete(taskId);
        if (!isObject(snap)) return;
        let row = rows.get(taskId);
        if (!row) {
          if (!belongsInLoadedRange(snap)) return;
          row = upsert(snap, 'sorted');
          if (!row) return;
        } else {
          applySnapshot(row, snap);
        }
        for (const e of events) applyEventToRow(row, e);
      }).catch((err) => {
        pending.delete(taskId);
        if (err.status === 404 || err.status === 403) return;
        handleError(err, 'Could not load a new commission');
      });
    }

    function onStreamEvent(ev) {
      if (ev.task_id === undefined || ev.task_id === null) return;
      const taskId = String(ev.task_id);
      const row = rows.get(taskId);
      if (row) applyEventToRow(row, ev);
      else handleUnknown(taskId, ev);
    }

    async function loadPage(cursor) {
      let url = '/api/commissions/user/' + encodeURIComponent(userId) + '?limit=' + PAGE_SIZE;
      if (cursor) url += '&cursor=' + encodeURIComponent(cursor);
      const data = await api('GET', url);
      const items = data && Array.isArray(data.items) ? data.items : [];
      const added = [];
      for (const snap of items) {
        const existed = isObject(snap) && rows.has(String(snap.task_id));
        const row = upsert(snap, 'bottom');
        if (row && !existed) added.push(row);
      }
      const next = data ? data.next_cursor : null;
      nextCursor = next === null || next === undefined || next === '' ? null : String(next);
      setHidden(loadMoreBtn, nextCursor === null);
      updateEmpty();
      return { items, added };
    }

    async function loadFirstPage() {
      let delay = 2000;
      for (;;) {
        try {
          return await loadPage(null);
        } catch (err) {
          if (err.status === 401) {
            signOut();
            return null;
          }
          const transient = err.status === 0 || err.status >= 500;
          notice.show('Could not load your commissions: ' + err.message +
            (transient ? ' Trying again shortly…' : ''));
          if (!transient) {
            setConnection('offline');
            return null;
          }
          await new Promise((resolve) => setTimeout(resolve, delay));
          delay = Math.min(delay * 2, 30000);
        }
      }
    }

    async function onCreate(event) {
      event.preventDefault();
      if (creating) return;
      const title = titleInput.value.trim();
      const text = textInput.value.trim();
      if (!title || !text) {
        notice.show('Please fill in both the post title and the post text.');
        (title ? textInput : titleInput).focus();
        return;
      }
      creating = true;
      createBtn.disabled = true;
      createBtn.setAttribute('aria-busy', 'true');
      setText(createBtn, 'Starting…');
      try {
        const snap = await api('POST', '/api/commissions', {
          context: { title, text },
          pipeline: 'commission',
        });
        if (!isObject(snap) || snap.task_id === undefined || snap.task_id === null) {
          throw new ApiError(500, 'bad_response', 'The server did not return the new commission.');
        }
        rememberTitle(snap.task_id, title);
        const row = upsert(snap, 'top');
        if (row) {
          // It may already exist if the live stream announced it first.
          if (listEl.firstElementChild !== row.li) listEl.prepend(row.li);
          renderRow(row);
        }
        form.reset();
        notice.info('Commission started.');
      } catch (err) {
        handleError(err, 'Could not start the commission');
      } finally {
        creating = false;
        createBtn.disabled = false;
        createBtn.removeAttribute('aria-busy');
        setText(createBtn, 'Start commission');
      }
    }

    async function onLoadMore() {
      if (loadingMore || nextCursor === null) return;
      loadingMore = true;
      loadMoreBtn.disabled = true;
      loadMoreBtn.setAttribute('aria-busy', 'true');
      setText(loadMoreBtn, 'Loading…');
      let added = [];
      try {
        const page = await loadPage(nextCursor);
        added = page.added;
      } catch (err) {
        handleError(err, 'Could not load more commissions');
      } finally {
        loadingMore = false;
        loadMoreBtn.disabled = false;
        loadMoreBtn.removeAttribute('aria-busy');
        setText(loadMoreBtn, 'Load more');
      }
      // Keep keyboard focus somewhere sensible when the button disappears.
      if (loadMoreBtn.hidden && added.length > 0) added[0].link.focus();
    }

    async function start() {
      const me = await loadMe();
      if (!me) return;
      userId = me.user_id;
      setHidden($('#loading'), true);
      setHidden($('#app'), false);

      const page = await loadFirstPage();
      if (!page || signedOut) return;

      // Resume the user stream after everything the snapshots already show.
      let maxSeq = 0;
      for (const snap of page.items) {
        const seq = isObject(snap) ? toSeq(snap.last_event_id) : null;
        if (seq !== null && seq > maxSeq) maxSeq = seq;
      }
      stream = new LiveStream({
        url: '/api/commissions/user/' + encodeURIComponent(userId) + '/stream',
        startAfter: maxSeq,
        onEvent: onStreamEvent,
        shouldReopen: () => !signedOut,
        beforeReopen: async () => {
          const ok = await stillSignedIn();
          if (!ok) signOut();
          return ok;
        },
      });
      stream.start();
    }

    form.addEventListener('submit', onCreate);
    loadMoreBtn.addEventListener('click', onLoadMore);
    titleListeners.push(() => {
      for (const row of rows.values()) renderRow(row);
    });
    wireLifecycle(() => stream);
    start();
  }

  // ---------------------------------------------------------------------
  // Page: progress view ("/commissions/{id}")
  // ---------------------------------------------------------------------

  function parseTaskId() {
    const match = window.location.pathname.match(/\/commissions\/([^/]+)\/?$/);
    if (!match) return null;
    try {
      return decodeURIComponent(match[1]);
    } catch (_) {
      return match[1];
    }
  }

  function normalizeStages(stages) {
    const byName = new Map();
    if (Array.isArray(stages)) {
      for (const s of stages) {
        if (isObject(s) && typeof s.name === 'string' && s.name) {
          byName.set(s.name, {
            name: s.name,
            state: typeof s.state === 'string' && s.state ? s.state : 'pending',
            progress_percent: clampPercent(s.progress_percent),
          });
        }
      }
    }
    const out = [];
    for (const name of STAGE_ORDER) {
      out.push(byName.get(name) || { name, state: 'pending', progress_percent: 0 });
      byName.delete(name);
    }
    for (const extra of byName.values()) out.push(extra);
    return out;
  }

  function initCommissionPage() {
    const taskId = parseTaskId();
    const els = {
      taskId: $('#task-id'),
      title: $('#commission-title'),
      state: $('#state'),
      overall: $('#overall'),
      overallPercent: $('#overall-percent'),
      stages: $('#stages'),
      message: $('#message'),
      attempt: $('#attempt'),
      error: $('#error'),
      errorText: $('#error .error-text'),
      retry: $('#retry-button'),
      cancel: $('#cancel-button'),
      result: $('#result'),
      resultBody: $('#result .result-body'),
      artifactsWrap: $('#artifacts-wrap'),
      artifacts: $('#artifacts'),
    };

    const view = {
      snap: null,
      applied: 0, // highest event id reflected in the view
      stream: null,
      busy: false,
      cancelRequested: false,
      resultKey: undefined,
      artifactUrls: new Set(),
      signedOut: false,
      refreshTimer: null,
    };

    setText(els.taskId, taskId || '(missing)');

    function signOut() {
      view.signedOut = true;
      if (view.stream) view.stream.stop('offline');
      sessionExpired();
    }

    function handleError(err, context) {
      if (err.status === 401) {
        signOut();
        return;
      }
      notice.show(context + ': ' + err.message);
    }

    function ensureStageRow(name) {
      let row = els.stages.querySelector('.stage-row[data-stage="' + CSS.escape(name) + '"]');
      if (row) return row;
      const label = stageLabel(name);
      const bar = createBar(label, 'stage-bar');
      bar.dataset.stage = name;
      bar.dataset.state = 'pending';
      row = h('li', { className: 'stage-row', dataset: { stage: name, state: 'pending' } }, [
        h('div', { className: 'bar-label' }, [
          h('span', { className: 'stage-name', text: label }),
          h('span', { className: 'stage-info' }, [
            h('span', { className: 'stage-state', text: 'pending' }), ' · ',
            h('span', { className: 'percent', text: '0%' }),
          ]),
        ]),
        bar,
      ]);
      els.stages.append(row);
      return row;
    }

    function renderStages(stages) {
      for (const s of stages) {
        const row = ensureStageRow(s.name);
        const pct = clampPercent(s.progress_percent);
        if (row.dataset.state !== s.state) row.dataset.state = s.state;
        setText($('.stage-state', row), s.state);
        setText($('.percent', row), pct + '%');
        setBar($('.stage-bar', row), pct, s.state, pct + '%, ' + s.state);
      }
    }

    function renderResult(d) {
      let key = null;
      if (d.state === 'completed') {
        try {
          key = JSON.stringify(d.result === undefined ? null : d.result);
        } catch (_) {
          key = 'unserializable';
        }
      }
      if (key === view.resultKey) return;
      view.resultKey = key;
      els.resultBody.replaceChildren();
      if (key === null) {
        setHidden(els.result, true);
        return;
      }
      const preview = buildPreview(d.result, { full: true, taskId });
      if (preview) {
        els.resultBody.append(preview);
      }
      const ideas = isObject(d.result) && Array.isArray(d.result.ideas) ? d.result.ideas : [];
      const ideaItems = ideas.map(ideaText).filter(Boolean);
      if (ideaItems.length > 0) {
        els.resultBody.append(
          h('h3', { className: 'h3', text: 'Ideas' }),
          h('ol', { className: 'ideas' }, ideaItems.map((t) => h('li', { text: t })))
        );
      }
      if (!preview && ideaItems.length === 0) {
        els.resultBody.append(h('p', { className: 'muted', text: 'The commission completed, but no product details were returned.' }));
      }
      setHidden(els.result, false);
    }

    function render() {
      const d = view.snap;
      if (!d) return;
      const state = d.state || 'created';
      const terminal = isTerminal(state);
      const title = commissionTitle(d);
      const pct = clampPercent(d.progress_percent);

      setText(els.title, title);
      document.title = (terminal ? stateLabel(state) : pct + '%') + ' · ' + title + ' — Atelier';

      setText(els.state, stateLabel(state));
      if (els.state.dataset.state !== state) els.state.dataset.state = state;

      setBar(els.overall, pct, state, pct + '%, ' + stateLabel(state));
      setText(els.overallPercent, pct + '%');

      renderStages(d.stages);

      const msg = typeof d.message === 'string' && d.message ? d.message : '—';
      setText(els.message, msg);

      const attempt = toSeq(d.attempt);
      const max = toSeq(d.max_attempts);
      if (attempt !== null && max !== null) {
        setText(els.attempt, 'attempt ' + attempt + ' of ' + max);
        setHidden(els.attempt, false);
      } else if (attempt !== null) {
        setText(els.attempt, 'attempt ' + attempt);
        setHidden(els.attempt, false);
      } else {
        setHidden(els.attempt, true);
      }

      const failed = state === 'failed';
      setText(els.errorText, failed ? (errorText(d.error) || 'The commission failed without an error message.') : '');
      setHidden(els.error, !failed);
      els.retry.disabled = view.busy;

      setHidden(els.cancel, terminal);
      els.cancel.disabled = view.busy || view.cancelRequested;
      setText(els.cancel, view.cancelRequested ? 'Cancelling…' : 'Cancel commission');

      renderResult(d);
    }

    /** Apply a snapshot unless the view already shows newer events. */
    function applySnapshot(snap) {
      if (!isObject(snap)) return false;
      const seq = toSeq(snap.last_event_id);
      if (view.snap && seq !== null && seq < view.applied) return false;
      const next = Object.assign({}, snap);
      next.stages = normalizeStages(snap.stages);
      view.snap = next;
      if (seq !== null && seq > view.applied) view.applied = seq;
      if (view.stream) view.stream.bump(view.applied);
      if (isTerminal(next.state)) view.cancelRequested = false;
      render();
      return true;
    }

    function stageIndex(name) {
      return view.snap.stages.findIndex((s) => s.name === name);
    }

    /** Best-effort local stage update; a snapshot re-read follows where it matters. */
    function updateStages(ev) {
      const stages = view.snap.stages;
      const name = typeof ev.stage === 'string' && ev.stage ? ev.stage : view.snap.stage;
      let idx = name ? stageIndex(name) : -1;
      if (name && idx === -1) {
        stages.push({ name, state: 'pending', progress_percent: 0 });
        idx = stages.length - 1;
      }
      const target = idx >= 0 ? stages[idx] : null;
      const stagePct = toSeq(ev.stage_progress_percent);

      switch (ev.type) {
        case 'stage_entered':
          if (target) {
            for (let i = 0; i < idx; i += 1) {
              if (stages[i].state !== 'done' && STAGE_ORDER.indexOf(stages[i].name) !== -1) {
                stages[i].state = 'done';
                stages[i].progress_percent = 100;
              }
            }
            target.state = 'running';
            target.progress_percent = stagePct !== null ? clampPercent(stagePct) : 0;
          }
          break;
        case 'progress':
        case 'artifact':
          if (target) {
            if (target.state === 'pending') target.state = 'running';
            if (stagePct !== null) target.progress_percent = clampPercent(stagePct);
          }
          break;
        case 'completed':
          for (const s of stages) {
            s.state = 'done';
            s.progress_percent = 100;
          }
          break;
        case 'failed':
        case 'attempt_failed':
          if (target) {
            target.state = 'failed';
          } else {
            for (const s of stages) {
              if (s.state === 'running') s.state = 'failed';
            }
          }
          break;
        case 'cancelled':
          for (const s of stages) {
            if (s.state === 'running') s.state = 'cancelled';
          }
          break;
        default:
          if (target && stagePct !== null) target.progress_percent = clampPercent(stagePct);
      }
    }

    function addArtifact(ev) {
      const nested = isObject(ev.artifact) ? ev.artifact : {};
      const url = safeUrl(ev.url) || safeUrl(ev.image_url) || safeUrl(ev.artifact_url) ||
        safeUrl(nested.url) || safeUrl(nested.image_url);
      if (!url || view.artifactUrls.has(url)) return;
      view.artifactUrls.add(url);
      const label = firstString(ev.name, ev.kind, nested.name, nested.kind, ev.message) || 'Artifact';
      const isImage = /\.(png|jpe?g|gif|webp|avif|svg)(\?|#|$)/i.test(url);
      const link = h('a', { href: url, target: isExternal(url) ? '_blank' : null, rel: isExternal(url) ? 'noopener noreferrer' : null });
      if (isImage) {
        link.append(h('img', { src: url, alt: label, loading: 'lazy', decoding: 'async' }));
      } else {
        link.append(label);
      }
      els.artifacts.append(h('li', null, link));
      setHidden(els.artifactsWrap, false);
    }

    function applyEvent(ev) {
      if (!view.snap) return;
      if (ev.task_id !== undefined && ev.task_id !== null && String(ev.task_id) !== String(taskId)) return;
      const seq = toSeq(ev.seq);
      if (seq !== null && seq <= view.applied) return; // the snapshot already covers it
      if (seq !== null) view.applied = seq;

      mergeEvent(view.snap, ev);
      updateStages(ev);
      if (ev.type === 'cancel_requested') view.cancelRequested = true;
      if (ev.type === 'retry_requested' || ev.type === 'job_started') view.cancelRequested = false;
      if (ev.type === 'artifact') addArtifact(ev);
      render();

      if (isTerminal(view.snap.state)) {
        // The server ends this stream after a terminal event.
        if (view.stream) view.stream.stop('ended');
        scheduleRefresh(0);
      } else if (RESYNC_EVENTS.has(ev.type)) {
        scheduleRefresh(300);
      }
    }

    async function fetchSnapshot() {
      const snap = await api('GET', taskPath(taskId));
      applySnapshot(snap);
      return view.snap;
    }

    function scheduleRefresh(delay) {
      if (view.refreshTimer) return;
      view.refreshTimer = setTimeout(async () => {
        view.refreshTimer = null;
        if (view.signedOut) return;
        try {
          await fetchSnapshot();
          if (view.snap && isTerminal(view.snap.state) && view.stream && view.stream.running) {
            view.stream.stop('ended');
          }
        } catch (err) {
          handleError(err, 'Could not refresh the commission');
        }
      }, delay);
    }

    function openStream() {
      if (!view.stream) {
        view.stream = new LiveStream({
          url: '/api/progress/' + encodeURIComponent(taskId) + '/stream',
          startAfter: view.applied,
          onEvent: applyEvent,
          shouldReopen: () => !view.signedOut && !(view.snap && isTerminal(view.snap.state)),
          beforeReopen: async () => {
            // Catch up from the snapshot (e.g. after a server restart) first.
            try {
              await fetchSnapshot();
            } catch (err) {
              if (err.status === 401) {
                signOut();
                return false;
              }
              if (err.status === 404) {
                notice.show('This commission no longer exists.');
                return false;
              }
              return true; // server still down: keep trying
            }
            return !isTerminal(view.snap.state);
          },
        });
      }
      view.stream.start(view.applied);
    }

    async function onCancel() {
      if (view.busy) return;
      view.busy = true;
      render();
      try {
        const snap = await api('POST', taskPath(taskId) + '/cancel');
        applySnapshot(snap);
        if (view.snap && !isTerminal(view.snap.state)) view.cancelRequested = true;
        notice.info('Cancellation requested.');
        if (view.snap && isTerminal(view.snap.state) && view.stream) view.stream.stop('ended');
      } catch (err) {
        handleError(err, 'Could not cancel');
        if (err.status === 409) scheduleRefresh(0);
      } finally {
        view.busy = false;
        render();
      }
    }

    async function onRetry() {
      if (view.busy) return;
      view.busy = true;
      render();
      try {
        const snap = await api('POST', taskPath(taskId) + '/retry');
        applySnapshot(snap);
        view.cancelRequested = false;
        notice.info('Retry requested.');
        // The previous stream ended with the failure; follow the new attempt.
        openStream();
        if (!els.cancel.hidden) els.cancel.focus();
      } catch (err) {
        handleError(err, 'Could not retry');
        if (err.status === 409) scheduleRefresh(0);
      } finally {
        view.busy = false;
        render();
      }
    }

    async function loadInitial() {
      let delay = 2000;
      for (;;) {
        try {
          const snap = await api('GET', taskPath(taskId));
          if (!isObject(snap)) throw new ApiError(500, 'bad_response', 'The server returned an unexpected answer.');
          return snap;
        } catch (err) {
          if (err.status === 401) {
            signOut();
            return null;
          }
          if (err.status === 404) {
            notice.show('Commission not found: ' + err.message);
            setText(els.state, 'not found');
            setConnection('offline');
            return null;
          }
          const transient = err.status === 0 || err.status >= 500;
          notice.show('Could not load the commission: ' + err.message + (transient ? ' Trying again shortly…' : ''));
          if (!transient) {
            setConnection('offline');
            return null;
          }
          await new Promise((resolve) => setTimeout(resolve, delay));
          delay = Math.min(delay * 2, 30000);
        }
      }
    }

    async function start() {
      if (!taskId) {
        notice.show('There is no commission id in this address.');
        setConnection('offline');
        return;
      }
      const me = await loadMe();
      if (!me) return;
      setHidden($('#app'), false);

      const snap = await loadInitial();
      if (!snap || view.signedOut) return;
      notice.clear();
      applySnapshot(snap);

      if (isTerminal(view.snap.state)) {
        setConnection('ended'); // nothing more will happen; no stream needed
      } else {
        openStream();
      }
    }

    titleListeners.push(render);
    els.cancel.addEventListener('click', onCancel);
    els.retry.addEventListener('click', onRetry);
    wireLifecycle(() => view.stream);
    start();
  }

  // ---------------------------------------------------------------------
  // Lifecycle: close streams on page hide, reconnect when back / online
  // ---------------------------------------------------------------------

  function wireLifecycle(getStream) {
    window.addEventListener('pagehide', () => {
      const stream = getStream();
      if (stream) stream.suspend();
    });
    window.addEventListener('pageshow', (event) => {
      const stream = getStream();
      if (event.persisted && stream) stream.resume();
    });
    window.addEventListener('online', () => {
      const stream = getStream();
      if (stream) stream.resume();
    });
  }

  // ---------------------------------------------------------------------
  // Switching accounts (the page the server serves when a sign-in link names another user)
  // ---------------------------------------------------------------------

  function initSwitchPage() {
    const button = $('#switch-button');
    const token = document.body.dataset.token || '';
    const here = document.body.dataset.here || '/';
    if (!button) return;
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        await api('POST', '/api/session', { token });
        window.location.replace(here);
      } catch (err) {
        button.disabled = false;
        notice.show(err && err.message ? err.message : 'Could not switch accounts.');
      }
    });
  }

  // ---------------------------------------------------------------------
  // Boot
  // ---------------------------------------------------------------------

  function boot() {
    stripTokenFromUrl();
    initNotice();
    initTokenForm();
    const page = document.body ? document.body.dataset.page : '';
    if (page === 'list') initListPage();
    else if (page === 'commission') initCommissionPage();
    else if (page === 'switch') initSwitchPage();
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', boot);
  } else {
    boot();
  }
})();
