"""Remote models: the same graph runs where the model lives (a Ray actor), reached over HTTP with a token.

In [1]: from nnsight_magic.remote import serve, RemoteModel
In [2]: server = serve(lm, name="smol", token="s3cret")           # on the machine with the GPU (needs Ray)
In [3]: remote = RemoteModel(server.url, "smol", token="s3cret")  # in a notebook anywhere (HTTP only)

``RemoteModel`` needs no Ray; ``serve`` imports it when called.
"""

from .client import RemoteModel
from .server import Server, serve

__all__ = ["RemoteModel", "Server", "serve"]
