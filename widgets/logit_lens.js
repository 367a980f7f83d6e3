// LogitLens: layers × positions, each cell the lens's top-1 token coloured by its probability. Hover a cell to
// see that token's probability at every layer (its trajectory); click to pin it.
import { blues, inkOn, el, svg } from "./common.js";

function trajectory(data, position, token) {
  const values = (data.trajectories[position] || {})[token] || [];
  const width = 260, height = 90, n = values.length;
  const root = svg("svg", { width, height: height + 16, class: "trajectory" });
  if (!n) return root;
  const x = (i) => 4 + (i * (width - 8)) / Math.max(1, n - 1), y = (p) => 4 + (1 - p) * height;
  root.append(svg("polyline", { points: values.map((p, i) => `${x(i)},${y(p)}`).join(" "), fill: "none",
    stroke: "var(--jp-brand-color1, #1976d2)", "stroke-width": 2 }));
  const label = svg("text", { x: 4, y: height + 14, "font-size": 11 });
  label.textContent = `P(${JSON.stringify(data.vocab[token])}) at position ${position}, layer 0 → ${n - 1}`;
  root.append(label);
  return root;
}

function render({ model, el: host }) {
  const data = model.get("data");
  host.classList.add("nnsight-viewer", "nnsight-logit-lens");
  host.append(el("div", { class: "title" }, data.title));
  const table = el("table", { class: "lens" });
  const head = el("tr");
  head.append(el("th", {}, "layer"));
  data.tokens.forEach((token) => head.append(el("th", {}, JSON.stringify(token))));
  table.append(head);
  const panel = el("div", { class: "panel" });
  let pinned = null;
  const show = (cell) => { panel.replaceChildren(trajectory(data, +cell.dataset.position, +cell.dataset.token)); };
  for (let layer = data.top.length - 1; layer >= 0; layer--) {
    const row = el("tr");
    row.append(el("th", {}, String(data.layers[layer])));
    data.top[layer].forEach(([token, p], position) => {
      const cell = el("td", { "data-layer": layer, "data-position": position, "data-token": token,
        title: `${JSON.stringify(data.vocab[token])} p=${p.toFixed(3)}` }, data.vocab[token]);
      cell.style.background = blues(p);
      cell.style.color = inkOn(p);
      cell.addEventListener("mouseenter", () => { if (!pinned) show(cell); });
      cell.addEventListener("click", () => {
        if (pinned) pinned.classList.remove("pinned");
        pinned = pinned === cell ? null : cell;
        if (pinned) { pinned.classList.add("pinned"); show(pinned); }
      });
      row.append(cell);
    });
    table.append(row);
  }
  host.append(table, panel);
}

export default { render };
