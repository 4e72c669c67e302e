// A Server-Sent Events parser for text read from fetch(): EventSource cannot send an Authorization header,
// so the page reads every event stream this way, with or without API keys.
// Follows the WHATWG event-stream format: lines end in \n, \r\n or \r; a blank line dispatches; ":" is a comment.

export class SSEParser {
  constructor() {
    this.buffer = "";
    this.retry = null; // the last "retry:" value in ms
    this.lastEventId = null; // survives across events, as in EventSource
    this.#reset();
  }

  #reset() {
    this.data = [];
    this.event = "";
    this.sawId = false;
  }

  /** Feed decoded text; returns the events completed by it: {event, data, id}. */
  push(text) {
    let chunk = this.buffer + text;
    let held = "";
    if (chunk.endsWith("\r")) {
      // a \r\n may be split across two reads: keep the \r until the next one
      held = "\r";
      chunk = chunk.slice(0, -1);
    }
    const lines = chunk.split(/\r\n|\r|\n/);
    this.buffer = lines.pop() + held;
    const events = [];
    for (const line of lines) {
      const event = this.#line(line);
      if (event) events.push(event);
    }
    return events;
  }

  #line(line) {
    if (line === "") {
      const hadData = this.data.length > 0;
      const event = { event: this.event || "message", data: this.data.join("\n"), id: this.lastEventId };
      this.#reset();
      return hadData ? event : null;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }
}
