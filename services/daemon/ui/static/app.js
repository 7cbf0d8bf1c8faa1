// Tron's web UI: the little the server-rendered pages cannot do by themselves.
// - every htmx request carries the session's CSRF token (X-CSRF-Token);
// - a button with data-action asks for its confirmation, calls the daemon's API (the one
//   the CLI calls) and shows the answer in #result, and beside the button when it sits in a
//   [data-control] with a [data-result] slot; a button with data-inputs sends the fields
//   filled in beside it (numbers as numbers, a select's choice as text, an empty one as
//   null; the API validates them); a success fires "tron:acted" on the body, on which the
//   task page's summary, the run page's spend and the mesh page's panels are fetched again;
// - the settings form is sent to PUT /settings; each error is shown next to its field;
// - beat ages tick from the "beats" event; the live log keeps its last MAX_LOG_LINES;
// - the keyboard keeps its place: a button whose row is drawn again (its own action's
//   answer, a live update) hands the focus to the same button of the new row, or the row's first.
// No framework and no build step: htmx and its SSE extension do the rest.
(function () {
  "use strict";

  const MAX_LOG_LINES = 1000;
  const meta = (name) => (document.querySelector(`meta[name="${name}"]`) || {}).content || "";
  const csrf = meta("csrf-token");
  const actor = meta("tron-actor");

  document.addEventListener("htmx:configRequest", (e) => {
    e.detail.headers["X-CSRF-Token"] = csrf;
  });

  function show(text, ok) {
    const box = document.getElementById("result");
    if (!box) return;
    box.textContent = text;
    box.dataset.outcome = ok ? "ok" : "error";
  }

  // A browser holds at most 6 connections to one host, and each open Tron page holds one for
  // its live stream: with more pages, a request waits in the browser for a free one and could
  // be sent minutes later, long after its operator gave up. Past ACTION_WAIT it is given up.
  const ACTION_WAIT = 15000;

  async function call(method, url, body) {
    let resp;
    try {
      resp = await fetch(url, {
        method, credentials: "same-origin", body: JSON.stringify(body), signal: AbortSignal.timeout(ACTION_WAIT),
        headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      });
    } catch (err) {
      if (err.name !== "TimeoutError") throw err;
      throw new Error(`no answer within ${ACTION_WAIT / 1000} s; it was probably never sent (too many Tron pages ` +
                      "open in this browser? each holds a connection): `tron audit` says whether it was done");
    }
    const text = await resp.text();
    let data;
    try { data = JSON.parse(text); } catch (_) { data = {error: text}; }
    return {status: resp.status, data};
  }

  // -- the keyboard's place -----------------------------------------------------------------------
  // A row is drawn again whenever it changes (sse-swap), and a button is disabled while its
  // request runs: either took the focus away to <body>, and a keyboard user had to Tab from
  // the top of the page again. The focused button is remembered by its row and verb, and
  // given back once the focus fell to <body>.
  const ROWS = ["service", "lane", "provider", "testid"];  // a row, else its panel (spawning, a task's actions)
  let place = null;  // {row: a selector of the row, verb, index: the button's place in its row}

  function placeOf(el) {
    const button = el.closest && el.closest("button[data-action]");
    const row = button && button.closest(ROWS.map((a) => `[data-${a}]`).join(","));
    if (!row) return null;
    const attr = ROWS.find((a) => row.dataset[a] !== undefined);
    return {row: `${row.tagName.toLowerCase()}[data-${attr}="${CSS.escape(row.dataset[attr])}"]`,
            verb: button.dataset.action, index: Array.from(row.querySelectorAll("button[data-action]")).indexOf(button)};
  }

  function restorePlace() {
    const active = document.activeElement;  // lost: <body>, or a button the redraw took out of the page
    if (!place || (active && active !== document.body && active.isConnected)) return;
    const row = document.querySelector(place.row);
    if (!row) return;
    // Its own button disabled: its request is on its way (any SSE message of the page may come
    // meanwhile). Wait for the answer or the row drawn again, rather than put the focus, and
    // with it the place, on a neighbour (Stop), which the next redraw would then keep.
    if (row.querySelector(`button[data-action="${CSS.escape(place.verb)}"][disabled]`)) return;
    // the same verb, else the button in its place (Pause gave way to Resume), else the row's link
    const buttons = Array.from(row.querySelectorAll("button[data-action]:not([disabled])"));
    const target = buttons.find((b) => b.dataset.action === place.verb)
      || buttons[Math.min(place.index, buttons.length - 1)] || row.querySelector("a[href]");
    if (target) target.focus();
  }

  document.addEventListener("focusin", (e) => {
    if (e.target !== document.body) place = placeOf(e.target);
  });
  for (const name of ["htmx:afterSwap", "htmx:sseMessage"]) document.addEventListener(name, restorePlace);

  // -- action buttons (services/daemon/ui/actions.py draws them) -----------------------------
  function showBeside(control, text, ok) {
    const slot = control && control.querySelector("[data-result]");
    if (!slot) return;
    slot.textContent = text;
    slot.dataset.outcome = ok ? "ok" : "error";
  }

  document.addEventListener("click", async (e) => {
    const button = e.target.closest("button[data-action]");
    if (!button) return;
    const control = button.closest("[data-control]");
    // The reason typed in the header, for every action until it is changed: the audit trail's "why".
    const reasonField = document.querySelector('input[name="action-reason"]');
    const reason = reasonField ? reasonField.value.replace(/\s+/g, " ").trim() : "";
    const body = {actor, reason: reason || "web ui"};
    let question = button.dataset.confirm;
    for (const name of (button.dataset.inputs || "").split(",").filter(Boolean)) {
      // filled in beside the button: sent as it is, judged by the API
      const field = (control || document).querySelector(`[name="${CSS.escape(name)}"]`);
      const raw = field ? field.value.trim() : "";
      body[name] = raw === "" ? null : field.tagName === "SELECT" ? raw : Number(raw);
      question = question.replace(`{${name}}`, raw || (field && field.dataset.blank) || "(none)");
    }
    if (reason) question += `\nReason: ${reason}`;
    if (!window.confirm(question)) return;
    const what = `${button.dataset.action} ${button.dataset.target || ""}`.trim();
    button.disabled = true;
    show(`${what}: sent…`, true);
    showBeside(control, "sent…", true);
    try {
      const {status, data} = await call(button.dataset.method, button.dataset.url, body);
      if (status < 300) {
        const extra = data.replaces ? ` (replaces ${data.replaces})` : "";
        show(`${what}: ${data.status}${extra}`, true);
        showBeside(control, `${data.status}${extra}`, true);
        document.body.dispatchEvent(new CustomEvent("tron:acted", {bubbles: true, detail: {what, data}}));
      } else {
        // 401: this page's session is over (logged out, expired, its token revoked); the API's
        // own words would send an operator looking for a header they never handle.
        const problem = status === 401
          ? "this page's session has ended (logged out, expired, or its token revoked): `tron ui` gives a new login link"
          : data.error || JSON.stringify(data);
        show(`${what} refused (${status}): ${problem}`, false);
        showBeside(control, `refused (${status}): ${problem}`, false);
      }
    } catch (err) {
      show(`${what} failed: ${err}`, false);
      showBeside(control, `failed: ${err}`, false);
    } finally {
      button.disabled = false;
      restorePlace();  // the focus the disabled button lost, on it or on its row's new one
    }
  });

  // -- settings ---------------------------------------------------------------------------------
  function fieldError(form, name, text) {
    const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (slot) slot.textContent = text;
    const field = form.querySelector(`[data-field-name="${CSS.escape(name)}"]`);
    if (field) field.classList.toggle("invalid", !!text);
  }

  function settingsMessage(text, ok) {
    const box = document.getElementById("settings-message");
    box.textContent = text;
    box.dataset.outcome = ok ? "ok" : "error";
  }

  document.addEventListener("submit", async (e) => {
    const form = e.target.closest("form[data-testid=settings]");
    if (!form) return;
    e.preventDefault();
    form.querySelectorAll("[data-error-for]").forEach((s) => fieldError(form, s.dataset.errorFor, ""));
    const changes = {};
    let local = 0;
    for (const input of form.querySelectorAll("input[name]")) {
      if (input.dataset.type === "bool") {
        if (String(input.checked) !== input.dataset.initial) changes[input.name] = input.checked;
        continue;
      }
      const raw = input.value.trim();
      if (raw === input.dataset.initial) continue;
      const value = Number(raw);
      if (raw === "" || !Number.isFinite(value)) {
        fieldError(form, input.name, "a number is needed");
        local++;
      } else {
        changes[input.name] = value;
      }
    }
    if (local) { settingsMessage("Nothing was changed: correct the fields marked.", false); return; }
    if (!Object.keys(changes).length) { settingsMessage("Nothing to change.", true); return; }
    const {status, data} = await call("PUT", "/settings", {policy: changes, actor});
    if (status === 200) {
      const list = Object.entries(changes).map(([k, v]) => `${k} = ${v}`).join(", ");
      settingsMessage(`Applied: ${list}. Kept in ${data.overlay}.`, true);
      htmx.ajax("GET", "/ui/settings/form", {target: "#settings-slot", swap: "innerHTML"});
    } else if (data.fields) {
      const names = Object.keys(data.fields);
      for (const name of names) fieldError(form, name, data.fields[name]);
      settingsMessage(`Nothing was changed: ${names.join(", ")} refused (see beside each field).`, false);
    } else {
      settingsMessage(`Nothing was changed (${status}): ${data.error || JSON.stringify(data)}`, false);
    }
  });

  // -- live details ------------------------------------------------------------------------------
  function age(seconds) {
    if (seconds === null || seconds === undefined) return "-";
    if (seconds < 60) return `${seconds.toFixed(1)}s`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)}m${String(Math.round(seconds % 60)).padStart(2, "0")}s`;
    return `${Math.floor(seconds / 3600)}h${String(Math.floor(seconds % 3600 / 60)).padStart(2, "0")}m`;
  }

  // A page hidden for a while (another tab in front) gives its stream's connection back, and
  // is loaded again, fresh, when it is shown: pages in the background do not use up the
  // browser's 6 connections to the daemon.
  let stream = null, hiddenTimer = null, released = false;
  document.addEventListener("htmx:sseOpen", (e) => { stream = e.detail.source; });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      hiddenTimer = setTimeout(() => {
        if (stream) { stream.close(); released = true; }
      }, window.tronHiddenRelease ?? 10000);
    } else {
      clearTimeout(hiddenTimer);
      if (released) location.reload();
    }
  });

  document.addEventListener("htmx:sseOpen", (e) => {
    e.detail.source.addEventListener("beats", (msg) => {
      for (const [name, seconds] of Object.entries(JSON.parse(msg.data))) {
        document.querySelectorAll(`[data-service="${CSS.escape(name)}"] [data-field="beat"]`)
          .forEach((cell) => { cell.textContent = age(seconds); });
      }
    });
  });

  let following = true;  // the log scrolls with new lines unless its reader scrolled up
  document.addEventListener("htmx:sseBeforeMessage", (e) => {
    const log = e.target.closest(".log");
    if (log) following = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  });
  document.addEventListener("htmx:sseMessage", (e) => {
    const log = e.target.closest(".log");
    if (!log) return;
    const lines = log.querySelectorAll(".log-line");
    for (let i = 0; i < lines.length - MAX_LOG_LINES; i++) lines[i].remove();
    if (following) log.scrollTop = log.scrollHeight;
  });
})();
