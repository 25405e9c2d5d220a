"""The settings that realise a strategy in the runtimes people use, written from each runtime's own
documentation, with the version they apply to; a strategy a runtime cannot express says so.

llama.cpp (ggml-org/llama.cpp, tools/server/README.md and common/arg.cpp):
  * `-ngl 999` offloads every layer's tensors to the GPU; `--n-cpu-moe N` then keeps "the MoE
    weights of the first N layers" in host memory, computed on the CPU, and `--cpu-moe` all of them
    (both since PR #15077, August 2025);
  * `-ot/--override-tensor REGEX=CPU` places every tensor whose name the regex matches (a
    substring search, C++ std::regex) in host memory. A GGUF holds a layer's routed experts as one
    tensor per matrix (`blk.N.ffn_{gate,up,down}_exps.weight`), so a rule places a whole layer's
    experts: one expert cannot be split from its layer.
vLLM (docs.vllm.ai, engine arguments): `--cpu-offload-gb G` keeps G GiB of the weights in host
  memory "loaded from CPU memory to GPU memory on the fly in each model forward pass" (since
  v0.5.0); it takes parameters in the model's module order, so the first layers go first. It has no
  expert cache and computes nothing on the CPU.
finemoe's replayer (`finemoe replay`) runs every policy of the simulator except the per-layer
  splits, lossy precisions and the SSD tier.
"""

from __future__ import annotations

import math

from finemoe.plan.strategies import Strategy

LLAMA_CPP = "llama.cpp"
LLAMA_CPP_VERSION = "builds with --n-cpu-moe/--cpu-moe (PR #15077, 2025-08) and -ot"
VLLM = "vLLM"
VLLM_VERSION = "--cpu-offload-gb: v0.5.0 and later"
FINEMOE = "finemoe replay"


def layer_regex(layers: list[int], tensor: str = r"ffn_(up|down|gate)_exps") -> str:
    """An -ot rule putting the routed experts of `layers` in host memory."""
    alternation = "|".join(str(n) for n in layers)
    return rf'-ot "blk\.({alternation})\.{tensor}=CPU"'


def settings(strategy: Strategy, *, cpu_layers: list[int], offloaded_bytes: int, trace: str, gpu_mem: str,
             hardware: str, expert_tensors: str | None = None, moe_blocks: list[int] | None = None) -> list[dict]:
    """Per runtime: `{"runtime", "applies_to", "args" (None when it cannot express the strategy), "note"}`.

    `cpu_layers`: the layers whose experts the strategy keeps off the GPU (static placements);
    `offloaded_bytes`: their bytes; `expert_tensors`: the regex of a layer's expert tensors from a
    GGUF index (default: llama.cpp's names); `moe_blocks`: each MoE layer's block number (blk.N),
    which differs from its MoE index where dense blocks lead (DeepSeek)."""
    tensor = expert_tensors or r"ffn_(up|down|gate)_exps"
    blocks = [moe_blocks[n] for n in cpu_layers] if moe_blocks else list(cpu_layers)
    out = [_llama_cpp(strategy, blocks, tensor), _vllm(strategy, offloaded_bytes)]
    out.append(_finemoe(strategy, trace=trace, gpu_mem=gpu_mem, hardware=hardware))
    return out


def _llama_cpp(s: Strategy, cpu_layers: list[int], tensor: str) -> dict:
    """`cpu_layers`: block numbers. --n-cpu-moe N counts blocks from 0, dense ones included."""
    row = {"runtime": LLAMA_CPP, "applies_to": LLAMA_CPP_VERSION}
    if s.policy == "cpu-all":
        return row | {"args": "-ngl 999 --cpu-moe", "note": f'the same as -ot "{tensor}=CPU"'}
    if s.name == "static first":
        if not cpu_layers:
            return row | {"args": "-ngl 999", "note": "every expert fits on the GPU"}
        return row | {"args": f"-ngl 999 --n-cpu-moe {max(cpu_layers) + 1}",
                      "note": "or " + layer_regex(cpu_layers, tensor)}
    if s.name == "static last":
        if not cpu_layers:
            return row | {"args": "-ngl 999", "note": "every expert fits on the GPU"}
        return row | {"args": f"-ngl 999 {layer_regex(cpu_layers, tensor)}",
                      "note": "--n-cpu-moe counts from the first layer, so the last layers need -ot"}
    why = {
        "static": "one -ot rule places a whole layer's experts (one tensor per matrix), not single experts",
        "fiddler": "it cannot choose per miss between copying and computing on the CPU",
        "cache-cpu-miss": "it keeps no expert cache on the GPU",
    }.get(s.policy, "it keeps no expert cache on the GPU and does not prefetch experts")
    if s.family == "stream":
        why = "it computes host-resident experts on the CPU rather than copying them each pass (see static first)"
    return row | {"args": None, "note": f"not expressible: {why}"}


def _vllm(s: Strategy, offloaded_bytes: int) -> dict:
    row = {"runtime": VLLM, "applies_to": VLLM_VERSION}
    if s.family == "stream":
        gib = math.ceil(offloaded_bytes / 2**30 * 10) / 10 if offloaded_bytes else 0  # a float, GiB
        if gib == 0:
            return row | {"args": "(no offload)", "note": "every expert fits on the GPU"}
        return row | {"args": f"--cpu-offload-gb {gib:g}",
                      "note": "vLLM takes parameters in module order, so the offload also covers those layers' "
                              "attention weights: a few more expert layers stay on the GPU than modelled"}
    return row | {"args": None, "note": "not expressible: vLLM's offload streams weights every forward pass; it "
                                        "has no expert cache and no CPU expert execution"}


def _finemoe(s: Strategy, *, trace: str, gpu_mem: str, hardware: str) -> dict:
    row = {"runtime": FINEMOE, "applies_to": "this version"}
    if s.layer_capacity:
        return row | {"args": None, "note": "the replayer has no per-layer split yet; simulate it with "
                                            f"--layer-capacity {s.layer_capacity}"}
    params = "".join(f" --policy-param {s.policy}.{k}={v}" for k, v in s.params.items())
    if s.policy_file:
        params += f" --policy-file {s.policy_file}"
    return row | {"args": f"finemoe replay {trace} --policy {s.policy}{params} --gpu-mem {gpu_mem} "
                          f"--hardware {hardware} --compare",
                  "note": "replays it with real copies and compute on this machine, against the simulator"}
