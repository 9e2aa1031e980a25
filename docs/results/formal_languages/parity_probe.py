"""One-layer probe of self-modifying Titans on a formal language (the data of
experiment=formal_languages), used to find which settings let the layer learn parity.

    python docs/results/formal_languages/parity_probe.py STEPS [field=value ...]

embedding -> pre-norm self-modifying Titans -> MLP -> head, d=64, 2 heads, AdamW (lr 1e-3),
batch 32, gradient clip 1; fields are SelfModifyingTitansConfig fields, plus lang=, seed=, d=.
Prints one JSON line: Bin0 / Bin1 sequence accuracy and the layer's eigenvalue telemetry."""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from nlcl.models.self_modifying_titans import SelfModifyingTitans, SelfModifyingTitansConfig
from nlcl.streams.synthetic import formal_languages_stream


def parse(value: str):
    if value in ("true", "false"):
        return value == "true"
    if value == "null":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def main():
    torch.set_num_threads(1)
    steps = int(sys.argv[1])
    fields = dict(a.split("=", 1) for a in sys.argv[2:])
    fields = {k: parse(v) for k, v in fields.items()}
    lang, seed, d = fields.pop("lang", "parity"), fields.pop("seed", 0), fields.pop("d", 64)
    torch.manual_seed(seed)
    train = formal_languages_stream([lang], n_train=1000, n_test=200, seed=seed).experiences[0]
    bin1 = formal_languages_stream([lang], n_train=10, n_test=200, seed=seed, test_bin=1).experiences[0].test
    vocab = 64

    embed = nn.Embedding(vocab, d)
    norm, mixer = nn.LayerNorm(d), SelfModifyingTitans(SelfModifyingTitansConfig(d_model=d, n_heads=2, **fields))
    mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
    head = nn.Linear(d, vocab)
    modules = nn.ModuleList([embed, norm, mixer, mlp, head])

    def logits(x):
        h = embed(x)
        h = h + mixer(norm(h))
        return head(h + mlp(h))

    def trimmed(x, y):
        length = int((y != -100).sum(1).max())
        return x[:, :length], y[:, :length]

    def sequence_accuracy(data):
        modules.eval()
        with torch.no_grad():
            x, y = trimmed(data.x, data.y)
            ok = ((logits(x).argmax(-1) == y) | (y == -100)).all(1).float().mean().item()
        modules.train()
        return ok

    opt = torch.optim.AdamW(modules.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for _ in range(steps):
        x, y = trimmed(*(t[torch.randint(len(train.train), (32,), generator=gen)] for t in (train.train.x, train.train.y)))
        loss = F.cross_entropy(logits(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    stats = mixer.mechanism_stats()
    print(json.dumps(dict(lang=lang, seed=seed, steps=steps, fields=fields, seconds=round(time.time() - start),
                          final_loss=round(sum(losses[-20:]) / 20, 4), bin0=sequence_accuracy(train.test),
                          bin1=sequence_accuracy(bin1), eigenvalue_min=stats.get("eigenvalue_min"),
                          negative_eigenvalue_fraction=stats.get("negative_eigenvalue_fraction"))))


if __name__ == "__main__":
    main()
