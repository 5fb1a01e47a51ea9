"""The model's record (issue 26): a typed, versioned ``ModelRecord``; older records still load."""
import json

import pytest

from upernet_vit.runs.record import RECORD_VERSION, ModelRecord, read_record
from helpers import record_8bit, tiny_model


def test_a_record_round_trips_through_a_model_folder(tmp_path):
    model = tiny_model()
    record = ModelRecord(mean=[0.5] * 3, std=[0.25] * 3, normalization="preset", label_values=[0, 128, 255],
                         patch_size=[32, 32], intensity_scale=255.0, intensity_range=[3.0, 250.0],
                         label_names=["background", "a", "b"], num_channels=3, file_ending=".png")
    model.preprocessing = record.to_json()
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "preprocessing.json").read_text())["version"] == RECORD_VERSION
    assert read_record(str(tmp_path / "m")) == record
    assert read_record(str(tmp_path)) is None  # a folder without a record


def test_a_version_1_record_loads_and_a_newer_or_broken_one_is_named(tmp_path):
    old = record_8bit(tiny_model())  # the keys records had before the version field, and no optional ones
    record = ModelRecord.from_json({**old, "extra": 1}, "p.json")
    assert record.version == RECORD_VERSION and record.label_names is None and record.intensity_scale == 255.0
    with pytest.raises(ValueError, match=r"^p.json lacks intensity_range \(written by an older upernet-vit"):
        ModelRecord.from_json({k: v for k, v in old.items() if k != "intensity_range"}, "p.json")
    with pytest.raises(ValueError, match=r"^p.json is a version 9 record, written by a newer upernet-vit"):
        ModelRecord.from_json({**old, "version": 9}, "p.json")
    with pytest.raises(ValueError, match=r"^p.json is not a JSON object"):
        ModelRecord.from_json([1, 2], "p.json")
    for version in (True, 0, "2", None):  # not a newer record: an edited one
        with pytest.raises(ValueError, match=r"^p.json: version .* is not a record version"):
            ModelRecord.from_json({**old, "version": version}, "p.json")


@pytest.mark.parametrize("key, value, must", [
    ("patch_size", 512, r"null or \[height, width\]"), ("mean", "abc", "a list of numbers"),
    ("std", [0.2, 0.0, 0.1], "a list of positive numbers"), ("normalization", "foo", "'preset', 'zscore' or 'volume'"),
    ("label_values", [0, 1.5], "a list of integers"), ("intensity_scale", -1, "a positive number"),
    ("intensity_range", [0], r"\[min, max\]"), ("num_channels", True, "null or a positive integer"),
])
def test_an_edited_field_of_the_wrong_type_is_named(key, value, must):
    with pytest.raises(ValueError, match=rf"^p.json: {key} is .*, but must be {must}.* \(the file was edited\)"):
        ModelRecord.from_json({**record_8bit(tiny_model()), key: value}, "p.json")


def test_a_model_folder_without_a_record_means_what_the_caller_says():
    record = ModelRecord.for_untrained([0.1, 0.2], [0.3, 0.4], 3, 65535)
    assert (record.normalization, record.label_values, record.patch_size) == ("preset", [0, 1, 2], None)
    assert record.intensity_range == [0.0, 65535.0] and record.mean == [0.1, 0.2]
