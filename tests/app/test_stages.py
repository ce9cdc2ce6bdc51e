"""The recipe's stage objects (ddps.app.stages): the LR schedule each reads from its section, which
stages a config runs, each stage's optimiser settings, and what the heads give the trainer."""
import types

import pytest
import torch

from ddps.app import config, stages, trainer
from ddps.app.data import train_batches


def _section(**values):
    defaults = dict(iters=300, lr=1.0, warmup_iters=None, warmup_ratio=0.1, lr_steps=[], lr_gamma=0.1,
                    lr_policy="step", lr_power=1.0)
    return types.SimpleNamespace(**{**defaults, **values})


@pytest.mark.parametrize("step,expected", [(0, 0.1), (5, 0.55), (10, 1.0), (19, 1.0), (20, 0.5), (31, 0.25)])
def test_lr_warms_up_linearly_then_steps(step, expected):
    # lr * (1 - (1 - step / warmup) * (1 - ratio)) during the warm-up, x gamma at each of lr_steps
    section = _section(warmup_iters=10, lr_steps=[20, 30], lr_gamma=0.5)
    assert stages.lr_at(step, section) == pytest.approx(expected)


def test_a_null_warm_up_is_a_tenth_of_the_stage_up_to_50_steps():
    assert stages.lr_at(15, _section(iters=300)) == pytest.approx(1 - 0.5 * 0.9)  # 30 warm-up steps
    assert stages.lr_at(49, _section(iters=4500)) < 1 and stages.lr_at(50, _section(iters=4500)) == 1
    assert stages.lr_at(15, _section(iters=305)) == pytest.approx(1 - 0.5 * 0.9)  # 305 // 10 = 30 steps


@pytest.mark.parametrize("step", [0, 5, 9, 10, 37, 99])
@pytest.mark.parametrize("power", [1.0, 0.9])
def test_poly_lr_after_the_warm_up(step, power):
    """mmcv's poly policy, min_lr 0: lr (1 - step / iters) ** power, the warm-up's factor
    1 - (1 - step / warmup)(1 - ratio) over its first steps (DIFF: 1500 steps from 1e-6)."""
    section = _section(iters=100, lr=2.0, warmup_iters=10, warmup_ratio=1e-6, lr_policy="poly", lr_power=power)
    poly = 2.0 * (1 - step / 100) ** power
    warm = 1 - (1 - step / 10) * (1 - 1e-6) if step < 10 else 1.0
    assert stages.lr_at(step, section) == pytest.approx(poly * warm, rel=1e-12)


def test_poly_and_lr_steps_are_one_or_the_other():
    with pytest.raises(config.ConfigError, match=r"segmentor.lr_steps: \[5\]: steps of the LR belong to "
                                                 r"segmentor.lr_policy=step"):
        config.load(config.find("synthetic-smoke"), ["segmentor.lr_policy=poly", "segmentor.lr_steps=[5]"])


def test_the_decode_head_trains_at_head_lr_mult(tmp_path):
    """segmentor.head_lr_mult: the segmentor's decode head and classifier in a group of their own,
    at that multiple of the schedule's LR at every step; 1 keeps one group."""
    t = _trainer(tmp_path, "segmentor.head_lr_mult=10", "segmentor.iters=3", "segmentor.lr_policy=poly",
                 "segmentor.warmup_iters=0", "train.iters=1")
    rest, head = t.stages[0].optimizer.param_groups
    assert [id(p) for p in head["params"]] == [id(p) for p in t.segmentor.classifier.parameters()]
    assert head["lr_mult"] == 10 and "lr_mult" not in rest
    assert len(rest["params"]) + 2 == len(list(t.segmentor.parameters()))
    seen = []
    step = t.stages[0].optimizer.step

    def record(*args, **kwargs):
        seen.append([g["lr"] for g in t.stages[0].optimizer.param_groups])
        return step(*args, **kwargs)

    t.stages[0].optimizer.step = record
    t.run(until="head")
    lr = t.cfg.segmentor.lr
    assert seen == [pytest.approx([lr * (1 - s / 3), 10 * lr * (1 - s / 3)]) for s in range(3)]
    assert len(_trainer(tmp_path / "plain").stages[0].optimizer.param_groups) == 1


class _OneImage(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset, self.ignore_index = dataset, dataset.ignore_index

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.dataset[0]


def test_a_cached_head_stage_takes_its_images_without_augmentation(tmp_path):
    """train.cache_features: the head stage's batches drawn without augmentation (the same image
    every epoch), the segmentor stage's with data's; without the cache both take data's."""
    t = _trainer(tmp_path, "train.cache_features=true", "data.flip_prob=0.5", "data.photometric=true")
    seg, head = t.stages
    d = t.cfg.data
    assert seg.data(d) is d and d.ratio_range == [0.75, 1.25] and d.flip_prob == 0.5 and d.photometric
    plain = head.data(d)
    assert (plain.ratio_range, plain.flip_prob, plain.photometric) == ([1.0, 1.0], 0.0, False)
    assert {k: v for k, v in vars(plain).items() if k not in ("ratio_range", "flip_prob", "photometric")} == \
        {k: v for k, v in vars(d).items() if k not in ("ratio_range", "flip_prob", "photometric")}
    one = _OneImage(t.train_set)
    batches = [next(iter(train_batches(one, section, 5, 1, step, step + 1))) for step in (0, 1)
               for section in (plain, d)]  # the same image at steps 0 and 1, with other random draws
    assert torch.equal(batches[0][0], batches[2][0]) and not torch.equal(batches[1][0], batches[3][0])
    assert _trainer(tmp_path / "live", "data.flip_prob=0.5").stages[1].data(d) is d


def _trainer(tmp_path, *overrides):
    cfg = config.load(config.find("synthetic-smoke"), ["data.synthetic.num_train=4", "data.synthetic.num_val=1",
                                                       *overrides])
    return trainer.Trainer(cfg, tmp_path / "run", resume=False)


GSS = ["head.kind=gss", "eval.use_ema=false", "head.gss.fusion_channels=[8,16,32]", "head.gss.swin=[2,2,3]"]


@pytest.mark.parametrize("overrides,names", [
    ([], ["segmentor", "head"]),
    (GSS, ["segmentor", "prior", "head"]),
    ([*GSS, "prior.iters=0"], ["segmentor", "head"]),
    ([*GSS, "head.gss.decoder=learned"], ["segmentor", "prior", "head", "decoder"]),
    ([*GSS, "head.gss.decoder=learned", "decoder.iters=0"], ["segmentor", "prior", "head"]),
    (["head.kind=gss", "head.gss.conditioning=frozen-features"], ["segmentor", "prior", "head"]),
    (["segmentor.iters=0"], ["head"]),
])
def test_the_stages_a_config_runs(tmp_path, overrides, names):
    t = _trainer(tmp_path, *overrides)
    assert [s.name for s in t.stages] == names and t.stage_name == names[0]


def test_each_stage_takes_its_section(tmp_path):
    t = _trainer(tmp_path, *GSS, "head.gss.decoder=learned", "segmentor.betas=[0.8,0.9]", "prior.weight_decay=0.5",
                 "train.lr=0.25", "train.warmup_iters=7", "decoder.lr=0.5")
    seg, prior, head, decoder = t.stages
    assert seg.optimizer.defaults["betas"] == (0.8, 0.9) and seg.section is t.cfg.segmentor
    assert prior.optimizer.defaults["weight_decay"] == 0.5
    assert head.optimizer.defaults["lr"] == 0.25 and stages.lr_at(0, head.section) == pytest.approx(0.25 * 1e-6)
    assert decoder.optimizer.defaults["lr"] == 0.5 and decoder.section is t.cfg.decoder
    # each optimiser holds exactly what its stage trains: GSS's head stage, the backbone with the head
    backbone = list(t.segmentor.features.parameters())
    for stage, params in ((seg, list(t.segmentor.parameters())), (prior, t.head.prior_parameters()),
                          (head, [*t.head.trainable_parameters(), *backbone]), (decoder, t.head.decoder_parameters())):
        assert [id(p) for p in stage.optimizer.param_groups[0]["params"]] == [id(p) for p in params]


def test_the_head_gives_the_trainer_its_average_and_weights(tmp_path):
    from ddps.nn.head import SCHEDULE_BUFFERS

    t = _trainer(tmp_path)
    assert set(t.ema) == set(t.head.state_dict()) - set(SCHEDULE_BUFFERS)
    from ddps.app.model import build_head
    sampling = build_head(t.cfg, t.segmentor.feature_channels, for_training=False)  # T = 10, not 20
    assert sampling.num_timesteps != t.head.num_timesteps
    sampling.load_trained(t.ema)
    assert all(torch.equal(sampling.state_dict()[k], v) for k, v in t.ema.items())
    assert sampling.reconstruct(torch.zeros(1, 8, 8, dtype=torch.long)) is None  # DDPS has no prior to report


def test_rare_class_sampling_feeds_every_stage(tmp_path, monkeypatch):
    """data.rcs: the trainer reads the training labels once and every stage's batches draw through
    that sampler; without it, none."""
    t = _trainer(tmp_path, "data.rcs=true", "data.rcs_min_pixels=10", "segmentor.iters=1", "train.iters=1")
    assert t.rcs is not None and _trainer(tmp_path / "plain").rcs is None
    used = []
    sample = t.rcs.sample
    monkeypatch.setattr(t.rcs, "sample", lambda *args: used.append(1) or sample(*args))
    t.run(until="done")
    assert len(used) == 2 * 4  # two stages of one step of 4 images
