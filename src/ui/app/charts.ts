// Two small SVG charts for the overview: stacked bars per minute, and lines per minute.
const SVG = "http://www.w3.org/2000/svg";

function svg(tag: string, attrs: Record<string, string | number>): SVGElement {
  const element = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) element.setAttribute(key, String(value));
  return element;
}

const W = 600;
const H = 140;
const PAD = { left: 36, right: 6, top: 8, bottom: 18 };

function frame(max: number, unit: string, first: string, last: string): SVGSVGElement {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img" }) as SVGSVGElement;
  const label = (x: number, y: number, text: string, anchor = "start") => {
    const t = svg("text", { x, y, "text-anchor": anchor, class: "axis" });
    t.textContent = text;
    root.appendChild(t);
  };
  root.appendChild(svg("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "grid" }));
  root.appendChild(svg("line", { x1: PAD.left, y1: PAD.top, x2: W - PAD.right, y2: PAD.top, class: "grid" }));
  label(PAD.left - 4, PAD.top + 8, `${max}${unit}`, "end");
  label(PAD.left - 4, H - PAD.bottom, "0", "end");
  label(PAD.left, H - 4, first);
  label(W - PAD.right, H - 4, last, "end");
  return root;
}

const clock = (iso: string) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

export interface Series {
  name: string;
  className: string;
  values: number[];
}

/** Stacked bars, one per label (minute). */
export function barChart(labels: string[], series: Series[], unit = ""): SVGSVGElement {
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] ?? 0), 0));
  const max = Math.max(1, ...totals);
  const root = frame(max, unit, labels[0] ? clock(labels[0]) : "", labels.at(-1) ? clock(labels.at(-1)!) : "");
  const width = (W - PAD.left - PAD.right) / Math.max(1, labels.length);
  const scale = (H - PAD.top - PAD.bottom) / max;
  labels.forEach((label, i) => {
    let y = H - PAD.bottom;
    for (const s of series) {
      const value = s.values[i] ?? 0;
      if (value <= 0) continue;
      const height = value * scale;
      y -= height;
      const bar = svg("rect", { x: PAD.left + i * width + 0.5, y, width: Math.max(1, width - 1), height, class: s.className });
      const title = svg("title", {});
      title.textContent = `${clock(label)} ${s.name}: ${value}`;
      bar.appendChild(title);
      root.appendChild(bar);
    }
  });
  return root;
}

/** Lines over minutes (points only where a minute has a value). */
export function lineChart(
  minutes: string[],
  points: { minute: string; values: number[] }[],
  series: Series[],
  unit = "",
): SVGSVGElement {
  const max = Math.max(1, ...points.flatMap((p) => p.values));
  const root = frame(Math.round(max), unit, minutes[0] ? clock(minutes[0]) : "", minutes.at(-1) ? clock(minutes.at(-1)!) : "");
  const index = new Map(minutes.map((minute, i) => [minute, i]));
  const step = (W - PAD.left - PAD.right) / Math.max(1, minutes.length);
  const scale = (H - PAD.top - PAD.bottom) / max;
  series.forEach((s, k) => {
    const xy = points
      .filter((p) => index.has(p.minute))
      .map((p) => [PAD.left + (index.get(p.minute)! + 0.5) * step, H - PAD.bottom - (p.values[k] ?? 0) * scale] as const);
    if (xy.length === 0) return;
    root.appendChild(svg("polyline", { points: xy.map(([x, y]) => `${x},${y}`).join(" "), class: `line ${s.className}` }));
    for (const [x, y] of xy) root.appendChild(svg("circle", { cx: x, cy: y, r: 2, class: `dot ${s.className}` }));
  });
  return root;
}
