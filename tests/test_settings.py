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
    ({"lr": -1.0}, "lr=-1.0 is invalid: must be positive"),
    ({"weight_decay": -1e-4}, "weight_decay=-0.0001 is invalid: must be 0 or more"),
    ({"momentum": 1.0}, "momentum=1.0 is invalid"),
])
def test_bad_values_fail_clearly(override, message):
    with pytest.raises(ValueError, match=message):
        settings.get("cpu", **override)


def test_recipe_covers_training_only():
    a, b = settings.get("cpu"), settings.get("cpu", n_targets=100, gt_subsets=10)
    assert a.recipe() == b.recipe()
    assert a.recipe() != settings.get("cpu", lr=0.1).recipe()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "momentum", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field}=.* must be a finite number"):
        settings.get("cpu", **{field: value})


def test_overrides_as_mapping_or_json_text():
    assert settings.get("cpu", {"gt_models": 8}).gt_models == 8
    assert settings.get("cpu", '{"gt_models": 8}').gt_models == 8  # what papermill -p delivers
    assert settings.get("cpu", "{'gt_models': 8}", epochs=2).epochs == 2  # a Python literal works too
    with pytest.raises(ValueError, match="parameter overrides=.* is not a valid dict: write it as JSON"):
        settings.get("cpu", '{"gt_models": 8')
    with pytest.raises(ValueError, match="overrides must be a dict"):
        settings.get("cpu", "[1, 2]")


@pytest.mark.parametrize("value, kind, expected", [
    ("0.1", float, 0.1), (3, float, 3), ("[0.01, 0.1]", list, [0.01, 0.1]), ('{"a": 1}', dict, {"a": 1}),
    ("gaussian", str, "gaussian"), (5, int, 5)])
def test_literal_parses_papermill_strings(value, kind, expected):
    assert settings.literal(value, "p", kind) == expected


@pytest.mark.parametrize("value, kind, message", [
    ("abc", float, "not a valid float"), (True, int, "must be a int"), (2.5, int, "must be a int"),
    (float("nan"), float, "finite"), ("[1,", list, "not a valid list"), (3, str, "must be a str")])
def test_literal_refuses_wrong_types(value, kind, message):
    with pytest.raises(ValueError, match=message):
        settings.literal(value, "p", kind)


def test_readme_papermill_command_gives_the_override(tmp_path):
    """The re-run command the README documents, run by papermill's own command line (--prepare-only), injects
    parameters that the chapter's setup line turns into the intended setting."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    command = re.search(r"`(papermill notebooks/02_lds\.ipynb out\.ipynb[^`]*)`", readme).group(1)
    import shlex

    args = shlex.split(command)[1:]
    args[1] = str(tmp_path / "out.ipynb")
    subprocess.run([sys.executable, "-m", "papermill", *args, "--prepare-only", "--no-progress-bar"],
                   cwd=root, check=True, capture_output=True)
    cells = json.loads((tmp_path / "out.ipynb").read_text())["cells"]
    ns = {}
    for cell in cells:
        tags = cell["metadata"].get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            exec("".join(cell["source"]), ns)
    setup = next("".join(c["source"]) for c in cells if "settings.get(setting" in "".join(c["source"]))
    line = next(l for l in setup.splitlines() if l.startswith("cfg = settings.get("))
    exec("from course_lib import settings\n" + line, ns)
    assert ns["cfg"].name == "cpu" and ns["cfg"].gt_models == 8
