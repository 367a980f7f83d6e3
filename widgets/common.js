// Shared by the viewers: colour scales and small SVG helpers. The data colours are fixed scales (a viewer's
// meaning must not change with the theme); text on them is black or white, whichever reads.
export function blues(p) {
  const t = Math.max(0, Math.min(1, p));
  return `rgb(${Math.round(247 - 222 * t)},${Math.round(251 - 148 * t)},${Math.round(255 - 90 * t)})`;
}
export function diverging(v, scale) {
  const t = Math.max(-1, Math.min(1, scale ? v / scale : 0));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t < 0 ? `rgb(${fade},${fade},255)` : `rgb(255,${fade},${fade})`;
}
export function inkOn(p) { return p > 0.55 ? "#fff" : "#111"; }
export function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text) node.textContent = text;
  return node;
}
export function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}
export function heatmap(matrix, size, colour, mask) {
  // matrix: rows of numbers; size: pixels per cell; mask(r, c) true draws the cell as masked (hatched grey)
  const rows = matrix.length, cols = rows ? matrix[0].length : 0;
  const root = svg("svg", { width: cols * size, height: rows * size, class: "heatmap" });
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
    const masked = mask && mask(r, c);
    root.append(svg("rect", { x: c * size, y: r * size, width: size, height: size,
      fill: masked ? "rgba(128,128,128,0.25)" : colour(matrix[r][c]) }));
  }
  return root;
}
