"""A user's plugin module, as docs/plugins.md describes it: a stream, a backbone, a classifier."""
import torch
from torch import nn

from nlcl.models import register_backbone
from nlcl.streams import Experience, TaskStream, TensorPairDataset

PAD = 3  # not 0, so that a model that ignores the pad id it is given would read padding


def first_token_stream(n_classes: int = 4, n_experiences: int = 2, per_class: int = 24, length: int = 8,
                       seed: int = 0, name: str = "first_token") -> TaskStream:
    """Class = the first token; the rest is noise, then right padding with PAD."""
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.arange(n_classes).repeat_interleave(n)
        x = torch.randint(4, 20, (len(y), length), generator=g)
        x[:, 0] = 20 + y
        x[:, length // 2:] = PAD
        return TensorPairDataset(x, y)

    train, test = split(per_class), split(per_class // 2)
    groups = torch.arange(n_classes).tensor_split(n_experiences)
    exps = [Experience(index=i, name=f"tokens {c.tolist()}", classes=c.tolist(),
                       train=train.subset(torch.isin(train.y, c).nonzero().squeeze(1)),
                       test=test.subset(torch.isin(test.y, c).nonzero().squeeze(1))) for i, c in enumerate(groups)]
    return TaskStream(name=name, experiences=exps, num_classes=n_classes, vocab_size=20 + n_classes, pad_id=PAD)


class CumulativeMean(nn.Module):
    """A causal backbone: position t holds the mean of the embeddings of tokens <= t."""

    def __init__(self, vocab_size: int, pad_id: int, d_model: int = 16):
        super().__init__()
        self.d_model, self.pad_id = d_model, pad_id
        self.embed = nn.Embedding(vocab_size, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, ids):
        h = self.embed(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1, device=ids.device)[None, :, None]
        return torch.tanh(self.out(h))


class BagOfTokens(nn.Module):
    """A whole classifier (it takes num_classes): mean embedding of the non-pad tokens -> logits."""

    def __init__(self, vocab_size: int, num_classes: int, pad_id: int, width: int = 16):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, ids):
        keep = (ids != self.pad_id).unsqueeze(-1).float()
        return self.head((self.embed(ids) * keep).sum(1) / keep.sum(1).clamp(min=1))


register_backbone("cumulative_mean", lambda vocab_size, pad_id, d_model=16: CumulativeMean(vocab_size, pad_id, d_model))


def tiny_benchmark(n_experiences: int = 2, seed: int = 0):
    """An avalanche-lib benchmark of random 1x4x4 images in 4 classes (for task=avalanche)."""
    from avalanche.benchmarks import nc_benchmark
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(seed)

    def ds(n):
        y = torch.arange(n) % 4
        d = TensorDataset(torch.rand(n, 1, 4, 4, generator=g) + y[:, None, None, None], y)
        d.targets = y.tolist()
        return d

    return nc_benchmark(ds(40), ds(20), n_experiences=n_experiences, task_labels=False, seed=seed)
