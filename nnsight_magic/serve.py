"""``python -m nnsight_magic.serve MODEL --name NAME --token-file F``: serve a model until Ctrl-C.

    $ python -m nnsight_magic.serve embedded --name smol --token-file ~/.smol-token --port 8737 --model-port 8738
    serving 'smol' at http://127.0.0.1:8737, runs at http://127.0.0.1:8738 (Ctrl-C stops it)

MODEL is a hub id, a local directory, or ``embedded`` (SmolLM2-135M, no hub needed). The model loads inside a Ray
actor (on a GPU when the cluster has one; across a node's GPUs with ``device_map="auto"`` when it has several).
``--address`` joins a running Ray cluster (``auto``, ``ray://HEAD:10001``); without it a local one starts. The
door binds ``127.0.0.1`` unless ``--host`` says otherwise (``--host 0.0.0.0`` only behind a firewall or a TLS
proxy: the token travels in a header). A local cluster is bounded by ``--num-cpus`` and ``--object-store-mb``
and keeps its files under ``--temp-dir``; Ctrl-C or SIGTERM stops the door, the model actor and that cluster.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnsight_magic.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a hub id, a local directory, or 'embedded'")
    parser.add_argument("--name", required=True, help="the name clients use: RemoteModel(url, NAME, token=...)")
    parser.add_argument("--token-file", required=True, help="a file holding the token clients must send")
    parser.add_argument("--address", default=None, help="a Ray cluster to join (default: start a local one)")
    parser.add_argument("--host", default="127.0.0.1", help="where the HTTP door listens (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="the door's port (default: a free one)")
    parser.add_argument("--model-port", type=int, default=0,
                        help="the port of the model actor's own door, where runs go (default: a free one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local cluster (default: all)")
    parser.add_argument("--object-store-mb", type=int, default=None,
                        help="object store of a local cluster, in MiB (default: Ray's)")
    parser.add_argument("--temp-dir", default=None, help="where a local cluster keeps its files (default: Ray's)")
    options = parser.parse_args(argv)
    with open(options.token_file) as file:
        token = file.read().strip()
    if not token:
        parser.error(f"{options.token_file} is empty; put a long random token in it (e.g. `openssl rand -hex 24`)")
    import ray
    from .remote import serve
    from .remote.server import NAMESPACE
    if options.address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(namespace=NAMESPACE, include_dashboard=False, log_to_driver=False, num_cpus=options.num_cpus,
                 object_store_memory=options.object_store_mb << 20 if options.object_store_mb else None,
                 _temp_dir=options.temp_dir)
    server = serve(options.model, name=options.name, token=token, host=options.host, port=options.port,
                   address=options.address, model_port=options.model_port)
    print(f"serving {options.name!r} at {server.url}, runs at {server.model_url} (Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
