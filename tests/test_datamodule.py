"""ContinualDataModule: the batches one process and N processes see, the loaders a run uses, and a
user's own datamodule in a real run."""
import pytest
import torch
from torch.utils.data import DataLoader

from nlcl.config import compose, validate
from nlcl.datamodule import ContinualDataModule, GlobalBatchSampler, default_datamodule, trim_padding
from nlcl.runner import run
from nlcl.streams.base import Experience, TaskStream, TensorPairDataset
from tests.conftest import tiny_overrides


def _stream(n_train=37, n_test=11, length=9, pad_id=0):
    g = torch.Generator().manual_seed(0)
    exps = []
    for i in range(2):
        x = torch.randint(1, 50, (n_train, length), generator=g)
        x[:, 6:] = pad_id  # every sequence ends in padding that collate trims
        xt = torch.randint(1, 50, (n_test, length), generator=g)
        exps.append(Experience(i, f"e{i}", [2 * i, 2 * i + 1],
                               TensorPairDataset(x, torch.randint(2 * i, 2 * i + 2, (n_train,), generator=g)),
                               TensorPairDataset(xt, torch.randint(2 * i, 2 * i + 2, (n_test,), generator=g))))
    return TaskStream("toy", exps, num_classes=4, vocab_size=50, pad_id=pad_id).validate()


def _batches(loader, epochs):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(epochs)]


@pytest.mark.parametrize("n,batch", [(37, 8), (32, 8), (5, 8)])
def test_one_rank_gives_the_batches_of_a_shuffled_dataloader_epoch_after_epoch(n, batch):
    stream = _stream(n_train=n)
    data = stream.experiences[1].train
    dm = ContinualDataModule(stream, batch, seed=3, rank=0, world_size=1).set_experience(1)
    ours = _batches(dm.train_dataloader(), 3)
    ref_loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(3001),
                            collate_fn=trim_padding(0))
    ref = _batches(ref_loader, 3)
    assert len(ours) == len(ref) == 3
    for e_ours, e_ref in zip(ours, ref):
        assert len(e_ours) == len(e_ref)
        for (x, y), (xr, yr) in zip(e_ours, e_ref):
            assert torch.equal(x, xr) and torch.equal(y, yr)
    assert ours[0][0][0].shape[1] == 6  # the padding columns were trimmed


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_of_each_step_make_up_the_single_process_batch(world):
    n, batch = 37, 8
    one = list(GlobalBatchSampler(n, batch, torch.Generator().manual_seed(5)))
    per_rank = [list(GlobalBatchSampler(n, batch, torch.Generator().manual_seed(5), r, world)) for r in range(world)]
    assert all(len(b) == len(one) for b in per_rank)  # every rank takes part in every step
    for k, whole in enumerate(one):
        assert sum((per_rank[r][k] for r in range(world)), []) == whole
        sizes = [len(per_rank[r][k]) for r in range(world)]
        assert max(sizes) - min(sizes) <= 1


def test_evaluation_shards_cover_every_test_sample_once():
    stream = _stream()
    seen = []
    for r in range(3):
        dm = ContinualDataModule(stream, 4, eval_batch_size=2, rank=r, world_size=3)
        loaders = dm.test_dataloaders()
        assert len(loaders) == len(stream)
        seen.append(torch.cat([x for x, _ in loaders[0]]) if len(loaders[0]) else torch.zeros(0, 6, dtype=torch.long))
    whole = stream.experiences[0].test.x[:, :6]
    got = torch.cat([s[:, :6] if s.shape[1] >= 6 else torch.nn.functional.pad(s, (0, 6 - s.shape[1])) for s in seen])
    assert torch.equal(got, whole)


def test_validation_loaders_appear_only_when_asked_for():
    stream = _stream(n_train=40)
    dm = ContinualDataModule(stream, 4)
    assert dm.val_dataloader() == []
    stream.hold_out_validation(3, seed=0, keep_test=True)
    loaders = dm.val_dataloader()
    assert len(loaders) == 2 and sum(len(y) for _, y in loaders[0]) == 6
    assert len(stream.experiences[0].test) == 11  # the test split stayed


def test_set_experience_refuses_an_index_outside_the_stream():
    with pytest.raises(IndexError, match="experience 5"):
        ContinualDataModule(_stream(), 4).set_experience(5)


class CountingDataModule(ContinualDataModule):
    """A user's datamodule: different batches (no shuffle), and it records what the run asked for."""

    calls: list = []

    def train_dataloader(self):
        CountingDataModule.calls.append(("train", self.experience))
        return DataLoader(self.train_set(), batch_size=self.batch_size, shuffle=False, collate_fn=self.collate())


def test_a_run_trains_through_a_user_datamodule(tmp_path):
    cfg = validate(compose(tiny_overrides(tmp_path / "r", "+task.first_experiences=2", "trainer.epochs=1")))
    CountingDataModule.calls = []

    def factory(stream, cfg, transform):
        return CountingDataModule(stream, int(cfg.trainer.batch_size), int(cfg.trainer.eval_batch_size),
                                  int(cfg.seed), transform)

    res = run(cfg, quiet=True, datamodule=factory)
    assert CountingDataModule.calls == [("train", 0), ("train", 1)]
    assert all(t["steps"] == -(-t["train_samples"] // 16) for t in res["timings"]["experiences"])
    with pytest.raises(TypeError, match="ContinualDataModule"):
        run(validate(compose(tiny_overrides(tmp_path / "s", "+task.first_experiences=1"))), quiet=True,
            datamodule=lambda s, c, t: object())


def test_default_datamodule_reads_the_trainer_settings(tmp_path):
    cfg = validate(compose(tiny_overrides(tmp_path / "r", "trainer.eval_batch_size=7")))
    dm = default_datamodule(_stream(), cfg, None)
    assert (dm.batch_size, dm.eval_batch_size, dm.seed) == (16, 7, 0)


class _Tiny(__import__("lightning").LightningModule):
    """Records the labels of every batch Lightning feeds it."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(50, 4)
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[1].clone())
        return self.emb(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("n", [37, 32])
def test_lightning_sees_the_same_batches_as_with_a_shuffled_dataloader(n):
    """Lightning stops a sized loader after its last batch without asking for another; the batch plan
    must draw from the generator exactly as DataLoader(shuffle=True) does even then (3 epochs)."""
    import lightning as L

    stream = _stream(n_train=n)

    def fit(**data):
        module = _Tiny()
        L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, accelerator="cpu", devices=1,
                  use_distributed_sampler=False).fit(module, **data)
        return module.seen

    ref = fit(train_dataloaders=DataLoader(stream.experiences[0].train, batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(0), collate_fn=trim_padding(0)))
    ours = fit(datamodule=ContinualDataModule(stream, 8, seed=0).set_experience(0))
    assert len(ours) == len(ref) == 3 * -(-n // 8)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
