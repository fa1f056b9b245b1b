"""vila_edge/atomic.py: a directory or file appears whole or not at all; an older one is replaced only
once the new one is complete."""
import os
import stat

import pytest

from vila_edge.atomic import atomic_dir, write_text


def test_atomic_dir_publishes_readable_and_replaces_old(tmp_path):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(str(out)) as tmp:
        assert (out / "old.txt").read_text() == "old"          # still the old one while building
        with open(os.path.join(tmp, "new.txt"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "new.txt").stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["engine"]                  # no temp or .old- dirs left


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_leaves_the_old_one_on_error(tmp_path, error):
    out = tmp_path / "engine"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(error):
        with atomic_dir(str(out)) as tmp:
            open(os.path.join(tmp, "half.txt"), "w").close()
            raise error
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["engine"]


def test_write_text_replaces_whole(tmp_path):
    path = tmp_path / "r.json"
    write_text(str(path), "{}")
    write_text(str(path), '{"a": 1}')
    assert path.read_text() == '{"a": 1}' and os.listdir(tmp_path) == ["r.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
