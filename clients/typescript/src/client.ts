// A small Atelier client: creates a commission and follows its Server-Sent Events until it
// ends. Its types come from the server's own OpenAPI document (check.sh generates them from
// a live server on every run), so a change to the API that breaks this client fails the
// type check instead of a user's build.

import type { components, paths } from "atelier-api";

type Schemas = components["schemas"];
export type CreateCommission = paths["/api/commissions"]["post"]["requestBody"]["content"]["application/json"];
export type Snapshot = paths["/api/commissions"]["post"]["responses"]["201"]["content"]["application/json"];
export type EventData = Schemas["EventData"];
export type ErrorBody = Schemas["ErrorBody"];
type StreamQuery = NonNullable<paths["/api/progress/{id}/stream"]["get"]["parameters"]["query"]>;

/** The states after which a commission's stream has nothing more to say. */
const TERMINAL: ReadonlySet<EventData["state"]> = new Set<EventData["state"]>(["completed", "failed", "cancelled"]);

/** An error the server answered, with its code (`{"error":{"code","message"}}`). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(`${status} ${code}: ${message}`);
  }
}

/** One SSE message: its `id:` (the log's seq, to resume from), `event:` and parsed `data:`. */
export interface StreamMessage {
  id: number | undefined;
  event: string;
  data: EventData;
}

export class AtelierClient {
  constructor(
    private readonly baseUrl: string,
    private readonly token: string,
  ) {}

  /** `POST /api/commissions`: 201 with the new commission, 200 with the first one for a repeated idempotency key. */
  async createCommission(body: CreateCommission): Promise<Snapshot> {
    const response = await fetch(`${this.baseUrl}/api/commissions`, {
      method: "POST",
      headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (response.status !== 201 && response.status !== 200) {
      throw await apiError(response);
    }
    return (await response.json()) as Snapshot;
  }

  /**
   * Follows `GET /api/progress/{id}/stream` until the commission ends. A stream the server
   * closes (a restart, a rotated secret) is opened again after the last event seen.
   */
  async *follow(id: number, after?: number): AsyncGenerator<StreamMessage> {
    let lastEventId = after;
    for (;;) {
      const query: StreamQuery = lastEventId === undefined ? {} : { last_event_id: lastEventId };
      const search = new URLSearchParams(Object.entries(query).map(([k, v]) => [k, String(v)]));
      const response = await fetch(`${this.baseUrl}/api/progress/${id}/stream?${search}`, {
        headers: { Authorization: `Bearer ${this.token}`, Accept: "text/event-stream" },
      });
      if (response.status === 204) {
        return; // the commission had already ended before `after`
      }
      if (response.status !== 200 || response.body === null) {
        throw await apiError(response);
      }
      for await (const message of readEvents(response.body)) {
        lastEventId = message.id ?? lastEventId;
        yield message;
        if (TERMINAL.has(message.data.state)) {
          return;
        }
      }
    }
  }
}

async function apiError(response: Response): Promise<ApiError> {
  const text = await response.text();
  try {
    const body = JSON.parse(text) as ErrorBody;
    return new ApiError(response.status, body.error.code, body.error.message);
  } catch {
    return new ApiError(response.status, "unknown", text);
  }
}

/**
 * A small SSE reader: messages are blocks of `field: value` lines ended by a blank line;
 * comment lines (`:`, the server's heartbeats) are skipped, `data:` lines are joined.
 */
export async function* readEvents(body: ReadableStream<Uint8Array>): AsyncGenerator<StreamMessage> {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let fields: { id?: string; event?: string; data: string[] } = { data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      return;
    }
    buffer += decoder.decode(value, { stream: true });
    let newline: number;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (fields.data.length > 0) {
          const id = fields.id === undefined ? undefined : Number(fields.id);
          yield { id, event: fields.event ?? "message", data: JSON.parse(fields.data.join("\n")) as EventData };
        }
        fields = { data: [] };
        continue;
      }
      if (line.startsWith(":")) {
        continue;
      }
      const colon = line.indexOf(":");
      const name = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (name === "data") {
        fields.data.push(text);
      } else if (name === "id") {
        fields.id = text;
      } else if (name === "event") {
        fields.event = text;
      }
    }
  }
}

/** What a progress display needs of one event, each field as the document types it. */
export interface Progress {
  commission: number;
  seq: number;
  kind: EventData["type"];
  state: EventData["state"];
  stage: EventData["stage"];
  percent: number;
}

export function progressOf(data: EventData): Progress {
  return {
    commission: data.task_id,
    seq: data.seq,
    kind: data.type,
    state: data.state,
    stage: data.stage,
    percent: data.progress_percent,
  };
}

/** Creates a commission and prints its progress until it ends; its final state. */
export async function commissionAndFollow(
  client: AtelierClient,
  title: string,
  // The live document lists the server's own pipelines: a name it does not have is a type error.
  pipeline: NonNullable<CreateCommission["pipeline"]>,
): Promise<EventData["state"]> {
  const created = await client.createCommission({ context: { title }, pipeline, priority: 0 });
  let state: EventData["state"] = created.state;
  for await (const message of client.follow(created.task_id)) {
    const p = progressOf(message.data);
    state = p.state;
    console.log(`${p.commission} #${p.seq} ${p.kind}: ${p.state} ${p.stage ?? "-"} ${p.percent}%`);
  }
  return state;
}
