-- compatible-with: 6
-- The W3C traceparent a task was submitted under (its submit's persist span, or the caller's
-- own when tracing is off), carried to its worker and into its environment. A nullable column
-- no older build reads or writes: every build that works with the previous version works with
-- this one.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS traceparent text;
