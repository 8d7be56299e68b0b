"""The tuning tables' lookup and the ``JDQ_TUNING`` overrides used for A / B measurements."""

import pytest

from jdq.kernels import tuning


def test_lookup_picks_the_first_row_that_fits_and_names_unknown_ops():
    assert tuning.lookup("fp8_attention", 256, device="default")["block_kv"] == 64
    assert tuning.lookup("fp8_attention", 4096, device="default")["block_kv"] == 128
    with pytest.raises(KeyError, match="no tuning table"):
        tuning.lookup("nope", 1)


def test_jdq_tuning_overrides_the_chosen_row(monkeypatch):
    base = tuning.lookup("quant_attention_split", 256, device="default")
    monkeypatch.setenv("JDQ_TUNING", "quant_attention_split.keep_logits=False, quant_attention.stages=3")
    got = tuning.lookup("quant_attention_split", 256, device="default")
    assert got == {**base, "keep_logits": False} and base["keep_logits"] is True
    assert tuning.lookup("quant_attention", 256, device="default")["stages"] == 3
    assert tuning.TABLES["quant_attention"]["default"][0][1]["stages"] == 2  # the table itself is untouched


@pytest.mark.parametrize("spec,match", [("keep_logits=False", "not op.key=value"), ("nope.a=1", "names no tuning table"),
                                        ("w8a8.stages=three", "not a Python literal")])
def test_bad_overrides_are_named(spec, match):
    with pytest.raises(ValueError, match=match):
        tuning.overrides(spec)
