"""Repeated module calls in a scan are replayed from the first one (tracing/replay.py), and the shapes stay exact."""

from __future__ import annotations

import torch

from nnsight_magic import NNsight
from nnsight_magic.tracing.shapes import ModuleScan

from conftest import hook_count


class Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.inner = torch.nn.Linear(width, 2 * width)
        self.outer = torch.nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.outer(self.inner(x).relu())


class Stack(torch.nn.Module):
    """Six identical blocks, then one of another width (not replayable from the others)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(Block(8) for _ in range(6))
        self.down = torch.nn.Linear(8, 4)
        self.last = Block(4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.last(self.down(x))


class Counting(Block):
    """A block whose forward changes its own attributes: it must run on every call."""

    def __init__(self, width: int):
        super().__init__(width)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class WithHelper(Block):
    """A block holding its own helper module outside the tree, as Hugging Face kernels give every attention layer its
    own ``_kernel_funcs = {"rotary_pos_emb": Func()}``: blocks alike but for that private object are still alike."""

    def __init__(self, width: int):
        super().__init__(width)
        self._helpers = {"activation": torch.nn.ReLU()}

    def forward(self, x):
        return x + self.outer(self._helpers["activation"](self.inner(x)))


def real_shapes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, list]:
    """Every module's output shape, dtype and device in a real run, recorded by hand-written hooks."""
    seen: dict[str, list] = {}
    handles = [module.register_forward_hook(
        lambda _, __, output, path=path: seen.setdefault(path, []).append((output.shape, output.dtype, output.device)))
        for path, module in model.named_modules()]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def scanned_shapes(scan: ModuleScan) -> dict[str, list]:
    return {path: [(value.shape, value.dtype, value.device) for value in values]
            for path, values in scan.outputs.items()}


def test_identical_blocks_are_scanned_once_and_every_call_keeps_its_exact_shapes_and_order():
    model, x = Stack(), torch.rand(3, 5, 8)
    scan = ModuleScan.run(model, lambda twin, x: twin(x), (x,), {})
    assert scan.replayed == 5 + 1   # blocks 1..5, and the outer Linear of block 0 is not like the inner one
    assert scanned_shapes(scan) == real_shapes(model, x)
    positions = [scan.order[(f"blocks.{index}", kind, 0)] for index in range(6) for kind in ("input", "output")]
    assert positions == sorted(positions)
    assert scan.order[("blocks.3", "input", 0)] < scan.order[("blocks.3.inner", "input", 0)] \
        < scan.order[("blocks.3.outer", "output", 0)] < scan.order[("blocks.3", "output", 0)]
    # a replayed call's submodule input is this call's own input, not the template's
    assert scan.input("blocks.4.inner", 0)[0][0] is scan.input("blocks.4", 0)[0][0]
    assert scan.input("blocks.4", 0)[0][0] is scan.output("blocks.3", 0)
    assert "forward" not in vars(scan.twin.blocks[2])   # the twin's patches are gone after the scan


def test_replayed_shapes_serve_a_trace_with_exact_values():
    model, x = Stack(), torch.rand(3, 5, 8)
    net = NNsight(model)
    with net.trace(x):
        inner = net.blocks[4].inner.output.save()
        assert inner.shape == (3, 5, 16)
        out = net.output.save()
    expected = []
    handle = model.blocks[4].inner.register_forward_hook(lambda _, __, output: expected.append(output))
    try:
        real = model(x)
    finally:
        handle.remove()
    assert torch.equal(inner.value, expected[0]) and torch.equal(out.value, real)
    assert hook_count(model) == 0


def test_blocks_with_a_users_hook_or_changing_attributes_run_on_every_call():
    model, x = Stack(), torch.rand(2, 8)
    calls = []
    model.blocks[3].inner.register_forward_hook(lambda module, args, output: calls.append(type(output).__name__))
    scan = ModuleScan.run(model, lambda twin, x: twin(x), (x,), {})
    assert calls == ["FakeTensor"]               # the user's hook saw block 3's scan call
    assert scanned_shapes(scan) == real_shapes(model, x)
    counting = torch.nn.Sequential(*(Counting(8) for _ in range(3)))
    scan = ModuleScan.run(counting, lambda twin, x: twin(x), (x,), {})
    assert [block.calls for block in scan.twin] == [1, 1, 1] and [block.calls for block in counting] == [0, 0, 0]


def test_a_model_on_the_meta_device_scans_with_its_inputs_device():
    with torch.device("meta"):
        model = Stack()
    scan = ModuleScan.run(model, lambda twin, x: twin(x), (torch.rand(2, 8),), {})
    assert scan.output("", 0).shape == (2, 4) and scan.output("", 0).device == torch.device("cpu")
    assert scan.output("blocks.5.inner", 0).device == torch.device("cpu")
    assert scan.twin.blocks[0].inner.weight.device == torch.device("cpu")
    assert model.blocks[0].inner.weight.device.type == "meta"


def test_a_language_model_on_the_meta_device_gets_the_shapes_of_the_real_one():
    """A lazily loaded model's tree lives on the meta device until its first real run: its scan (with every layer
    after the first replayed, the cache included) gives the shapes a real model of that config produces."""
    transformers = __import__("pytest").importorskip("transformers")
    from nnsight_magic.models.language import LanguageModel
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    with torch.device("meta"):
        lazy = transformers.LlamaForCausalLM(config).eval()
    torch.manual_seed(0)
    real = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 7))
    lm = LanguageModel(lazy)
    with lm.scan(ids):
        hidden = lm.model.layers[2].output.save()
        logits = lm.lm_head.output.save()
        shapes = (tuple(hidden.shape), tuple(logits.shape))
    expected = []
    handle = real.model.layers[2].register_forward_hook(lambda _, __, output: expected.append(output))
    try:
        with torch.no_grad():
            out = real(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    assert shapes == (tuple(expected[0].shape), tuple(out.logits.shape))
    assert lazy.model.layers[0].mlp.up_proj.weight.device.type == "meta"


def test_blocks_that_each_hold_a_private_helper_module_are_still_replayed():
    model, x = torch.nn.Sequential(*(WithHelper(8) for _ in range(4))), torch.rand(3, 5, 8)
    assert model[0]._helpers["activation"] is not model[1]._helpers["activation"]
    scan = ModuleScan.run(model, lambda twin, x: twin(x), (x,), {})
    assert scan.replayed == 3   # blocks 1..3 from block 0
    assert scanned_shapes(scan) == real_shapes(model, x)
    hooked = torch.nn.Sequential(*(WithHelper(8) for _ in range(3)))
    calls = []
    hooked[2]._helpers["activation"].register_forward_hook(lambda module, args, output: calls.append(output.shape))
    scan = ModuleScan.run(hooked, lambda twin, x: twin(x), (x,), {})
    assert calls == [(3, 5, 16)]   # a helper with a hook of yours is not alike: its block runs, and the hook fires
    assert scanned_shapes(scan) == real_shapes(hooked, x) and calls == [(3, 5, 16)] * 2
