"""`finemoe collect` out of the box: the embedded demo MoE on real prompts (LMSYS, ShareGPT)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch  # noqa: F401  (the dev extra installs both; a missing package fails, never skips)
import transformers  # noqa: F401
from click.testing import CliRunner

from finemoe.cli.main import cli
from finemoe.traces.io import read_trace


def _usage_entropy_bits(trace) -> np.ndarray:
    J = trace.geometry.num_experts
    out = []
    for layer in range(trace.geometry.num_layers):
        counts = np.bincount(trace.experts[:, layer].reshape(-1), minlength=J)
        p = counts / counts.sum()
        out.append(-(p[p > 0] * np.log2(p[p > 0])).sum())
    return np.array(out)


@pytest.mark.slow
def test_the_64_lmsys_prompts_collect_with_the_embedded_model(lmsys_prompts, tmp_path):
    out = tmp_path / "lmsys.parquet"
    result = CliRunner().invoke(cli, [
        "collect", "--prompts", str(lmsys_prompts), "--limit", "0", "--max-new-tokens", "4",
        "--batch-size", "16", "--max-prompt-tokens", "192", "--threads", "1", "--quiet", "-o", str(out),
    ])
    assert result.exit_code == 0, result.output
    trace = read_trace(out)
    assert len(trace.requests) == 64
    assert [r.label for r in trace.requests][:2] == ["lmsys-chat-1m-64.json/0", "lmsys-chat-1m-64.json/1"]
    assert all(1 <= r.generated_tokens <= 4 for r in trace.requests)
    assert trace.geometry.model_name == "finemoe-demo-moe" and trace.geometry.num_experts == 8
    meta = trace.metadata
    assert meta["complete"] is True and meta["collector"]["prompts"] == str(lmsys_prompts)
    assert meta["collector"]["model"] == "finemoe-demo-moe"
    # learned, text-dependent routing: balanced over tokens, yet each token's router is confident
    assert _usage_entropy_bits(trace).min() > 2.6
    assert trace.router_probs.astype(np.float32).max(-1).mean() > 0.35

    info = CliRunner().invoke(cli, ["trace", "info", str(out), "--json"])
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert "finemoe-demo-moe" in json.dumps(summary)


@pytest.mark.slow
def test_collect_defaults_use_the_embedded_model_and_sharegpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["collect", "--limit", "3", "--max-new-tokens", "8", "--threads", "1",
                                      "--quiet"])
    assert result.exit_code == 0, result.output
    trace = read_trace(tmp_path / "trace.parquet")
    assert [r.label.split("/")[0] for r in trace.requests] == ["sharegpt"] * 3
    assert trace.metadata["collector"]["sampling"] is True  # the demo model samples (seeded)
    again = CliRunner().invoke(cli, ["collect", "--limit", "3", "--max-new-tokens", "8", "--threads", "1",
                                     "--quiet", "-o", "again.parquet"])
    assert again.exit_code == 0
    assert read_trace(tmp_path / "again.parquet").content_hash() == trace.content_hash()  # seeded: deterministic
