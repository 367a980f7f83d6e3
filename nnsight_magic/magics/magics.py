"""``%%trace``, ``%%session`` and ``%session``: the notebook face of the intervention engine.

In [1]: %load_ext nnsight_magic
In [2]: %%trace net x
   ...: h = net.layer1.output            # a tensor in the notebook once the cell ran
In [3]: %config TraceMagics.widget = False

One :class:`TraceMagics` instance per shell holds the options (traitlets, visible to ``%config`` and to
``ipython_config.py`` as ``c.TraceMagics.widget``) and the session that spans cells, if one is open.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand, output_can_be_silenced
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import display
from traitlets import Bool, TraitError, Unicode, validate

import torch

from ..intervention.session import Session
from ..intervention.tracer import Tracer
from ..models.nnsight import NNsight
from . import runtime
from .bindings import CellBindings
from .cell_code import compile_cell, current_cell_number, split_arguments, trim_to_user_code
from .notebook_session import OPEN, NotebookSession
from .rewrite import RESULT_NAME, RUNTIME


@magics_class
class TraceMagics(Magics):
    """The extension's magics and options; ``%load_ext nnsight_magic`` registers one per shell."""

    widget = Bool(True, help="Show the graph inspector under every %%trace cell (off: --no-widget).").tag(config=True)
    autosave = Bool(True, help="Save every traced value a %%trace cell assigns at its top level and bind the "
                               "name to the real value after the run (off: --no-autosave).").tag(config=True)

    memory_warning = Unicode("2GB", help="Warn in the inspector's header when a trace's saved values or its largest "
                                         "value will hold more than this (from shapes, before the run): "
                                         "'2GB', '512MiB'; '' for never.").tag(config=True)

    @validate("memory_warning")
    def _check_memory_warning(self, proposal: Any) -> str:
        from ..widgets.forecast import parse_bytes
        try:
            if proposal["value"]:
                parse_bytes(proposal["value"])
        except ValueError as error:
            raise TraitError(str(error)) from None
        return proposal["value"]

    def __init__(self, shell: Any = None, **kwargs: Any):
        super().__init__(shell=shell, **kwargs)
        self.notebook_session: NotebookSession | None = None
        self.last_session: NotebookSession | None = None

    # --------------------------------------------------------------------------------------------- %%trace
    @magic_arguments(name="%trace")
    @argument("model", metavar="MODEL", help="the model: a Python expression (`net`, `lm`) naming an NNsight or LanguageModel")
    @argument("inputs", nargs="*", metavar="INPUT",
              help="the model's input(s): Python expressions (`x`, `\"a prompt\"`, `ids[:, :5]`); none: use "
                   "`with tracer.invoke(...)` blocks in the body")
    @argument("--generate", action="store_true", help="generate tokens (`model.generate`) instead of one forward pass")
    @argument("--max-new-tokens", type=int, metavar="N", help="how many tokens --generate produces")
    @argument("--scan", action="store_true", help="build the graph and show shapes; do not run the model")
    @argument("--no-widget", action="store_true", help="do not show the graph inspector")
    @argument("--no-autosave", action="store_true", help="bind traced names to proxies; only `.save()` keeps values")
    @argument("--tracer", default="tracer", metavar="NAME", help="the name the tracer has in the body (default: tracer)")
    @no_var_expand
    @output_can_be_silenced
    @cell_magic
    def trace(self, line: str, cell: str) -> Any:
        """Run a cell of intervention code with a model: read and change its values while it runs.

        In [1]: %%trace net x
           ...: h = net.layer1.output                 # a proxy while the cell builds, a tensor afterwards
           ...: net.layer2.output[:, 0] = 0           # an edit, applied while the model runs
           ...: if h.sum() > 0:                       # `if` on a traced value: decided when the model runs
           ...:     print("positive:", h.sum())       # printed then, with the real value
           ...: out = net.output

        In [2]: %%trace lm "The Eiffel Tower is in" --generate --max-new-tokens 3
           ...: for step in tracer.iter[0:3]:          # each generation step
           ...:     print(lm.lm_head.output[0, -1].argmax())
           ...: ids = tracer.result

        In [3]: %%trace net                           # no input: one invoke per input, batched
           ...: with tracer.invoke(a):
           ...:     ha = net.layer1.output
           ...: with tracer.invoke(b):
           ...:     net.layer1.output[:] = ha          # patch b's run with a's values

        MODEL and each INPUT are Python expressions evaluated in the notebook, separated by spaces (write
        `(a + b)` for an expression with spaces outside brackets and quotes). The body is Python run while
        the graph is built; `tracer` (or --tracer NAME) is bound in it. Every name the cell assigns at its top
        level whose value is traced is saved and, after the run, bound to the real value (names starting with
        `_` are not; --no-autosave or `%config TraceMagics.autosave = False` turn this off). `if`/`elif`/`else`
        and `and`/`or`/`not` on traced values, `for` over `tracer.iter[...]`, `tracer.all()` or a traced
        value, `a, b = traced`, `print(...)` and f-strings of traced values become graph code; plain Python
        stays Python. A last expression is shown as the cell's output, computed by the model.

        Errors keep their type and name the cell line (`IndexError: line 3 ...`), before the model runs when
        shapes show the problem; the model is left without hooks and names from earlier cells keep their
        values. Inside `%session start` ... `%session run` the cell is recorded instead of run.
        """
        __tracebackhide__ = True
        args = self._parse(self.trace, line)
        model = self._evaluate(args.model, "MODEL")
        inputs = [self._evaluate(expression, "INPUT") for expression in args.inputs]
        self._check_trace_arguments(args, model)
        code = compile_cell(self.shell, f"%%trace {line.strip()}", cell)
        session = self.notebook_session  # a --scan cell may read earlier cells' values, but is not recorded
        autosave = self.autosave and not args.no_autosave
        namespace = self.shell.user_ns
        names = code.rewritten.assigned if autosave else []
        bindings = CellBindings(namespace, code.rewritten.referenced)
        namespace[RUNTIME] = runtime
        if session is not None:
            session.session.activate()
        try:
            tracer = self._tracer(model, inputs, args)
            if self.widget and not args.no_widget:
                self._inspect(tracer, f"%%trace {line.strip()}", self.memory_warning)
            namespace[args.tracer] = tracer
            with tracer:
                with runtime.printing_into(tracer):
                    exec(code.code, namespace)
                bindings.save_traced(names + [RESULT_NAME], lambda proxy: proxy.tracer is tracer, containers=autosave)
        except BaseException as error:
            bindings.restore()
            trim_to_user_code(error, code.filename, self.shell)
            raise
        finally:
            if session is not None:
                session.session.deactivate()
            for helper in code.rewritten.helpers:
                namespace.pop(helper, None)
        if args.scan:
            return namespace.pop(RESULT_NAME, None)  # proxies with shapes: nothing ran
        if session is not None:
            bindings.settle()
            session.record(current_cell_number(self.shell), code.source, tracer, bindings)
            namespace.pop(RESULT_NAME, None)
            print(f"recorded as cell {len(session.cells)} of the open session: `%session run` runs it")
            return None
        bindings.bind()
        return namespace.pop(RESULT_NAME, None)

    def _check_trace_arguments(self, args: Any, model: Any) -> None:
        if not isinstance(model, NNsight):
            if isinstance(model, torch.nn.Module):
                raise UsageError(f"%%trace: MODEL `{args.model}` is a {type(model).__name__}, which cannot be traced; "
                                 "wrap it first: `net = NNsight(module)` or `lm = LanguageModel(hf_model, "
                                 "tokenizer=tok)`")
            raise UsageError(f"%%trace: MODEL `{args.model}` is a {type(model).__name__}, not a model: the first word "
                             "of `%%trace` is the model (an NNsight or LanguageModel, e.g. `net = NNsight(module)`), "
                             "the inputs follow it: `%%trace net x`")
        if not args.tracer.isidentifier():
            raise UsageError(f"%%trace: --tracer needs a Python name, not `{args.tracer}`")
        if args.max_new_tokens is not None and not args.generate:
            raise UsageError("%%trace: --max-new-tokens goes with --generate")
        if args.generate and args.scan:
            raise UsageError("%%trace: --scan checks one forward pass; drop --generate to scan")
        if args.generate and not callable(getattr(model, "generate", None)):
            raise UsageError(f"%%trace: --generate needs a model that generates (a LanguageModel); `{args.model}` "
                             f"is a {type(model).__name__}")

    @staticmethod
    def _tracer(model: Any, inputs: list, args: Any) -> Tracer:
        if args.scan:
            return model.scan(*inputs)
        if args.generate:
            options = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
            return model.generate(*inputs, **options)
        return model.trace(*inputs)

    @staticmethod
    def _inspect(tracer: Tracer, title: str, memory_warning: str) -> None:
        """Show the graph inspector for ``tracer`` (it adds itself to ``tracer.observers``), headed by the cell's
        first line; it warns when the trace will hold more than ``memory_warning`` (``"2GB"``)."""
        from ..widgets import GraphInspector
        from ..widgets.forecast import parse_bytes
        GraphInspector(tracer, title=title, memory_warning=parse_bytes(memory_warning) if memory_warning else None)

    # ------------------------------------------------------------------------------------------- %%session
    @magic_arguments(name="%session")
    @argument("--no-autosave", action="store_true", help="bind traced names to proxies; only `.save()` keeps values")
    @no_var_expand
    @output_can_be_silenced
    @cell_magic("session")
    def session_cell(self, line: str, cell: str) -> Any:
        """Run several traces, and Python loops around them, as one session at the end of the cell.

        In [1]: %%session
           ...: with net.trace(a):
           ...:     h = net.layer1.output              # saved automatically (a top-level name)
           ...: outs = []
           ...: for scale in (1, 2):
           ...:     with net.trace(b):
           ...:         net.layer1.output[:] = h * scale   # `h` from the first trace (a bridge)
           ...:         outs.append(net.output)
        In [2]: h.shape, outs[1]                     # real tensors: every trace ran, in order, at the cell's end

        The body is rewritten like a `%%trace` body (`if` on traced values, `print`, unpacking). If the body or
        a trace fails, nothing is bound and names from earlier cells keep their values.
        """
        __tracebackhide__ = True
        args = self._parse(self.session_cell, line)
        if self.notebook_session is not None:
            raise UsageError("%%session: a session spanning cells is open (`%session start`); `%%trace` cells join "
                             "it. Run it with `%session run` or drop it with `%session discard` first")
        code = compile_cell(self.shell, f"%%session {line.strip()}".rstrip(), cell)
        namespace = self.shell.user_ns
        names = code.rewritten.assigned if self.autosave and not args.no_autosave else []
        bindings = CellBindings(namespace, code.rewritten.referenced)
        namespace[RUNTIME] = runtime
        session = Session()
        try:
            session.activate()
            try:
                exec(code.code, namespace)
            finally:
                session.deactivate()
                for helper in code.rewritten.helpers:
                    namespace.pop(helper, None)
            bindings.save_traced(names + [RESULT_NAME], lambda proxy: proxy.tracer is not None and
                                 proxy.tracer.session is session, containers=bool(names))
            session.run()
        except BaseException as error:
            if session.status == OPEN:
                session.discard()
            bindings.restore()
            trim_to_user_code(error, code.filename, self.shell)
            raise
        bindings.bind()
        return namespace.pop(RESULT_NAME, None)

    # -------------------------------------------------------------------------------------------- %session
    @no_var_expand
    @line_magic("session")
    def session_line(self, line: str) -> None:
        """A session that spans cells: `%session start`, then `%%trace` cells, then `%session run`.

        In [1]: %session start                    # later %%trace cells are recorded, not run
        In [2]: %%trace net a
           ...: h = net.layer1.output             # a proxy until the session runs
        In [3]: %%trace net b
           ...: net.layer1.output[:] = h          # a value of cell 2 (a bridge between the traces)
           ...: out = net.output
        In [4]: %session run                      # every recorded cell runs, in order; h and out are tensors

        `%session` shows the open session (its cells and their saved names), `%session discard` drops it
        without running anything. A cell that fails while it is built is not recorded; the cells before it
        stay. If `%session run` fails, the cells that ran keep their values and the error names the cell.
        """
        __tracebackhide__ = True
        command = line.strip()
        if command == "":
            self._show_session()
        elif command == "start":
            if self.notebook_session is not None:
                raise UsageError(f"%session start: a session is already open ({len(self.notebook_session.cells)} "
                                 "cells); `%session run` or `%session discard` it first")
            self.notebook_session = NotebookSession()
            print("session started: the next %%trace cells are recorded; `%session run` runs them in order")
        elif command in ("run", "discard"):
            notebook_session = self.notebook_session
            if notebook_session is None:
                raise UsageError(f"%session {command}: no session is open; start one with `%session start`")
            self.notebook_session = None
            self.last_session = notebook_session
            if command == "discard":
                notebook_session.discard()
                print(f"session discarded: {len(notebook_session.cells)} recorded cell(s) dropped")
                return
            notebook_session.run()
            print(f"session ran: {len(notebook_session.cells)} cell(s)")
        else:
            raise UsageError(f"%session: unknown command `{command}`; use `%session start`, `%session run`, "
                             "`%session discard`, or `%session` to show the open session")

    def _show_session(self) -> None:
        shown = self.notebook_session or self.last_session
        if shown is None:
            print("no session is open: `%session start` opens one")
            return
        if shown is not self.notebook_session:
            print("no session is open; the last one:")
        print(shown.summary())
        if self.widget:
            from ..widgets import SessionView
            display(SessionView(shown))

    # ------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _parse(magic: Any, line: str) -> Any:
        return magic.parser.parse_args(split_arguments(line))

    def _evaluate(self, expression: str, role: str) -> Any:
        __tracebackhide__ = True
        try:
            return eval(expression, self.shell.user_ns)
        except Exception as error:
            error.add_note(f"while evaluating the %%trace {role} `{expression}`")
            raise error.with_traceback(None) from None  # the eval's own frame has no source to show

    def close(self) -> None:
        """Drop an open session (the extension is being unloaded)."""
        if self.notebook_session is not None:
            self.notebook_session.discard()
            self.notebook_session = None
