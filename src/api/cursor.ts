// The opaque cursor of GET /tasks (and gRPC ListTasks): clients pass next_cursor back
// unchanged, so its encoding may change without breaking them.
import { invalidArgument } from "../task/errors";
import { isTaskId } from "../task/spec";

/** The opaque list cursor: base64url of the last id of the page. */
export function encodeCursor(lastId: string): string {
  return Buffer.from(lastId, "utf8").toString("base64url");
}

/** The id a cursor stands for; anything encodeCursor did not produce is refused. */
export function decodeCursor(cursor: string): string {
  const id = /^[A-Za-z0-9_-]{1,64}$/.test(cursor) ? Buffer.from(cursor, "base64url").toString("utf8") : "";
  if (!isTaskId(id) || encodeCursor(id) !== cursor) {
    throw invalidArgument("cursor", "cursor is not valid; pass next_cursor from the previous page unchanged");
  }
  return id;
}
