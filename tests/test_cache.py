"""Every cache is keyed by what shapes its content, survives a change of chunking, refuses foreign content with a
clear message, and never stores or passes on non-finite values."""
import shutil

import pytest
import torch

from course_lib import cache, lds, retrain, train
from course_lib.attribution import datamodels as dm


def _tiny(smoke, **kw):
    return smoke.replace(gt_subsets=3, gt_models=2, epochs=1, **kw)


def test_ground_truth_resumes_under_another_chunk_size(smoke, smoke_data, tmp_path, monkeypatch):
    """Interrupted with ensemble_size=2, resumed with 4 (the reported crash): the finished parts are reused, only
    the missing models are trained, and the result equals an uninterrupted build."""
    calls = []
    real = train.train_models

    def interrupted(*a, **kw):
        calls.append(len(a[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_models", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lds.build_ground_truth(_tiny(smoke, ensemble_size=2), smoke_data, cache=tmp_path, progress=False)
    assert [p.name for p in tmp_path.glob("gt_*/part_*")] == ["part_000000_000002.pt"]
    calls.clear()
    monkeypatch.setattr(train, "train_models", lambda *a, **kw: (calls.append(len(a[2])), real(*a, **kw))[1])
    gt = lds.build_ground_truth(_tiny(smoke, ensemble_size=4), smoke_data, cache=tmp_path, progress=False)
    assert calls == [4]  # models 2..5 in one chunk; models 0, 1 came from the part
    fresh = lds.build_ground_truth(_tiny(smoke, ensemble_size=1), smoke_data, cache=tmp_path / "fresh",
                                   progress=False)
    assert torch.allclose(gt.outputs, fresh.outputs, atol=1e-3)  # batched vs single convolutions: round-off only
    assert not list(tmp_path.glob("gt_*/part_*"))  # parts are removed once the ground truth is whole


def _copy_into_folder_of(path, root, cfg, other):
    """Copy a file of cfg's ground-truth folder into the folder that ``other``'s ground truth uses under root."""
    name = path.parent.name.replace(cache.cache_key(lds.ground_truth_spec(cfg)),
                                    cache.cache_key(lds.ground_truth_spec(other)))
    (root / name).mkdir(parents=True)
    shutil.copy(path, root / name / path.name)


def test_foreign_parts_and_files_are_refused(smoke, smoke_data, tmp_path, monkeypatch):
    cfg = _tiny(smoke, ensemble_size=2)
    real = train.train_models
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(train, "train_models", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lds.build_ground_truth(cfg, smoke_data, cache=tmp_path / "a", progress=False)
    part = next((tmp_path / "a").glob("gt_*/part_*"))
    # the same part file dropped into the folder of another ground truth (other subsets and seeds)
    other = cfg.replace(gt_seed=1)
    _copy_into_folder_of(part, tmp_path / "b", cfg, other)
    with pytest.raises(ValueError, match="foreign or stale content"):
        lds.build_ground_truth(other, smoke_data, cache=tmp_path / "b", progress=False)
    # a finished ground-truth file whose spec is not the setting's
    monkeypatch.setattr(train, "train_models", real)
    gt = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path / "a", progress=False)
    _copy_into_folder_of(next((tmp_path / "a").glob("gt_*/ground_truth.pt")), tmp_path / "c", cfg, other)
    with pytest.raises(ValueError, match="foreign content"):
        lds.build_ground_truth(other, smoke_data, cache=tmp_path / "c", progress=False)
    assert gt.outputs.shape[:2] == (3, 2)


def test_a_diverged_model_stops_the_build_and_is_not_stored(smoke, smoke_data, tmp_path):
    cfg = _tiny(smoke, ensemble_size=2, lr=1e6)  # a learning rate that blows up
    with pytest.raises(FloatingPointError, match=r"ground-truth subset 0, replicate 0 \(seed \d+\).*recipe"):
        lds.build_ground_truth(cfg, smoke_data, cache=tmp_path, progress=False)
    assert not list(tmp_path.glob("gt_*/part_*")) and not list(tmp_path.glob("gt_*/ground_truth.pt"))
    with pytest.raises(FloatingPointError, match="datamodel model 0"):
        dm.training_data(cfg, smoke_data, m=2, cache=tmp_path, progress=False)
    with pytest.raises(FloatingPointError, match="reference model 0 .* diverged"):
        train.reference_models(cfg, smoke_data, 1, cache=tmp_path)


def test_reference_models_refuse_foreign_files(smoke, smoke_data, tmp_path):
    cfg = smoke.replace(epochs=1)
    train.reference_models(cfg, smoke_data, 1, stream="a", cache=tmp_path)
    folder_a = next(tmp_path.glob("models_*"))
    ref_b = train.reference_models(cfg, smoke_data, 1, stream="b", cache=tmp_path)
    folder_b = next(p for p in tmp_path.glob("models_*") if p != folder_a)
    shutil.copy(folder_a / "model_0000.pt", folder_b / "model_0000.pt")
    with pytest.raises(ValueError, match="another model than reference model 0 of stream 'b'"):
        train.reference_models(cfg, smoke_data, 1, stream="b", cache=tmp_path)
    assert len(ref_b) == 1


def test_load_or_compute_checks_its_spec(tmp_path):
    path = tmp_path / "r.pt"
    value = {"scores": torch.arange(3.0), "seconds": 1.5}
    assert cache.load_or_compute(path, lambda: value, {"k": 1}) is value
    again = cache.load_or_compute(path, lambda: pytest.fail("recomputed"), {"k": 1})
    assert torch.equal(again["scores"], value["scores"]) and again["seconds"] == 1.5
    with pytest.raises(ValueError, match="foreign content"):
        cache.load_or_compute(path, lambda: value, {"k": 2})


def test_parts_cover_any_range(smoke, smoke_data, tmp_path):
    """train_outputs reuses parts written with other chunk sizes and longer streams, and trains only the gaps."""
    cfg = smoke.replace(epochs=1, ensemble_size=2)
    masks = retrain.subset_masks(smoke_data.n_train, 5, 0.5, 0, stream="t")
    seeds = torch.arange(5)
    out5, _, _ = retrain.train_outputs(cfg, smoke_data, masks, seeds, tmp_path, "t", progress=False)
    out3, _, _ = retrain.train_outputs(cfg.replace(ensemble_size=3), smoke_data, masks[:3], seeds[:3], tmp_path,
                                       "t", progress=False)
    assert torch.equal(out3, out5[:3])  # part [2, 4) clipped to row 2
    names = sorted(p.name for p in tmp_path.glob("part_*"))
    assert names == ["part_000000_000002.pt", "part_000002_000004.pt", "part_000004_000005.pt"]


def test_lds_and_noise_ceiling_refuse_non_finite_outputs():
    masks = retrain.subset_masks(40, 30, 0.5, 0)
    tau = torch.randn(40, 4)
    outputs = (masks.double() @ tau.double())[:, None, :].repeat(1, 2, 1).float()
    gt = lds.GroundTruth(masks, outputs, torch.ones(30, 2), torch.arange(4), {}, 0.0)
    assert lds.lds(tau, gt).mean == pytest.approx(1.0)
    gt.outputs[3, 1, 2] = float("nan")  # one diverged model
    with pytest.raises(ValueError, match="1 non-finite outputs"):
        lds.lds(tau, gt)
    with pytest.raises(ValueError, match="non-finite outputs"):
        lds.noise_ceiling(gt)
    assert lds.lds(tau[:, [0, 1, 3]], gt, targets=[0, 1, 3]).mean == pytest.approx(1.0)  # other targets are fine


def test_cached_models_counts_the_leading_models(smoke, smoke_data, tmp_path):
    cfg = smoke.replace(epochs=1, ensemble_size=2)
    assert dm.cached_models(cfg, cache=tmp_path) == 0
    dm.training_data(cfg, smoke_data, m=3, cache=tmp_path, progress=False)
    assert dm.cached_models(cfg, cache=tmp_path) == 3
    assert dm.cached_models(cfg.replace(lr=0.01), cache=tmp_path) == 0  # another recipe, another stream


def test_load_or_compute_refuses_unreadable_files(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(lds.Score(0.1, (0.0, 0.2), None), path)  # a pickled object, as an older format stored
    with pytest.raises(ValueError, match="cannot be read as a cached result"):
        cache.load_or_compute(path, lambda: {}, {"k": 1})
