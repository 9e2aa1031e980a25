"""Config fault campaign (not part of the test suite; a few minutes on 2 cores).

Every numeric, list or boolean field of every option of the task, model, strategy, optim and
trainer groups gets a fixed set of bad values, then the bad overrides a fault campaign found
silent or crashing are tried by name. Each try is classified: refused naming the field, refused
without naming it, traceback (any other exception), or silent (accepted). A try refused by
`validate_static` (or by composing) is also counted as "before torch": the CLI refuses those
without importing torch or Lightning, in about a second.

    PYTHONPATH=$PWD python tests/campaigns/config_campaign.py
"""
import copy
import sys
from collections import Counter

from omegaconf import OmegaConf

sys.path.insert(0, ".")
from nlcl.config import ConfigError, compose, validate, validate_static  # noqa: E402
from nlcl.config_checks import POSITIVE, ZERO_ALLOWED  # noqa: E402
from tests.test_config_fuzz import FIELDS, base  # noqa: E402

def bad_for(v):
    nf = [float("nan"), float("inf"), -1]
    if isinstance(v, bool):
        return ["maybe", 1, 0.5]
    if isinstance(v, int):
        return [1.5, True, "abc", "12", [1], *nf, 0]
    if isinstance(v, float):
        return [True, "abc", "0.1", [0.1], *nf, 0.0]
    if isinstance(v, list):
        return ["18", 7, [float("nan")], [-1]]
    return []



def before_torch(make_cfg) -> bool:
    try:
        validate_static(make_cfg())
    except ConfigError:
        return True
    return False


stats, examples = Counter(), {}
for group, option, path, value in FIELDS:
    v = eval(value)
    key = path.rsplit(".", 1)[-1]
    for bad in bad_for(v):
        if bad in (0, 0.0) and not isinstance(bad, bool) and not (POSITIVE.search(key) and key not in ZERO_ALLOWED):
            continue  # 0 is a legal value of this field
        cfg = copy.deepcopy(base(group, option))
        OmegaConf.update(cfg, path, bad, force_add=True)
        try:
            validate(cfg)
            kind = "silent"
        except ConfigError as e:
            kind = "refused by name" if str(e).startswith(path) else "refused without the field"
        except Exception:  # noqa: BLE001 - counted, that is the point
            kind = "traceback"
        stats[kind] += 1
        if kind == "refused by name":
            stats["of which before torch"] += before_torch(lambda: cfg)
        examples.setdefault(kind, []).append(f"{group}={option} {path}={bad!r}")
print("generated:", dict(stats), "tries", sum(v for k, v in stats.items() if k != "of which before torch"))
for k in ("silent", "traceback", "refused without the field"):
    print(k, examples.get(k, [])[:10])

NAMED = [["task.train_per_class=1.5"], ["task.train_per_class=true"], ["model=hope", "model.cms.periods='18'"],
         ["model.d_model=0"], ["model.n_layers=-1"], ["strategy=replay", "strategy.replay_batch_size=0"],
         ["strategy=ewc", "strategy.ewc_lambda=-1"], ["strategy=ewc", "strategy.ewc_lambda=inf"],
         ["strategy=lwf", "strategy.temperature=0"], ["strategy=lwf", "strategy.alpha=nan"], ["optim.lr=inf"],
         ["+sed=3"], ["run_dir="], ["~trainer.epochs"], ["task.train_per_class=abc"], ["model.n_heads=0"],
         ["trainer.gradient_clip='12'"], ["trainer.accelerator=gpu"], ["run_dir=/dev/null/x"], ["trainer.epoch=3"],
         ["model=hoep"], ["strategy=rplay"], ["trainer.epochs=1.5"], ["model.n_heads=3"], ["seed=-1"],
         ["optim.weight_decay=-0.1"], ["strategy=replay", "strategy.mem_size=0"], ["task.max_len=0"]]
named = Counter()
for ov in NAMED:
    ovs = ov if any(o.startswith("run_dir=") for o in ov) else ["run_dir=/tmp/never-written", *ov]
    field = ov[-1].lstrip("+~").split("=")[0]
    try:
        validate(compose(ovs))
        kind = "silent"
    except ConfigError as e:
        kind = "refused by name" if str(e).startswith(field) else "refused without the field"
        named["of which before torch"] += kind == "refused by name" and before_torch(lambda: compose(ovs))
        if kind != "refused by name":
            print("  ", ov, "->", e)
    except Exception as e:  # noqa: BLE001
        kind = "traceback"
        print("  traceback", ov, type(e).__name__, e)
    named[kind] += 1
print("named in the issue:", dict(named), "tries", sum(v for k, v in named.items() if k != "of which before torch"))
