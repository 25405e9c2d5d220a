"""finemoe: which Mixture-of-Experts experts should live in GPU memory.

Record real router decisions (`finemoe collect`, `finemoe import`), explore offloading policies and
memory budgets in a discrete-event simulator (`finemoe simulate`), and replay a configuration with
real transfers and compute (`finemoe replay`) to check what the simulator predicted.
"""

__version__ = "0.1.0"
