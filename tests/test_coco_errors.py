"""COCO reader errors named with the file and the annotation id, before training starts (issue 31)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from nonlocalnet.detection.coco import CocoDetection, CocoFormatError, read_coco
from nonlocalnet.detection.synthetic import make_builtin_coco


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("figures")
    images, ann = make_builtin_coco("figures", root, num_images=2, image_size=64)
    return Path(images), json.loads(Path(ann).read_text())


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(area="big"), "annotations whose 'area' is not a number (ids): {id}"),
        (
            lambda a: a.update(segmentation={"size": [64, 64], "counts": "garbage!!"}),
            "annotations whose 'segmentation' is neither polygons",
        ),
        (
            lambda a: a.update(segmentation={"size": [64, 64], "counts": [10, 20]}),
            "annotations whose 'segmentation' is neither polygons",
        ),  # runs that do not cover the image
        (lambda a: a.update(iscrowd=7), "annotations whose 'iscrowd' is not 0 or 1 (ids): {id}"),
        (lambda a: a.update(image_id=[1]), "annotations whose 'id', 'image_id' or 'category_id' is not an integer"),
    ],
)
def test_a_bad_annotation_field_is_refused_when_the_file_is_read_naming_the_id(tmp_path, figures, change, message):
    images, data = figures
    data = copy.deepcopy(data)
    change(data["annotations"][1])
    path = _write(tmp_path, data)
    with pytest.raises(CocoFormatError) as caught:
        read_coco(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message.format(id=data["annotations"][1]["id"]) in str(caught.value)


def test_keypoints_of_48_values_instead_of_51_are_refused_before_training(tmp_path, figures):
    images, data = figures
    data = copy.deepcopy(data)
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:48]
    path = _write(tmp_path, data)
    with pytest.raises(
        CocoFormatError,
        match=f"annotations whose 'keypoints' are not 51 numbers .* \\(ids\\): {data['annotations'][0]['id']}",
    ):
        CocoDetection(images, path, keypoints=True, train=True)  # (before: a reshape error mid-epoch)


def test_an_image_entry_that_is_not_an_image_is_one_error_naming_file_and_id(tmp_path, figures):
    images, data = figures
    (tmp_path / "img").mkdir()
    for info in data["images"]:
        (tmp_path / "img" / info["file_name"]).write_bytes((images / info["file_name"]).read_bytes())
    first = data["images"][0]
    (tmp_path / "img" / first["file_name"]).write_text("not a picture")
    dataset = CocoDetection(tmp_path / "img", _write(tmp_path, data), keypoints=True)
    with pytest.raises(
        ValueError,
        match=f"image '{first['file_name']}' \\(id {first['id']}\\) in {tmp_path / 'img'} is not a readable image",
    ):
        dataset[dataset.ids.index(first["id"])]
