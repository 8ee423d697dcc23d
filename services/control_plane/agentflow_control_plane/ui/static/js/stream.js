// The event stream over WebSocket, resumed after any disconnect with after=<last cursor>.
//
// Browsers cannot set an Authorization header on a WebSocket, so every connection first
// takes a short-lived ticket (POST /v1/events/tickets, with the token) and passes it in
// the query. A control plane without the stream answers the ticket request with 404/405:
// the page then says so and refreshes from REST instead.

import { ApiError, api } from "./api.js";

const RETRY_MS = [250, 500, 1000, 2000, 4000, 8000];

export class EventStream {
  /**
   * @param {string} path  "/v1/events" or "/v1/runs/<id>/events"
   * @param {object} opts  params (query filters), after (cursor), onEvent(ev), onState(state, detail), onGap()
   */
  constructor(path, { params = {}, after = null, onEvent, onState = () => {}, onGap = () => {} }) {
    this.path = path;
    this.params = params;
    this.last = after;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onGap = onGap;
    this.ws = null;
    this.closed = false;
    this.failures = 0;
    this.timer = null;
  }

  start() {
    this.connect();
    return this;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
  }

  setState(state, detail) {
    this.state = state;
    this.onState(state, detail);
  }

  async connect() {
    if (this.closed) return;
    this.setState(this.failures ? "reconnecting" : "connecting");
    let ticket;
    try {
      ticket = (await api("/v1/events/tickets", { method: "POST" })).ticket;
    } catch (error) {
      if (this.closed) return;
      if (error instanceof ApiError && (error.status === 404 || error.status === 405)) {
        this.setState("unavailable", "this control plane has no event stream");
        return;
      }
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        this.setState("error", error.message);
        return;
      }
      this.retry();
      return;
    }
    if (this.closed) return;
    const url = new URL(this.path, location.origin);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    for (const [k, v] of Object.entries(this.params)) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
    }
    if (this.last !== null && this.last !== undefined) url.searchParams.set("after", this.last);
    url.searchParams.set("ticket", ticket);
    const ws = new WebSocket(url);
    this.ws = ws;
    ws.onopen = () => {
      this.failures = 0;
      this.setState("live");
    };
    ws.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      // Cursors only grow: anything at or below the last one was already seen.
      if (this.last !== null && typeof event.cursor === "number" && event.cursor <= this.last) return;
      if (typeof event.cursor === "number") this.last = event.cursor;
      this.onEvent(event);
    };
    ws.onclose = (close) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (this.closed) return;
      this.closedWith(close.code, close.reason);
    };
  }

  closedWith(code, reason) {
    switch (code) {
      case 1000: // the run finished: the per-run stream ends after its terminal event
        this.closed = true;
        this.setState("ended");
        return;
      case 4400:
      case 4403:
      case 4404:
        this.closed = true;
        this.setState("error", reason || `closed with code ${code}`);
        return;
      case 4410: // older than retention: what was missed cannot be replayed
        this.last = null;
        this.onGap();
        this.retry();
        return;
      default: // 1001 shutdown, 1006 dropped, 4401 ticket, 4429 slow consumer: resume from this.last
        this.retry();
    }
  }

  retry() {
    const wait = RETRY_MS[Math.min(this.failures, RETRY_MS.length - 1)];
    this.failures += 1;
    this.setState("reconnecting");
    this.timer = setTimeout(() => this.connect(), wait);
  }
}

/**
 * Keep a page current: the stream when the server has one, otherwise poll `refresh`.
 * Returns {stop()}. `indicator` is a liveIndicator() element.
 */
export function follow({ path, params, after = null, indicator, onEvent, refresh, pollMs = 2000, onGap, onEnd }) {
  let poller = null;
  const startPolling = () => {
    if (poller || !refresh) return;
    indicator?.set("polling", "no event stream on this control plane: polling the REST API");
    poller = setInterval(refresh, pollMs);
  };
  const stream = new EventStream(path, {
    params,
    after,
    onEvent,
    onGap: onGap || refresh,
    onState: (state, detail) => {
      if (state === "unavailable") {
        startPolling();
        return;
      }
      indicator?.set(state, detail);
      if (state === "ended" && onEnd) onEnd();
    },
  }).start();
  return {
    stream,
    get polling() {
      return poller !== null;
    },
    stop() {
      stream.close();
      if (poller) clearInterval(poller);
    },
  };
}
