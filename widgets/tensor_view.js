// TensorView: the last two axes of a tensor as a heatmap, a slider for every other axis, and a histogram.
import { diverging, el, heatmap, svg } from "./common.js";

function slice(data, index) {
  const [rows, cols] = data.shape.slice(-2);
  let offset = 0, stride = rows * cols;
  for (let axis = data.shape.length - 3; axis >= 0; axis--) { offset += index[axis] * stride; stride *= data.shape[axis]; }
  const matrix = [];
  for (let r = 0; r < rows; r++) matrix.push(data.values.slice(offset + r * cols, offset + (r + 1) * cols));
  return matrix;
}

function histogram(bins) {
  const width = 240, height = 60, tallest = Math.max(...bins, 1), w = width / bins.length;
  const root = svg("svg", { width, height, class: "histogram" });
  bins.forEach((count, i) => root.append(svg("rect", { x: i * w, y: height - (height * count) / tallest,
    width: Math.max(w - 1, 1), height: (height * count) / tallest, fill: "var(--jp-brand-color1, #1976d2)" })));
  return root;
}

function render({ model, el: host }) {
  const data = model.get("data");
  host.classList.add("nnsight-viewer", "nnsight-tensor-view");
  host.append(el("div", { class: "title" }, data.title));
  const index = data.shape.slice(0, -2).map(() => 0);
  const picture = el("div");
  const size = Math.max(3, Math.min(16, Math.floor(480 / Math.max(...data.shape.slice(-2)))));
  const draw = () => picture.replaceChildren(heatmap(slice(data, index), size, (v) => diverging(v, data.scale)));
  index.forEach((_, axis) => {
    const label = el("label", {}, `axis ${axis}: `);
    const slider = el("input", { type: "range", min: 0, max: data.shape[axis] - 1, value: 0, "data-axis": axis });
    const shown = el("span", {}, "0");
    slider.addEventListener("input", () => { index[axis] = +slider.value; shown.textContent = slider.value; draw(); });
    label.append(slider, shown);
    host.append(el("div"), label);
  });
  host.append(picture, el("div", { class: "muted" }, data.stats), histogram(data.histogram));
  draw();
}

export default { render };
