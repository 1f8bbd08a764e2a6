// Live updates over server-sent events. Every stream the dashboard holds is registered here,
// and is open only while the view is live: the tab visible (visibilitychange) and the person
// has not paused it. Hidden or paused, every stream is closed (the server does no work for
// it); shown again, each opens again from where it stopped (each opener keeps its own place).
type Close = () => void;
type Open = () => Close;

interface Stream {
  open: Open;
  close: Close | null;
  page: boolean;
}

export class Live {
  private readonly streams = new Set<Stream>();
  private paused = false;
  private readonly watchers = new Set<(live: boolean) => void>();

  constructor() {
    document.addEventListener("visibilitychange", () => this.sync());
  }

  /** Live: visible and not paused. */
  get active(): boolean {
    return !this.paused && document.visibilityState === "visible";
  }

  get isPaused(): boolean {
    return this.paused;
  }

  setPaused(paused: boolean): void {
    this.paused = paused;
    this.sync();
  }

  /** Calls back with whether the view is live, now and on every change. */
  watch(callback: (live: boolean) => void): void {
    this.watchers.add(callback);
    callback(this.active);
  }

  /** Registers a stream (page streams end when the page changes); returns its removal. */
  add(open: Open, page = true): Close {
    const stream: Stream = { open, close: null, page };
    this.streams.add(stream);
    if (this.active) stream.close = open();
    return () => {
      stream.close?.();
      stream.close = null;
      this.streams.delete(stream);
    };
  }

  /** Ends every stream of the page being left. */
  leavePage(): void {
    for (const stream of [...this.streams]) {
      if (!stream.page) continue;
      stream.close?.();
      this.streams.delete(stream);
    }
  }

  private sync(): void {
    const active = this.active;
    for (const stream of this.streams) {
      if (active && !stream.close) stream.close = stream.open();
      else if (!active && stream.close) {
        stream.close();
        stream.close = null;
      }
    }
    for (const watcher of this.watchers) watcher(active);
  }
}

export const live = new Live();

/** An EventSource with named-event handlers, as an opener for Live.add. */
export function eventSource(url: () => string, handlers: Record<string, (event: MessageEvent) => void>): Open {
  return () => {
    const source = new EventSource(url(), { withCredentials: true });
    for (const [name, handler] of Object.entries(handlers)) source.addEventListener(name, handler as EventListener);
    return () => source.close();
  };
}
