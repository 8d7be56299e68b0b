"""The ViDiT-Q and MixDQ recipe functions: plans, per-range balancing state, the budget-split search, act protection."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdq
from jdq import quant as Q
from jdq.recipes import mixdq, vidit_q


@functools.cache
def embedded():
    m, _ = jdq.models.load(Path(jdq.__file__).parent / "assets" / "animal_dit")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 28, 28, 1)), jnp.float32)
    args = (x, jnp.asarray([900.0, 100.0]), jnp.asarray([1, 2], jnp.int32))
    ops = Q.trace_operands(m.apply, m.params, *args)
    _, st = Q.collect_stats(m.apply, m.params, *args)
    # two "steps": the second with 3x larger activations (weights unchanged)
    scaled = {k: v if k.endswith(":weight") else jax.tree.map(lambda a: 3 * a, v) for k, v in st.items()}
    return m, args, ops, Q.stack_stats([st, scaled])


@pytest.mark.slow
def test_vidit_q_plans_follow_the_paper():
    m, args, ops, stats = embedded()
    assert vidit_q.balance_of(8, 8, None, None)[0] == "none"
    assert vidit_q.balance_of(6, 6, None, None) == ("static", 0.625)
    assert vidit_q.balance_of(4, 8, None, None) == ("timestep", 0.11)
    plan = Q.resolve(vidit_q.rules(wbits=4, abits=8, timesteps=(999.0, 0.0)) + [Q.keep_float("*")], ops)
    assert plan.transform_for("blocks.0.adaLN_modulation:weight") is None  # the FP skip list
    assert plan.transform_for("blocks.0.attn.qk:q") is None  # attention matmuls in float
    state, params = vidit_q.prepare(plan, stats, m)
    s = np.asarray(state["blocks.0.mlp.fc1:act"]["s"])
    assert s.shape == (2, 160)  # one smoothing vector per time range
    # range 1 (t = 999) saw 3x smaller activations than range 0 (t = 0): s scales by 3^alpha
    np.testing.assert_allclose(s[0] / s[1], 3.0**0.11, rtol=1e-4)
    q = plan.bind(state)
    for step in (0, 1):  # a forward pass at either step runs and stays close to float (W4A8)
        out = m.apply(params, *args, quant=q.at_step(step, 2))
        ref = m.apply(params, *args)
        assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.3
    plan8 = Q.resolve(vidit_q.rules() + [Q.keep_float("*")], ops)
    assert not any(find for k in plan8.quantized_keys for find in Q.find_stages(plan8.transform_for(k).meta, None,
                                                                                   "balance"))


def sensitivity(n_content=6, n_quality=6, seed=0):
    """A synthetic ``jdq sensitivity`` result: scores rise with bits, sensitivity varies per unit."""
    rng = np.random.default_rng(seed)
    units = {}
    for i in range(n_content + n_quality):
        content = i < n_content
        name, metric = f"blocks.{i}.{'mlp.fc1' if content else 'attn.qkv'}", "ssim" if content else "sqnr"
        sens = rng.uniform(0.1, 1.0)
        score = (lambda b: 1 - sens * 2.0**-b) if content else (lambda b: 6.0 * b - 10 * sens)
        units[name] = {"metric": metric, "group": "ffn" if content else "attention", "sites": [name],
                       "weight_size": int(rng.integers(1, 10)) * 1000, "act_size": 100,
                       "weight": {str(b): {metric: score(b)} for b in (2, 4, 8)},
                       "act": {str(b): {metric: score(b) - sens} for b in (4, 8)}}
    return {"units": units}


def test_mixdq_budget_split_and_candidates():
    r = 0.8
    for bc, bq in mixdq.budget_splits(3.66, r):  # the split keeps the overall mean at B̄
        assert 4 <= bq <= 8 and 2 <= bc <= 8
        avg = (bc * r + bq) / (1 + r)
        assert 3.36 - 1e-9 <= avg <= 3.66 + 1e-9
    sens = sensitivity()
    units = sens["units"]
    cands = mixdq.weight_candidates(sens, 4.0)
    assert cands
    for c in cands:
        sizes = {n: units[n]["weight_size"] for n in c}
        assert 4.0 - 0.3 - 0.02 <= sum(c[n] * sizes[n] for n in c) / sum(sizes.values()) <= 4.0 + 0.02
        for n, b in c.items():
            assert b in ((2, 4, 8) if units[n]["metric"] == "ssim" else (4, 8))
    assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)  # distinct


def test_mixdq_act_protect_and_allocation():
    sens = sensitivity(n_content=10, n_quality=10)
    budget = (2 * 4 + 7 * 8) / 9  # 9 equal layers left per group: two at 4 bits
    got = mixdq.act_assignment(sens, budget, protect=0.01)
    units = sens["units"]
    for metric in ("ssim", "sqnr"):
        names = [n for n, u in units.items() if u["metric"] == metric]
        worst = min(names, key=lambda n: units[n]["act"]["8"][metric])
        assert got[worst] == 0  # ceil(1 % of 10) = 1 layer of each group kept in float
        rest = [n for n in names if n != worst]
        mean = sum(got[n] * units[n]["act_size"] for n in rest) / sum(units[n]["act_size"] for n in rest)
        assert abs(mean - budget) <= 0.02 and {got[n] for n in rest} <= {4, 8}


@pytest.mark.slow
def test_vidit_q_mp_assignment_respects_the_budget():
    sens = sensitivity()
    got = vidit_q.mp_assignment(sens, 6.0)
    units = sens["units"]
    for metric in ("ssim", "sqnr"):
        names = [n for n, u in units.items() if u["metric"] == metric]
        mean = sum(got[n] * units[n]["weight_size"] for n in names) / sum(units[n]["weight_size"] for n in names)
        assert abs(mean - 6.0) <= 0.02 and {got[n] for n in names} <= {4, 8}
    m, args, ops, stats = embedded()
    wb = {"blocks.0.mlp.fc1": 8}
    plan = Q.resolve(vidit_q.rules(wbits=4, abits=8, balance="none", weight_bits=wb) + [Q.keep_float("*")], ops)
    assert plan.transform_for("blocks.0.mlp.fc1:weight").meta.spec.bits == 8
    assert plan.transform_for("blocks.1.mlp.fc1:weight").meta.spec.bits == 4
    with pytest.raises(ValueError, match="sensitivity="):
        vidit_q.tune(m, stats, None, None, dict(vidit_q.OPTIONS, mp_budget=4.5))


@functools.cache
def tiny():
    """A one-block random DiT, a 2-step DDIM sampler, two labels and their calibration statistics."""
    from jdq.models import dit
    from jdq.recipes.core import calibration_stats, model_operands
    from jdq.sampling.generate import resolve_sampler

    cfg = dit.Config(input_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    m = dit.from_config(cfg, key=1)
    sampler = resolve_sampler(m, "ddim", 2)
    labels = jnp.asarray([0, 2], jnp.int32)
    sites = [o.site for o in model_operands(m, labels) if o.role == "weight" and o.site.startswith("blocks.")]
    return m, sampler, labels, sites, calibration_stats(m, sampler, labels)


@pytest.mark.slow  # ~10-30 s on 2 shared cores: two compiled ranking samplers
def test_pixel_mse_ranking_picks_the_argmin():
    """Constructed answers: all-8-bit weights beat all-2-bit ones; float activations (and weights) are exact."""
    m, sampler, labels, sites, stats = tiny()
    w2, w8 = {s: 2 for s in sites}, {s: 8 for s in sites}
    mixed = dict(w8, **{sites[-1]: 2})
    best, mses = mixdq.rank_by_pixel_mse(m, sampler, labels, [w2, w8, mixed], samples=2)
    assert best == int(np.argmin(mses)) == 1 and mses[1] < mses[2] < mses[0]
    a4, a8, fp = ({s: b for s in sites} for b in (4, 8, 0))
    best, mses = mixdq.rank_by_pixel_mse(m, sampler, labels, [a4, a8, fp], side="act", stats=stats, samples=2)
    assert best == 2 and mses[2] <= 1e-3 * mses[1] < mses[1] < mses[0]
    with pytest.raises(ValueError, match="statistics"):
        mixdq.rank_by_pixel_mse(m, sampler, labels, [a4], side="act", samples=2)
    with pytest.raises(ValueError, match="not one of"):
        mixdq.rank_by_pixel_mse(m, sampler, labels, [{sites[0]: 7}], samples=2)


@pytest.mark.slow  # ~20-40 s on 2 shared cores
def test_tune_records_both_rankings(tmp_path):
    """``tune`` ranks the weight candidates, then the activation candidates with the weights fixed, and records both."""
    m, sampler, labels, sites, stats = tiny()
    rng = np.random.default_rng(1)
    units = {}
    act_sizes = [150, 100, 250, 100, 200]  # two distinct joint solutions at 6.0 bits
    for i, s in enumerate(sites):  # sizes with two distinct paper solutions at 4.0 weight bits
        metric = "ssim" if ".mlp." in s else "sqnr"
        sens = rng.uniform(0.2, 1.0)
        score = (lambda b: 1 - sens * 2.0**-b) if metric == "ssim" else (lambda b: 6.0 * b - 10 * sens)
        units[s] = {"metric": metric, "group": "ffn" if metric == "ssim" else "attention", "sites": [s],
                    "weight_size": 1000 * (3, 5, 2, 4, 6)[i], "act_size": act_sizes[i],
                    "weight": {str(b): {metric: score(b), "sqnr": 6.0 * b - 10 * sens} for b in (2, 3, 4, 5, 6, 8)},
                    "act": {str(b): {metric: score(b) - sens, "sqnr": 6.0 * b - 11 * sens} for b in (4, 8)}}
    path = tmp_path / "s.json"
    path.write_text(__import__("json").dumps({"units": units}))
    for search, cands in (("paper", None), ("noise", (3, 4, 5, 6, 8))):
        opts = dict(mixdq.OPTIONS, mp_budget=4.0, act_budget=6.0 if search == "noise" else None,
                    act_protect=0.0 if search == "noise" else 0.2,
                    sensitivity=str(path), rank_samples=2, mp_search=search, mp_candidates=cands, rank_uniform=True)
        got = mixdq.tune(m, stats, sampler, labels, opts)
        for side in ("weight", "act") if search == "noise" else ("weight",):
            rk = got["ranking"][side]
            mses = [c["mse"] for c in rk["candidates"]]
            assert len(mses) >= 2 and rk["chosen"] == int(np.argmin(mses))
        assert set(got["weight_bits"]) == set(sites)
        if search == "noise":
            assert set(got["act_bits"]) == set(sites) and set(got["act_bits"].values()) <= {4, 8}
        else:  # ceil(20 %) of each group's layers in float, the others at the uniform abits
            assert list(got["act_bits"].values()) == [0, 0]
        w = got["ranking"]["weight"]["candidates"]
        assert w[0]["layers_per_bits"] == {"4": len(sites)}  # rank_uniform: the uniform assignment is a candidate
        assert all(c["mean_bits"] <= 4.0 + 0.02 for c in w)
        if cands:
            assert set(got["weight_bits"].values()) <= set(cands)
        # the ranked winner is no worse than uniform on the ranking samples
        assert min(c["mse"] for c in w) <= w[0]["mse"]


def timed_sensitivity(worse_group=1):
    """A time-grouped ``jdq sensitivity`` result: two units, two groups; ``worse_group`` hurts more at 4 bits."""
    units = {}
    for unit, metric, group, sites in (("blocks.0/ffn", "ssim", "ffn", ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]),
                                       ("blocks.0/attention", "sqnr", "attention", ["blocks.0.attn.qkv"])):
        for g in (0, 1):
            loss = 0.05 if g == worse_group else 0.005  # the 4-bit damage of this (unit, group)
            w = {"4": {"ssim": 1 - loss, "sqnr": 10 * np.log10(1 / loss)},
                 "8": {"ssim": 1 - 1e-4, "sqnr": 50.0}}
            units[f"{unit}@t{g}"] = {"metric": metric, "group": group, "sites": sites, "unit": unit, "time_group": g,
                                     "steps": [g], "weight_size": 1000, "act_size": 10, "weight": w}
    units["blocks.0/adaln@t0"] = {"metric": "sqnr", "group": "adaln", "sites": ["blocks.0.adaLN_modulation"],
                                  "unit": "blocks.0/adaln", "time_group": 0, "steps": [0], "weight_size": 10**6,
                                  "act_size": 10, "weight": {"4": {"sqnr": 1.0}, "8": {"sqnr": 2.0}}}
    return {"units": units}


@pytest.mark.parametrize("search", ["paper", "noise"])
@pytest.mark.parametrize("worse", [0, 1])
def test_vidit_q_time_group_that_hurts_more_gets_more_bits(search, worse):
    got = vidit_q.mp_assignment(timed_sensitivity(worse), 6.0, search=search)
    assert "blocks.0.adaLN_modulation" not in got  # kept in float by the plan: not in the budget
    for site in ("blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.0.attn.qkv"):
        assert got[site][worse] == 8 and got[site][1 - worse] == 4


@pytest.mark.slow  # ~30-70 s on 2 shared cores: a per-time-group sweep and two plans on a tiny DiT
def test_vidit_q_per_time_group_mp_end_to_end():
    """Measured per time group on a tiny DiT: the group whose 4-bit weights hurt more gets 8 bits; the plan applies it."""
    from jdq.quant import sensitivity as S
    from jdq.recipes.core import model_operands
    from jdq.sampling.generate import Denoiser, sample_shape
    from jdq.sampling.loop import sample, sample_keys

    m, sampler, labels, sites, _ = tiny()
    ops = model_operands(m, labels)
    groups = S.contiguous_groups(sampler.num_steps, 2)
    fn, shape, keys = Denoiser(m, "dit"), sample_shape(m), sample_keys(0, 2)
    draw = lambda q=None: np.asarray(sample(fn, m.params, sampler, labels, keys, shape, quant=q))  # noqa: E731
    fp = draw()
    unit = S.units(ops, "group")["blocks.0/ffn"]
    units = {}
    for bits in (4, 8):
        plan = S.sweep_plan(ops, S.SweepSpec((bits,), (8,), "row", "group"), "weight", bits, groups)
        base = plan.init({})
        for g in (0, 1):
            u = units.setdefault(f"blocks.0/ffn@t{g}", {"metric": "sqnr", "group": "ffn", "sites": list(unit),
                                                        "unit": "blocks.0/ffn", "time_group": g, "steps": [g],
                                                        "weight_size": 1000, "weight": {}})
            u["weight"][str(bits)] = {"sqnr": S.sqnr(fp, draw(plan.bind(S.switch_on(plan, base, unit, g))))}
    loss = {g: units[f"blocks.0/ffn@t{g}"]["weight"]["4"]["sqnr"] for g in (0, 1)}
    assert loss[0] != loss[1]
    worse = min(loss, key=loss.get)  # the lower SQNR at 4 bits: quantizing that group hurts more
    got = vidit_q.mp_assignment({"units": units}, 6.0, search="noise")
    assert all(got[s][worse] == 8 and got[s][1 - worse] == 4 for s in unit)
    # the plan quantizes those weights at 8 bits during that group's step, at 4 bits in the other
    rules = lambda wb: vidit_q.rules(wbits=4, abits=8, balance="none", steps=2, weight_bits=wb)  # noqa: E731
    mp = Q.resolve(rules(got) + [Q.keep_float("*")], ops)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + shape), jnp.float32)
    for step in (0, 1):
        fixed = Q.resolve(rules({s: got[s][step] for s in unit}) + [Q.keep_float("*")], ops)
        a = fn(m.params, x, jnp.full((2,), 500.0), labels, quant=mp.bind(mp.init({})).at_step(step, 2))
        b = fn(m.params, x, jnp.full((2,), 500.0), labels, quant=fixed.bind(fixed.init({})).at_step(step, 2))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
