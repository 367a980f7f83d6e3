// The live inspector's front end (anywidget): the table HTML the kernel sends, a filter box, and the folded
// groups and scroll position kept across updates (the kernel re-sends the table a few times a second).
function openGroups(el) {
  return new Set([...el.querySelectorAll("tbody[data-group]")]
    .filter((body) => body.querySelector("input.nnsight-fold:checked"))
    .map((body) => body.dataset.group));
}

function applyFilter(el, query) {
  const root = el.querySelector(".nnsight-live");
  const q = query.toLowerCase();
  root.classList.toggle("filtering", q.length > 0);
  for (const row of root.querySelectorAll("tr[data-node]")) {
    row.classList.toggle("nomatch", q.length > 0 && !row.textContent.toLowerCase().includes(q));
  }
}

function render({ model, el }) {
  el.classList.add("nnsight-inspector");
  const filter = document.createElement("input");
  filter.className = "nnsight-filter";
  filter.placeholder = "filter rows (name, expression, status)";
  const live = document.createElement("div");
  live.className = "nnsight-live";
  el.append(filter, live);
  const draw = () => {
    const open = openGroups(el);
    const scroll = live.querySelector(".nnsight-scroll");
    const top = scroll ? scroll.scrollTop : 0;
    live.innerHTML = model.get("value");
    for (const body of live.querySelectorAll("tbody[data-group]")) {
      const box = body.querySelector("input.nnsight-fold");
      if (box && open.has(body.dataset.group)) box.checked = true;
    }
    const again = live.querySelector(".nnsight-scroll");
    if (again) again.scrollTop = top;
    applyFilter(el, filter.value);
  };
  filter.addEventListener("input", () => applyFilter(el, filter.value));
  model.on("change:value", draw);
  draw();
  return () => model.off("change:value", draw);
}

export default { render };
