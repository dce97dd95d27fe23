// The Valkyrie console: loads server-rendered fragments into the page, follows the live event
// stream to keep them current, and calls the HTTP API for cancel and drain. No build step, no
// dependencies. Every request carries the bearer token kept in this tab (sessionStorage).
"use strict";

(function () {
  const TOKEN_KEY = "valkyrie-token";
  const view = document.getElementById("view");
  const eventsList = document.getElementById("events");
  const live = document.getElementById("live");
  const message = document.getElementById("message");
  const tokenForm = document.getElementById("token-form");
  let loading = null; // the AbortController of the fragment being loaded
  let lastEventId = null;
  let refreshTimer = null;
  let wakeFollow = null; // cuts the reconnect wait short (a new token)

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (token()) h["Authorization"] = "Bearer " + token();
    return h;
  }

  function say(text, kind) {
    message.textContent = text;
    message.dataset.kind = kind || "info";
    message.hidden = !text;
  }

  // /console/... -> the fragment that renders it
  function fragmentFor(path, search) {
    const rest = path.replace(/^\/console\/?/, "");
    let fragment = "overview";
    if (rest.startsWith("jobs/")) fragment = "job/" + encodeURIComponent(rest.slice(5));
    else if (rest) fragment = rest;
    return "/console/fragments/" + fragment + search;
  }

  function currentView() {
    const rest = location.pathname.replace(/^\/console\/?/, "");
    if (rest.startsWith("jobs/")) return { name: "job", id: rest.slice(5) };
    return { name: rest || "overview", id: null };
  }

  async function problemText(response) {
    try {
      const body = await response.json();
      return body.detail || body.title || response.statusText;
    } catch (e) {
      return response.statusText;
    }
  }

  async function load(quiet) {
    if (loading) loading.abort();
    const controller = new AbortController();
    loading = controller;
    const url = fragmentFor(location.pathname, location.search);
    const current = currentView();
    document.querySelectorAll("nav a").forEach(function (a) {
      a.classList.toggle("current", a.dataset.view === current.name ||
        (current.name === "job" && a.dataset.view === "jobs"));
    });
    try {
      const response = await fetch(url, { headers: headers(), signal: controller.signal });
      if (response.status === 401 || response.status === 403) {
        tokenForm.hidden = false;
        say(await problemText(response), "error");
        view.dataset.loaded = "";
        return;
      }
      if (!response.ok) {
        say(await problemText(response), "error");
        return;
      }
      const html = await response.text();
      if (controller.signal.aborted) return;
      view.innerHTML = html;
      view.dataset.loaded = location.pathname + location.search;
      view.dataset.loadedAt = String(Date.now());
      if (!quiet) say("");
      if (current.name === "events") fillFullEvents();
    } catch (e) {
      if (e.name !== "AbortError") say("could not load " + url + ": " + e, "error");
    } finally {
      if (loading === controller) loading = null;
    }
  }

  function navigate(url) {
    history.pushState(null, "", url);
    load(false);
  }

  document.addEventListener("click", function (event) {
    const a = event.target.closest("a[data-nav]");
    if (a && a.origin === location.origin && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      navigate(a.pathname + a.search);
      return;
    }
    const button = event.target.closest("button[data-action]");
    if (button) act(button);
  });

  document.addEventListener("submit", function (event) {
    const form = event.target;
    if (form.matches("form[data-find-job]")) {
      event.preventDefault();
      const id = new FormData(form).get("job_id").trim();
      if (id) navigate("/console/jobs/" + encodeURIComponent(id));
    } else if (form.matches("form[data-nav]")) {
      event.preventDefault();
      const params = new URLSearchParams();
      new FormData(form).forEach(function (value, key) {
        if (String(value).trim() !== "") params.set(key, String(value).trim());
      });
      const query = params.toString();
      navigate(new URL(form.action).pathname + (query ? "?" + query : ""));
    }
  });

  window.addEventListener("popstate", function () { load(false); });

  // cancel and drain: a first click asks, a second one (within 5 s) does it
  async function act(button) {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.dataset.label = button.textContent;
      button.textContent = "Sure? " + button.textContent;
      setTimeout(function () {
        if (button.dataset.armed === "1") {
          button.dataset.armed = "";
          button.textContent = button.dataset.label;
        }
      }, 5000);
      return;
    }
    button.dataset.armed = "";
    button.disabled = true;
    let response;
    if (button.dataset.action === "cancel") {
      response = await fetch("/api/v2/jobs/" + encodeURIComponent(button.dataset.jobId), {
        method: "DELETE", headers: headers(),
      });
    } else if (button.dataset.action === "drain") {
      response = await fetch("/api/v2/runners/" + encodeURIComponent(button.dataset.runnerId) + "/status", {
        method: "PUT",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify({ drain: button.dataset.drain === "true" }),
      });
    } else {
      return;
    }
    if (response.ok) {
      say(button.dataset.action === "cancel" ? "cancel requested" : "done", "ok");
      setTimeout(function () { load(true); }, 300);
    } else {
      button.disabled = false;
      button.textContent = button.dataset.label;
      say(await problemText(response), "error");
    }
  }

  // -- live events ------------------------------------------------------------------------------
  const seen = [];

  function eventItem(event) {
    const li = document.createElement("li");
    const data = event.data || {};
    li.dataset.type = event.type;
    li.dataset.subject = event.subject_id || "";
    const time = new Date(event.at_ms).toLocaleTimeString();
    const strong = document.createElement("strong");
    strong.textContent = event.type;
    li.append(time + " ", strong, " ");
    const entity = event.type.split(".")[0];
    if (event.subject_id && (entity === "job" || entity === "runner")) {
      const a = document.createElement("a");
      a.textContent = event.subject_id;
      a.href = entity === "job" ? "/console/jobs/" + encodeURIComponent(event.subject_id)
        : "/console/runners?q=" + encodeURIComponent(event.subject_id);
      a.dataset.nav = "";
      li.append(a);
    } else if (event.subject_id) {
      li.append(event.subject_id);
    }
    const detail = data.runner_id || data.reason || "";
    if (detail) li.append(" " + detail);
    return li;
  }

  function fillFullEvents() {
    const full = document.getElementById("events-full");
    if (!full) return;
    full.replaceChildren.apply(full, seen.slice(0, 500).map(eventItem));
  }

  function onEvent(event) {
    seen.unshift(event);
    if (seen.length > 500) seen.pop();
    eventsList.prepend(eventItem(event));
    while (eventsList.children.length > 50) eventsList.lastChild.remove();
    const full = document.getElementById("events-full");
    if (full) {
      full.prepend(eventItem(event));
      while (full.children.length > 500) full.lastChild.remove();
    }
    scheduleRefresh(event);
  }

  // The job on screen: refresh 150 ms after its event. Other views: 1.2 s after the last event
  // (the queue ledger is written once a second), but at least every 3 s while events keep coming.
  let pendingSince = 0;

  function scheduleRefresh(event) {
    const current = currentView();
    if (current.name === "events") return;
    if (view.contains(document.activeElement) && document.activeElement.matches("input")) return;
    let delay;
    if (current.name === "job") {
      if (event.subject_id !== current.id) return;
      delay = 150;
    } else {
      const now = Date.now();
      if (!pendingSince) pendingSince = now;
      delay = Math.min(1200, Math.max(0, 3000 - (now - pendingSince)));
    }
    if (refreshTimer) clearTimeout(refreshTimer);
    refreshTimer = setTimeout(function () {
      refreshTimer = null;
      pendingSince = 0;
      load(true);
    }, delay);
  }

  function setLive(on) {
    live.dataset.live = on ? "on" : "off";
    live.textContent = on ? "live: on" : "live: off";
  }

  async function follow() {
    let wait = 1000;
    for (;;) {
      try {
        let url = "/api/v2/events?filter=%3E&heartbeat_s=10";
        if (lastEventId !== null) url += "&last_event_id=" + lastEventId;
        const response = await fetch(url, { headers: headers({ Accept: "text/event-stream" }) });
        if (!response.ok) throw new Error(await problemText(response));
        setLive(true);
        wait = 1000;
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const chunk = await reader.read();
          if (chunk.done) break;
          buffer += decoder.decode(chunk.value, { stream: true }).replace(/\r\n/g, "\n");
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const frame = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            let id = null;
            const data = [];
            frame.split("\n").forEach(function (line) {
              if (line.startsWith("id:")) id = line.slice(3).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            });
            if (id !== null) lastEventId = id;
            if (data.length) {
              try { onEvent(JSON.parse(data.join("\n"))); } catch (e) { /* not an event */ }
            }
          }
        }
      } catch (e) {
        /* reconnect below */
      }
      setLive(false);
      await new Promise(function (resolve) {
        wakeFollow = resolve;
        setTimeout(resolve, wait);
      });
      wakeFollow = null;
      wait = Math.min(wait * 2, 5000);
    }
  }

  // -- token ------------------------------------------------------------------------------------
  document.getElementById("token-button").addEventListener("click", function () {
    tokenForm.hidden = !tokenForm.hidden;
  });
  tokenForm.addEventListener("submit", function (event) {
    event.preventDefault();
    const value = new FormData(tokenForm).get("token").trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    tokenForm.reset();
    tokenForm.hidden = true;
    load(false);
    if (wakeFollow) wakeFollow();
  });
  document.getElementById("token-forget").addEventListener("click", function () {
    sessionStorage.removeItem(TOKEN_KEY);
    tokenForm.hidden = true;
    load(false);
  });

  load(false);
  follow();
})();
