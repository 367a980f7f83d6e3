"""What the live inspector costs a run: 100-step generations and a forward pass, with and without it.

``python bench/run.py inspector`` (or ``python -m bench.bench_inspector``) prints two timing tables, the number and
size of the messages each inspected run sends, and the target: the inspector costs less than 5 % of the run of a
100-step generation.

The front end is stood in for by a comm that JSON-encodes every message it is given (what ipykernel does before
a message leaves the kernel), and the inspector is made to believe it is in a notebook, so it displays itself
(also JSON-encoded) instead of printing. What is timed is therefore everything the kernel's main thread pays:
building the widgets, rendering rows, the throttled updates while the model runs, the value summaries at the end.

* **tiny**, the worst case for a cost per node: a GPT-2 of 2 blocks × 64 (about 1 ms a step) generates 100 tokens;
  every step appends the argmax of its last logits to a traced list (a value watched per step, 5 nodes per step).
  ``generate_inspected`` adds ``GraphInspector(tracer)`` (updates at most every 0.25 s); ``generate_unthrottled``
  uses ``update_interval=0``, so every status change is sent: what the throttle saves. ``forward`` /
  ``forward_inspected``: one forward pass of a 12-block GPT-2 × 64 saving every block's output, the inspector's
  fixed cost (widgets, rows, summaries) against a run of a few milliseconds.
* **smollm2**, a classroom model: the embedded SmolLM2-135M generates 100 tokens from the Eiffel Tower prompt,
  watched the same way.
* **in a real kernel** (the targets; ``python -m bench.bench_inspector --kernel`` runs only this part, about
  2 minutes; ``BENCH_INSPECTOR_ROUNDS=N`` rounds, default 12): ``%%trace`` cells of the embedded model sent to an
  IPython kernel through jupyter_client, as nbclient runs a notebook: a 30-block logit-lens cell (target: the
  inspector adds at most 10 %) and a 100-step generation that reads only ``tracer.result`` (at most 2 %; the
  model's ``generation_config.min_new_tokens = 100`` makes it 100 steps: SmolLM2 answers this prompt in 5), each
  with and without ``--no-widget``, in the same kernel, every round in a shuffled order, paired within the round.
  Reported: wall time from request to reply; in the kernel, the time and the process CPU time from ``pre_run_cell``
  to ``post_run_cell`` (steadier on a loaded machine); the time spent in the inspector's own code (timed around
  its entry points, on every thread: what a paired difference cannot resolve when the machine's speed drifts by
  more than the target within a round); the load average; and the iopub messages and bytes of each cell.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import comm
import torch

from bench import common
from bench.models import tiny_gpt2, token_ids
from nnsight_magic import NNsight, load_embedded_model
from nnsight_magic.models.language import LanguageModel
from nnsight_magic.widgets import GraphInspector
from nnsight_magic.widgets import inspector as inspector_module

NEW_TOKENS = 100


class EncodingComm(comm.base_comm.BaseComm):
    """A comm that JSON-encodes each message, as ipykernel does, and counts what it would send."""

    messages = 0
    encoded_bytes = 0

    def publish_msg(self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None,
                    **keys: Any) -> None:
        EncodingComm.messages += 1
        EncodingComm.encoded_bytes += len(json.dumps({"msg_type": msg_type, "data": data, "metadata": metadata}))


class EncodedDisplay:
    """A display and its handle: the bundle JSON-encoded when shown and when updated (the static form)."""

    def __init__(self, widget: Any):
        json.dumps(widget._repr_mimebundle_())

    def update(self, bundle: dict, raw: bool = False) -> None:
        json.dumps(bundle)


@contextlib.contextmanager
def notebook_front_end() -> Iterator[None]:
    """Widgets talk to :class:`EncodingComm`; the inspector displays itself (encoded) as in a notebook."""
    saved = comm.create_comm, inspector_module.in_notebook, inspector_module.display
    comm.create_comm = lambda **kwargs: EncodingComm(**kwargs)
    inspector_module.in_notebook = lambda: True
    inspector_module.display = lambda widget, **options: EncodedDisplay(widget)
    try:
        yield
    finally:
        comm.create_comm, inspector_module.in_notebook, inspector_module.display = saved


# ---------------------------------------------------------------------------------------------- cases
def generate(lm: LanguageModel, prompt: Any, inspect: dict | None) -> list:
    # min_new_tokens: SmolLM2 ends its answer to the Eiffel Tower prompt after 5 tokens; the case is 100 steps
    with lm.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS) as tracer:
        if inspect is not None:
            GraphInspector(tracer, **inspect)
        tokens = tracer.list().save()
        with tracer.all():
            tokens.append(lm.lm_head.output[0, -1].argmax())
    return tokens.value


def forward(net: NNsight, ids: torch.Tensor, inspect: bool) -> list:
    with net.trace(ids) as tracer:
        if inspect:
            GraphInspector(tracer)
        saved = [block.output.save() for block in net.transformer.h]
    return [proxy.value for proxy in saved]


def tiny_cases() -> dict[str, Callable[[], Any]]:
    small = tiny_gpt2()
    lm, prompt = LanguageModel(small), token_ids(small, seq=16)
    deep = tiny_gpt2(n_layer=12)
    net, ids = NNsight(deep), token_ids(deep)
    check_generation(lm, prompt)
    common.assert_same("saved block outputs under the inspector", forward(net, ids, True), forward(net, ids, False))
    return {"generate": lambda: generate(lm, prompt, None),
            "generate_inspected": lambda: generate(lm, prompt, {}),
            "generate_unthrottled": lambda: generate(lm, prompt, {"update_interval": 0}),
            "forward": lambda: forward(net, ids, False),
            "forward_inspected": lambda: forward(net, ids, True)}


def smollm2_cases() -> dict[str, Callable[[], Any]]:
    lm = load_embedded_model()
    prompt = "The Eiffel Tower is in the city of"
    check_generation(lm, prompt)
    return {"generate": lambda: generate(lm, prompt, None), "generate_inspected": lambda: generate(lm, prompt, {})}


def check_generation(lm: LanguageModel, prompt: Any) -> None:
    """The inspector changes nothing: the same tokens with and without it, throttled or not."""
    plain = generate(lm, prompt, None)
    common.assert_same("tokens generated under the inspector", generate(lm, prompt, {}), plain)
    common.assert_same("tokens generated under the unthrottled inspector",
                       generate(lm, prompt, {"update_interval": 0}), plain)


DESCRIPTIONS = {
    "generate": f"{NEW_TOKENS}-step generation, argmax watched per step",
    "generate_inspected": "the same, GraphInspector (updates ≤ 4/s)",
    "generate_unthrottled": "the same, GraphInspector(update_interval=0)",
    "forward": "12-block forward, 12 block outputs saved",
    "forward_inspected": "the same, GraphInspector",
}


def message_counts(runs: dict[str, Callable[[], Any]]) -> str:
    """A Markdown table: messages and encoded kilobytes one run of each inspected case sends."""
    lines = ["| case | messages per run | encoded KB per run |", "|---|---:|---:|"]
    for name, run in runs.items():
        if "inspected" not in name and "unthrottled" not in name:
            continue
        EncodingComm.messages = EncodingComm.encoded_bytes = 0
        run()
        lines.append(f"| {name} | {EncodingComm.messages} | {EncodingComm.encoded_bytes / 1024:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ real kernel
KERNEL_SETUP = """%load_ext nnsight_magic
import torch
torch.set_num_threads(1)
from nnsight_magic import load_embedded_model
lm = load_embedded_model()
prompt = "The Eiffel Tower is located in the city of"
lm.generation_config.min_new_tokens = 100  # else the answer (" Paris, France.") ends the generation at step 5
import threading as _bench_threading
import time as _bench_time
from nnsight_magic.magics.magics import TraceMagics as _BenchMagics
from nnsight_magic.widgets.inspector import GraphInspector as _BenchInspector, TokenStream as _BenchStream
from nnsight_magic.widgets.throttle import Throttle as _BenchThrottle
_bench_cell = None
_bench_spent = [0.0]  # seconds spent in the inspector's own code during this cell, every thread
_bench_depth = _bench_threading.local()
def _bench_timed(owner, name):
    original = getattr(owner, name)  # a plain function, also for a staticmethod (re-wrapped below)
    def timed(*args, **kwargs):
        depth = getattr(_bench_depth, "value", 0)
        _bench_depth.value = depth + 1
        start = _bench_time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _bench_depth.value = depth
            if depth == 0:  # only the outermost call counts (graph_built renders through the throttle)
                _bench_spent[0] += _bench_time.perf_counter() - start
    setattr(owner, name, staticmethod(timed) if isinstance(owner.__dict__[name], staticmethod) else timed)
for _owner, _names in ((_BenchMagics, ("_inspect",)), (_BenchStream, ("put",)), (_BenchThrottle, ("_run",)),
                       (_BenchInspector, ("graph_built", "node_status", "step_started", "request_status",
                                          "run_finished"))):
    for _name in _names:
        _bench_timed(_owner, _name)
def _bench_started(info):
    global _bench_start
    _bench_spent[0] = 0.0
    _bench_start = (_bench_time.perf_counter(), _bench_time.process_time())
def _bench_ended(result):
    global _bench_cell
    _bench_cell = (_bench_time.perf_counter() - _bench_start[0], _bench_time.process_time() - _bench_start[1],
                   _bench_spent[0])
get_ipython().events.register("pre_run_cell", _bench_started)
get_ipython().events.register("post_run_cell", _bench_ended)
"""
LENS_CELL = """%%trace lm prompt{flag}
lens = [lm.lm_head(lm.model.norm(block.output[0, -1])).softmax(-1) for block in lm.model.layers]
"""
GENERATE_CELL = """%%trace lm prompt --generate --max-new-tokens 100{flag}
ids = tracer.result
"""


class KernelCell:
    """One cell sent to the kernel: its wall time (request to reply, timed here), the time and the CPU time of the
    kernel process from ``pre_run_cell`` to ``post_run_cell`` (timed in the kernel, by the setup cell's hooks),
    the time the inspector's own code took in it (``spent``: the setup cell times the magic's ``_inspect``, the
    inspector's observer methods, its token streamer and its throttled renders, on whichever thread they run),
    and the iopub messages it caused (count and encoded bytes), recorded per run."""

    def __init__(self, client: Any, code: str):
        self.client, self.code = client, code
        self.inside: list[float] = []
        self.cpu: list[float] = []
        self.spent: list[float] = []
        self.messages: list[tuple[int, int]] = []

    def __call__(self) -> None:
        sent = [0, 0]

        def count(message: dict) -> None:
            sent[0] += 1
            sent[1] += len(json.dumps(message["content"], default=str))
        reply = self.client.execute_interactive(self.code, timeout=900, output_hook=count,
                                                user_expressions={"cell": "_bench_cell"})
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"the cell failed: {reply['content']}")
        inside, cpu, spent = ast.literal_eval(reply["content"]["user_expressions"]["cell"]["data"]["text/plain"])
        self.inside.append(inside)
        self.cpu.append(cpu)
        self.spent.append(spent)
        self.messages.append((sent[0], sent[1]))


def kernel_cases(client: Any) -> dict[str, KernelCell]:
    """Cells of the embedded model run in a real IPython kernel (jupyter_client, no browser, as nbclient runs a
    notebook): the widget's messages are built, encoded and sent over ZeroMQ; timed from request to reply."""
    return {name: KernelCell(client, code) for name, code in KERNEL_CELLS.items()}


KERNEL_CELLS = {"lens_30_layers": LENS_CELL.format(flag=" --no-widget"),
                "lens_30_layers_inspected": LENS_CELL.format(flag=""),
                "generate_100": GENERATE_CELL.format(flag=" --no-widget"),
                "generate_100_inspected": GENERATE_CELL.format(flag="")}


KERNEL_DESCRIPTIONS = {
    "lens_30_layers": "%%trace: logit lens over SmolLM2's 30 blocks (150 nodes, 30 saved), --no-widget",
    "lens_30_layers_inspected": "the same cell with the inspector",
    "generate_100": "%%trace --generate --max-new-tokens 100, reads only tracer.result, --no-widget",
    "generate_100_inspected": "the same cell with the inspector (tokens so far shown live)",
}
KERNEL_TARGETS = (("lens_30_layers", 0.10), ("generate_100", 0.02))


def kernel_section(rounds: int = 12) -> None:
    """The targets: each round runs the four cells once in a shuffled order in the same kernel, so each widget
    cell is paired with its ``--no-widget`` cell of the same round (:func:`common.interleave`)."""
    from jupyter_client.manager import start_new_kernel

    root = __file__.rsplit("/bench/", 1)[0]
    environment = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       OMP_NUM_THREADS="1")
    load_before = os.getloadavg()
    manager, client = start_new_kernel(kernel_name="python3", env=environment)
    try:
        client.execute_interactive(KERNEL_SETUP, timeout=900, output_hook=lambda message: None)
        cases = kernel_cases(client)
        timings = common.interleave(cases, rounds=common.rounds(rounds), warmup=1, clock=time.perf_counter)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    load = " / ".join(f"{value:.2f}" for value in load_before)
    after = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    print("### In a real kernel: the embedded SmolLM2-135M, wall time from execute_request to execute_reply\n")
    print(f"Load average before: {load}; after: {after}. {len(timings['generate_100'])} paired rounds.\n")
    print(common.table(timings, {"lens_30_layers_inspected": "lens_30_layers",
                                 "generate_100_inspected": "generate_100"}, KERNEL_DESCRIPTIONS), "\n")
    rows, shares = [], []
    for case, share in KERNEL_TARGETS:
        baseline = common.summary(timings[case])["median_ms"]
        cost = common.paired_difference(timings[f"{case}_inspected"], timings[case])
        interval = common.paired_interval(timings[f"{case}_inspected"], timings[case])
        rows.append((f"inspector on {case} (wall)", cost, interval, share * baseline,
                     f"{case}_inspected − {case}; target: {100 * share:.0f} % of {case}'s median"))
        line = f"{case} {100 * cost / baseline:+.1f} % wall"
        for clock, what in (("inside", "time in the kernel, pre_run_cell to post_run_cell"),
                            ("cpu", "the same, CPU time of the kernel process")):
            plain = getattr(cases[case], clock)[1:]  # the warm-up run left out, as in `timings`
            inspected = getattr(cases[f"{case}_inspected"], clock)[1:]
            difference = common.paired_difference(inspected, plain)
            median = common.summary(plain)["median_ms"]
            rows.append((f"inspector on {case} ({clock})", difference, common.paired_interval(inspected, plain),
                         share * median, what))
            line += f", {100 * difference / median:+.1f} % {clock}"
        spent = cases[f"{case}_inspected"].spent[1:]
        own = common.summary(spent)["median_ms"]
        ordered = sorted(spent)
        rows.append((f"inspector's own code in {case}", own, None, share * baseline,
                     f"timed in the kernel around every inspector entry point, median of the rounds (fastest "
                     f"{1e3 * ordered[0]:.1f}, slowest {1e3 * ordered[-1]:.1f} ms)"))
        line += f"; its own code {100 * own / baseline:.2f} %"
        shares.append(line)
    print(common.targets_table(rows), "\n")
    print(f"Share of the cell's time: {'; '.join(shares)}.\n")
    lines = ["| cell | iopub messages | encoded KB |", "|---|---:|---:|"]
    for name, cell in cases.items():
        count, size = cell.messages[-1]
        lines.append(f"| {name} | {count} | {size / 1024:.1f} |")
    print("\n".join(lines), "\n")


# -------------------------------------------------------------------------------------------------- run
def main() -> None:
    if os.environ.get("BENCH_INSPECTOR_KERNEL_ONLY") == "1" or "--kernel" in sys.argv:
        kernel_section(int(os.environ.get("BENCH_INSPECTOR_ROUNDS", "12")))
        return
    print("## The live inspector's cost\n")
    with notebook_front_end():
        runs = tiny_cases()
        tiny = common.interleave(runs, rounds=common.rounds(120), warmup=3)
        counts = message_counts(runs)
        smollm2 = common.interleave(smollm2_cases(), rounds=common.rounds(8), warmup=1)
    print("### tiny: GPT-2 2 × 64 (generation), 12 × 64 (forward)\n")
    print(common.table(tiny, {"generate_inspected": "generate", "generate_unthrottled": "generate",
                              "forward_inspected": "forward"}, DESCRIPTIONS), "\n")
    print(counts, "\n")
    print("### smollm2: the embedded SmolLM2-135M\n")
    print(common.table(smollm2, {"generate_inspected": "generate"}, DESCRIPTIONS), "\n")
    print("### Target: the inspector costs < 5 % of a 100-step generation\n")
    rows, shares = [], []
    for name, timings in (("tiny", tiny), ("smollm2", smollm2)):
        baseline = common.summary(timings["generate"])["median_ms"]
        cost = common.paired_difference(timings["generate_inspected"], timings["generate"])
        interval = common.paired_interval(timings["generate_inspected"], timings["generate"])
        rows.append((f"inspector on {name}'s {NEW_TOKENS}-step generation", cost, interval, 0.05 * baseline,
                     "generate_inspected − generate; target: 5 % of generate's median"))
        shares.append(f"{name} {100 * cost / baseline:.1f} % (95 % CI {100 * interval[0] / baseline:+.1f} % to "
                      f"{100 * interval[1] / baseline:+.1f} %)")
    print(common.targets_table(rows), "\n")
    print(f"Share of the run: {'; '.join(shares)}. Every case was checked before timing: the tokens and the saved "
          "values are the same with and without the inspector.\n")
    kernel_section()


if __name__ == "__main__":
    common.entry_point(main)
