// Inline SVG charts drawn by the console itself (no library): lines on fixed axes, stacked bars over time,
// and horizontal bars. Colours come from console.css by class, since the page's policy allows no inline
// style; every mark carries its figures as data attributes and a <title>, for people and tests alike.
const SVG = "http://www.w3.org/2000/svg";

export function svg(tag, attrs = {}, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, String(value));
  for (const child of children) element.append(child);
  return element;
}

const titled = (element, text) => { element.append(svg("title", {}, text)); return element; };

// Curves on [0, 1] × [0, 1] (a ROC: x = FAR, y = TAR), with the chance diagonal and a legend.
export function unitLines(lines, { width = 240, height = 240, xLabel = "", yLabel = "", className = "" } = {}) {
  const pad = 28;
  const w = width - pad - 8, h = height - pad - 8;
  const x = (v) => (pad + v * w).toFixed(1);
  const y = (v) => (8 + (1 - v) * h).toFixed(1);
  const chart = svg("svg", { class: `chart ${className}`.trim(), width, height, viewBox: `0 0 ${width} ${height}` });
  chart.append(
    svg("rect", { class: "frame", x: pad, y: 8, width: w, height: h }),
    svg("line", { class: "chance", x1: x(0), y1: y(0), x2: x(1), y2: y(1) }),
    svg("text", { class: "axis", x: pad + w / 2, y: height - 6, "text-anchor": "middle" }, xLabel),
    svg("text", { class: "axis", x: 10, y: 8 + h / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${8 + h / 2})` }, yLabel),
  );
  lines.forEach((line, i) => {
    const points = line.x.map((v, k) => `${x(v)},${y(line.y[k])}`).join(" ");
    chart.append(titled(svg("polyline", { class: line.className, points, "data-points": line.x.length }), line.label));
    chart.append(svg("text", { class: `legend ${line.className}`, x: pad + w - 4, y: 8 + h - 8 - 14 * i, "text-anchor": "end" }, line.label));
  });
  return chart;
}

// One stacked bar per bucket: `buckets` = [{label, parts: {key: count}}], `keys` = [[key, class, name]].
export function stackedBars(buckets, keys, { width = 560, height = 160 } = {}) {
  const pad = 24;
  const top = Math.max(1, ...buckets.map((b) => keys.reduce((sum, [key]) => sum + (b.parts[key] || 0), 0)));
  const step = (width - pad) / Math.max(1, buckets.length);
  const scale = (height - pad - 4) / top;
  const chart = svg("svg", { class: "chart bars", width, height, viewBox: `0 0 ${width} ${height}` });
  chart.append(
    svg("text", { class: "axis", x: 2, y: 12 }, String(top)),
    svg("line", { class: "frame", x1: pad, y1: height - pad, x2: width, y2: height - pad }),
  );
  buckets.forEach((bucket, i) => {
    let base = height - pad;
    for (const [key, className, name] of keys) {
      const count = bucket.parts[key] || 0;
      if (!count) continue;
      const h = count * scale;
      base -= h;
      const rect = svg("rect", {
        class: className, x: (pad + i * step + 1).toFixed(1), y: base.toFixed(1),
        width: Math.max(1, step - 2).toFixed(1), height: h.toFixed(1), "data-key": key, "data-value": count,
      });
      chart.append(titled(rect, `${bucket.label} · ${name}: ${count}`));
    }
  });
  const every = Math.ceil(buckets.length / 6);
  buckets.forEach((bucket, i) => {
    if (i % every === 0 || i === buckets.length - 1) {
      chart.append(svg("text", { class: "axis", x: (pad + i * step).toFixed(1), y: height - 8 }, bucket.short));
    }
  });
  return chart;
}

// Horizontal bars: [{name, value, className, of?}]; with `of`, a bar is a share of that total.
export function barList(items, { width = 320 } = {}) {
  const row = 22, label = 110;
  const top = Math.max(1, ...items.map((item) => item.of ?? item.value));
  const chart = svg("svg", { class: "chart hbars", width, height: row * items.length + 4 });
  items.forEach((item, i) => {
    const y = 2 + i * row;
    const full = width - label - 60;
    if (item.of !== undefined) chart.append(svg("rect", { class: "track", x: label, y, width: full, height: row - 6 }));
    const bar = svg("rect", {
      class: item.className || "bar", x: label, y, width: ((item.value / top) * full).toFixed(1), height: row - 6,
      "data-key": item.key ?? item.name, "data-value": item.value,
    });
    const figure = item.of !== undefined ? `${item.value} / ${item.of}` : String(item.value);
    chart.append(
      svg("text", { class: "axis", x: 0, y: y + row - 10 }, item.name),
      titled(bar, `${item.name}: ${figure}`),
      svg("text", { class: "axis", x: label + full + 4, y: y + row - 10 }, figure),
    );
  });
  return chart;
}
