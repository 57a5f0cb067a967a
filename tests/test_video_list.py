"""One reader of the video-list format for the dataset and `prepare-videos`: the same lines accepted, the same
refused with the same message (file and line)."""

from __future__ import annotations

import pytest

from nonlocalnet.data.prepare import read_list_lines
from nonlocalnet.data.video_list import read_video_list

LINES = [  # (line, multi_label, the error or None)
    ("a b/c d.avi 3", False, None),
    ("x.mkv 3,17", False, "several labels '3,17' in a single-label list"),
    ("x.mkv 3,17 4", True, None),
    ("x.mkv +3", False, "label '+3' is not a non-negative integer"),
    ("x.mkv ٣", False, "label '٣' is not a non-negative integer"),  # a digit to str.isdigit, not to the format
    ("x.mkv", False, "expected 'path label'"),
    ("/abs/x.mkv 1", False, "the path '/abs/x.mkv' must be relative to the data root"),
    ("../x.mkv 1", False, "the path '../x.mkv' must be relative to the data root"),
    ("x.mkv ,", True, "no label in 'x.mkv ,'"),
]


@pytest.mark.parametrize("line, multi_label, error", LINES)
def test_the_dataset_and_prepare_videos_read_a_list_line_alike(tmp_path, line, multi_label, error):
    listing = tmp_path / "l.txt"
    listing.write_text(f"# header\n{line}\n", encoding="utf-8")
    if error is None:
        entries = read_video_list(listing, num_classes=20, multi_label=multi_label)
        lines = read_list_lines(listing, multi_label=multi_label)
        assert [e[0] for e in entries] == [ln.path for ln in lines if ln.path is not None]
        return
    for read in (
        lambda: read_video_list(listing, num_classes=20, multi_label=multi_label),
        lambda: read_list_lines(listing, multi_label=multi_label),
    ):
        with pytest.raises(ValueError) as caught:
            read()
        assert str(caught.value).startswith(f"{listing}, line 2: ") and error in str(caught.value)


def test_a_list_that_is_not_utf8_is_one_error_naming_file_line_and_byte(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_bytes(b"a.mp4 1\nb\xff.mp4 0\n")
    for read in (lambda: read_video_list(listing, num_classes=2), lambda: read_list_lines(listing)):
        with pytest.raises(ValueError, match=f"{listing}, line 2: not UTF-8 text \\(byte 0xff\\)"):
            read()


def test_windows_line_ends_and_a_byte_order_mark_are_read_by_both(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_bytes("\ufeffa.mp4 1\r\nb.mp4 0\r\n".encode())
    assert read_video_list(listing, num_classes=2) == [("a.mp4", 1), ("b.mp4", 0)]
    assert [(ln.path, ln.rest) for ln in read_list_lines(listing)] == [("a.mp4", " 1"), ("b.mp4", " 0")]
