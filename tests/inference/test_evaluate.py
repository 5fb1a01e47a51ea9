"""evaluate's nnU-Net ``summary.json`` fields, by hand: per case and foreground label TP/FP/FN/TN, Dice and
IoU (NaN where the label is in neither file), ``mean`` (NaN-skipping over cases) and ``foreground_mean``."""
import json
import math

import numpy as np
import pytest
from PIL import Image

from upernet_vit.cli import main
from upernet_vit.inference.evaluate import evaluate


def _write(folder, name, array):
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(folder / f"{name}.png")


@pytest.fixture
def two_cases(tmp_path):
    # case a: label 1 TP 2, FP 1, FN 1; label 2 TP 1, FP 1, FN 1.  case b: label 2 absent from both
    _write(tmp_path / "gt", "a", [[0, 1, 1, 2], [0, 1, 2, 0]])
    _write(tmp_path / "pred", "a", [[0, 1, 0, 2], [1, 1, 0, 2]])
    _write(tmp_path / "gt", "b", [[0, 1, 1, 0], [0, 0, 0, 0]])
    _write(tmp_path / "pred", "b", [[0, 1, 1, 0], [0, 0, 0, 0]])
    return tmp_path


def test_nnunet_fields_by_hand(two_cases):
    summary = evaluate(str(two_cases / "pred"), str(two_cases / "gt"), {"background": 0, "a": 1, "b": 2})
    first, second = summary["metric_per_case"]
    assert first["reference_file"].endswith("gt/a.png") and first["prediction_file"].endswith("pred/a.png")
    assert set(first["metrics"]) == {"1", "2"}  # foreground labels only, keyed by value as nnU-Net does
    assert first["metrics"]["1"] == {"Dice": 4 / 6, "IoU": 2 / 4, "FP": 1, "TP": 2, "FN": 1, "TN": 4,
                                     "n_pred": 3, "n_ref": 3}
    assert first["metrics"]["2"] == {"Dice": 2 / 4, "IoU": 1 / 3, "FP": 1, "TP": 1, "FN": 1, "TN": 5,
                                     "n_pred": 2, "n_ref": 2}
    assert second["metrics"]["1"]["Dice"] == 1.0 and math.isnan(second["metrics"]["2"]["Dice"])
    assert summary["mean"]["1"]["Dice"] == pytest.approx((4 / 6 + 1) / 2)
    assert summary["mean"]["2"]["Dice"] == pytest.approx(0.5)  # the NaN case is skipped
    assert summary["mean"]["2"]["TN"] == pytest.approx((5 + 8) / 2)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(((4 / 6 + 1) / 2 + 0.5) / 2)
    assert summary["mean_case_dice"]["b"] == pytest.approx(0.5)  # our own field agrees


def test_ignore_value_in_truth_is_skipped_and_in_a_prediction_is_a_miss(tmp_path):
    _write(tmp_path / "gt", "a", [[0, 1, 255, 255]])
    _write(tmp_path / "pred", "a", [[1, 255, 1, 0]])  # the model "predicted" the ignore value on a 1
    summary = evaluate(str(tmp_path / "pred"), str(tmp_path / "gt"), {"background": 0, "fg": 1}, ignore_value=255)
    assert summary["metric_per_case"][0]["metrics"]["1"] == {
        "Dice": 0.0, "IoU": 0.0, "FP": 1, "TP": 0, "FN": 1, "TN": 0, "n_pred": 1, "n_ref": 1}
    assert summary["dice"]["fg"] == 0.0


def test_the_written_summary_keeps_nan_as_nnunet_does(two_cases, capsys):
    labels = two_cases / "dataset.json"
    labels.write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2}}))
    assert main(["evaluate", "--pred", str(two_cases / "pred"), "--gt", str(two_cases / "gt"),
                 "--labels", str(labels)]) == 0
    record = json.loads((two_cases / "pred" / "summary.json").read_text())  # Python's json reads NaN
    assert math.isnan(record["metric_per_case"][1]["metrics"]["2"]["IoU"])
    assert record["foreground_mean"]["TP"] == pytest.approx(((2 + 2) / 2 + (1 + 0) / 2) / 2)  # counts are never NaN


def test_png_predictions_pair_with_tiff_masks_of_the_same_name(two_cases):
    """The docs' promise: pairs are made by name, the suffix may differ (PNG predictions, TIFF masks)."""
    gt_tif = two_cases / "gt_tif"
    gt_tif.mkdir()
    for name in ("a", "b"):
        Image.open(two_cases / "gt" / f"{name}.png").save(gt_tif / f"{name}.tif")
    labels = {"background": 0, "a": 1, "b": 2}
    from_png = evaluate(str(two_cases / "pred"), str(two_cases / "gt"), labels)
    from_tif = evaluate(str(two_cases / "pred"), str(gt_tif), labels)
    assert [c["reference_file"][-5:] for c in from_tif["metric_per_case"]] == ["a.tif", "b.tif"]
    assert [c["metrics"]["1"] for c in from_tif["metric_per_case"]] == [c["metrics"]["1"] for c in from_png["metric_per_case"]]


def test_evaluate_labels_dataset_json_honours_its_ignore_label(tmp_path):
    """The command reads the ignore value from dataset.json's labels, as the Python ignore_value= does."""
    _write(tmp_path / "gt", "a", [[0, 1, 255, 255]])
    _write(tmp_path / "pred", "a", [[0, 1, 1, 0]])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "fg": 1, "ignore": 255}}))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--labels", str(tmp_path / "dataset.json")]) == 0
    record = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert record["metric_per_case"][0]["metrics"]["1"] == {  # the two ignored pixels are in no count
        "Dice": 1.0, "IoU": 1.0, "FP": 0, "TP": 1, "FN": 0, "TN": 1, "n_pred": 1, "n_ref": 1}
