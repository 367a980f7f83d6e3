"""The Envoy tree: children, ModuleList access, module calls on traced values, helpful errors."""

from __future__ import annotations

import pytest
import torch

from nnsight_magic import NNsight

from conftest import hook_count


class Stack(torch.nn.Module):
    """A ModuleList of blocks plus a head, shaped like a tiny transformer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(4))
        self.norm = torch.nn.LayerNorm(6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return self.head(self.norm(x))


@pytest.fixture
def stack():
    return Stack()


def test_the_tree_mirrors_the_modules_children(stack):
    net = NNsight(stack)
    assert net.blocks[2]._module is stack.blocks[2] and net.blocks[-1]._module is stack.blocks[3]
    assert len(net.blocks) == 4 and [block._module for block in net.blocks] == list(stack.blocks)
    assert [each._module for each in net.blocks[1:3]] == list(stack.blocks[1:3])
    assert net.blocks[2]._path == "blocks.2" and net.blocks[2] is net.blocks[2]
    assert net.head.weight is stack.head.weight and net.norm.normalized_shape == (6,)
    with pytest.raises(IndexError, match="has 4 children"):
        net.blocks[4]


def test_wrong_names_list_the_closest_children(stack):
    net = NNsight(stack)
    with pytest.raises(AttributeError) as raised:
        net.blok
    message = str(raised.value)
    assert "did you mean 'blocks'" in message and "blocks, norm, head" in message


def test_reading_every_block_in_a_loop_matches_hooks(stack):
    net = NNsight(stack)
    x = torch.rand(2, 6)
    expected = []
    handles = [block.register_forward_hook(lambda module, args, output: expected.append(output.clone()))
               for block in stack.blocks]
    with torch.no_grad():
        stack(x)
    for handle in handles:
        handle.remove()
    with net.trace(x):
        outputs = [block.output.save() for block in net.blocks]
    assert all(torch.equal(proxy.value, want) for proxy, want in zip(outputs, expected))


def test_calling_a_module_on_a_traced_value_is_the_logit_lens(stack):
    net = NNsight(stack)
    x = torch.rand(2, 6)
    head_calls = []
    handle = stack.head.register_forward_hook(
        lambda module, args, output: head_calls.append(output) if not getattr(output, "fake_mode", None) else None)
    with net.trace(x):
        lens = net.head(net.norm(net.blocks[1].output)).save()
        final = net.head.output.save()
    handle.remove()
    assert len(head_calls) == 1  # the lens call did not fire head's hooks: only the model's own call did
    hidden = []
    grab = stack.blocks[1].register_forward_hook(lambda module, args, output: hidden.append(output))
    with torch.no_grad():
        stack(x)
        assert torch.equal(lens.value, stack.head(stack.norm(hidden[0])))
    grab.remove()
    assert torch.equal(final.value, head_calls[0])


def test_a_lens_call_does_not_count_as_a_call_of_the_module(stack):
    net = NNsight(stack)
    x = torch.rand(2, 6)
    with net.trace(x):
        net.head(net.blocks[0].output)          # runs while blocks[0]'s hook is active
        real = net.head.output.save()           # still the model's first (and only) call of head
    with torch.no_grad():
        assert torch.equal(real.value, stack(x))


def test_outside_a_trace_calling_an_envoy_calls_the_module(stack):
    net = NNsight(stack)
    x = torch.rand(2, 6)
    with torch.no_grad():
        assert torch.equal(net(x), stack(x)) and torch.equal(net.head(x), stack.head(x))


def test_module_values_need_an_open_trace(stack):
    net = NNsight(stack)
    with pytest.raises(RuntimeError, match=r"cannot read .output on blocks\[0\] outside a trace"):
        net.blocks[0].output
    with pytest.raises(RuntimeError, match="outside a trace"):
        net.blocks[0].output = torch.zeros(1)


def test_traces_cannot_be_nested(stack):
    net = NNsight(stack)
    with net.trace(torch.rand(1, 6)):
        with pytest.raises(RuntimeError, match="cannot be nested"):
            with net.trace(torch.rand(1, 6)):
                pass
        net.output.save()
    assert hook_count(stack) == 0


def test_a_trace_without_input_explains_itself(stack):
    net = NNsight(stack)
    with pytest.raises(ValueError, match="this trace has no input"):
        with net.trace():
            net.head.output.save()


def test_a_child_named_output_keeps_its_name():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.output = torch.nn.Linear(3, 3)   # like BERT's BertLayer.output

        def forward(self, x):
            return self.output(x) * 2

    block = Block()
    net = NNsight(block)
    x = torch.rand(1, 3)
    assert net.output._module is block.output
    with net.trace(x):
        inner = net.output.output.save()
        whole = net.nns_output.save()
    with torch.no_grad():
        assert torch.equal(inner.value, block.output(x)) and torch.equal(whole.value, block(x))


def test_tracer_apply_log_and_graph(stack, capsys):
    net = NNsight(stack)
    x = torch.rand(2, 6)
    with net.trace(x) as tracer:
        norm = tracer.apply(torch.linalg.vector_norm, net.head.output, dim=-1).save()
        tracer.log("head norm", norm)
    printed = capsys.readouterr().out
    with torch.no_grad():
        expected = torch.linalg.vector_norm(stack(x), dim=-1)
    assert torch.equal(norm.value, expected)
    assert printed.startswith("head norm tensor(")
    assert "print(" in str(tracer.graph) and "vector_norm" in str(tracer.graph)


def test_attaching_a_module_through_the_envoy_sets_it_on_the_model(stack):
    net = NNsight(stack)
    probe = torch.nn.Linear(6, 1)
    net.probe = probe
    assert stack.probe is probe and net.probe._module is probe


def test_a_child_read_once_is_the_same_envoy_and_follows_a_replacement_through_the_envoy(stack):
    net = NNsight(stack)
    head = net.head
    assert net.head is head and net.__dict__["head"] is head  # cached on the root too: a plain attribute read
    replacement = torch.nn.Linear(6, 3)
    net.head = replacement
    assert stack.head is replacement and net.head._module is replacement and net.head is not head
    x = torch.rand(2, 6)
    with net.trace(x):
        out = net.head.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, stack(x))


def test_an_edited_copy_has_child_envoys_of_its_own(stack):
    net = NNsight(stack)
    original_head = net.head  # read before the copy exists: the copy must not inherit it
    x = torch.rand(2, 6)
    with net.edit() as edited:
        edited.head.output[:] = 0
    assert edited.head is not original_head and edited.head._root is edited and net.head is original_head
    with edited.trace(x):
        out = edited.output.save()
    with net.trace(x):
        plain = net.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, torch.zeros(2, 3)) and torch.equal(plain.value, stack(x))
    assert hook_count(stack) == 0
