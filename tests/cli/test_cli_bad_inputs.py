"""The ``jdq`` command line on hostile input (the cases of a hostile-input probe): each is a clear
one-line error with exit status 2 before anything is computed, or documented behaviour, and nothing
already written is lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jdq import cli
from jdq.models import base, dit

ROOT = Path(__file__).resolve().parents[2]
UNWRITABLE = Path("/proc")  # a folder no process can create files in, root included (unlike chmod)
needs_proc = pytest.mark.skipif(not UNWRITABLE.is_dir(), reason="needs Linux /proc")


def _run(args, capsys):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _model(d, pixel=True, **cfg_changes):
    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    base.save(dit.from_config(cfg.replace(**cfg_changes), key=0), d)
    (d / "sampling.json").write_text(json.dumps({"sampler": "ddim", "steps": 2, "guidance": 2.0,
                                                 "clip_denoised": True, "pixel_space": pixel}))
    return d


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    """A tiny random pixel-space DiT folder (2 DDIM steps)."""
    return _model(tmp_path_factory.mktemp("models") / "tiny_dit")


def _tree(folder):
    """``{relative path: bytes}`` of every file under ``folder`` (what must stay untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# jdq convert
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def pt_file(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.convert.test_convert_dit import official_state_dict

    path = tmp_path / "m.pt"
    torch.save(official_state_dict(), path)
    return path


def test_convert_overwrite_refuses_an_unrelated_folder(pt_file, tmp_path, capsys):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    code, _, err = _run(["convert", pt_file, out, "--num-heads", "4", "--overwrite"], capsys)
    assert code == 2 and "not a jdq model folder" in err
    assert _tree(out) == {"holiday.jpg": b"precious"}


def test_convert_overwrite_refuses_the_source_itself(tmp_path, capsys):
    src = _model(tmp_path / "src")  # a jdq model folder, so only "it is the source" can refuse it
    before = _tree(src)
    code, _, err = _run(["convert", src, src, "--overwrite"], capsys)
    assert code == 2 and "it is the source" in err
    assert _tree(src) == before


def test_convert_overwrite_refuses_the_sources_parent(tmp_path, capsys):
    parent = _model(tmp_path / "parent")
    src = parent / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    before = _tree(parent)
    code, _, err = _run(["convert", src, parent, "--overwrite"], capsys)
    assert code == 2 and "contains the source" in err
    assert _tree(parent) == before


def test_convert_overwrite_replaces_a_model_folder(pt_file, tmp_path, capsys):
    out = tmp_path / "o"
    assert _run(["convert", pt_file, out, "--num-heads", "4"], capsys)[0] == 0
    code, _, err = _run(["convert", pt_file, out, "--num-heads", "4"], capsys)
    assert code == 2 and "already exists" in err
    assert _run(["convert", pt_file, out, "--num-heads", "4", "--overwrite", "--dtype", "float16"], capsys)[0] == 0
    assert {str(v.dtype) for v in load_file(str(out / "params.safetensors")).values()} == {"float16"}


@pytest.mark.parametrize("dtype,message", [("int8", "'int8' is not a floating storage dtype"),
                                           ("complex64", "'complex64' is not a floating storage dtype"),
                                           ("float8_e4m3fn", "not a floating storage dtype"),
                                           ("foo", "'foo' is not a dtype")])
def test_convert_dtype_is_checked_before_reading(tmp_path, dtype, message, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")  # reading it would fail: the dtype error comes first
    code, _, err = _run(["convert", garbage, tmp_path / "o", "--dtype", dtype], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()


def test_convert_pt_without_torch_hints_at_the_extra(pt_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    code, _, err = _run(["convert", pt_file, tmp_path / "o"], capsys)
    assert code == 2 and "[torch] extra" in err
    code, _, err = _run(["convert", tmp_path, tmp_path / "o", "--kind", "dit"], capsys)
    assert code == 2 and "is a folder; a DiT or Inception checkpoint is a .pt/.pth file" in err


def _diffusers_folder(d, config):
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    save_file({"pos_embed": np.zeros((1, 4), np.float32)}, str(d / "diffusion_pytorch_model.safetensors"))
    return d


@pytest.mark.parametrize("config,message", [
    ("[1, 2]", "found a JSON list"),
    ('"DiTTransformer2DModel"', "found a JSON str"),
    ("{broken", "not valid UTF-8 JSON"),
    ({"_class_name": "DiTTransformer2DModel", "num_attention_heads": "2"},
     "num_attention_heads is the string '2'; a number is expected"),
    ({"_class_name": "DiTTransformer2DModel", "num_attention_heads": 2.5}, "must be an integer, got"),
])
def test_convert_malformed_diffusers_config_names_the_file(tmp_path, config, message, capsys):
    src = _diffusers_folder(tmp_path / "src", config)
    code, _, err = _run(["convert", src, tmp_path / "o"], capsys)
    assert code == 2 and message in err and str(src / "config.json") in err, err


def test_convert_undecodable_config_names_the_file(tmp_path, capsys):
    src = _diffusers_folder(tmp_path / "src", "{}")
    (src / "config.json").write_bytes(b'{"_class_name": "\xff"}')
    code, _, err = _run(["convert", src, tmp_path / "o"], capsys)
    assert code == 2 and "not valid UTF-8 JSON" in err and str(src / "config.json") in err


def test_convert_refuses_non_finite_source_weights(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from tests.convert.test_convert_dit import official_state_dict

    sd = official_state_dict()
    sd["blocks.0.mlp.fc1.weight"][3, 5] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    code, _, err = _run(["convert", tmp_path / "nan.pt", tmp_path / "o", "--num-heads", "4"], capsys)
    assert code == 2 and "'blocks.0.mlp.fc1.kernel' has 1 NaN or Inf" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# jdq sample
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value,message", [
    ("--guidance", "nan", "--guidance must be a finite number"), ("--guidance", "inf", "--guidance must be a finite"),
    ("--eta", "nan", "--eta must be a finite number"), ("--eta", "-1", "--eta must be >= 0"),
    ("--shift", "nan", "--shift must be a finite number"), ("--per-class", "0", "--per-class must be >= 1"),
])
def test_sample_rejects_non_finite_and_out_of_range_settings(dit_dir, tmp_path, flag, value, message, capsys):
    extra = ["--sampler", "ddim"] if flag == "--eta" else []
    code, _, err = _run(["sample", dit_dir, "--out", tmp_path / "s", "--no-progress", flag, value, *extra], capsys)
    assert code == 2 and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["--sampler", "ddpm", "--eta", "0.5"], "--eta applies to the DDIM sampler only; this run uses 'ddpm'"),
    (["--eta", "0.5", "--sampler", "dpm++2m"], "--eta applies to the DDIM sampler only"),
    (["--shift", "3"], "--shift applies to the flow-matching (euler) sampler only"),
])
def test_sample_options_that_do_not_apply_are_errors(dit_dir, tmp_path, args, message, capsys):
    code, _, err = _run(["sample", dit_dir, "--out", tmp_path / "s", "--no-progress", *args], capsys)
    assert code == 2 and message in err, err


def test_sample_vae_on_a_pixel_model_is_an_error(dit_dir, tmp_path, capsys):
    vae = tmp_path / "vae"
    vae.mkdir()
    code, _, err = _run(["sample", dit_dir, "--out", tmp_path / "s", "--vae", vae], capsys)
    assert code == 2 and "--vae decodes latents" in err and "pixel_space" in err


@needs_proc
def test_sample_unwritable_output_fails_before_loading(tmp_path, capsys):
    # the model folder does not exist either: the output is checked first, before any model is read
    code, _, err = _run(["sample", tmp_path / "absent", "--out", UNWRITABLE / "s"], capsys)
    assert code == 2 and "--out: cannot write /proc/s" in err, err


def test_sample_writes_png_and_npz_as_a_pair(dit_dir, tmp_path, capsys, monkeypatch):
    from jdq.sampling import images

    prefix = tmp_path / "s"
    assert _run(["sample", dit_dir, "--out", prefix, "--no-progress"], capsys)[0] == 0
    before = _tree(tmp_path)
    with np.load(tmp_path / "s.npz") as z:
        assert json.loads(str(z["settings"]))["guidance"] == 2.0

    def interrupted(arrays):  # the .npz is the second file: the PNG is already in its temporary file
        def write(tmp):
            raise KeyboardInterrupt
        return write

    monkeypatch.setattr(images, "_npz_writer", interrupted)
    code, _, err = _run(["sample", dit_dir, "--out", prefix, "--no-progress", "--seed", "5"], capsys)
    assert code == 130 and "interrupted; nothing was written" in err
    assert _tree(tmp_path) == before  # both old files intact, no new PNG beside the old .npz, no temporaries


def test_ctrl_c_in_the_console_script_exits_without_interpreter_teardown(tmp_path):
    """Console path: status 130 through os._exit, after flushing, so XLA threads cannot crash the teardown."""
    script = ("import atexit, sys\n"
              "import jdq.cli.sample as s\n"
              "def run(args):\n"
              "    print('sampling', flush=False)\n"
              "    raise KeyboardInterrupt\n"
              "s.run = run\n"
              "atexit.register(lambda: print('interpreter teardown ran'))\n"
              "sys.argv = ['jdq', 'sample']\n"
              "from jdq.cli import main\n"
              "main()\n"
              "print('main returned')\n")
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 130, p.stderr
    assert "jdq sample: interrupted; nothing was written" in p.stderr
    assert p.stdout == "sampling\n"  # flushed before os._exit; neither atexit nor the rest of the script ran


def test_ctrl_c_called_from_python_returns_130(monkeypatch, capsys):
    import jdq.cli.cost as cost

    monkeypatch.setattr(cost, "run", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = _run(["cost"], capsys)
    assert code == 130 and "interrupted; nothing was written" in err


def test_sample_refuses_a_model_with_a_nan_weight(tmp_path, capsys):
    d = _model(tmp_path / "m")
    flat = load_file(str(d / "params.safetensors"))
    flat["final_layer.linear.kernel"][0, 0] = np.nan
    save_file(flat, str(d / "params.safetensors"))
    for extra in ([], ["--quant", "w8a8-static"]):  # nothing calibrates on it either
        code, _, err = _run(["sample", d, "--out", tmp_path / "s", "--no-progress", *extra], capsys)
        assert code == 2 and "'final_layer.linear.kernel' has 1 NaN or Inf" in err, err
    assert not (tmp_path / "s.png").exists()


# ---------------------------------------------------------------------------------------------
# jdq cost, jdq eval
# ---------------------------------------------------------------------------------------------


@needs_proc
def test_cost_json_unwritable_fails_before_costing(capsys, monkeypatch):
    import jdq.cli.cost as cost

    monkeypatch.setattr(cost, "cost_rows", lambda args: pytest.fail("costed before checking --json"))
    code, _, err = _run(["cost", "--json", UNWRITABLE / "x.json"], capsys)
    assert code == 2 and "--json: cannot write /proc/x.json" in err, err


@needs_proc
def test_eval_unwritable_out_fails_before_loading(tmp_path, capsys):
    code, _, err = _run(["eval", tmp_path / "absent", "--out", UNWRITABLE / "run"], capsys)
    assert code == 2 and "--out: cannot write /proc/run" in err, err


def test_eval_rejects_non_finite_guidance_and_vae_on_pixels(dit_dir, tmp_path, capsys):
    code, _, err = _run(["eval", dit_dir, "--out", tmp_path / "r", "--guidance", "nan"], capsys)
    assert code == 2 and "--guidance must be a finite number" in err, err
    code, _, err = _run(["eval", dit_dir, "--out", tmp_path / "r", "--vae", tmp_path], capsys)
    assert code == 2 and "--vae decodes latents" in err, err


@pytest.mark.parametrize("text,message", [("[1]", "expected a JSON object of sampling defaults, found a JSON list"),
                                          ('{"steps": "2"}', "steps must be of type int, got '2'"),
                                          ('{"guidance": NaN}', "guidance must be finite, of type int or float, got nan"),
                                          ('{"pixel_space": 1}', "pixel_space must be of type bool, got 1"),
                                          (b'{"sampler": "\xff"}', "not valid UTF-8 JSON")])
def test_malformed_sampling_json_names_the_file(tmp_path, text, message, capsys):
    d = _model(tmp_path / "m")
    (d / "sampling.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    for command in ("sample", "eval"):
        code, _, err = _run([command, d, "--out", tmp_path / "o"], capsys)
        assert code == 2 and message in err and str(d / "sampling.json") in err, err


@needs_proc
def test_encode_prompts_unwritable_output_fails_before_encoding(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    code, _, err = _run(["encode-prompts", tmp_path, "--prompts", tmp_path / "prompts.txt",
                         "--out", UNWRITABLE / "c.safetensors"], capsys)
    assert code == 2 and "--out: cannot write /proc/c.safetensors" in err, err


@pytest.mark.parametrize("args,message", [(["--per-class", "0"], "--per-class must be >= 1"),
                                          (["--vae", "vae"], "--vae does not apply to a pipeline folder"),
                                          (["--guidance", "nan"], "--guidance must be a finite number")])
def test_pipeline_sample_rejects_what_does_not_apply(tmp_path, args, message, capsys):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "pipeline.json").write_text('{"kind": "pixart"}')  # checked before the pipeline is loaded
    code, _, err = _run(["sample", pipe, "--prompt", "a cat", "--out", tmp_path / "s", *args], capsys)
    assert code == 2 and message in err, err


@needs_proc
def test_quantize_unwritable_out_fails_before_calibrating(capsys):
    code, _, err = _run(["quantize", "--recipe", "w8a8", "--out", UNWRITABLE / "q"], capsys)
    assert code == 2 and "--out: cannot write /proc/q" in err, err
