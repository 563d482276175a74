"""AR-ness of a masked diffusion LM's decoding order (DiffuCoder, Gong et al., arXiv 2506.20639, Sec. 3).

How autoregressive is the order in which a decoder commits tokens? From the order of committed positions
o_1, o_2, ... of one sample (generated-region indices, 0 = first generated token):

* local AR-ness@k: the fraction of decoded tokens that continue a next-token run of length k, i.e. the k
  tokens decoded just before token i sit at o_i - 1, ..., o_i - k (the prompt counts as decoded, so the
  first tokens of a left-to-right order already qualify);
* global AR-ness@k: the fraction of decoded tokens that were among the k leftmost still-masked positions
  when they were decoded (earliest-mask selection).

Left-to-right decoding scores 1.0 on both for every k. Tokens committed in the same forward pass have no
order among themselves; genkit takes them left to right (a pass that fills a contiguous span is as AR as
filling it one by one). Re-masked tokens (WINO) return to the masked set and count again when re-decoded.
DiffuCoder reports both per step of one-token-per-step decoding, where the two conventions coincide.
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

from genkit.errors import ConfigError


def decoding_events(trace: list[list[int]], remask_trace: list[list[int]] | None = None):
    """[(kind, position)] in decoding order: ("commit", p) left to right within a pass, then ("remask", p)."""
    events = []
    for i, committed in enumerate(trace):
        events += [("commit", int(p)) for p in sorted(committed)]
        if remask_trace is not None and i < len(remask_trace):
            events += [("remask", int(p)) for p in sorted(remask_trace[i])]
    return events


def arness_of_order(trace: list[list[int]], gen_length: int, ks=(1, 2, 4),
                    remask_trace: list[list[int]] | None = None) -> dict:
    """Local and global AR-ness@k of one sample's trace ([pass] -> committed positions)."""
    events = decoding_events(trace, remask_trace)
    masked = list(range(gen_length))  # sorted still-masked positions
    history = [-j for j in range(max(ks), 0, -1)]  # the prompt: positions -K..-1 count as decoded
    local = {k: 0 for k in ks}
    glob = {k: 0 for k in ks}
    n = 0
    for kind, p in events:
        if kind == "remask":
            bisect.insort(masked, p)
            continue
        rank = bisect.bisect_left(masked, p)
        if rank >= len(masked) or masked[rank] != p:
            raise ConfigError(f"trace commits position {p}, which is not masked at that point")
        for k in ks:
            glob[k] += rank < k
            local[k] += all(history[-j] == p - j for j in range(1, k + 1))
        masked.pop(rank)
        history.append(p)
        n += 1
    if n == 0:
        return {**{f"local@{k}": None for k in ks}, **{f"global@{k}": None for k in ks}, "tokens": 0}
    return {**{f"local@{k}": local[k] / n for k in ks}, **{f"global@{k}": glob[k] / n for k in ks}, "tokens": n}


def arness(records: list[dict], ks=(1, 2, 4)) -> dict:
    """Mean over samples of the per-sample AR-ness; records are `genkit decode --trace` results lines."""
    per = []
    for r in records:
        if "error" in r:
            continue
        if "trace" not in r:
            raise ConfigError("results have no decoding order: rerun `genkit decode` with --trace")
        G = len(r["output_ids"]) if "output_ids" in r else 1 + max((p for s in r["trace"] for p in s), default=-1)
        per.append(arness_of_order(r["trace"], G, ks, r.get("remask_trace")))
    per = [p for p in per if p["tokens"]]
    if not per:
        raise ConfigError("no decoded samples to score")
    out = {key: sum(p[key] for p in per) / len(per) for key in per[0] if key != "tokens"}
    out["samples"] = len(per)
    return out


def arness_file(path: str | os.PathLike, ks=(1, 2, 4)) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise ConfigError(f"'{path}' does not exist: pass the results.jsonl of `genkit decode --trace`")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return arness(records, ks)
