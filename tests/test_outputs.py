"""Output folders checked before the work, and OS errors told in one line naming the path."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

import pytest

from ivpt.cli import main
from ivpt.errors import IVPTError
from ivpt.outputs import describe_os_error, prepare_output_dir, write_text

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def test_prepare_output_dir_creates_the_folder_and_leaves_nothing_in_it(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert prepare_output_dir(target) == target
    assert target.is_dir() and list(target.iterdir()) == []
    assert prepare_output_dir(target) == target  # an existing folder is fine


def test_prepare_output_dir_names_the_file_in_the_way(tmp_path: Path) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("hi")
    with pytest.raises(IVPTError) as info:
        prepare_output_dir(blocker / "sub" / "deeper")
    assert str(info.value) == f"output folder '{blocker / 'sub' / 'deeper'}': '{blocker}' is a file, expected a folder"
    with pytest.raises(IVPTError) as info:
        prepare_output_dir(blocker, "run folder")
    assert str(info.value) == f"run folder '{blocker}' is a file, expected a folder"
    assert not (blocker.parent / "sub").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_prepare_output_dir_reports_a_folder_it_cannot_write(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(IVPTError, match=r"output folder '.*locked': permission denied \(expected a path"):
        prepare_output_dir(locked)


def test_describe_os_error_points_at_the_file_that_blocks_a_path(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(OSError) as info:
        (tmp_path / "afile" / "sub").mkdir(parents=True)
    assert describe_os_error(info.value) == (
        f"'{tmp_path / 'afile' / 'sub'}': not a directory ('{tmp_path / 'afile'}' is a file, expected a folder)"
    )
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device"), "x/last.pt") == (
        "'x/last.pt': no space left on device (expected free space on its file system)"
    )


@needs_dev_full
def test_a_full_disk_names_the_file_being_written(tmp_path: Path) -> None:
    full = tmp_path / "metrics.json"
    full.symlink_to("/dev/full")  # every write to it fails with ENOSPC, and the error names no file
    with pytest.raises(OSError) as info:
        write_text(full, "{}" * 10_000)
    expected = f"'{full}': no space left on device (expected free space on its file system)"
    assert describe_os_error(info.value) == expected


def test_train_into_a_path_under_a_file_is_one_line(tiny_overrides, tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("hi")
    code = main(["train", *tiny_overrides(f"train.out_dir={tmp_path / 'afile' / 'sub'}")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"ivpt train: error: run folder (train.out_dir) '{tmp_path / 'afile' / 'sub'}': '{tmp_path / 'afile'}' "
        "is a file, expected a folder\n"
    )


def test_the_file_size_limit_is_one_line_naming_the_file(tiny_overrides, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Files may not grow past 1 KiB (config.yaml is larger; Python ignores SIGXFSZ, so writes fail with EFBIG).
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        code = main(["train", *tiny_overrides(f"train.out_dir={out}")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    assert capsys.readouterr().err == (
        f"ivpt train: error: '{out / 'config.yaml'}': file too large (expected a file within the size limit of "
        "`ulimit -f` and of the file system)\n"
    )
