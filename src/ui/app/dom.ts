// A tiny DOM helper: h("tag.class", {attrs}, children) and the formats every page uses.
export type Child = Node | string | number | null | undefined | false | Child[];
type Attrs = Record<string, string | number | boolean | null | undefined | EventListener>;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K | `${K}.${string}`,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const [name, ...classes] = tag.split(".");
  const element = document.createElement(name as K);
  if (classes.length) element.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (typeof value === "function") element.addEventListener(key.replace(/^on/, ""), value);
    // Through the CSSOM: the page's Content-Security-Policy refuses style attributes.
    else if (key === "style") element.style.cssText = String(value);
    else if (key === "class") element.className = [element.className, String(value)].filter(Boolean).join(" ");
    else if (value === true) element.setAttribute(key, "");
    else element.setAttribute(key, String(value));
  }
  append(element, children);
  return element;
}

function append(parent: Node, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(parent, child);
    else parent.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
}

/** Replaces an element's children. */
export function fill(parent: Element, ...children: Child[]): void {
  parent.replaceChildren();
  append(parent, children);
}

/** A link within the dashboard (the router takes it without a page load). */
export const link = (href: string, ...children: Child[]) => h("a", { href, "data-nav": "" }, ...children);

export function ago(iso: string | null | undefined): string {
  if (!iso) return "—";
  const ms = Date.now() - new Date(iso).getTime();
  const future = ms < 0;
  const s = Math.abs(ms) / 1000;
  const text =
    s < 1
      ? "now"
      : s < 60
        ? `${Math.round(s)}s`
        : s < 3600
          ? `${Math.round(s / 60)}m`
          : s < 86400
            ? `${Math.round(s / 3600)}h`
            : `${Math.round(s / 86400)}d`;
  if (text === "now") return text;
  return future ? `in ${text}` : `${text} ago`;
}

export const time = (iso: string | null | undefined) =>
  iso ? h("time", { datetime: iso, title: iso }, new Date(iso).toLocaleString()) : "—";

export function duration(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60_000)}m ${Math.round((ms % 60_000) / 1000)}s`;
}

export const badge = (state: string) => h("span.badge", { class: `s-${state}`, "data-state": state }, state.replace("_", " "));

export const shortId = (id: string) => id.slice(-12);
