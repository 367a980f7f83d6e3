// AttentionHeads: one small pattern per head (queries down, keys across, the causal mask greyed); hover a head
// to preview it large with the tokens on both axes, click to lock the preview on it.
import { blues, el, heatmap } from "./common.js";

function preview(data, head) {
  const box = el("div", { class: "preview" });
  const pattern = data.patterns[head];
  const size = Math.max(10, Math.min(28, Math.floor(360 / pattern.length)));
  const grid = el("table", { class: "lens" });
  const top = el("tr");
  top.append(el("th", {}, `head ${head}`));
  data.tokens.forEach((token) => top.append(el("th", { title: token }, token.slice(0, 6))));
  grid.append(top);
  pattern.forEach((row, q) => {
    const tr = el("tr");
    tr.append(el("th", {}, data.tokens[q]));
    row.forEach((p, k) => {
      const td = el("td", { title: `${data.tokens[q]} → ${data.tokens[k]}: ${p.toFixed(3)}` });
      td.style.background = data.causal && k > q ? "rgba(128,128,128,0.25)" : blues(p);
      td.style.minWidth = td.style.height = `${size}px`;
      tr.append(td);
    });
    grid.append(tr);
  });
  box.append(grid);
  return box;
}

function render({ model, el: host }) {
  const data = model.get("data");
  host.classList.add("nnsight-viewer", "nnsight-attention-heads");
  host.append(el("div", { class: "title" }, data.title));
  const heads = el("div", { class: "heads" });
  const panel = el("div", { class: "panel" });
  let locked = null;
  data.patterns.forEach((pattern, head) => {
    const cell = el("div", { class: "head", "data-head": head });
    const size = Math.max(2, Math.floor(64 / pattern.length));
    cell.append(heatmap(pattern, size, blues, data.causal ? (q, k) => k > q : null), el("div", {}, `head ${head}`));
    cell.addEventListener("mouseenter", () => { if (locked === null) panel.replaceChildren(preview(data, head)); });
    cell.addEventListener("click", () => {
      heads.querySelectorAll(".locked").forEach((node) => node.classList.remove("locked"));
      locked = locked === head ? null : head;
      if (locked !== null) { cell.classList.add("locked"); panel.replaceChildren(preview(data, head)); }
    });
    heads.append(cell);
  });
  host.append(heads, panel);
  panel.replaceChildren(preview(data, 0));
}

export default { render };
