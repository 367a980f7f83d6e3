"""The generic deferred-execution core: nodes, graphs, proxies, fake-tensor shapes and dataflow execution."""

from .execution import Execution
from .graph import Graph, StepSet
from .node import Node
from .proxy import Proxy
from .shapes import ModuleScan, ShapeInference

__all__ = ["Execution", "Graph", "ModuleScan", "Node", "Proxy", "ShapeInference", "StepSet"]
