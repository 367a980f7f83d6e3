"""``module.source``: values inside a module's forward, against values computed by hand from the module's weights."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from language_fixtures import GPT2_VOCAB, encode, hook_count
from magic_shell import ip, ok  # noqa: F401  (the IPython shell fixture)
from nnsight_magic import LanguageModel, NNsight
from nnsight_magic.intervention.source_install import plain_function
from nnsight_magic.intervention.source_rewrite import ForwardRewrite
from nnsight_magic.widgets.labels import node_labels

PROMPT = "The Eiffel Tower is in"


def untouched(module: torch.nn.Module) -> bool:
    """No trace of ``.source`` on the model: no instance forward, no "source" child, no hooks."""
    return all("forward" not in each.__dict__ and "source" not in each._modules for each in module.modules()) \
        and hook_count(module) == 0


def causal_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) with the causal mask, by hand: (batch, heads, query, key)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    length = q.shape[-2]
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)


def test_gpt2_attn_weights_equal_the_probabilities_by_hand(gpt2_lm, gpt2_tok):
    model = gpt2_lm._module
    model.set_attn_implementation("eager")
    attn = model.transformer.h[0].attn
    with gpt2_lm.trace(PROMPT):
        source = gpt2_lm.transformer.h[0].attn.source
        weights = source.attn_weights.output.save()
        shape_while_building = tuple(weights.shape)
        hidden = gpt2_lm.transformer.h[0].attn.input.save()
    assert untouched(model)
    heads = attn.num_heads
    q, k, _ = attn.c_attn(hidden.value).split(attn.split_size, dim=2)
    split = lambda t: t.view(1, -1, heads, attn.head_dim).transpose(1, 2)  # noqa: E731
    expected = causal_probabilities(split(q), split(k))
    assert shape_while_building == tuple(expected.shape) == (1, heads, 7, 7)
    assert torch.allclose(weights.value, expected, atol=1e-6)


def test_an_edit_changes_the_output_as_a_hand_edited_forward_would(gpt2_lm, gpt2_tok):
    model = gpt2_lm._module
    ids = encode(gpt2_tok, PROMPT)
    with gpt2_lm.trace(PROMPT):
        gpt2_lm.transformer.h[1].mlp.source.hidden_states_1.output[:] *= 2   # the activation's output, in place
        gpt2_lm.transformer.h[0].mlp.source.c_proj_0.input[:, -1] = 0       # a call's first argument
        logits = gpt2_lm.lm_head.output.save()
    assert untouched(model)
    mlp0, mlp1 = model.transformer.h[0].mlp, model.transformer.h[1].mlp

    def hand_mlp0(_, args):  # GPT2MLP.forward by hand, with c_proj's input edited
        h = mlp0.act(mlp0.c_fc(args[0]))
        h = h.clone()
        h[:, -1] = 0
        return mlp0.dropout(mlp0.c_proj(h))

    def hand_mlp1(_, args):
        return mlp1.dropout(mlp1.c_proj(mlp1.act(mlp1.c_fc(args[0])) * 2))

    handles = [mlp0.register_forward_hook(lambda m, a, o: hand_mlp0(m, a)),
               mlp1.register_forward_hook(lambda m, a, o: hand_mlp1(m, a))]
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(logits.value, expected, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, expected, atol=1e-3)  # the edit was for that run only


def test_llama_attention_and_mlp(llama_lm, gpt2_tok):
    model = llama_lm._module
    model.set_attn_implementation("eager")
    ids = encode(gpt2_tok, PROMPT)
    with llama_lm.trace(PROMPT):
        attn = llama_lm.model.layers[0].self_attn.source
        weights = attn.attn_weights.output.save()
        rotated = attn.apply_rotary_pos_emb_0.output.save()
        llama_lm.model.layers[1].self_attn.source.o_proj_0.input[:] = 0   # layer 1's attention adds nothing
        down = llama_lm.model.layers[0].mlp.source.down_proj.output.save()
        mlp_out = llama_lm.model.layers[0].mlp.output.save()
        logits = llama_lm.lm_head.output.save()
    assert untouched(model)
    with torch.no_grad():
        reference = model(ids, output_attentions=True)
    assert torch.allclose(weights.value, reference.attentions[0], atol=1e-6)
    assert len(rotated.value) == 2 and rotated.value[0].shape == (1, 4, ids.shape[1], 16)
    assert torch.equal(down.value, mlp_out.value)
    hook = model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, o: torch.zeros_like(o))
    try:
        with torch.no_grad():
            expected = model(ids).logits
    finally:
        hook.remove()
    assert torch.allclose(logits.value, expected, atol=1e-5)


def test_gpt_neox_attention_and_mlp(gpt2_tok):
    torch.manual_seed(0)
    config = GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           vocab_size=GPT2_VOCAB, max_position_embeddings=64, attn_implementation="eager")
    model = GPTNeoXForCausalLM(config).eval()
    lm = LanguageModel(model, tokenizer=gpt2_tok)
    with lm.trace(PROMPT):
        source = lm.gpt_neox.layers[0].attention.source
        qkv = source.qkv.output.save()
        hidden = lm.gpt_neox.layers[0].attention.input.save()
        weights = source.attn_weights.output.save()
        lm.gpt_neox.layers[0].mlp.source.hidden_states_1.output = torch.zeros(1, 7, 128)  # act's value, replaced
        mlp = lm.gpt_neox.layers[0].mlp.output.save()
    assert untouched(model)
    attention = model.gpt_neox.layers[0].attention
    expected = attention.query_key_value(hidden.value).view(1, -1, 4, 3 * 16).transpose(1, 2)
    assert torch.allclose(qkv.value, expected, atol=1e-6)
    assert weights.value.shape == (1, 4, expected.shape[2], expected.shape[2])
    assert torch.allclose(weights.value.sum(-1), torch.ones(1, 4, expected.shape[2]), atol=1e-5)
    dense = model.gpt_neox.layers[0].mlp.dense_4h_to_h
    assert torch.allclose(mlp.value, dense(torch.zeros(1, 7, 128)), atol=1e-6)


def test_under_sdpa_attn_weights_is_none_and_the_listing_says_so(gpt2_lm):
    gpt2_lm._module.set_attn_implementation("sdpa")
    text = str(gpt2_lm.transformer.h[0].attn.source)
    assert "attn_weights is None" in text and "attention_interface_0" in text
    with gpt2_lm.trace(PROMPT):
        weights = gpt2_lm.transformer.h[0].attn.source.attn_weights.output.save()
        out = gpt2_lm.transformer.h[0].attn.source.attn_output_4.output.save()
        real = gpt2_lm.transformer.h[0].attn.output.save()
    assert weights.value is None
    assert torch.equal(out.value, real.value[0])


def test_an_unknown_name_lists_the_operations(gpt2_lm):
    with pytest.raises(AttributeError) as error:
        gpt2_lm.transformer.h[0].mlp.source.hiden_states
    message = str(error.value)
    assert "did you mean" in message and "c_fc_0" in message and "hidden_states_3" in message
    assert "test_source.py" in message  # the user's line


def test_no_trace_remains_after_an_error_and_the_rewrite_is_cached(gpt2_lm):
    model = gpt2_lm._module
    before = type(model.transformer.h[0].mlp).forward
    with pytest.raises(RuntimeError):
        with gpt2_lm.trace(PROMPT):
            gpt2_lm.transformer.h[0].mlp.source.act_0.output.save()
            raise RuntimeError("the user's own error")
    assert untouched(model) and type(model.transformer.h[0].mlp).forward is before
    with pytest.raises(IndexError):
        with gpt2_lm.trace(PROMPT):
            gpt2_lm.transformer.h[0].mlp.source.act_0.output[:, :, 999] = 0   # caught while building
    assert untouched(model)
    assert ForwardRewrite.of(before) is ForwardRewrite.of(before)


def test_the_inspector_labels_name_the_operation(gpt2_lm):
    with gpt2_lm.scan(PROMPT) as tracer:
        act = gpt2_lm.transformer.h[0].mlp.source.act_0.output
    assert act.shape[-1] == 256
    assert any("transformer.h[0].mlp.source.act_0.output" in label for label in node_labels(tracer.graph).expressions)
    assert untouched(gpt2_lm._module)


def test_values_at_every_generation_step(gpt2_lm):
    with gpt2_lm.generate(PROMPT, max_new_tokens=3) as tracer:
        steps = tracer.list().save()
        with tracer.all():
            steps.append(gpt2_lm.transformer.h[0].mlp.source.act_0.output)
    assert [tuple(value.shape) for value in steps.value] == [(1, 7, 256), (1, 1, 256), (1, 1, 256)]
    assert untouched(gpt2_lm._module)


def test_the_embedded_smollm2_attention_and_mlp(embedded_lm):
    with embedded_lm.trace("The Eiffel Tower is in the city of"):
        attn = embedded_lm.model.layers[3].self_attn.source
        before_o_proj = attn.attn_output_1.output.save()
        o_proj_input = attn.o_proj_0.input.save()
        down = embedded_lm.model.layers[3].mlp.source.down_proj.output.save()
        mlp = embedded_lm.model.layers[3].mlp.output.save()
    assert torch.equal(before_o_proj.value, o_proj_input.value)   # the variable is what o_proj receives
    assert torch.equal(down.value, mlp.value)
    assert untouched(embedded_lm._module)


def test_a_session_discard_and_a_recorded_trace_leave_nothing(gpt2_lm):
    with gpt2_lm.session():
        with gpt2_lm.trace(PROMPT):
            act = gpt2_lm.transformer.h[0].mlp.source.act_0.output.save()
        with gpt2_lm.trace(PROMPT):
            gpt2_lm.transformer.h[0].mlp.source.act_0.output[:] = act
            out = gpt2_lm.transformer.h[0].mlp.output.save()
        assert "source" in gpt2_lm._module.transformer.h[0].mlp._modules   # recorded: installed until the run
    assert untouched(gpt2_lm._module)
    assert out.value.shape == (1, 7, 64)


def test_a_variable_of_several_lines_next_and_skip(gpt2_lm):
    with gpt2_lm.trace(PROMPT):
        mlp = gpt2_lm.transformer.h[0].mlp
        first = mlp.source.hidden_states.output.save()            # every assignment in turn: c_fc's value first
        after_act = mlp.source.hidden_states.next().output.save()  # then act's
        fc = mlp.source.c_fc_0.output.save()
        act = mlp.source.act_0.output.save()
        mlp.source.c_proj_0.skip(torch.ones(1, 7, 64))             # c_proj does not run; its value is ones
        out = mlp.output.save()
    assert torch.equal(first.value, fc.value) and torch.equal(after_act.value, act.value)
    assert torch.equal(out.value, torch.ones(1, 7, 64))             # dropout is the identity in eval mode
    assert untouched(gpt2_lm._module)


def test_the_cache_keeps_to_modules_when_a_trace_also_uses_source(gpt2_lm):
    with gpt2_lm.trace(PROMPT) as tracer:
        act = gpt2_lm.transformer.h[0].mlp.source.act_0.output.save()
        cache = tracer.cache()
    assert "transformer.h.0.mlp.act" in cache.value and not any(".source" in path for path in cache.value)
    assert torch.equal(cache.value["transformer.h.0.mlp.act"], act.value)


def scaled(function):
    @functools.wraps(function)
    def wrapper(self, x):
        return function(self, x) * 2
    return wrapper


def helper(x):
    return x + 1


class Base(torch.nn.Module):
    def forward(self, x):
        return x * 3


class Child(Base):
    def __init__(self):
        super().__init__()
        self.__offset = 0.5   # a private name: mangled to _Child__offset

    @scaled
    def forward(self, x):
        y = super().forward(x)
        y = helper(y) + self.__offset
        return y


def test_super_private_names_helpers_and_decorators_behave_as_before():
    module = Child()
    x = torch.arange(3.0)
    net = NNsight(module)
    with net.trace(x):
        source = net.source
        base = source.forward_0.output.save()
        first, second = source.y_0.output.save(), source.y_1.output.save()
        out = net.output.save()
    assert torch.equal(out.value, module(x)) and torch.equal(out.value, (x * 3 + 1 + 0.5) * 2)
    assert torch.equal(base.value, x * 3) and torch.equal(first.value, x * 3) and torch.equal(second.value, x * 3 + 1.5)
    assert list(source) == ["forward_0", "y_0", "helper_0", "y_1", "y"]
    assert untouched(module)


def test_a_trace_cell_reads_and_edits_an_operation(ip):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    ip.user_ns.update(net=NNsight(layer), x=torch.ones(1, 3))
    ok(ip, "%%trace net x\nnet.source.linear_0.input[:] = 0\nout = net.output\n")
    assert torch.equal(ip.user_ns["out"], layer.bias.detach()[None])   # linear(0) is the bias
    assert untouched(layer)


def test_a_persistent_edit_of_an_operation(gpt2_lm):
    with gpt2_lm.edit() as edited:
        edited.transformer.h[0].mlp.source.act_0.output[:] = 0
    assert untouched(gpt2_lm._module)
    with edited.trace(PROMPT):
        c_proj_input = edited.transformer.h[0].mlp.c_proj.input.save()
    assert torch.equal(c_proj_input.value, torch.zeros(1, 7, 256))
    assert untouched(gpt2_lm._module)


def test_a_module_with_accelerate_hooks(gpt2_lm):
    accelerate_hooks = pytest.importorskip("accelerate.hooks")
    mlp = gpt2_lm._module.transformer.h[0].mlp
    accelerate_hooks.add_hook_to_module(mlp, accelerate_hooks.ModelHook())
    wrapper, kept = mlp.__dict__["forward"], mlp.__dict__["_old_forward"]
    with gpt2_lm.trace(PROMPT):
        act = gpt2_lm.transformer.h[0].mlp.source.act_0.output.save()
        fc = gpt2_lm.transformer.h[0].mlp.c_fc.output.save()
    assert torch.equal(act.value, mlp.act(fc.value))
    assert mlp.__dict__["forward"] is wrapper and mlp.__dict__["_old_forward"] is kept
    assert "source" not in mlp._modules and hook_count(gpt2_lm._module) == 0


def test_an_operation_in_a_branch_not_taken_says_so(gpt2_lm):
    with pytest.raises(RuntimeError, match=r"never reached this operation's line .*print\(transformer.h\[0\].attn.source\)"):
        with gpt2_lm.trace(PROMPT):
            gpt2_lm.transformer.h[0].attn.source.c_attn_0.output.save()   # the cross-attention branch
    assert untouched(gpt2_lm._module)


def test_the_inspector_shows_an_operation_with_its_shape(gpt2_lm):
    from nnsight_magic.widgets import GraphInspector
    with gpt2_lm.trace(PROMPT) as tracer:
        inspector = GraphInspector(tracer)
        gpt2_lm.transformer.h[0].mlp.source.act_0.output.save()
    row = next(line for line in inspector.text().splitlines() if "source.act_0" in line)
    assert "transformer.h[0].mlp.source.act_0.output" in row and "(1, 7, 256)" in row and "saved" in row


# ------------------------------------------------------------------------------- inside a function a forward calls
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_operations_inside_the_attention_function_read_and_edit(family, gpt2_lm, llama_lm, gpt2_tok):
    lm = gpt2_lm if family == "gpt2" else llama_lm
    model = lm._module
    model.set_attn_implementation("eager")
    attn = lm.transformer.h[0].attn if family == "gpt2" else lm.model.layers[0].self_attn
    module = attn._module
    ids = encode(gpt2_tok, PROMPT)
    with lm.trace(PROMPT):
        inner = attn.source.attention_interface_0.source          # eager_attention_forward's own operations
        probabilities = inner.softmax_0.output.save()
        shape_while_building = tuple(probabilities.shape)
    assert untouched(model) and "eager_attention_forward" in str(inner)
    with torch.no_grad():  # on a copy: output_attentions leaves Hugging Face's recording hooks on a model
        reference = copy.deepcopy(model)(ids, output_attentions=True)
    assert shape_while_building == tuple(reference.attentions[0].shape)
    assert torch.allclose(probabilities.value, reference.attentions[0], atol=1e-6)

    with lm.trace(PROMPT):
        attn.source.attention_interface_0.source.matmul_1.input[:, :, :, 0] = 0   # weights to mix values: key 0 off
        hidden = attn.input.save()
        out = attn.output[0].save()
        logits = lm.lm_head.output.save()
    assert untouched(model)
    edited = reference.attentions[0].clone()
    edited[:, :, :, 0] = 0
    with torch.no_grad():  # the attention's output by hand, from its weights and the edited probabilities
        if family == "gpt2":
            value = module.c_attn(hidden.value).split(module.split_size, dim=2)[2]
            value = value.view(1, -1, module.num_heads, module.head_dim).transpose(1, 2)
            expected = module.c_proj((edited @ value).transpose(1, 2).reshape(1, ids.shape[1], -1))
        else:
            value = module.v_proj(hidden.value).view(1, ids.shape[1], -1, module.head_dim).transpose(1, 2)
            value = value.repeat_interleave(module.num_key_value_groups, dim=1)
            expected = module.o_proj((edited @ value).transpose(1, 2).reshape(1, ids.shape[1], -1))
    assert torch.allclose(out.value, expected, atol=1e-5)
    assert not torch.allclose(logits.value, reference.logits, atol=1e-4)   # the edit reached the logits
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference.logits)            # and was for that run only


def test_a_helper_named_in_the_source_is_listed_outside_a_trace_and_read_two_levels_down(llama_lm, gpt2_tok):
    model = llama_lm._module
    attn = llama_lm.model.layers[0].self_attn
    listing = str(attn.source.apply_rotary_pos_emb_0.source)         # a module-level function: known from its name
    assert "apply_rotary_pos_emb (modeling_llama.py" in listing and "q_embed" in listing
    with llama_lm.trace(PROMPT):
        rotary = attn.source.apply_rotary_pos_emb_0
        query = rotary.input.save()                                   # the call's first argument: the queries
        cos, sin = rotary.inputs[0][2].save(), rotary.inputs[0][3].save()
        halves = rotary.source.rotate_half_0.source.cat_0.output.save()   # inside rotate_half, inside it
        q_embed = rotary.source.q_embed.output.save()
    assert untouched(model)
    first, second = query.value.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)                       # rotate_half by hand
    assert torch.equal(halves.value, rotated)
    expected = query.value * cos.value.unsqueeze(1) + rotated * sin.value.unsqueeze(1)
    assert torch.allclose(q_embed.value, expected, atol=1e-6)


def test_a_call_without_python_source_or_not_yet_known_says_so_at_the_line(gpt2_lm):
    attn = gpt2_lm.transformer.h[0].attn
    with pytest.raises(TypeError, match=r"test_source.py:\d+ .*attention_interface_0.source: `attention_interface` "
                                        r"is only known once the forward calls it"):
        str(gpt2_lm.transformer.h[1].attn.source.attention_interface_0.source)  # outside a trace, never run
    with pytest.raises(TypeError, match=r"test_source.py:\d+ .*view_4.source: .*calls .*view, which has no Python"):
        with gpt2_lm.trace(PROMPT):
            attn.source.view_4.source                                    # `query_states.view(shape_q)`: a builtin
    with pytest.raises(TypeError, match=r"`self.c_attn` is a module: read its own `.source`"):
        with gpt2_lm.trace(PROMPT):
            attn.source.c_attn_1.source                                  # `self.c_attn(hidden_states)`
    assert untouched(gpt2_lm._module)
    with gpt2_lm.trace(PROMPT):  # the trace after works; the model runs sdpa, so the call inside is sdpa's kernel
        kernel = attn.source.attention_interface_0.source.scaled_dot_product_attention_0
        query, key, value = (kernel.inputs[0][index].save() for index in range(3))
        mixed = kernel.output.save()
    expected = causal_probabilities(query.value, key.value) @ value.value
    assert mixed.value.shape == (1, attn._module.num_heads, 7, attn._module.head_dim)
    assert torch.allclose(mixed.value, expected, atol=1e-6)


def test_a_function_the_kernels_library_made_a_module_is_read_as_that_function():
    kernels = pytest.importorskip("kernels", reason="the kernels library (a dependency of transformers >= 5.25) "
                                                    "is not installed")

    def scaled_sum(x, y):
        scaled = x * 2
        return scaled + y

    as_module = kernels.use_kernel_forward_from_hub("ScaledSum")(scaled_sum)   # what transformers does to helpers
    assert isinstance(as_module, torch.nn.Module) and plain_function(as_module) is scaled_sum
    assert plain_function(scaled_sum) is scaled_sum
    linear = torch.nn.Linear(2, 2)
    assert plain_function(linear) is linear                                    # any other module stays a module
