"""The cost of ``.source``: a trace that reads a value inside an attention forward vs one that reads the module.

GPT-2-small shape (12 blocks, 768 wide), 32 tokens, CPU. Every case saves one tensor of block 6's attention:

* ``module``: ``lm.transformer.h[6].attn.output[0]`` (hooks on the module only; the baseline);
* ``source``: ``lm.transformer.h[6].attn.source.attn_output_4.output``, the same tensor from inside the forward
  (the rewritten forward is installed for the trace, every call and assignment in it goes through a tiny module,
  and the scan is keyed apart, cached after the first trace);
* ``bare``: the model's forward without any trace, for scale.

Run: ``PYTHONPATH=. python -m bench.bench_source`` (``BENCH_QUICK=1`` for a check that it works).
"""

from __future__ import annotations

import torch

from bench import common
from bench.models import gpt2_small, token_ids
from nnsight_magic import NNsight


def main() -> None:
    common.use_threads()
    model = gpt2_small()
    ids = token_ids(model, seq=32)
    net = NNsight(model)

    def bare() -> torch.Tensor:
        with torch.no_grad():
            return model(ids).logits

    def module() -> torch.Tensor:
        with net.trace(ids):
            value = net.transformer.h[6].attn.output[0].save()
        return value.value

    def source() -> torch.Tensor:
        with net.trace(ids):
            value = net.transformer.h[6].attn.source.attn_output_4.output.save()
        return value.value

    common.assert_same("the value from inside the forward", source(), module())
    timings = common.interleave({"bare": bare, "module": module, "source": source}, rounds=common.rounds(100),
                                warmup=5, clock=common.timer())
    print(common.machine())
    print(common.table(timings, baselines={"module": "bare", "source": "module"}))


if __name__ == "__main__":
    main()
