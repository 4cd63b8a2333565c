"""discover() reads nothing from outside the data set's folder: images and .txt captions that are symbolic links
leading out are skipped (and named), a metadata.jsonl leading out is refused, while links inside the set (or to the set) work."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from loraforge_engine.data import DataError, discover


def image(path, colour=(200, 30, 30)):
    Image.new("RGB", (16, 16), colour).save(path)


@pytest.fixture
def sets(tmp_path):
    """A captioned set and, beside it, a folder of private files a link could point at."""
    data = tmp_path / "set"
    private = tmp_path / "private"
    data.mkdir()
    private.mkdir()
    for i in range(2):
        image(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    image(private / "secret.png", (0, 0, 255))
    (private / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    return data, private


def test_caption_link_leading_out_is_skipped(sets):
    data, private = sets
    image(data / "2.png")
    os.symlink(private / "passwd", data / "2.txt")
    skipped: list = []
    ex = discover(data, skipped=skipped)
    assert [e.path.name for e in ex] == ["0.png", "1.png"]
    assert all("root:" not in e.caption for e in ex)
    assert [(s.name, s.reason) for s in skipped] == [("2.txt", "unreadable")]


def test_image_link_leading_out_is_skipped(sets):
    data, private = sets
    os.symlink(private / "secret.png", data / "2.png")
    (data / "2.txt").write_text("a stolen image")
    skipped: list = []
    ex = discover(data, skipped=skipped)
    assert [e.path.name for e in ex] == ["0.png", "1.png"]
    assert [(s.name, s.reason) for s in skipped] == [("2.png", "unreadable")]


def test_set_of_only_outside_links_holds_no_images(sets):
    data, private = sets
    for i in range(2):
        (data / f"{i}.txt").unlink()
        os.symlink(private / "passwd", data / f"{i}.txt")
    with pytest.raises(DataError, match="holds no captioned images"):
        discover(data)


def test_links_inside_the_set_are_followed(sets, tmp_path):
    data, _ = sets
    (data / "originals").mkdir()
    image(data / "originals" / "2.png")
    os.symlink(data / "originals" / "2.png", data / "2.png")
    os.symlink(data / "0.txt", data / "2.txt")
    skipped: list = []
    ex = discover(data, skipped=skipped)
    assert [e.path.name for e in ex] == ["0.png", "1.png", "2.png"]
    assert ex[2].caption == "caption 0" and skipped == []
    # The set's folder itself may be a link: files are confined to where it really is.
    os.symlink(data, tmp_path / "alias")
    assert len(discover(tmp_path / "alias", skipped=skipped)) == 3 and skipped == []


def test_metadata_link_leading_out_is_refused(sets, tmp_path):
    data, private = sets
    (private / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x"}) + "\n")
    os.symlink(private / "metadata.jsonl", data / "metadata.jsonl")
    with pytest.raises(DataError, match="symbolic link leading outside the data set"):
        discover(data)


def test_image_swapped_for_a_link_after_discovery_is_refused_when_opened(sets):
    """The race the name check alone leaves open: an image replaced by a link leading out after discover()
    checked it is refused by open_rgb() and the fingerprint, which judge the file they opened."""
    from loraforge_engine.data import ImageError, dataset_fingerprint, open_rgb

    data, private = sets
    ex = discover(data)
    assert open_rgb(ex[1]).size == (16, 16)
    (data / "1.png").unlink()
    os.symlink(private / "secret.png", data / "1.png")
    with pytest.raises(ImageError) as err:
        open_rgb(ex[1])
    assert err.value.reason == "unreadable"
    assert "outside the data set" in str(err.value)
    with pytest.raises(DataError, match="outside the data set"):
        dataset_fingerprint(ex)
    # A folder of the set's own (reached through a link to the set) is still inside.
    assert open_rgb(ex[0]).size == (16, 16)
