// What each page gets: where to draw, the URL, who is signed in, and the live overview.
import type { Schemas, Session } from "./api";

export type Overview = Schemas["Overview"];

export interface PageContext {
  root: HTMLElement;
  url: URL;
  session: Session;
  /** Whether the signed-in token (or the open API) allows this scope; pages hide what it does not. */
  can(scope: "submit" | "cancel" | "admin"): boolean;
  navigate(href: string, replace?: boolean): void;
  /** Calls back with each live overview while the page is shown. */
  onOverview(callback: (overview: Overview) => void): void;
  /** Calls back (at most once a second) when any task changed, while the page is shown. */
  onChange(callback: () => void): void;
  /** A message at the top of the page. */
  notify(message: string, kind?: "ok" | "error"): void;
}

export type Page = (context: PageContext) => Promise<void> | void;
