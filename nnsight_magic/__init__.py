"""nnsight_magic: look inside a PyTorch model, and change it, from notebook cells or plain Python.

In [1]: %load_ext nnsight_magic
In [2]: %%trace net x
   ...: h = net.layer1.output             # a tensor in the notebook after the cell ran

In plain Python:

In [1]: from nnsight_magic import NNsight
In [2]: net = NNsight(torch_module)
In [3]: with net.trace(x):
   ...:     h = net.layer1.output.save()
In [4]: h.value
"""

from .errors import OutOfOrderError
from .models.embedded import load_embedded_model
from .models.language import LanguageModel
from .models.nnsight import NNsight


def load_ipython_extension(ipython):
    """``%load_ext nnsight_magic``: register the ``%%trace``, ``%%session`` and ``%session`` magics."""
    from .magics import load_ipython_extension as load
    load(ipython)


def unload_ipython_extension(ipython):
    """``%unload_ext nnsight_magic``: remove the magics again."""
    from .magics import unload_ipython_extension as unload
    unload(ipython)


__all__ = ["LanguageModel", "NNsight", "OutOfOrderError", "load_embedded_model", "load_ipython_extension",
           "unload_ipython_extension"]
