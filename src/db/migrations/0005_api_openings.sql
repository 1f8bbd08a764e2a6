-- Authentication, once on, stays on. The API is closed while any token exists, live or
-- revoked (a revoke marks the row, it never deletes it), that was created since the last
-- explicit opening (`bun run token open-api`); with none ever created it is open as before.
-- Each opening is kept, with who made it.
CREATE TABLE api_openings (
  id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  opened_at  timestamptz(3) NOT NULL DEFAULT clock_timestamp(),
  opened_by  text NOT NULL
);
