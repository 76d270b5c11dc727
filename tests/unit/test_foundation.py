"""The bottom layer: atomic writes, the byte vocabulary, the command-line error guard."""
import pytest

from terrabyte.data_pipeline.basics.errors import ConfigError, DataError, TerrabyteError, run_guarded
from terrabyte.data_pipeline.basics.system import atomic_path, atomic_write, free_port
from terrabyte.data_pipeline.basics.vocab import BYTES, Vocab


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, "step1")
    atomic_write(target, b"step2")
    assert target.read_text() == "step2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_atomic_path_failure_keeps_old_content_and_no_temp(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_atomic_path_temp_is_hidden_beside_target(tmp_path):
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"x")
    assert (tmp_path / "model.safetensors").read_bytes() == b"x"


def test_free_port_is_bindable():
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_vocab_ids_sit_above_the_data():
    assert (BYTES.pad_id, BYTES.eos_id, BYTES.bos_id, BYTES.size) == (256, 257, 258, 259)
    assert BYTES.is_data(0) and BYTES.is_data(255) and not BYTES.is_data(256) and not BYTES.is_data(-1)
    assert BYTES.data_bytes([104, 256, 105, 257, 0]) == b"hi\x00"
    small = Vocab(16)
    assert (small.pad_id, small.eos_id, small.bos_id, small.size) == (16, 17, 18, 19)


def test_guard_prints_user_errors_in_one_line(capsys):
    def bad_config():
        raise ConfigError("config key train.steps must be positive, got -1")

    assert run_guarded(bad_config) == 2
    assert capsys.readouterr().err == "terrabyte: error: config key train.steps must be positive, got -1\n"

    def missing_file():
        open("/nonexistent/terrabyte/file")

    assert run_guarded(missing_file) == 2
    assert capsys.readouterr().err.startswith("terrabyte: error: [Errno 2]")


def test_guard_lets_bugs_keep_their_traceback():
    def bug():
        raise ValueError("an internal invariant broke")

    with pytest.raises(ValueError, match="internal invariant"):
        run_guarded(bug)


def test_user_errors_are_still_value_errors():
    for cls in (ConfigError, DataError):
        assert issubclass(cls, TerrabyteError) and issubclass(cls, ValueError)
