// TokenValues: the prompt's tokens, each coloured by its value (blue below zero, red above); hover for the number.
import { diverging, inkOn, el } from "./common.js";

function render({ model, el: host }) {
  const data = model.get("data");
  host.classList.add("nnsight-viewer", "nnsight-token-values");
  host.append(el("div", { class: "title" }, data.title));
  const line = el("div", { class: "tokens" });
  data.tokens.forEach((token, i) => {
    const value = data.values[i];
    const span = el("span", { class: "token", "data-position": i, title: `${JSON.stringify(token)}: ${value}` },
      token);
    span.style.background = diverging(value, data.scale);
    span.style.color = inkOn(Math.abs(data.scale ? value / data.scale : 0));
    line.append(span);
  });
  host.append(line);
}

export default { render };
