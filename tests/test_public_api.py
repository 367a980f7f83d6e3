"""The public surface users and notebooks rely on (../shared/API.md): pinned, so a change is deliberate."""

from __future__ import annotations

import inspect

import nnsight_magic
from nnsight_magic import LanguageModel, NNsight


def test_the_exported_names_are_the_documented_ones():
    assert sorted(nnsight_magic.__all__) == sorted([
        "LanguageModel", "NNsight", "OutOfOrderError", "load_embedded_model", "load_ipython_extension",
        "unload_ipython_extension"])
    for name in nnsight_magic.__all__:
        assert getattr(nnsight_magic, name) is not None


def test_the_model_entry_points_keep_their_signatures():
    assert list(inspect.signature(NNsight.trace).parameters) == ["self", "inputs", "validate", "grad", "kwargs"]
    assert list(inspect.signature(NNsight.edit).parameters) == ["self", "inplace"]
    assert list(inspect.signature(LanguageModel.generate).parameters) == [
        "self", "inputs", "max_new_tokens", "validate", "grad", "kwargs"]
    for method in ("trace", "scan", "session", "edit", "clear_edits", "all"):
        assert callable(getattr(NNsight, method))
    assert isinstance(inspect.getattr_static(LanguageModel, "tokenizer"), property)


def test_the_tracer_offers_the_documented_calls():
    from nnsight_magic.intervention.tracer import Tracer
    for name in ("invoke", "cond", "merge", "all", "next", "stop", "apply", "log", "list"):
        assert callable(getattr(Tracer, name)), name
    for name in ("iter", "result"):
        assert isinstance(inspect.getattr_static(Tracer, name), property), name
    from nnsight_magic.widgets import GraphInspector, SessionView
    assert GraphInspector and SessionView
