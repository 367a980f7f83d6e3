"""``python -m nnsight_magic.demo``: the first classroom notebook in JupyterLab, or run to an HTML page.

From a clone of the repository (``make demo`` runs this after setting up ``.venv``)::

    $ python -m nnsight_magic.demo
    Installed the kernel "Python 3 (nnsight_magic)" in /repo/.venv/share/jupyter/kernels/nnsight

    JupyterLab is serving /repo/examples. Open this address in your browser (Ctrl+C here stops JupyterLab):

        http://127.0.0.1:41873/lab/tree/01_first_trace.ipynb?token=3f9c...

    $ python -m nnsight_magic.demo --headless
    Running 01_first_trace.ipynb in the kernel "nnsight" ...
    Wrote /repo/build/demo/01_first_trace.html

Both first install the ``nnsight`` kernel (the extension preloaded) into this Python environment, so JupyterLab
opens the notebooks with it; JupyterLab's own log goes to ``build/demo/jupyterlab.log``. ``--headless`` runs
the notebook with nbclient instead of a browser and writes a standalone HTML page in which every inspector and
viewer is its static HTML rendering (their mime bundles carry one): the page needs no kernel, no widget state and
no CDN.

The notebooks live in ``examples/`` of the repository, next to this package; an installed copy of the package
without them says where to get them.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from .kernel import DEFAULT_NAME, install

REPOSITORY = Path(__file__).resolve().parent.parent
EXAMPLES = REPOSITORY / "examples"
FIRST_NOTEBOOK = "01_first_trace.ipynb"
DEFAULT_HTML = REPOSITORY / "build" / "demo" / "01_first_trace.html"
SERVER_START_SECONDS = 120
CELL_TIMEOUT_SECONDS = 600  # the embedded model's first load on a machine converts its weights (about half a minute)


def first_notebook() -> Path:
    """``examples/01_first_trace.ipynb`` of the repository this package was loaded from.

    Raises ``SystemExit`` with what to do when the package was installed without the repository's examples.
    """
    notebook = EXAMPLES / FIRST_NOTEBOOK
    if not notebook.is_file():
        raise SystemExit(f"The demo opens the classroom notebook examples/{FIRST_NOTEBOOK}, which is not next to this "
                         f"copy of nnsight_magic ({REPOSITORY}): the notebooks come with the repository, not with the "
                         "installed package. Clone the repository and run `make demo` in it.")
    return notebook


def register_kernel(prefix: str | os.PathLike = sys.prefix) -> Path:
    """Install the ``nnsight`` kernelspec under ``prefix`` and make this process and its children find it first.

    ``JUPYTER_PATH`` gets ``prefix/share/jupyter`` in front, so a kernel of the same name elsewhere (an older
    install in the user's Jupyter directory) does not shadow this environment's.
    """
    path = Path(install(DEFAULT_NAME, prefix=os.fspath(prefix)))
    shared = os.fspath(Path(prefix) / "share" / "jupyter")
    earlier = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([shared, earlier]) if earlier else shared
    print(f'Installed the kernel "Python 3 (nnsight_magic)" in {path}')
    return path


def run_headless(notebook: Path, output: Path) -> bool:
    """Run ``notebook`` top to bottom in its kernel and write it as HTML to ``output`` (widgets as static HTML).

    Returns whether every cell ran; a failed notebook is written too, with the error in its cell.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    document = nbformat.read(notebook, as_version=4)
    kernel = document.metadata.get("kernelspec", {}).get("name", DEFAULT_NAME)
    print(f'Running {notebook.name} in the kernel "{kernel}" ...', flush=True)
    client = NotebookClient(document, kernel_name=kernel, timeout=CELL_TIMEOUT_SECONDS, store_widget_state=False,
                            resources={"metadata": {"path": os.fspath(notebook.parent)}})
    succeeded = True
    try:
        client.execute()
    except CellExecutionError as error:
        succeeded = False
        print(f"A cell of {notebook.name} failed:\n{error}", file=sys.stderr)
    page, _ = HTMLExporter().from_notebook_node(document)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    print(f"Wrote {output}")
    return succeeded


def open_lab(notebook: Path, log_path: Path, port: int | None = None, browser: bool = True) -> None:
    """Serve JupyterLab on 127.0.0.1 with ``notebook`` open, print its address, and stop it on Ctrl+C.

    The server's own messages go to ``log_path``, so the address stays easy to find in the terminal.
    """
    port = port or free_port()
    token = secrets.token_hex(24)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={notebook.parent}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # containers and CI machines often run as root; the server binds 127.0.0.1 only
    with open(log_path, "w") as log:
        # a session of its own: Ctrl+C reaches only this process, which stops the server without its y/n prompt
        server = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until_serving(server, f"{base}/api/status?token={token}", log_path)
            url = f"{base}/lab/tree/{notebook.name}?token={token}"
            print(f"\nJupyterLab is serving {notebook.parent}. Open this address in your browser "
                  f"(Ctrl+C here stops JupyterLab):\n\n    {url}\n", flush=True)
            if browser and has_display():
                import webbrowser
                webbrowser.open(url)
            server.wait()
        except KeyboardInterrupt:
            print("Stopping JupyterLab ...")
        finally:
            stop(server)


def wait_until_serving(server: subprocess.Popen, status_url: str, log_path: Path) -> None:
    """Return once ``status_url`` answers; raise ``SystemExit`` with the log's end if the server quits or hangs."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"JupyterLab stopped while starting (exit status {server.returncode}):\n"
                             f"{tail(log_path)}")
        try:
            with urllib.request.urlopen(status_url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.25)
    raise SystemExit(f"JupyterLab did not answer within {SERVER_START_SECONDS} s:\n{tail(log_path)}")


def stop(server: subprocess.Popen) -> None:
    """Stop the server (it shuts its kernels down on SIGTERM); kill it if it does not stop in time."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def has_display() -> bool:
    """Whether a graphical browser can open here (otherwise Python's webbrowser may start a text browser)."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnsight_magic.demo",
                                     description="Install the nnsight kernel and open the first classroom notebook.")
    parser.add_argument("--headless", action="store_true",
                        help="run the notebook without a browser and write it, widgets included, as an HTML page")
    parser.add_argument("--output", type=Path, default=DEFAULT_HTML,
                        help=f"the HTML page; JupyterLab's log goes next to it (default: {DEFAULT_HTML})")
    parser.add_argument("--port", type=int, help="JupyterLab's port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--no-browser", action="store_true", help="only print JupyterLab's address")
    parser.add_argument("--prefix", default=sys.prefix,
                        help=f"where the kernelspec goes, under PREFIX/share/jupyter (default: this environment, "
                             f"{sys.prefix})")
    args = parser.parse_args(argv)
    notebook = first_notebook()
    register_kernel(args.prefix)
    output = args.output.resolve()
    if args.headless:
        return 0 if run_headless(notebook, output) else 1
    open_lab(notebook, output.parent / "jupyterlab.log", args.port, browser=not args.no_browser)
    return 0


if __name__ == "__main__":
    sys.exit(main())
