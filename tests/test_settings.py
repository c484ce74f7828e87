import pytest

from course_lib import settings


def test_presets_and_overrides():
    cfg = settings.get("cpu", epochs=3)
    assert cfg.epochs == 3 and cfg.name == "cpu" and cfg.dataset == "mnist5k"
    assert settings.get().name == "cpu"
    assert settings.get("smoke").gt_models >= 2
    assert settings.get("gpu").arch == "resnet9"


def test_unknown_setting_lists_valid_names():
    with pytest.raises(ValueError, match="valid settings: smoke, cpu, gpu"):
        settings.get("laptop")


def test_unknown_override_lists_valid_overrides():
    with pytest.raises(ValueError, match="unknown override.*'epoch'.*valid overrides:.*epochs"):
        settings.get("cpu", epoch=3)


@pytest.mark.parametrize("override, message", [
    ({"epochs": 0}, "epochs=0 is invalid: must be at least 1"),
    ({"epochs": 2.5}, "must be an integer"),
    ({"alpha": 1.5}, "alpha=1.5 is invalid"),
    ({"arch": "vit"}, "valid values: logreg, mlp, cnn, resnet9"),
    ({"dataset": "imagenet"}, "valid values: mnist5k, cifar10, cifar2"),
    ({"device": "tpu"}, "valid values: auto, cpu, cuda"),
    ({"lr": -1.0}, "lr > 0"),
])
def test_bad_values_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        settings.get("cpu", **override)


def test_recipe_covers_training_only():
    a, b = settings.get("cpu"), settings.get("cpu", n_targets=100, gt_subsets=10)
    assert a.recipe() == b.recipe()
    assert a.recipe() != settings.get("cpu", lr=0.1).recipe()
