"""Tuned schedules shipped as json and selected by name (pspc_index.schedule)."""
import json
from dataclasses import replace

import pytest

from pspc_index import schedule as sch
from pspc_index.errors import UserError


def tuned(**changes) -> sch.Schedule:
    return replace(sch.FASHION_MNIST, name="fm-test-tuned", **changes)


def write(folder, doc, name="s.json"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(doc))
    return folder / name


def test_json_round_trip_and_selection_by_name(tmp_path, monkeypatch):
    s = tuned(patch_sizes=(28,) * 7 + (21, 13, 9, 9, 5, 5, 3, 3, 3, 3, 3), lambdas=(1.0,) * 7 + (0.9,) * 11)
    write(tmp_path, sch.schedule_to_json(s, {"made_by": "test"}))
    found = sch.tuned_schedules(tmp_path)
    assert found == {"fm-test-tuned": s}
    # selectable by name next to the derived and shipped schedules; the 28 x 28 default is the shipped tuned one
    monkeypatch.setattr(sch, "SCHEDULES", {**sch.SCHEDULES, **found})
    assert sch.get_schedule("fm-test-tuned", 28, 28) == s
    assert sch.get_schedule(None, 28, 28) is sch.SCHEDULES["fashion-mnist-tuned"]
    assert sch.get_schedule("fashion-mnist", 28, 28) is sch.FASHION_MNIST
    with pytest.raises(UserError, match="28x28 images"):
        sch.get_schedule("fm-test-tuned", 32, 32)
    # switching the default is the one DEFAULTS entry
    monkeypatch.setattr(sch, "DEFAULTS", {(28, 28): "fm-test-tuned"})
    assert sch.default_schedule(28, 28) == s and sch.get_schedule(None, 28, 28) == s


def test_shipped_tuned_schedule():
    """The shipped Fashion-MNIST default: the evaluation's tuned s(t) and lambda(t) (docs/results.md section
    6), the derived schedule's grid and ELS k(t)."""
    s = sch.SCHEDULES["fashion-mnist-tuned"]
    assert sch.default_schedule(28, 28) is s and s.shape == (28, 28)
    assert s.patch_sizes == (28,) * 7 + (21, 21, 13, 9, 5, 5) + (3,) * 5
    assert s.els_sizes == sch.FASHION_MNIST.els_sizes and len(s.lambdas) == sch.FASHION_MNIST.steps


def test_no_folder_no_schedules(tmp_path):
    assert sch.tuned_schedules(tmp_path / "absent") == {}
    assert all(sch.SCHEDULES[n] is s for n, s in (("cifar10", sch.CIFAR10), ("fashion-mnist", sch.FASHION_MNIST)))


@pytest.mark.parametrize("change, why", [
    (dict(format="x"), "format"),
    (dict(name="fashion-mnist"), "derived schedule"),
    (dict(patch_sizes=[28] * 17 + [4]), "odd and fit"),
    (dict(patch_sizes=[28] * 17 + [31]), None),  # 31 >= 28: the whole image, accepted
    (dict(lambdas=[1.0] * 17 + [0.0]), r"\(0, 1\]"),
    (dict(lambdas=[1.0] * 17), "per step"),
    (dict(els_sizes=[3] * 18), None),
    (dict(els_sizes=[4] * 18), "ELS sizes"),
    (dict(shape=[28]), "not a readable"),
])
def test_bad_documents_refused(tmp_path, change, why):
    doc = {**sch.schedule_to_json(tuned()), **change}
    path = write(tmp_path, doc)
    if why is None:
        assert sch.read_schedule_json(path).name == "fm-test-tuned"
        return
    with pytest.raises(UserError, match=why):
        sch.read_schedule_json(path)


def test_unreadable_file(tmp_path):
    (tmp_path / "s.json").write_text("{not json")
    with pytest.raises(UserError, match="not a readable schedule json"):
        sch.tuned_schedules(tmp_path)
