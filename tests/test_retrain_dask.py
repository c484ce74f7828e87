"""Retraining on a Dask cluster (``retrain.use_cluster`` / $COURSE_DASK_SCHEDULER): the same models bit for bit as
the in-process build, and a worker killed mid-chunk costs that chunk only. The cluster tests need the optional extra
``cluster`` (dask[distributed]) and skip without it."""
import collections
import json
import os
import signal
import sys

import pytest
import torch

from course_lib import lds, retrain, train

NO_DASK = "the optional extra `cluster` (dask[distributed]) is not installed: pip install -e '.[cluster]'"


def _tiny(smoke, **kw):
    return smoke.replace(gt_subsets=3, gt_models=2, epochs=1, **kw)


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed", reason=NO_DASK)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
            distributed.Client(cl) as c:
        yield c


@pytest.fixture
def one_thread():
    """The in-process reference trains on one thread, like the workers (Dask's nanny sets OMP_NUM_THREADS=1):
    another thread count may sum in another order, and the recipe amplifies round-off."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_without_a_cluster_dask_is_never_imported(smoke, smoke_data, tmp_path, monkeypatch):
    monkeypatch.delenv(retrain.SCHEDULER_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "distributed", None)  # any `import distributed` now fails, as without dask
    masks = retrain.subset_masks(smoke_data.n_train, 1, 0.5, 0, stream="t")
    out, _, _ = retrain.train_outputs(smoke.replace(epochs=1), smoke_data, masks, torch.arange(1), tmp_path, "t",
                                      progress=False)
    assert out.shape == (1, len(smoke_data.y_test))
    monkeypatch.setenv(retrain.SCHEDULER_ENV, "tcp://127.0.0.1:8786")
    with pytest.raises(ImportError, match=r"needs dask: pip install -e '\.\[cluster\]'"):
        retrain._client()
    with retrain.use_cluster(None):  # in-process, whatever the environment says
        assert retrain._client() is None


def test_cluster_build_equals_the_serial_build(client, smoke, smoke_data, tmp_path, monkeypatch, one_thread):
    assert set(client.run(torch.get_num_threads).values()) == {1}
    cfg = _tiny(smoke, ensemble_size=2)
    serial = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path / "serial", progress=False)
    fixed = lds.build_fixed_seed_ground_truth(cfg, smoke_data, 0.1, m=3, cache=tmp_path / "serial", progress=False)
    monkeypatch.setattr(train, "train_models", lambda *a, **kw: pytest.fail("trained in the driver"))
    monkeypatch.setattr(train, "train_weighted", lambda *a, **kw: pytest.fail("trained in the driver"))
    with retrain.use_cluster(client):
        gt = lds.build_ground_truth(cfg, smoke_data, cache=tmp_path / "dask", progress=False)
        gt_fixed = lds.build_fixed_seed_ground_truth(cfg, smoke_data, 0.1, m=3, cache=tmp_path / "dask",
                                                     progress=False)
    for a, b in ((gt, serial), (gt_fixed, fixed)):
        assert torch.equal(a.masks, b.masks) and a.spec == b.spec
        assert torch.equal(a.outputs, b.outputs) and torch.equal(a.accuracy, b.accuracy)  # bit for bit


def test_a_diverged_model_on_a_worker_stops_the_build_and_is_not_stored(client, smoke, smoke_data, tmp_path):
    with retrain.use_cluster(client), \
            pytest.raises(FloatingPointError, match=r"ground-truth subset 0, replicate 0 \(seed \d+\).*recipe"):
        lds.build_ground_truth(_tiny(smoke, ensemble_size=6, lr=1e6), smoke_data, cache=tmp_path, progress=False)
    assert not list(tmp_path.glob("gt_*/part_*"))


def _kill_once(distributed, folder, log, marker):
    """A worker plugin that wraps ``train.train_models`` in every worker process, restarted ones included: it logs
    the seeds of every chunk it trains and, the first time a chunk finishes training while a part is already on
    disk, kills its own worker before the part is saved (once: ``marker`` records the parts on disk then). Defined
    here so that cloudpickle sends the class by value: the workers cannot import this test module."""

    class KillOnce(distributed.WorkerPlugin):
        def setup(self, worker):
            self.real = real = train.train_models

            def train_models(cfg, data, masks, seeds, **kw):
                with open(log, "a") as f:
                    f.write(" ".join(map(str, seeds.tolist())) + "\n")
                models = real(cfg, data, masks, seeds, **kw)
                done = {p.name: p.stat().st_mtime_ns for p in folder.glob("part_*.pt")}
                if done:
                    try:
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        return models
                    os.write(fd, json.dumps(done).encode())
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
                return models

            train.train_models = train_models

        def teardown(self, worker):
            train.train_models = self.real

    return KillOnce()


def test_a_killed_worker_costs_only_its_chunk(client, smoke, smoke_data, tmp_path, monkeypatch, one_thread):
    distributed = pytest.importorskip("distributed", reason=NO_DASK)
    cfg = smoke.replace(epochs=1, ensemble_size=1)
    M = 6
    masks = retrain.subset_masks(smoke_data.n_train, M, 0.5, 0, stream="kill")
    seeds = retrain.model_seeds(M, 1, 0, stream="kill").flatten()
    serial, acc, _ = retrain.train_outputs(cfg, smoke_data, masks, seeds, tmp_path / "serial", "s", progress=False)
    folder, log, marker = tmp_path / "dask", tmp_path / "trained.log", tmp_path / "killed"
    folder.mkdir()
    client.register_plugin(_kill_once(distributed, folder, log, marker), name="kill-once")
    try:
        with retrain.use_cluster(client):
            out, acc_dask, _ = retrain.train_outputs(cfg, smoke_data, masks, seeds, folder, "d", progress=False)
    finally:
        client.unregister_worker_plugin("kill-once")
    assert marker.exists(), "no worker was killed: the test did not test anything"
    assert torch.equal(out, serial) and torch.equal(acc_dask, acc)
    trained = collections.Counter(log.read_text().split("\n")[:-1])
    assert sorted(trained) == sorted(str(int(s)) for s in seeds)  # every chunk trained, and
    assert sorted(trained.values()) == [1] * (M - 1) + [2]  # only the killed one twice
    before = json.loads(marker.read_text())  # the parts written before the kill were never written again
    assert before and all((folder / n).stat().st_mtime_ns == t for n, t in before.items())
    # a later call finds every part and trains nothing
    monkeypatch.setattr(train, "train_models", lambda *a, **kw: pytest.fail("retrained a stored part"))
    again, _, _ = retrain.train_outputs(cfg, smoke_data, masks, seeds, folder, "d", progress=False)
    assert torch.equal(again, serial)
