"""checkpoints_convert on facebookresearch/DiT-format .pt files and diffusers folders: config
inference, safe loading (a code-running pickle is refused), key/shape errors that name the key
and both shapes, corrupt files, and atomic output (nothing left behind on failure)."""

import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jdq.models  # noqa: E402
from checkpoints_convert import CheckpointError, convert, convert_diffusers_folder, convert_dit_checkpoint  # noqa: E402
from checkpoints_convert.__main__ import main as cli_main  # noqa: E402
from jdq.models import layers  # noqa: E402


def official_state_dict(hidden=48, depth=2, p=2, c=4, grid=4, classes=10, learn_sigma=True, seed=0):
    """Random tensors with facebookresearch/DiT's key names and shapes (pos_embed the fixed table)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    out_c = 2 * c if learn_sigma else c
    sd = {
        "x_embedder.proj.weight": r(hidden, c, p, p), "x_embedder.proj.bias": r(hidden),
        "t_embedder.mlp.0.weight": r(hidden, 256), "t_embedder.mlp.0.bias": r(hidden),
        "t_embedder.mlp.2.weight": r(hidden, hidden), "t_embedder.mlp.2.bias": r(hidden),
        "y_embedder.embedding_table.weight": r(classes + 1, hidden),
        "pos_embed": torch.from_numpy(layers.sincos_pos_embed_2d(hidden, grid))[None],
        "final_layer.linear.weight": r(p * p * out_c, hidden), "final_layer.linear.bias": r(p * p * out_c),
        "final_layer.adaLN_modulation.1.weight": r(2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": r(2 * hidden),
    }
    for i in range(depth):
        b = f"blocks.{i}"
        sd.update({
            f"{b}.attn.qkv.weight": r(3 * hidden, hidden), f"{b}.attn.qkv.bias": r(3 * hidden),
            f"{b}.attn.proj.weight": r(hidden, hidden), f"{b}.attn.proj.bias": r(hidden),
            f"{b}.mlp.fc1.weight": r(4 * hidden, hidden), f"{b}.mlp.fc1.bias": r(4 * hidden),
            f"{b}.mlp.fc2.weight": r(hidden, 4 * hidden), f"{b}.mlp.fc2.bias": r(hidden),
            f"{b}.adaLN_modulation.1.weight": r(6 * hidden, hidden), f"{b}.adaLN_modulation.1.bias": r(6 * hidden),
        })
    return sd


def save_pt(path, obj):
    torch.save(obj, path)
    return path


def no_leftovers(parent, name):
    return [p for p in os.listdir(parent) if name in p] == []


def test_infers_config_and_defaults_heads(tmp_path):
    sd = official_state_dict(hidden=384, depth=1, p=4, c=4, grid=4, classes=7, learn_sigma=False)
    out = convert_dit_checkpoint(save_pt(tmp_path / "m.pt", sd), tmp_path / "out")
    model, cfg = jdq.models.load(out)
    assert (cfg.hidden_size, cfg.depth, cfg.patch_size, cfg.input_size, cfg.num_classes, cfg.learn_sigma,
            cfg.num_heads) == (384, 1, 4, 16, 7, False, 6)
    assert json.loads((out / "config.json").read_text())["family"] == "dit"
    # weights land where the site names say (x_embedder: conv -> (p·p·C, D) patch linear)
    w = sd["x_embedder.proj.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(model.params["x_embedder"]["kernel"]),
                                  w.transpose(2, 3, 1, 0).reshape(4 * 4 * 4, 384))
    np.testing.assert_array_equal(np.asarray(model.params["blocks"][0]["adaLN_modulation"]["kernel"]),
                                  sd["blocks.0.adaLN_modulation.1.weight"].numpy().T)


def test_num_heads_override_and_required_for_nonstandard(tmp_path):
    sd = save_pt(tmp_path / "m.pt", official_state_dict(hidden=48))
    with pytest.raises(CheckpointError, match="hidden size 48 is not a standard DiT variant"):
        convert_dit_checkpoint(sd, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    _, cfg = jdq.models.load(convert_dit_checkpoint(sd, tmp_path / "b", num_heads=4))
    assert cfg.num_heads == 4
    with pytest.raises(CheckpointError, match="not divisible by num_heads=5"):
        convert_dit_checkpoint(sd, tmp_path / "c", num_heads=5)


def test_training_checkpoint_with_ema_and_args(tmp_path):
    """train.py saves {"model", "ema", "opt", "args"}; the EMA weights are used (as find_model does)."""
    import argparse

    ema = official_state_dict(seed=1)
    ckpt = {"model": official_state_dict(seed=2), "ema": ema, "args": argparse.Namespace(model="DiT-XL/2")}
    model, _ = jdq.models.load(convert_dit_checkpoint(save_pt(tmp_path / "c.pt", ckpt), tmp_path / "o", num_heads=4))
    np.testing.assert_array_equal(np.asarray(model.params["x_embedder"]["bias"]), ema["x_embedder.proj.bias"].numpy())


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = Evil()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    sd = official_state_dict()
    sd["payload"] = evil
    torch.save(sd, path)  # a .pt (zip) whose pickle calls os.system when unpickled unsafely
    with pytest.raises(CheckpointError, match="refused to load"):
        convert_dit_checkpoint(path, tmp_path / "out", num_heads=4)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
    # a plain (non-zip) pickle too
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(evil))
    with pytest.raises(CheckpointError, match="refused to load|cannot read"):
        convert_dit_checkpoint(raw, tmp_path / "out2")
    assert not marker.exists()


def test_truncated_and_garbage_files(tmp_path):
    good = save_pt(tmp_path / "m.pt", official_state_dict())
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt: cannot read PyTorch checkpoint.*truncated or corrupt"):
        convert_dit_checkpoint(tmp_path / "trunc.pt", tmp_path / "o1", num_heads=4)
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.pt"):
        convert_dit_checkpoint(tmp_path / "junk.pt", tmp_path / "o2", num_heads=4)
    with pytest.raises(CheckpointError, match="no such file"):
        convert_dit_checkpoint(tmp_path / "absent.pt", tmp_path / "o3", num_heads=4)
    assert no_leftovers(tmp_path, "o1") and no_leftovers(tmp_path, "o2")


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), r"missing key 'blocks.1.mlp.fc2.bias' \(expected shape \(48,\)\)"),
    (lambda sd: sd.__setitem__("blocks.0.extra.weight", torch.zeros(3, 2)),
     r"unexpected key.*blocks.0.extra.weight \(3, 2\)"),
    (lambda sd: sd.__setitem__("blocks.1.attn.proj.weight", torch.zeros(48, 47)),
     r"key 'blocks.1.attn.proj.weight' has shape \(48, 47\), expected \(48, 48\)"),
    (lambda sd: sd.__setitem__("pos_embed", sd["pos_embed"] + 0.1), "pos_embed differs"),
])
def test_bad_keys_name_the_key_and_shapes(tmp_path, mutate, message):
    sd = official_state_dict()
    mutate(sd)
    with pytest.raises(CheckpointError, match=message):
        convert_dit_checkpoint(save_pt(tmp_path / "m.pt", sd), tmp_path / "out", num_heads=4)
    assert not (tmp_path / "out").exists()
    assert no_leftovers(tmp_path, "out")


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    pt = save_pt(tmp_path / "m.pt", official_state_dict())
    out = convert_dit_checkpoint(pt, tmp_path / "out", num_heads=4)
    before = (out / "params.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        convert_dit_checkpoint(pt, out, num_heads=4)
    bad = official_state_dict()
    bad.pop("pos_embed")
    with pytest.raises(CheckpointError):  # a failed overwrite leaves the old folder intact
        convert_dit_checkpoint(save_pt(tmp_path / "bad.pt", bad), out, num_heads=4, overwrite=True)
    assert (out / "params.safetensors").read_bytes() == before
    convert_dit_checkpoint(save_pt(tmp_path / "m2.pt", official_state_dict(seed=5)), out, num_heads=4, overwrite=True)
    assert (out / "params.safetensors").read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["bad.pt", "m.pt", "m2.pt", "out"]


def test_cli_and_bf16_storage(tmp_path, capsys):
    pt = save_pt(tmp_path / "m.pt", official_state_dict())
    assert cli_main(["dit", str(pt), str(tmp_path / "o"), "--num-heads", "4", "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    model, _ = jdq.models.load(tmp_path / "o")
    assert str(model.params["blocks"][0]["attn"]["qkv"]["kernel"].dtype) == "bfloat16"
    assert cli_main(["dit", str(tmp_path / "absent.pt"), str(tmp_path / "o2")]) == 1
    assert "error:" in capsys.readouterr().err


def test_load_rejects_tampered_folders(tmp_path):
    from safetensors.numpy import load_file, save_file

    out = convert_dit_checkpoint(save_pt(tmp_path / "m.pt", official_state_dict()), tmp_path / "o", num_heads=4)
    flat = load_file(str(out / "params.safetensors"))
    flat["final_layer.linear.bias"] = flat["final_layer.linear.bias"][:-1]
    save_file(flat, str(out / "params.safetensors"))
    with pytest.raises(ValueError, match=r"final_layer.linear.bias.*expected shape \(32,\), found \(31,\)"):
        jdq.models.load(out)
    data = (out / "params.safetensors").read_bytes()
    (out / "params.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        jdq.models.load(out)
    (out / "config.json").write_text('{"family": "nope"}')
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        jdq.models.load(out)


# ---------------------------------------------------------------------------------------------
# diffusers folders
# ---------------------------------------------------------------------------------------------


def test_diffusers_folder_errors(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                                        norm_num_groups=1)
    src = tmp_path / "src"
    m.save_pretrained(src, safe_serialization=True)
    # per-block embedders differ in a fresh random diffusers model: refused, naming the key
    with pytest.raises(CheckpointError, match=r"transformer_blocks.1.norm1.emb.* differs from transformer_blocks.0"):
        convert_diffusers_folder(src, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="_class_name='UNet2DModel'"):
        convert_diffusers_folder(src, tmp_path / "o")
    (src / "config.json").write_text(json.dumps({**cfg, "norm_type": "ada_norm"}))
    with pytest.raises(CheckpointError, match="norm_type='ada_norm' is not supported"):
        convert_diffusers_folder(src, tmp_path / "o")
    (src / "config.json").write_text(json.dumps(cfg))
    st = next(src.glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        convert_diffusers_folder(src, tmp_path / "o")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_diffusers_folder(tmp_path, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_convert_autodetects_kind(tmp_path):
    pt = save_pt(tmp_path / "m.pt", official_state_dict())
    assert jdq.models.load(convert(pt, tmp_path / "a", num_heads=4))[1].source == "facebookresearch/DiT"
    with pytest.raises(CheckpointError, match="neither a checkpoint file nor a diffusers folder"):
        convert(tmp_path / "nothing", tmp_path / "b")
