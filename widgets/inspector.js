// The live inspector's front end (anywidget): the table HTML the kernel sends once, patched in place while the
// model runs (custom messages with the header and the rows and group heads that changed), a filter box, and the
// folded groups and scroll position kept across updates.
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

// One table row from its HTML (a <tr> parses only inside a table).
function parseRow(html) {
  const template = document.createElement("template");
  template.innerHTML = `<table><tbody>${html}</tbody></table>`;
  return template.content.querySelector("tr");
}

function applyPatch(live, patch) {
  const top = live.querySelector(".nnsight-top");
  if (top) top.innerHTML = patch.top;
  for (const [node, html] of patch.rows) {
    const row = live.querySelector(`tr[data-node="${node}"]`);
    if (row) row.replaceWith(parseRow(html));
  }
  for (const [position, html] of patch.heads) {
    const head = live.querySelector(`tbody[data-index="${position}"] > tr.group-head`);
    if (!head) continue;
    const open = head.querySelector("input.nnsight-fold").checked;
    const fresh = parseRow(html);
    if (open) fresh.querySelector("input.nnsight-fold").checked = true;
    head.replaceWith(fresh);
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
  const patch = (content) => {
    applyPatch(live, content);
    applyFilter(el, filter.value);
  };
  filter.addEventListener("input", () => applyFilter(el, filter.value));
  model.on("change:value", draw);
  model.on("msg:custom", patch);
  draw();
  return () => {
    model.off("change:value", draw);
    model.off("msg:custom", patch);
  };
}

export default { render };
