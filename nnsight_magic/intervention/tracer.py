"""``with model.trace(...)``: build an intervention graph, check it, then run it with the model.

In [1]: with net.trace(x) as tracer:
   ...:     h = net.layer1.output.save()             # read (zero-copy when saved)
   ...:     net.layer2.output[:, 0] = 0              # edit in place, applied while the model runs
   ...:     out = net.output.save()
In [2]: h.value, out.value                           # real tensors after the block

While the block runs, every operation on a proxy adds a node to ``tracer.graph`` and, when shapes are on (the
default), gets a fake value at once: ``h.shape`` is real, and a bad index raises at its line. When the block
ends the graph is checked (an edit that needs a later value raises ``OutOfOrderError``), then it runs: hooks on
the touched modules feed it as the model computes, and afterwards only saved values remain.

Several inputs are batched with ``tracer.invoke``; generation steps are addressed with ``tracer.iter[...]``,
``tracer.all()`` and ``tracer.next()``; ``tracer.cond`` / ``.else_()`` condition a block on a traced value;
``tracer.stop()`` ends the forward pass early.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from ..errors import annotate, user_location
from ..tracing.execution import DONE as DONE_STATE
from ..tracing.graph import Graph, StepSet
from ..tracing.node import Node, SourceLine, describe_fake, map_nodes, module_label, user_line
from ..tracing.proxy import Proxy
from ..tracing.shapes import ModuleScan, ShapeInference, shared_fake_mode
from .batching import narrow
from .cache import cache as build_cache
from .contexts import Conditional, IterationBlock, IterationIndexer, Invoker
from .ordering import check_order
from .parameters import ParameterValue
from .session import current_session
from .source_install import MARK as SOURCE_MARK, release_sources, use_source

BUILDING, RECORDED, RUNNING, DONE, FAILED = "building", "recorded", "running", "done", "failed"


def first_input(inputs: tuple[tuple, dict]) -> Any:
    """The first positional argument of a module call, or its first keyword argument if it has none."""
    args, kwargs = inputs
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise IndexError("the module was called without arguments, so it has no .input")


first_input.returns_view = True  # its value is part of the module's inputs: editing it edits the inputs
first_input.structural = True  # it only picks a part of its argument: safe to run on fake values for shapes


def replace_first_input(inputs: tuple[tuple, dict], value: Any) -> tuple[tuple, dict]:
    """``inputs`` with its first argument (see :func:`first_input`) replaced by ``value``."""
    args, kwargs = inputs
    if args:
        return (value,) + tuple(args[1:]), kwargs
    if kwargs:
        first = next(iter(kwargs))
        return args, {**kwargs, first: value}
    raise IndexError("the module was called without arguments, so it has no .input to set")


replace_first_input.structural = True


def retain_grad(tensor: torch.Tensor) -> None:
    """``tensor.retain_grad()`` on the real value (``h.retain_grad()`` in a trace that calls ``.backward()``)."""
    tensor.retain_grad()


def in_branch(value: Any) -> Any:
    """A module value read inside a ``tracer.cond`` branch: the same value, but it exists only if the branch runs.

    The module's value itself is shared with reads outside the branch; this node carries the condition, so a
    value saved in a branch that was not taken has no value after the run (its ``.value`` says why).
    """
    return value


in_branch.returns_view = True  # the very same object: an edit through it edits the module's value
in_branch.structural = True


class Tracer:
    """Builds one intervention graph for one model run; see the module docstring.

    Args:
        model: the :class:`~nnsight_magic.models.nnsight.NNsight` (or subclass) to trace.
        inputs, input_kwargs: the model's input; with none, use ``tracer.invoke(...)`` blocks.
        validate: compute fake values (shapes) while building and check the order before running. ``False``
            skips the fake-tensor pass; order problems are then found while the model runs.
        grad: keep autograd on during the run. By default it is on only if the trace calls ``.backward()``
            (saved values then carry no autograd graph, which saves a lot of memory).
        run_options: how the model runs (``{"generate": True, "max_new_tokens": 5}`` for generation).
        scan_only: build and check shapes, but never run the model (``model.scan``).
    """

    def __init__(self, model: Any, inputs: tuple = (), input_kwargs: dict | None = None, *, validate: bool = True,
                 grad: bool | None = None, run_options: dict | None = None, scan_only: bool = False):
        self.model = model
        self.origin = SourceLine.here()  # the user's `with model.trace(...)` line, for errors about the input
        self.validate = validate or scan_only
        self.graph = Graph(ShapeInference(model._module) if self.validate else None)
        self.keep_grad = grad
        self.run_options = run_options or {}
        self.scan_only = scan_only
        self.status = BUILDING
        self.observers: list[Any] = []
        self.invokes: list[Any] = []
        self._implicit = (tuple(inputs), dict(input_kwargs or {})) if inputs or input_kwargs else None
        self._current_invoke: int | None = None
        self._in_invoke = False
        self._scans: dict[Any, ModuleScan | None] = {}
        self._entries: dict[tuple, Proxy] = {}
        self._values: dict[tuple, Proxy] = {}
        self._call_cursor: dict[str, int] = {}
        self._step_cursor = 0
        self._grads: dict[tuple[int, int], Proxy] = {}
        self._backward_count = 0
        self._result: Proxy | None = None
        self._proxies: list[weakref.ref] = []
        self._saved: dict[int, list[weakref.ref]] = {}
        self._bridges: dict[tuple[int, int], Proxy] = {}
        self._branch_depth = 0  # open tracer.cond branches (see in_branch)
        self._parameters: dict[tuple[str, str], Proxy] = {}
        self._sources: list[tuple[str, Any]] = []  # (path, module) running rewritten while this trace exists
        self.session = current_session()
        self.session_index: int | None = None

    # ------------------------------------------------------------------------------------------ the block
    def __enter__(self) -> "Tracer":
        self.model._enter_tracer(self)
        if self.session is not None:
            self.session.building = self
        try:
            if self._implicit is not None:
                self._open_invoke(*self._implicit)
            for edit in self.model._edits:
                edit.replay(self)
        except BaseException:
            self.model._exit_tracer(self)
            if self.session is not None and self.session.building is self:
                self.session.building = None
            raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        if self._implicit is not None and self._in_invoke:
            self._close_invoke()
        self.model._exit_tracer(self)
        if self.session is not None and self.session.building is self:
            self.session.building = None
        if exc_type is not None:
            self._detach(None)
            self.status = FAILED
            return False
        try:
            self._finish_building()
        except BaseException:
            self._detach(None)
            self.status = FAILED
            raise
        self._dispatch()
        return False

    def _dispatch(self) -> None:
        """Hand the built graph to whoever runs it: now, at the end of a session, or never (a scan)."""
        from .backends import dispatch
        dispatch(self)

    # ---------------------------------------------------------------------------------------- the funnel
    def create_proxy(self, op: str, target: Any, args: tuple, kwargs: dict, *, meta: dict | None = None,
                     fake: Any = None, after: tuple = (), location: tuple[str, int] | None = None) -> Proxy:
        """Create a node from proxies and plain values (at the user's line) and return its proxy."""
        if self.status != BUILDING:
            building = self.session.building if self.session is not None else None
            if building is not None and building is not self:  # an earlier trace's value used in a later trace
                return building.create_proxy(op, target, args, kwargs, meta=meta, fake=fake, after=after,
                                             location=location)
            raise RuntimeError("this trace has already run; operations on its values belong inside the trace, or "
                               "use `.value` of saved results after it")
        filename, lineno = location or user_location()
        if args:
            args = self._to_nodes(args)
        if kwargs:
            kwargs = self._to_nodes(kwargs)
        node = self.graph.create_node(op, target, args, kwargs, filename=filename, lineno=lineno, meta=meta,
                                      fake=fake, after=after)
        if op == "call_function" and node.fake is None and getattr(target, "structural", False) and \
                self.graph.shape_inference is not None:
            node.fake = _structural_fake(node)
        proxy = Proxy(node, self)
        self._proxies.append(weakref.ref(proxy))
        return proxy

    def adopt(self, proxy: Proxy) -> None:
        """Track a proxy made outside the funnel (``x.name`` before it is used) so it is detached after the run."""
        self._proxies.append(weakref.ref(proxy))

    def _to_nodes(self, value: Any) -> Any:
        if isinstance(value, Proxy):
            return self._node_of(value)
        if isinstance(value, (tuple, list)):
            items = [self._to_nodes(item) for item in value]
            if isinstance(value, list):
                return items
            return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
        if isinstance(value, dict):
            return {key: self._to_nodes(item) for key, item in value.items()}
        if isinstance(value, slice):
            return slice(self._to_nodes(value.start), self._to_nodes(value.stop), self._to_nodes(value.step))
        return value

    def _node_of(self, proxy: Proxy) -> Node | Any:
        if proxy._tracer is self:
            return proxy.node
        if proxy._tracer is None:
            return proxy.value  # a saved value of a finished trace is just a value; an unsaved one raises
        if self.session is not None and proxy._tracer.session is self.session:
            return self.session.bridge(proxy, self).node
        raise RuntimeError(f"{proxy._label()} belongs to another trace that has not run yet; to use values across "
                           "traces, put both traces in a session (`with model.session():`)")

    # --------------------------------------------------------------------------------- module values (Envoy)
    def _key(self, path: str, kind: str, invoke: Any = "current") -> tuple:
        stack = self.graph._section_stack
        section = stack[-1] if stack else None
        step = self._step_cursor if section is None else None
        if invoke == "current":
            invoke = None if self._implicit is not None else self._current_invoke  # one input: the whole batch
        return (path, kind, self._call_cursor.get(path, 0), step, section, invoke)

    def call_key(self, path: str, kind: str) -> tuple:
        """The module call a value read now belongs to: ``(path, kind, call, step, block, invoke)``, what
        ``.output`` and ``attn.pattern`` are keyed by (the call count, the step or iteration block, the invoke)."""
        return self._key(path, kind)

    def first_step(self, key: tuple) -> int | None:
        """The generation step whose scan gives the fake values of ``key``'s call: its step, or its block's first."""
        step, section = key[3], key[4]
        return step if section is None else self.graph.sections[section].steps.first

    def module_value(self, path: str, kind: str) -> Proxy:
        """The proxy for ``.output`` / ``.inputs`` / ``.input`` of the module at ``path`` (latest assignment)."""
        key = self._key(path, kind)
        proxy = self._values.get(key)
        if proxy is None:
            if kind == "input":  # derived from the current inputs, which an assignment may have replaced
                proxy = self.create_proxy("call_function", first_input, (self.module_value(path, "inputs"),), {})
            else:
                proxy = self._original(key)
            self._values[key] = proxy
        if self._branch_depth:
            return self.create_proxy("call_function", in_branch, (proxy,), {})
        return proxy

    def _original(self, key: tuple) -> Proxy:
        """The value of ``key`` as the model produces it, before any assignment in this trace."""
        path, kind, call, step, section, invoke = key
        if kind == "input":
            return self.create_proxy("call_function", first_input, (self._original((*key[:1], "inputs", *key[2:])),), {})
        entry = self._entries.get(key)
        if entry is None:
            if SOURCE_MARK in path:
                use_source(self, path)
            op = "module_output" if kind == "output" else "module_inputs"
            meta = {"call": call, "step": step or 0, "invoke": invoke}
            first_step = step if section is None else self.graph.sections[section].steps.first  # first_step(key)
            entry = self.create_proxy(op, path, (), {}, meta=meta,
                                      fake=self._entry_fake(op, path, call, invoke, first_step) if self.validate
                                      else None)
            self._entries[key] = entry
        return entry

    def set_module_value(self, path: str, kind: str, value: Any) -> None:
        """``envoy.output = value`` and friends: replace the module's value for the rest of the model run."""
        key = self._key(path, kind)
        if kind == "input":
            inputs_key = self._key(path, "inputs")
            value = self.create_proxy("call_function", replace_first_input, (self.module_value(path, "inputs"), value), {})
            key, kind = inputs_key, "inputs"
        elif kind == "inputs" and not (isinstance(value, (tuple, list)) and len(value) == 2):
            raise TypeError(f"{user_line()}: assign `.inputs` an `(args, kwargs)` pair")
        original = self._original(key)
        check_replacement(original, value, f"{module_label(path)}.{kind}")
        swap = self.create_proxy("swap", None, (original, value), {})
        self._values[key] = swap
        if kind == "inputs":
            self._values.pop((*key[:1], "input", *key[2:]), None)

    def skip_module(self, path: str, value: Any) -> None:
        """``envoy.skip(value)``: the module's current call does not run; its output is ``value``."""
        self.set_module_value(path, "output", value)
        self._values[self._key(path, "output")].node.meta["skip"] = True

    def parameter_value(self, path: str, name: str, kind: str) -> Proxy:
        """``envoy.weight`` in a trace: a proxy of this run's parameter (or buffer); see :mod:`.parameters`.

        One node per parameter, outside iteration blocks, so every read and edit in the trace sees the same tensor.
        """
        key = (path, name)
        proxy = self._parameters.get(key)
        if proxy is None:
            with self.graph.outside_sections():
                proxy = self.create_proxy("call_function", ParameterValue(path, name, kind), (), {})
            if self.graph.shape_inference is not None:
                with shared_fake_mode():
                    proxy.node.fake = shared_fake_mode().from_tensor(
                        proxy.node.target.tensor(self.model._module).detach())
            if not self._branch_depth:  # one read inside a branch exists only if the branch runs
                self._parameters[key] = proxy
        return proxy

    def set_parameter(self, path: str, name: str, kind: str, value: Any) -> None:
        """``envoy.weight = value`` in a trace: this run's copy of the parameter takes ``value`` (``w[...] = value``)."""
        self.parameter_value(path, name, kind)[...] = value

    def advance_call(self, path: str, calls: int = 1) -> None:
        """Later reads of the module at ``path`` refer to its call after the current one."""
        self._call_cursor[path] = self._call_cursor.get(path, 0) + calls

    def apply_module(self, path: str, args: tuple, kwargs: dict) -> Proxy:
        """Call the module at ``path`` on (traced) values; neither its hooks nor ours fire."""
        return self.create_proxy("apply_module", path, args, kwargs)

    def _changed_values(self, before: dict) -> dict:
        """Module values assigned inside a condition's branch since ``before``."""
        return {key: value for key, value in self._values.items()
                if before.get(key) is not value and value.node.branch is not None}

    def _merge_values(self, condition: Proxy, start: dict, then: dict, otherwise: dict) -> None:
        """After a condition: each module value assigned in a branch is the branch's value if it ran."""
        for key in {**then, **otherwise}:
            base = start[key] if key in start else self._original(key)
            self._values[key] = self.create_proxy(
                "merge", None, (condition, then.get(key, base), otherwise.get(key, base)), {})

    # ------------------------------------------------------------------------------------------- proxies
    def call_method(self, proxy: Proxy, name: str, args: tuple, kwargs: dict,
                    location: tuple[str, int] | None = None) -> Proxy:
        """``proxy.name(*args, **kwargs)``; ``.backward()`` also numbers the backward pass for ``.grad``."""
        if name == "retain_grad" and not args and not kwargs:
            # a fake value never requires grad (shapes are computed without autograd): run it on real ones only
            return self.create_proxy("call_function", retain_grad, (proxy,), {}, location=location)
        if name != "backward":
            return self.create_proxy("call_method", name, (proxy, *args), kwargs, location=location)
        index = self._backward_count
        self._backward_count += 1
        targets = tuple(grad.node.args[0].index for (_, backward), grad in self._grads.items() if backward == index)
        return self.create_proxy("call_method", name, (proxy, *args), kwargs, meta={"backward": index},
                                 after=targets, location=location)

    def grad_of(self, proxy: Proxy) -> Proxy:
        """``proxy.grad``: the gradient of ``proxy`` in the next ``.backward()`` (or its assigned value)."""
        key = (proxy.node.index, self._backward_count)
        grad = self._grads.get(key)
        if grad is None:
            grad = self.create_proxy("grad", None, (proxy,), {}, meta={"backward": key[1]}, fake=proxy.node.fake)
            self._grads[key] = grad
        return self._values.get(("grad",) + key, grad)

    def set_grad(self, proxy: Proxy, value: Any) -> None:
        self.grad_of(proxy)  # the gradient as autograd computes it, which the assignment replaces
        key = (proxy.node.index, self._backward_count)
        self._values[("grad",) + key] = self.create_proxy("swap", None, (self._grads[key], value), {})

    def update(self, proxy: Proxy, value: Any) -> Proxy:
        return self.create_proxy("update", None, (proxy, value), {})

    # ------------------------------------------------------------------------------------- the public API
    def invoke(self, *inputs: Any, **kwargs: Any) -> Invoker:
        """One input of a batched forward pass (``with tracer.invoke("text"):``); no input: the whole batch."""
        return Invoker(self, inputs, kwargs)

    def cond(self, value: Any) -> Conditional:
        """A block that runs only if ``value`` is true when the model produces it (``with tracer.cond(x):``)."""
        return Conditional(self, value)

    def merge(self, condition: Conditional, if_true: Any, if_false: Any) -> Proxy:
        """After ``tracer.cond``: ``if_true`` if the condition held when the model ran, else ``if_false``.

        This is how a ``%%trace`` cell's ``if`` gives a name the value of the branch that ran:
        ``x = tracer.merge(condition, x_from_if_branch, x_from_else_branch)``. Either side may be a plain value.
        """
        return self.create_proxy("merge", None, (condition.proxy, if_true, if_false), {})

    @property
    def iter(self) -> IterationIndexer:
        """``tracer.iter[2]``, ``tracer.iter[1:4]``, ``tracer.iter[[0, 2]]``: blocks run at those generation steps."""
        return IterationIndexer(self)

    def all(self) -> IterationBlock:
        """A block that runs at every generation step (``tracer.iter[:]``)."""
        return IterationBlock(self, StepSet(slice(None)))

    def next(self, steps: int = 1) -> "Tracer":
        """Later module reads refer to the next generation step (nnsight 0.2/0.3 style)."""
        self._step_cursor += steps
        return self

    def stop(self) -> Proxy:
        """End the model run once every node created before this line has run."""
        return self.create_proxy("stop", None, (), {}, after=tuple(range(len(self.graph.nodes))))

    def apply(self, function: Callable, *args: Any, **kwargs: Any) -> Proxy:
        """``function(*args, **kwargs)`` on the real values, when they exist."""
        return self.create_proxy("call_function", function, args, kwargs)

    def log(self, *values: Any, **kwargs: Any) -> Proxy:
        """``print(*values)`` when the values exist (at that point of the model run)."""
        return self.create_proxy("log", print, values, kwargs)

    def cache(self, modules: Any = None, include_inputs: bool = False, device: Any = None,
              dtype: Any = None) -> Proxy:
        """Every module's output in this run, saved: ``cache.value["transformer.h.0"]`` (see :mod:`.cache`).

        ``modules=`` names the modules (paths or Envoys; default: every module that runs), ``include_inputs=True``
        adds ``cache.value.inputs[path]`` (``(args, kwargs)``), ``device=`` / ``dtype=`` store converted copies. In
        generation each entry is a list with one value per step.
        """
        return build_cache(self, modules, include_inputs, device, dtype)

    def list(self) -> Proxy:
        """A traced list: ``acc.append(x)`` inside invokes, steps and session traces; save it to keep it."""
        return self.create_proxy("new_list", list, (), {})

    @property
    def result(self) -> Proxy:
        """What the model run returned (the generated token ids for ``generate``)."""
        if self._result is None:
            scan = self._scans.get(self._scan_key(None)) if self.validate else None
            self._result = self.create_proxy("result", None, (), {}, fake=getattr(scan, "result", None))
        return self._result

    # ------------------------------------------------------------------------------------------- invokes
    def _open_invoke(self, inputs: tuple, kwargs: dict) -> int | None:
        if self.status != BUILDING:
            raise RuntimeError("this trace has already run: open invokes inside its `with` block")
        if self._implicit is not None and self.invokes:
            raise RuntimeError("this trace was given its input directly; use `with model.trace() as tracer:` "
                               "and one `tracer.invoke(input)` per input to batch several inputs")
        if self._in_invoke:
            raise RuntimeError("invokes cannot be nested: close the current `with tracer.invoke(...)` first")
        self._in_invoke = True
        if not inputs and not kwargs:
            self._current_invoke = None  # an invoke without input sees the whole batch
            return None
        self.invokes.append(self.model._prepare_input(*inputs, **kwargs))
        self._current_invoke = len(self.invokes) - 1
        return self._current_invoke

    def _close_invoke(self) -> None:
        self._in_invoke = False
        self._current_invoke = None

    # ---------------------------------------------------------------------------------------------- shapes
    def scan_with_source(self, operation_path: str) -> None:
        """Run this trace's scan with the forward around the operation at ``operation_path`` rewritten, so the
        operation learns which function it calls (``attn.source.attention_interface_0.source``)."""
        if self.validate and self.invokes:
            use_source(self, operation_path)
            self._scan(None if len(self.invokes) == 1 else self._current_invoke)

    def _scan_key(self, invoke: int | None) -> Any:
        if invoke is not None or len(self.invokes) == 1:
            return 0 if invoke is None else invoke
        return ("batch", len(self.invokes))

    def _scan(self, invoke: int | None, step: int = 0) -> ModuleScan | None:
        """The scan of ``invoke``'s input (``None``: the whole batch) at generation step ``step``."""
        key = self._scan_key(invoke)
        slot = (key, step) if step else key
        if slot not in self._scans:
            if not self.invokes:
                return None
            prepared = self.invokes[key] if isinstance(key, int) else self.model._batch_inputs(self.invokes)[0]
            self._scans[slot] = self.model._scan(prepared, self.run_options, step)
        return self._scans[slot]

    def _entry_fake(self, op: str, path: str, call: int, invoke: int | None, step: int = 0) -> Any:
        if not self.validate:
            return None
        scan = self._scan(invoke, step)
        if scan is None:
            return None
        return scan.output(path, call) if op == "module_output" else scan.input(path, call)

    def _refresh_shapes(self) -> None:
        """With several invokes, give whole-batch and padded values their final shapes, and re-check the graph."""
        module_values = [node for node in self.graph.entries() if node.op in ("module_output", "module_inputs")]
        if len(self.invokes) < 2 and all(node.fake is not None for node in module_values):
            return
        changed = False
        for node in module_values:
            invoke = node.meta.get("invoke")
            if invoke is not None and not self.model._batching_changes_shapes:
                continue
            fake = self._final_entry_fake(node)
            if fake is not None and _signature(fake) != _signature(node.fake):
                node.fake = fake
                changed = True
        if changed and self.graph.shape_inference is not None:
            for node in self.graph.nodes:
                if not node.is_entry:
                    node.fake = self.graph.shape_inference.infer(node)
                    if node.fake is None and getattr(node.target, "structural", False):
                        node.fake = _structural_fake(node)

    def _final_entry_fake(self, node: Node) -> Any:
        section = node.section
        step = node.meta.get("step", 0) if section is None else self.graph.sections[section].steps.first
        scan = self._scan(None, step)
        if scan is None:
            return None
        path, call = node.target, node.meta.get("call", 0)
        value = scan.output(path, call) if node.op == "module_output" else scan.input(path, call)
        invoke = node.meta.get("invoke")
        if value is None or invoke is None or len(self.invokes) < 2:
            return value
        start = sum(prepared.batch_size for prepared in self.invokes[:invoke])
        total = sum(prepared.batch_size for prepared in self.invokes)
        with scan.fake_mode:
            return narrow(value, start, self.invokes[invoke].batch_size, total)

    # ------------------------------------------------------------------------------------- finishing
    def _finish_building(self) -> None:
        for (index, backward), grad in self._grads.items():
            if backward >= self._backward_count:
                raise annotate(RuntimeError(
                    f"{grad.node.describe()} is read, but no `.backward()` follows it in this trace: read `.grad` "
                    "before the `.backward()` call it belongs to"), grad.node)
        if not self.invokes and any(node.op in ("module_output", "module_inputs", "result")
                                    for node in self.graph.nodes):
            raise ValueError("this trace has no input: pass one to `model.trace(input)` or open "
                             "`with tracer.invoke(input):` blocks")
        nodes = self.graph.nodes
        for root in self.graph.writes.values():
            if isinstance(nodes[root].target, ParameterValue) and nodes[root].op == "call_function":
                nodes[root].meta["edited_parameter"] = True  # this run edits a copy; the model keeps its own
        if self.validate:
            self._refresh_shapes()
            scan = next((scan for scan in self._scans.values() if scan is not None), None)
            if scan is not None:
                check_order(self.graph, _entry_position(scan, self.graph))

    @property
    def needs_grad(self) -> bool:
        """Autograd stays on if asked to, or if the trace calls ``.backward()``."""
        return bool(self.keep_grad) or (self.keep_grad is None and self._backward_count > 0)

    def _detach(self, execution: Any) -> None:
        """After the run: saved proxies get their values; no proxy keeps this tracer alive any longer."""
        state, values = (execution.state, execution.values) if execution is not None else ((), ())
        saved, set_slot = self._saved, object.__setattr__
        for reference in self._proxies:
            proxy = reference()
            if proxy is None:
                continue
            node = proxy._node
            if execution is not None and node is not None and node.saved and state[node.index] == DONE_STATE:
                set_slot(proxy, "_value", values[node.index])
                saved.setdefault(node.index, []).append(reference)
            set_slot(proxy, "_tracer", None)
        self._proxies = []
        if self._sources:
            release_sources(self)
        # the build-time tables hold proxies (and so their values): a finished tracer keeps no value alive
        self._entries.clear()
        self._values.clear()
        self._grads.clear()
        self._result = None

    @property
    def bridges(self) -> dict[tuple[int, int], Proxy]:
        """Values this trace receives from earlier traces of its session: ``(trace, node) -> bridge proxy``."""
        return dict(self._bridges)

    def saved_proxies(self, index: int) -> list[Proxy]:
        """The live proxies that received the saved value of node ``index`` after the run."""
        return [proxy for proxy in (reference() for reference in self._saved.get(index, ())) if proxy is not None]

    def __repr__(self) -> str:
        return f"<Tracer {self.status}: {len(self.graph.nodes)} nodes, {len(self.invokes)} invoke(s)>"


def check_replacement(original: Proxy, value: Any, label: str) -> None:
    """Refuse, at the user's line, a replacement that cannot stand for a module's value.

    ``None`` never can (to PyTorch a hook returning ``None`` means "no change", so it would be silently
    ignored); when the original's fake value is known, a tensor must be replaced by a tensor and a tuple or list
    by a tuple or list.
    """
    if value is None:
        raise TypeError(f"{user_line()}: {label} cannot be replaced by None (the model would silently keep its "
                        "value); assign a tensor, e.g. `torch.zeros_like(...)`, or edit it in place")
    fake = original.node.fake
    if fake is None:
        return
    replacement = value.node.fake if isinstance(value, Proxy) else value
    if replacement is None and isinstance(value, Proxy):
        return  # not known while building: checked when the model runs
    expected = torch.Tensor if isinstance(fake, torch.Tensor) else (tuple, list) if isinstance(fake, (tuple, list)) \
        else None
    if expected is not None and not isinstance(replacement, expected):
        kind = "a tensor" if expected is torch.Tensor else "a tuple or list"
        raise TypeError(f"{user_line()}: {label} is {kind} ({describe_fake(fake)}), so it must be replaced by "
                        f"{kind}, not {type(replacement).__name__}")


def _structural_fake(node: Node) -> Any:
    """The fake value of a node whose function only picks or rearranges parts of its arguments (``.input``).

    Such functions are safe on fake values. One that fails here (a module called without arguments has no
    ``.input``) is left without a shape; the run raises the same error at the user's line.
    """
    unknown = False

    def fake_of(argument: Node) -> Any:
        nonlocal unknown
        unknown = unknown or argument.fake is None
        return argument.fake

    args = map_nodes(fake_of, node.args)
    kwargs = map_nodes(fake_of, node.kwargs)
    if unknown:
        return None
    try:
        return node.target(*args, **kwargs)
    except Exception:
        return None


def _signature(fake: Any) -> Any:
    if isinstance(fake, torch.Tensor):
        return (tuple(fake.shape), fake.dtype)
    if isinstance(fake, (tuple, list)):
        return tuple(_signature(item) for item in fake)
    if isinstance(fake, dict):
        return tuple((key, _signature(item)) for key, item in fake.items())
    return type(fake)


def _entry_position(scan: ModuleScan, graph: Graph) -> Callable[[Node], float | None]:
    """Place each entry in the run: (generation step, hook event) flattened into one number."""
    width = len(scan.order) + 1

    def position(node: Node) -> float | None:
        if node.op in ("module_output", "module_inputs"):
            kind = "output" if node.op == "module_output" else "input"
            event = scan.order.get((node.target, kind, node.meta.get("call", 0)))
            if event is None:
                return None
            step = graph.sections[node.section].steps.first if node.section is not None else node.meta.get("step", 0)
            return step * width + event
        if node.op == "iteration":
            return graph.sections[node.section].steps.first * width - 0.5
        if node.op == "bridge":
            return -1.0
        return float("inf")  # grads and the run's result come after the forward pass

    return position
