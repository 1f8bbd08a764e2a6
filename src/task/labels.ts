// Worker labels and what tasks ask of them: requirements with comparators, preferences with
// weights. The claim matches them in SQL (tq_labels_match, migration "routing"), with the same
// rules as `matches` here, which the waiting reason and the fast path use.
import { invalidArgument } from "./errors";

export const LABEL_OPS = ["=", "!=", ">", ">=", "<", "<=", "exists"] as const;
export type LabelOp = (typeof LABEL_OPS)[number];

export interface LabelRequirement {
  key: string;
  op: LabelOp;
  /** Absent for `exists`; a number for the ordering comparators. */
  value?: string;
}

export interface LabelPreference extends LabelRequirement {
  /** Added to the task's score on a worker that matches: 1 to 100. */
  weight: number;
}

export const LABEL_KEY = /^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$/;
const NUMBER = /^-?[0-9]+(\.[0-9]+)?$/;
const ORDERED: readonly LabelOp[] = [">", ">=", "<", "<="];

/** A label value as SQL's tq_label_number reads it. */
function asNumber(value: string | undefined): number | null {
  return value !== undefined && NUMBER.test(value) ? Number(value) : null;
}

/** Whether the labels satisfy one requirement: the rule tq_label_matches applies in SQL. */
export function matchesOne(req: LabelRequirement, labels: Readonly<Record<string, string>>): boolean {
  const has = Object.hasOwn(labels, req.key);
  const have = has ? labels[req.key] : undefined;
  switch (req.op) {
    case "exists":
      return has;
    case "=":
      return have === req.value;
    case "!=":
      return have !== req.value;
    default: {
      const a = asNumber(have);
      const b = asNumber(req.value);
      if (a === null || b === null) return false;
      if (req.op === ">") return a > b;
      if (req.op === ">=") return a >= b;
      if (req.op === "<") return a < b;
      return a <= b;
    }
  }
}

export function matches(requires: readonly LabelRequirement[], labels: Readonly<Record<string, string>>): boolean {
  return requires.every((req) => matchesOne(req, labels));
}

/** A requirement as people write it: `gpu=1`, `mem_gb>=64`, `ssd exists`. */
export function describeRequirement(req: LabelRequirement): string {
  return req.op === "exists" ? `${req.key} exists` : `${req.key}${req.op}${req.value ?? ""}`;
}

/**
 * Checks a list of requirements or preferences from a client; `field` names it in the error.
 * Ordering comparators need a number; `exists` takes no value.
 */
export function checkLabelRules(rules: readonly LabelRequirement[], field: string): void {
  rules.forEach((rule, i) => {
    const at = `${field}[${i}]`;
    if (!LABEL_KEY.test(rule.key))
      throw invalidArgument(`${at}.key`, `${at}.key must be a label name (letters, digits, _ . - /)`);
    if (rule.op === "exists") {
      if (rule.value !== undefined) throw invalidArgument(`${at}.value`, `${at}.value is not taken by exists`);
      return;
    }
    if (rule.value === undefined) throw invalidArgument(`${at}.value`, `${at}.value is required for ${rule.op}`);
    if (ORDERED.includes(rule.op) && !NUMBER.test(rule.value)) {
      throw invalidArgument(`${at}.value`, `${at}.value must be a number for ${rule.op}`);
    }
  });
}

/**
 * Parses TQ_WORKER_LABELS: `gpu=1,region=eu,mem_gb=64` (a key alone is the value "true").
 * Throws with the offending entry.
 */
export function parseLabels(text: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const entry of text.split(",").map((e) => e.trim())) {
    if (entry === "") continue;
    const eq = entry.indexOf("=");
    const key = eq < 0 ? entry : entry.slice(0, eq).trim();
    const value = eq < 0 ? "true" : entry.slice(eq + 1).trim();
    if (!LABEL_KEY.test(key)) throw new Error(`label "${entry}": the name must be letters, digits, _ . - /`);
    labels[key] = value;
  }
  return labels;
}
