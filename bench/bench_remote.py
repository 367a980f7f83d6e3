"""Remote traces on loopback: the overhead of a remote trace over a local one, and several clients' throughput.

    python bench/run.py remote          # starts a local Ray cluster (loopback, bounded), serves, measures, stops

The model is GPT-2-small-shaped where it matters for the wire (``n_embd=768``, 12 heads, 2 layers, a 1,024-token
vocabulary, random weights), the input 32 tokens, and each trace saves ``transformer.h[0]``'s output
(1×32×768 float32, 96 KiB back). Local and remote traces alternate in shuffled rounds; the overhead is the
paired difference. Times are wall-clock (the work happens in other processes). Throughput: 1, 2 and 4 client
threads, each with its own ``RemoteModel``, sending traces to the one model actor (to its own HTTP door, which the
front door names; no Ray call per trace).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time

import torch

from bench.common import interleave, rounds, table

os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                  RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_agent_register_timeout_ms="120000",
                  RAY_enable_metrics_collection="0")


def _model():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=768, n_head=12, vocab_size=1024, n_positions=128)).eval()


def main() -> None:
    import ray

    from nnsight_magic import LanguageModel
    from nnsight_magic.remote import RemoteModel, serve

    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    for attempt in range(3):  # on a busy machine Ray's agents can miss the raylet's 30 s start window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20,
                     _temp_dir=temp)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        local = LanguageModel(_model())
        server = serve(LanguageModel(_model()), name="gpt2", token="bench")
        remote = RemoteModel(server.url, "gpt2", token="bench")
        ids = torch.randint(0, 1024, (1, 32))

        def trace(model):
            def run():
                with model.trace(ids):
                    hidden = model.transformer.h[0].output.save()
                return hidden.value
            return run

        assert torch.equal(trace(local)(), trace(remote)())
        timings = interleave({"local": trace(local), "remote": trace(remote)}, rounds=rounds(200), warmup=10)
        print("## Remote traces (loopback, one model actor)\n")
        print(__doc__.split("\n\n", 1)[1].strip() + "\n")
        print(table(timings, baselines={"remote": "local"},
                    descriptions={"local": "trace in the notebook's process", "remote": "same trace, served"}))
        print()
        per_client = rounds(100)
        rows = ["| clients | traces | seconds | traces/s |", "|---:|---:|---:|---:|"]
        for clients in (1, 2, 4):
            models = [RemoteModel(server.url, "gpt2", token="bench") for _ in range(clients)]
            for model in models:
                trace(model)()
            started = time.perf_counter()
            threads = [threading.Thread(target=lambda model=model: [trace(model)() for _ in range(per_client)])
                       for model in models]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            rows.append(f"| {clients} | {clients * per_client} | {elapsed:.2f} | {clients * per_client / elapsed:.0f} |")
        print("\n".join(rows) + "\n")
        server.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
