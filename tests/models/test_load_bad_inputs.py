"""Loading and saving model folders on hostile input: damaged weights, malformed config.json, unsafe
overwrites, stale temporaries, permissions. Each case is a clear error naming the file or tensor,
or documented behaviour, and nothing already written is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jdq.models
from jdq.models import base, dit

CFG = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)


@pytest.fixture
def folder(tmp_path):
    return base.save(dit.from_config(CFG, key=0), tmp_path / "m")


def _edit_params(folder, name, fn):
    flat = load_file(str(folder / "params.safetensors"))
    flat[name] = fn(flat[name])
    save_file(flat, str(folder / "params.safetensors"))


NAME = "blocks.0.attn.qkv.kernel"


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_refused_naming_the_tensor(folder, value):
    _edit_params(folder, NAME, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, value, a).astype(a.dtype))
    with pytest.raises(ValueError, match=rf"tensor '{NAME}' has 1 NaN or Inf value"):
        jdq.models.load(folder)


def test_integer_weight_is_refused(folder):
    _edit_params(folder, NAME, lambda a: np.round(a * 100).astype(np.int32))
    with pytest.raises(ValueError, match=rf"tensor '{NAME}' has dtype int32; model params must be floating"):
        jdq.models.load(folder)


def test_mixed_dtype_weights_are_refused(folder):
    _edit_params(folder, NAME, lambda a: a.astype(np.float16))
    with pytest.raises(ValueError, match=rf"mixed dtypes: .* are float32 but '{NAME}' is float16"):
        jdq.models.load(folder)


def test_uniform_half_precision_storage_still_loads(folder):
    flat = {k: v.astype(np.float16) for k, v in load_file(str(folder / "params.safetensors")).items()}
    save_file(flat, str(folder / "params.safetensors"))
    model, _ = jdq.models.load(folder)
    assert str(model.params["blocks"][0]["attn"]["qkv"]["kernel"].dtype) == "float16"


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "expected a JSON object of config fields, found a JSON list"),
    ('"dit"', "expected a JSON object of config fields, found a JSON str"),
    ("{not json", "not valid UTF-8 JSON"),
])
def test_malformed_config_names_the_file(folder, text, message):
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        jdq.models.load(folder)
    assert str(folder / "config.json") in str(e.value)


def test_undecodable_config_names_the_file(folder):
    (folder / "config.json").write_bytes(b'{"family": "dit", "x": "\xff\xfe"}')
    with pytest.raises(ValueError, match="not valid UTF-8 JSON") as e:
        jdq.models.load(folder)
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize("field,value,want", [("num_heads", "2", "an integer"), ("hidden_size", 32.0, "an integer"),
                                              ("null_class", 1, "true or false"), ("mlp_ratio", "4", "a finite number"),
                                              ("attn_norm_eps", float("nan"), "a finite number"),
                                              ("dtype", 32, "a string")])
def test_wrong_typed_config_field_names_field_and_file(folder, field, value, want):
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, field: value}))
    with pytest.raises(ValueError, match=rf"field '{field}' must be {want}, got {value!r}") as e:
        jdq.models.load(folder)
    assert str(folder / "config.json") in str(e.value)


def test_config_field_types_accept_numpy_scalars_and_ints_for_floats():
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=np.int64(1), hidden_size=32, depth=1, num_heads=2,
                     num_classes=3, mlp_ratio=4)
    assert cfg.in_channels == 1
    with pytest.raises(ValueError, match="field 'num_heads' must be an integer"):
        dit.Config(num_heads="16")


def test_overwrite_replaces_only_a_model_folder(folder, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    model = dit.from_config(CFG, key=1)
    with pytest.raises(FileExistsError, match="not a jdq model folder"):
        base.save(model, other, overwrite=True)
    assert (other / "mine.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a jdq model folder"):
        base.save(model, tmp_path / "file", overwrite=True)
    base.save(model, folder, overwrite=True)  # a model folder is replaced
    np.testing.assert_array_equal(jdq.models.load(folder)[0].params["blocks"][0]["attn"]["qkv"]["kernel"],
                                  model.params["blocks"][0]["attn"]["qkv"]["kernel"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "m", "notes"]


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    out = tmp_path / "m"
    dead = tmp_path / f".m.tmp-{base._HOST}-{_dead_pid()}-0123abcd"
    dead.mkdir()
    (dead / "params.safetensors").write_bytes(b"\0" * 1000)
    old = tmp_path / f".m.old-{base._HOST}-{_dead_pid()}-0123abcd"
    old.mkdir()
    live = tmp_path / f".m.tmp-{base._HOST}-1-0123abcd"  # pid 1 is alive: a conversion in progress
    live.mkdir()
    other_host = tmp_path / f".m.tmp-elsewhere-{_dead_pid()}-0123abcd"
    other_host.mkdir()
    base.save(dit.from_config(CFG, key=0), out)
    assert not dead.exists() and not old.exists()
    assert live.exists() and other_host.exists()
    assert base.is_model_folder(out)


def test_folder_and_file_modes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = base.save(dit.from_config(CFG, key=0), tmp_path / "m")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    for f in out.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
    old = os.umask(0o077)
    try:
        out = base.save(dit.from_config(CFG, key=0), tmp_path / "private")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o700


def test_a_killed_write_leaves_a_temporary_the_next_write_removes(tmp_path):
    """End to end: SIGKILL a process in the middle of writing a model folder, then save there again."""
    script = ("import sys, time\n"
              "from pathlib import Path\n"
              "from jdq.models.base import write_folder_atomically\n"
              "def write(tmp):\n"
              "    (tmp / 'params.safetensors').write_bytes(b'0' * 100000)\n"
              "    print(tmp, flush=True)\n"
              "    time.sleep(600)\n"
              "write_folder_atomically(Path(sys.argv[1]), write)\n")
    p = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "m")], stdout=subprocess.PIPE, text=True,
                         cwd=Path(__file__).resolve().parents[2], env=dict(os.environ, JAX_PLATFORMS="cpu"))
    try:
        left = Path(p.stdout.readline().strip())  # the writer is now inside write(): kill it there
        p.kill()
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert left.is_dir() and left.parent == tmp_path and left.name.startswith(".m.tmp-")
    assert not (tmp_path / "m").exists()
    base.save(dit.from_config(CFG, key=0), tmp_path / "m")
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m"]
