// HTTP helpers for tests against real processes.
import { isFinal, type TaskState } from "../../src/task/state";

export type TaskJson = Record<string, unknown> & { id: string; state: TaskState; worker_id: string | null; attempt: number };

export async function postJson(url: string, body: unknown): Promise<{ status: number; json: any }> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return { status: response.status, json: await response.json() };
}

export async function getJson(url: string): Promise<{ status: number; json: any }> {
  const response = await fetch(url);
  return { status: response.status, json: await response.json() };
}

/**
 * Follows GET /tasks/:id/events until `until` holds for a snapshot (default: a final state)
 * and returns that snapshot: the test waits on the server's own change notifications.
 */
export async function watchTask(
  baseUrl: string,
  id: string,
  until: (task: TaskJson) => boolean = (task) => isFinal(task.state),
  timeoutMs = 30_000,
): Promise<TaskJson> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  const seen: string[] = [];
  try {
    const response = await fetch(`${baseUrl}/tasks/${id}/events`, { signal: controller.signal });
    if (!response.ok || !response.body) throw new Error(`GET /tasks/${id}/events answered ${response.status}`);
    const decoder = new TextDecoder();
    let buffer = "";
    for await (const chunk of response.body) {
      buffer += decoder.decode(chunk, { stream: true });
      let end: number;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        // The server ends a stream it cannot continue (the database failed) with an error event.
        if (block.split("\n").includes("event: error")) throw new Error(`the event stream of ${id} failed: ${data}`);
        const task = JSON.parse(data) as TaskJson;
        seen.push(`${task.state}#${task.attempt}`);
        if (until(task)) return task;
      }
    }
    throw new Error(`the event stream of ${id} ended without the awaited state; saw ${seen.join(", ")}`);
  } catch (error) {
    if (controller.signal.aborted)
      throw new Error(`task ${id} did not reach the awaited state within ${timeoutMs} ms; saw ${seen.join(", ")}`);
    throw error;
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}
