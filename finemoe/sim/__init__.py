"""The discrete-event simulator: hardware and model cost model, memory budget, workload, SimPy engine, metrics, sweeps."""
