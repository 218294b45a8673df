"""FP training and checkpoints: resume is bit-exact, settings are validated, tampered files are refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tdqrt.calibration.checkpoint import load_fp_checkpoint
from tdqrt.calibration.training import TrainConfig, lr_factor, train
from tdqrt.engines.errors import ArtifactError, ConfigError

TINY = dict(data="digits", model="tiny", batch_size=8, warmup_steps=1, num_data=64, lr=1e-3)


def test_resume_is_bit_exact(tmp_path):
    # A constant learning rate makes "2 steps, then extend to 4" follow the same trajectory as "4 steps", so
    # the resumed weights must equal the uninterrupted ones bit for bit (model, EMA, optimizer, RNG restored).
    cfg = TINY | {"lr_schedule": "constant", "checkpoint_every": 100}
    full = train(TrainConfig(steps=4, **cfg), tmp_path / "full", progress=False)
    part = tmp_path / "part"
    train(TrainConfig(steps=2, **cfg), part, progress=False)
    resumed = train(TrainConfig(steps=4, **cfg), part, resume=True, progress=False)
    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = json.loads((part / "train_log.json").read_text())["loss"]
    assert [s for s, _ in log] == [0, 1, 2, 3]


def test_resume_refuses_changed_settings_and_missing_state(tmp_path):
    train(TrainConfig(steps=2, checkpoint_every=100, **TINY), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="lr"):
        train(TrainConfig(steps=4, **(TINY | {"lr": 5e-4})), tmp_path / "a", resume=True, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(TrainConfig(steps=2, **TINY), tmp_path / "a", progress=False)
    with pytest.raises(ArtifactError, match="does not exist"):
        train(TrainConfig(steps=2, **TINY), tmp_path / "b", resume=True, progress=False)


@pytest.mark.parametrize(
    "bad", [{"model": "huge"}, {"steps": 0}, {"lr": -1.0}, {"lr_schedule": "step"}, {"ema_decay": 1.0},
            {"cond_drop_prob": 1.5}]
)
def test_invalid_settings(bad):
    with pytest.raises(ConfigError):
        TrainConfig(**(TINY | bad))


def test_lr_schedules():
    cos = TrainConfig(steps=110, warmup_steps=10, lr_schedule="cosine", **{k: v for k, v in TINY.items() if k != "warmup_steps"})
    assert lr_factor(cos, 0) == pytest.approx(0.1)
    assert lr_factor(cos, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 60) == pytest.approx(0.5)
    lin = TrainConfig(**(cos.to_dict() | {"lr_schedule": "linear"}))
    assert lr_factor(lin, 60) == pytest.approx(0.5)
    assert lr_factor(lin, 110) == 0.0


def test_config_round_trip():
    cfg = TrainConfig(**TINY)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig.from_dict(cfg.to_dict() | {"lrr": 1})


def test_checkpoint_round_trip_and_card(tiny_digits_model):
    ckpt = load_fp_checkpoint(tiny_digits_model)
    card = json.loads((tiny_digits_model / "model.json").read_text())
    assert card["format"] == "tdqrt-fp-model" and card["ema"] is True
    assert card["data"]["name"] == "digits" and card["schedule"]["kind"] == "linear"
    assert card["training"]["model"] == "tiny" and "torch" in card["versions"]
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([10, 900])
    y = torch.tensor([3, ckpt.model.null_label])
    again = load_fp_checkpoint(tiny_digits_model)
    with torch.no_grad():
        assert torch.equal(ckpt.model(x, t, y), again.model(x, t, y))


def test_tampered_or_truncated_checkpoint_refused(tiny_digits_model, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_digits_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="sha256"):
        load_fp_checkpoint(bad)
    (bad / "model.json").write_text("{ truncated")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_fp_checkpoint(bad)
    with pytest.raises(ArtifactError, match="not a model directory"):
        load_fp_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_training_target_follows_the_prediction_type(prediction):
    """The loss target is what the schedule's network predicts: ε, v (diffusers' ``get_velocity``, the oracle) or
    x0; a model that outputs it exactly has zero loss, an ε-predictor's output does not (unless ε is the target)."""
    import diffusers
    import torch.nn.functional as F

    from tdqrt.calibration.data.images import ImageData
    from tdqrt.calibration.training import noisy_batch
    from tdqrt.runtime.schedules import NoiseSchedule, ScheduleConfig

    x0 = torch.rand(1, 1, 8, 8) * 2 - 1  # one image: every drawn x0 is this one
    data = ImageData(images=x0, labels=None, num_classes=0, class_names=[], name="one")
    schedule = NoiseSchedule(ScheduleConfig(prediction_type=prediction))
    x_t, t, y, target = noisy_batch(data, schedule, 16, torch.Generator().manual_seed(0), cond_drop_prob=0.0,
                                    null_label=None)
    oracle = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    a_bar = oracle.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0s = x0.expand_as(x_t)
    noise = (x_t - a_bar.sqrt() * x0s) / (1 - a_bar).sqrt()
    expected = {"epsilon": noise, "sample": x0s, "v_prediction": oracle.get_velocity(x0s, noise, t)}[prediction]
    assert torch.allclose(target, expected, atol=1e-4)
    assert F.mse_loss(expected, target) < 1e-8
    assert (F.mse_loss(noise, target) < 1e-8) == (prediction == "epsilon")
