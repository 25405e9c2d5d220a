"""`finemoe plan`: from a trace and a machine to what to run, how fast, and how far from the best.

The pieces, in the order a plan uses them:
  * `accesses`: the measured requests' expert accesses in the order a batch-1 run makes them;
  * `curves`: one pass over them gives LRU's and Belady MIN's misses at every cache size (stack
    distances, Mattson et al. 1970);
  * `strategies`: what finemoe can express, each with the policy that runs it and its closed-form
    estimate from those curves and counts (`estimate`);
  * `planner`: the latency-memory curve from the estimates, the discrete-event simulator to confirm
    the points near the front and the user's budget, the [bound, oracle] bracket, the recommendation;
  * `runtimes`: the llama.cpp, vLLM and finemoe settings that realise a placement.
"""
