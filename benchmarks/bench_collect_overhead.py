"""What does recording cost? generate() with the collector's hooks versus without, same run.

Same model, same prompts, greedy decoding (so both produce the same tokens and do the same work).
Conditions alternate round by round. Each is timed in process CPU time (what this process
computed; on a shared machine far steadier than wall time) and wall time; the overhead is the
ratio of median CPU times, the best wall time of each is shown too. "hooks" is generate() with every hook installed plus turning what they kept into arrays
(experts, weights, full probabilities, semantic keys, speculative routers); "collect" is the whole `collect()` path, including turning
steps into trace rows and writing Parquet part files.

    python3 benchmarks/bench_collect_overhead.py                  # embedded demo MoE, quick
    python3 benchmarks/bench_collect_overhead.py --model PATH --limit 16 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from finemoe.traces.collect import CollectConfig, collect
from finemoe.traces.collect.adapters import architecture_of
from finemoe.traces.collect.hooks import RoutingRecorder
from finemoe.traces.collect.loader import load_model
from finemoe.traces.collect.runner import PromptEncoder, eos_ids
from finemoe.traces.prompts import load_prompts

LMSYS = Path(__file__).resolve().parents[2] / "shared" / "prompts" / "lmsys-chat-1m-64.json"


def generate_all(model, encoder, prompts, max_new_tokens: int, eos: list[int], recorder=None) -> int:
    tokens = 0
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = torch.tensor([encoder.encode(prompt.text)], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=encoder.pad_id, eos_token_id=eos or None)
        tokens += out.shape[1] - ids.shape[1]
        if recorder is not None:
            assert len(recorder.finish()) == out.shape[1] - ids.shape[1]
    return tokens


@contextmanager
def timed(key: str, cpu: dict, wall: dict):
    c, w = time.process_time(), time.perf_counter()
    yield
    cpu[key].append(time.process_time() - c)
    wall[key].append(time.perf_counter() - w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo MoE)")
    ap.add_argument("--prompts", default=str(LMSYS) if LMSYS.is_file() else "sharegpt")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok, name = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    prompts = load_prompts(args.prompts, limit=args.limit)
    encoder = PromptEncoder(tok, chat_template=True, max_tokens=args.max_prompt_tokens)
    eos = eos_ids(model, tok)
    cfg = CollectConfig(max_new_tokens=args.max_new_tokens, greedy=True, max_prompt_tokens=args.max_prompt_tokens)
    arch = architecture_of(model.config)
    generate_all(model, encoder, prompts[:1], 4, eos)  # warm-up

    times: dict[str, list[float]] = {"plain": [], "hooks": [], "collect": []}
    walls: dict[str, list[float]] = {"plain": [], "hooks": [], "collect": []}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            with timed("plain", times, walls):
                tokens = generate_all(model, encoder, prompts, args.max_new_tokens, eos)
            with timed("hooks", times, walls), RoutingRecorder(model, arch, projection=None) as rec:
                hooked = generate_all(model, encoder, prompts, args.max_new_tokens, eos, recorder=rec)
            assert hooked == tokens, "hooked run generated different tokens"
            with timed("collect", times, walls):
                collect(model, tok, prompts, Path(tmp) / f"r{r}.parquet", cfg, progress=False)

    plain = statistics.median(times["plain"])
    plain_wall = min(walls["plain"])
    print(f"model {name}, {len(prompts)} prompts, {tokens} generated tokens per run, "
          f"{args.rounds} rounds, device {device}, {args.threads} CPU thread(s)")
    for key, label in (("plain", "generate() without hooks"), ("hooks", "generate() with hooks"),
                       ("collect", "collect() (hooks + rows + Parquet)")):
        med, wall = statistics.median(times[key]), min(walls[key])
        print(f"  {label:36s} CPU {med:6.3f} s  x{med / plain:.3f} (overhead {100 * (med / plain - 1):+5.1f}%)"
              f"   best wall {wall:6.3f} s, {tokens / wall:6.1f} tok/s, x{wall / plain_wall:.3f}")


if __name__ == "__main__":
    main()
